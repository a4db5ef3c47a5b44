"""Rows far too long for `model.max_seq_length`, refused before anything is tokenized.

    from sftlib.data.length import refuse_overlong
    refuse_overlong(train_ds, max_length=2048, source="`chat.jsonl`")   # DataError naming the row

A row is refused when it has more than CHARS_PER_TOKEN characters for each token `model.max_seq_length`
allows. Tokenizers of the models sftlib trains average 3 to 5 characters per token on prose and code, and
even runs of spaces rarely pack more than 16 into one token, so such a row holds at least (usually more than
ten times) the tokens training keeps: training would see a small start of it and drop the rest. That is
rarely a conversation; it is a file pasted into a field, or a JSON Lines file whose line breaks were lost.
Counting characters takes a moment on Arrow columns, where tokenizing a 50 MB row takes minutes.
"""

from __future__ import annotations

import numpy as np

from sftlib.data.detect import DataError

CHARS_PER_TOKEN = 64  # above every tokenizer's longest usual token: a refused row cannot fit the limit


def row_characters(ds) -> np.ndarray:
    """Characters of each row: the `text`, or the sum of the turns' `content` of `messages`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = ds.with_format("arrow")[:]
    if "messages" in table.column_names:
        turns = table.column("messages").combine_chunks()
        if isinstance(turns, pa.ChunkedArray):  # an empty table
            return np.zeros(len(ds), dtype=np.int64)
        content = pc.fill_null(pc.utf8_length(turns.flatten().field("content")), 0).to_numpy(zero_copy_only=False)
        parents = pc.list_parent_indices(turns).to_numpy(zero_copy_only=False)
        return np.bincount(parents, weights=content, minlength=len(turns)).astype(np.int64)
    if "text" in table.column_names:
        return pc.fill_null(pc.utf8_length(table.column("text")), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.zeros(len(ds), dtype=np.int64)


def refuse_overlong(ds, max_length: int, source: str | None = None, split: str = "training") -> None:
    """DataError when a row has more than CHARS_PER_TOKEN x `max_length` characters (see the module's text)."""
    if ds is None or not len(ds) or not isinstance(max_length, int) or max_length < 1:
        return
    chars = row_characters(ds)
    bound = CHARS_PER_TOKEN * max_length
    over = np.flatnonzero(chars > bound)
    if not len(over):
        return
    i = int(over[np.argmax(chars[over])])
    row = ds[i]
    start = row["text"] if "text" in row else next((m["content"] for m in row["messages"] if m.get("content")), "")
    start = " ".join(str(start)[:40].split())
    more = f" ({len(over)} rows in all)" if len(over) > 1 else ""
    raise DataError(
        f"{source or 'the data'}: row {i} of the {split} rows (starting {start!r}) has {int(chars[i]):,} characters, "
        f"about {int(chars[i]) // 4:,} tokens at a usual 4 characters per token, against `model.max_seq_length` "
        f"{max_length}{more}: training would keep only its start. Such a row is usually a file pasted into one "
        f"field or JSON Lines whose line breaks were lost. Fix: drop it or split it into conversations of at most "
        f"about {4 * max_length:,} characters (rows over {bound:,} characters, {CHARS_PER_TOKEN} per allowed token, are "
        "refused before tokenizing)")
