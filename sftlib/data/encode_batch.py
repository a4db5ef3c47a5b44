"""A whole dataset of conversations to token ids and loss labels, fast: what `encode_conversation` gives, row for row.

    from sftlib.data import encode_dataset
    rows = encode_dataset(ds, tokenizer, template, train_on="assistant", max_length=2048)
    rows["input_ids"], rows["labels"], rows["truncated"]

Same rows and the same errors (naming the row) as sftlib.data.encode.encode_conversation, but on
batches: in a worker thread the Rust tokenizer takes a thousand texts per call on every core, while
Python renders the next thousand and turns the last into arrays; masks, BOS and truncation are numpy;
the columns go to Arrow without per-row lists. With `train_on="all"` and a built-in template it renders
each conversation once (no prompt renders: their checks cannot fail for these templates, see
`render_whole`) and asks for no character offsets: the rows where a token crosses an answer's start
(sftlib.data.boundary) are found by asking the tokenizer about the token at the end of each
`assistant_prefix` in the text, and only those rows are rendered and tokenized again, cut there. With
`train_on="assistant"` and a built-in template the answers' starts are found the same way (`_marked_spans`,
prompt renders only where a message quotes the marker), and the masks ask the tokenizer only about the
tokens at each answer's two ends (`_masked_from_encodings`), not for every token's offsets. On 2 cores the
tokenizer itself is then most of the time (benchmarks/data_prep_bench.py and its results say how much).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from sftlib.data.boundary import crosses, marker_ends, prepends_space, straddled, tokenize_cut
from sftlib.data.encode import (IGNORE, EncodeError, NoTemplate, adds_bos, bos_prefix, encode_conversation,
                                mask_labels, render_whole, trained_spans)

BATCH_ROWS = 16384  # rows per `Dataset.map` batch: few batch boundaries, where Python and Rust cannot overlap
CHUNK_ROWS = 1024  # texts per tokenizer call: Rust tokenizes one chunk while Python renders the next


def encode_dataset(dataset, tokenizer, template, *, train_on: str = "assistant", max_length: int | None = None,
                   num_proc: int | None = None):
    """Map a `messages` (or `text`) dataset to `input_ids`, `labels`, `truncated` columns.

    Row for row what `encode_conversation` gives, errors included (as `EncodeError("row N: ...")`).
    One process (the default) is fastest: the Rust tokenizer then uses every core. With `num_proc` > 1
    each worker tokenizes alone, as TOKENIZERS_PARALLELISM says."""
    column = "messages" if "messages" in dataset.column_names else "text"
    adds_bos(tokenizer)  # once, here, rather than in every worker
    # Batches as Arrow tables: their rows become Python objects chunk by chunk, while Rust tokenizes.
    arrow = dataset.format["type"] is None  # (a dataset with a format of its own is mapped as it is)
    features = dataset.features

    def fn(batch, indices):
        return _encode_batch(batch, indices, tokenizer, template, column, train_on, max_length, features)

    with _rust_threads(num_proc):
        out = (dataset.with_format("arrow") if arrow else dataset).map(
            fn, batched=True, batch_size=BATCH_ROWS, with_indices=True, num_proc=num_proc,
            remove_columns=dataset.column_names, features=_features(), desc="Tokenizing")
    return out.with_format(None) if arrow else out


def _features():
    """The types `datasets` gave the per-row version's columns (it stores a column named input_ids as int32)."""
    import datasets

    return datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                              "labels": datasets.List(datasets.Value("int64")), "truncated": datasets.Value("bool")})


@contextlib.contextmanager
def _rust_threads(num_proc: int | None):
    """TOKENIZERS_PARALLELISM=true for this call, then as it was. Not in `num_proc` workers (they share
    the cores) and not in a child process: a forked child must not start Rust's thread pool again."""
    import multiprocessing

    child = multiprocessing.parent_process() is not None
    with contextlib.suppress(ImportError):
        import multiprocess  # what `datasets` starts its workers with

        child = child or multiprocess.parent_process() is not None
    if (num_proc or 1) > 1 or child:
        yield
        return
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _rust_tokenizer(tokenizer):
    """The `tokenizers.Tokenizer` whose `encode_batch` gives exactly the ids and offsets that
    `tokenizer(text, add_special_tokens=False)` gives, or None where the class or its state could change
    them (then the tokenizer's own batched call is used)."""
    from transformers import PreTrainedTokenizerFast

    if not isinstance(tokenizer, PreTrainedTokenizerFast) or hasattr(tokenizer, "_switch_to_input_mode"):
        return None
    for name in ("__call__", "_call_one", "encode_plus", "_encode_plus", "batch_encode_plus", "_batch_encode_plus"):
        if getattr(type(tokenizer), name, None) is not getattr(PreTrainedTokenizerFast, name, None):
            return None
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return None  # the call would switch these off first
    if backend.encode_special_tokens != bool(getattr(tokenizer, "split_special_tokens", False)):
        return None
    return backend


def _encode_batch(batch, indices: list[int], tokenizer, template, column: str, train_on: str,
                  max_length: int | None, features):
    """One `Dataset.map` batch (a pyarrow table, or a dict of Python lists): a pyarrow table of the rows
    `encode_conversation` would give."""
    import pyarrow as pa
    from datasets.formatting import PythonFormatter

    from sftlib.data.templates import TEMPLATES

    def rows(first: int, stop: int) -> list:  # what `Dataset.map` would have handed over, for these rows
        if isinstance(batch, pa.Table):
            return PythonFormatter(features=features).format_column(batch.select([column]).slice(first, stop - first))
        return batch[column][first:stop]

    values = rows(0, len(indices)) if column == "text" else None
    odd_text = column == "text" and (tokenizer.eos_token_id is None or not all(isinstance(v, str) for v in values))
    if odd_text or (max_length is not None and type(max_length) is not int):
        values = rows(0, len(indices)) if values is None else values
        return _reference_batch(values, indices, tokenizer, template, column, train_on, max_length)
    masked = column == "messages" and train_on != "all"
    if column == "text":
        head, tail, label_head = bos_prefix(tokenizer, NoTemplate), [tokenizer.eos_token_id], None
    else:
        head, tail = bos_prefix(tokenizer, template), []
        label_head = [IGNORE] * len(head) if masked else None  # None: labels are the input ids
    built_in = column == "messages" and template in TEMPLATES.values()
    whole_only = built_in and not masked
    special = (tokenizer.bos_token or "", tokenizer.eos_token or "")
    eot = template.end_of_turn_text(tokenizer.eos_token)
    backend = _rust_tokenizer(tokenizer)
    splits = column == "messages" and not prepends_space(tokenizer)  # see sftlib.data.boundary
    parts = []

    def finish(future, spans, texts, chunk, chunk_indices):
        out = future.result()
        if masked and isinstance(out, list):  # Rust's Encodings: masks from the tokens at the spans' ends
            out_ids, mask = _masked_from_encodings(out, texts, spans, splits, tokenizer)
            n = np.fromiter(map(len, out_ids), np.int64, len(out_ids))
            body = np.fromiter(itertools.chain.from_iterable(out_ids), np.int64, int(n.sum()))
            mask = mask(body, n)
        else:
            n, body, mask = _ids_and_mask(out, texts, spans, chunk, chunk_indices, masked, splits)
        sizes, ids = _frame(body, n, head, tail)
        labels = None
        if masked:
            labels = _frame(mask, n, label_head, tail)[1]
        truncated = sizes > max_length if max_length is not None else np.zeros(len(n), bool)
        if truncated.any():
            # what `x[:max_length]` keeps, negative `max_length` included
            kept = np.maximum(np.minimum(sizes, max_length) if max_length >= 0 else sizes + max_length, 0)
            keep = np.ones(len(ids), bool)
            row_starts = _starts(sizes)
            for r in np.flatnonzero(truncated):
                keep[row_starts[r] + kept[r]: row_starts[r] + sizes[r]] = False
            ids, labels, sizes = ids[keep], (labels[keep] if labels is not None else None), kept
        parts.append((sizes, ids, labels, truncated))

    def _ids_and_mask(out, texts, spans, chunk, chunk_indices, masked, splits):
        """(row lengths, ids, mask or None) from character offsets (the tokenizer's own call, or no mask)."""
        cut_rows = splits and masked
        out_ids, out_offsets = _ids_and_offsets(out, masked)
        if splits and not masked:
            out_ids = _cut_unmasked(out, out_ids, texts, spans, chunk, chunk_indices, tokenizer, template,
                                    template.assistant_prefix if whole_only else None)
        text_lengths = np.fromiter(map(len, texts), np.int64, len(texts))
        while True:  # at most twice: rows with a token across an answer's start are tokenized again, as encode.py does
            n = np.fromiter(map(len, out_ids), np.int64, len(out_ids))
            body = np.fromiter(itertools.chain.from_iterable(out_ids), np.int64, int(n.sum()))
            if not masked:
                break
            flat = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(out_offsets)), np.int64,
                               2 * len(body))
            redo = _straddling_rows(n, flat[0::2], flat[1::2], spans, text_lengths) if cut_rows else []
            if not len(redo):
                break
            out_ids, out_offsets = list(out_ids), list(out_offsets)
            for r in redo:
                out_ids[r], out_offsets[r] = tokenize_cut(tokenizer, texts[r], [a for a, _ in spans[r]],
                                                          {"input_ids": out_ids[r], "offset_mapping": out_offsets[r]})
            cut_rows = False
        return n, body, (_mask_batch(body, n, flat[0::2], flat[1::2], spans, text_lengths) if masked else None)

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for first in range(0, len(indices), CHUNK_ROWS):
            texts, spans = [], []
            chunk = values[first:first + CHUNK_ROWS] if values is not None else rows(first, first + CHUNK_ROWS)
            for value, index in zip(chunk, indices[first:first + CHUNK_ROWS]):
                try:
                    if column == "text":
                        texts.append(value)
                    elif whole_only:
                        texts.append(render_whole(template, value, *special, eot))
                    elif built_in:
                        text = render_whole(template, value, *special, eot)
                        texts.append(text)
                        row_spans = _marked_spans(text, value, template, eot)
                        spans.append(row_spans if row_spans is not None else
                                     trained_spans(template, tokenizer, value)[1])
                    else:
                        text, row_spans = trained_spans(template, tokenizer, value)
                        texts.append(text)
                        spans.append(row_spans)
                except ValueError as exc:  # the template's or ours: say which row, keep the reason
                    raise EncodeError(f"row {index}: {exc}") from exc
            submitted = (pool.submit(_tokenize, tokenizer, backend, texts, masked), spans, texts, chunk,
                         indices[first:first + CHUNK_ROWS])
            if pending is not None:
                finish(*pending)  # Python turns the last chunk into arrays while Rust tokenizes this one
            pending = submitted
        if pending is not None:
            finish(*pending)

    total = sum(len(p[1]) for p in parts)
    if total >= 2**31:  # Arrow's list offsets are int32
        raise EncodeError(f"rows {indices[0]}-{indices[-1]} hold {total:,} tokens, more than one Arrow batch can; "
                          "pass `max_length` (the training sequence length)")
    # one record batch per chunk, the numpy arrays wrapped without copying them into one first
    batches = []
    for sizes, ids, labels, truncated in parts or [(np.zeros(0, np.int64), np.zeros(0, np.int64), None,
                                                    np.zeros(0, bool))]:
        offsets = pa.array(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32))
        batches.append(pa.record_batch([pa.ListArray.from_arrays(offsets, pa.array(ids.astype(np.int32))),
                                        pa.ListArray.from_arrays(offsets, pa.array(labels if masked else ids)),
                                        pa.array(truncated)], names=["input_ids", "labels", "truncated"]))
    return pa.Table.from_batches(batches)


def _tokenize(tokenizer, backend, texts: list[str], offsets: bool):
    """What `tokenizer(text, add_special_tokens=False)` gives for each text. Runs in a worker thread:
    `encode_batch` releases the GIL, so Rust tokenizes while Python renders and builds arrays."""
    if backend is not None:
        return backend.encode_batch(texts, add_special_tokens=False) if texts else []
    return tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets) if texts else None


def _marked_spans(text: str, messages: list[dict], template, eot: str) -> list[tuple[int, int]] | None:
    """`trained_spans(...)[1]` of a built-in template's rendered `text` with no prompt render, or None (then
    render them): each assistant turn's prompt is a prefix of the text ending with `assistant_prefix`
    (tests/test_templates.py holds them to it), so the answers' starts are among the ends of that marker in
    the text, one per turn; where there are exactly as many ends as assistant turns, they are the starts."""
    starts = marker_ends(text, template.assistant_prefix)
    if len(starts) != sum(m["role"] == "assistant" for m in messages):
        return None
    return [(a, text.find(eot, a) + len(eot)) for a in starts]


def _cut_unmasked(out, ids: list, texts: list[str], spans: list, chunk, chunk_indices, tokenizer, template,
                  marker: str | None) -> list:
    """`ids` with the rows where a token crosses an answer's start tokenized again as `tokenize_cut` does
    (`train_on="all"`: no offsets were asked for). `marker`: the built-in template's `assistant_prefix`,
    whose ends in the text are the candidate cuts (every prompt ends with it; `spans` is empty then), a
    crossed one sends the row to `trained_spans` for its real cuts; None: the cuts are the `spans`' starts."""
    encodings = out if isinstance(out, list) else getattr(out, "encodings", None)
    if encodings is None:  # no Encoding objects to ask: every row the exact way (only rows with cuts change)
        redo = range(len(texts))
    else:
        redo = [r for r, (encoding, text) in enumerate(zip(encodings, texts))
                if crosses(encoding, text, marker_ends(text, marker) if marker is not None else
                           [a for a, _ in spans[r]])]
    if not redo:
        return ids
    ids = list(ids)
    for r in redo:
        if marker is None:
            row_spans = spans[r]
        else:
            try:
                row_spans = trained_spans(template, tokenizer, chunk[r])[1]
            except ValueError as exc:  # render_whole accepted it, so not expected; said as the rows' errors are
                raise EncodeError(f"row {chunk_indices[r]}: {exc}") from exc
        ids[r] = tokenize_cut(tokenizer, texts[r], [a for a, _ in row_spans])[0]
    return ids


def _masked_from_encodings(encodings, texts: list[str], spans: list, splits: bool, tokenizer):
    """(ids per row, a function of (flat ids, row lengths) giving the flat labels), with no token's offsets
    read but where a row needs them. A row with a token across an answer's start is tokenized again, cut
    (`tokenize_cut`, as encode.py does). Elsewhere each span's trained tokens run from the first token holding
    its first character to the one holding its last (`_span_tokens`), which is what `mask_labels` trains
    where token starts never go backwards (byte-level BPE, SentencePiece); a row where the two questions
    cannot settle it is masked by `mask_labels` from all its offsets."""
    ids = [e.ids for e in encodings]
    ranges: list[tuple[int, int, int]] = []  # (row, first trained token, past the last)
    explicit: dict[int, list[int]] = {}
    for r, (encoding, text, row_spans) in enumerate(zip(encodings, texts, spans)):
        if not row_spans:
            continue
        cuts = [a for a, _ in row_spans]
        if splits and crosses(encoding, text, cuts):
            ids[r], offsets = tokenize_cut(tokenizer, text, cuts)
            explicit[r] = mask_labels(ids[r], offsets, row_spans)
            continue
        tokens = _span_tokens(encoding, text, row_spans)
        if tokens is None:
            explicit[r] = mask_labels(ids[r], encoding.offsets, row_spans)
        else:
            ranges.extend((r, i, j) for i, j in tokens)

    def labels(body: np.ndarray, n: np.ndarray) -> np.ndarray:
        starts = _starts(n)
        edges = np.zeros(len(body) + 1, np.int64)
        if ranges:
            at = np.array(ranges, np.int64)
            np.add.at(edges, starts[at[:, 0]] + at[:, 1], 1)
            np.add.at(edges, starts[at[:, 0]] + at[:, 2], -1)
        out = np.where(np.cumsum(edges[:-1]) > 0, body, IGNORE)
        for r, row_labels in explicit.items():
            out[starts[r]:starts[r] + n[r]] = row_labels
        return out

    return ids, labels


def _span_tokens(encoding, text: str, spans) -> list[tuple[int, int]] | None:
    """For each span (a, b): (i, j) with tokens i..j-1 the ones `mask_labels` trains for it, asking the encoding
    only about the tokens at a and b; None where that cannot be settled so (then read every offset). The first
    token holding character a is the first ending past a (token starts never go backwards); the token holding
    b - 1, a character below U+0080 (one byte, so one token holds it), is the last starting before b when the
    token after it starts at b or later. Spans must run left to right without overlapping."""
    out, last_end, count = [], 0, len(encoding)
    for a, b in spans:
        if a < last_end or b <= a or ord(text[b - 1]) >= 0x80:
            return None
        last_end = b
        i, k = encoding.char_to_token(a), encoding.char_to_token(b - 1)
        if i is None or k is None or k < i:
            return None
        if k + 1 < count and encoding.token_to_chars(k + 1)[0] < b:
            return None
        out.append((i, k + 1))
    return out


def _ids_and_offsets(out, offsets: bool) -> tuple[list, list | None]:
    """(ids, character offsets or None) per text from `_tokenize`'s result. In the main thread, so that
    the worker thread is back in Rust at once."""
    if out is None:  # no texts
        return [], [] if offsets else None
    if isinstance(out, list):  # tokenizers' Encoding objects
        return [e.ids for e in out], ([e.offsets for e in out] if offsets else None)
    return out["input_ids"], (out["offset_mapping"] if offsets else None)


def _starts(sizes: np.ndarray) -> np.ndarray:
    """Where each row starts in the flat array of all rows."""
    starts = np.zeros(len(sizes), np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    return starts


def _frame(body: np.ndarray, n: np.ndarray, head: list[int], tail: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(sizes, flat values) of `head + row + tail` for every row of `body` (rows of lengths `n`)."""
    if not head and not tail:
        return n, body
    sizes = n + len(head) + len(tail)
    out = np.empty(int(sizes.sum()), np.int64)
    fixed = np.zeros(len(out), bool)
    row_starts = _starts(sizes)
    for where, tokens in ((row_starts, head), (row_starts + len(head) + n, tail)):
        for j, token in enumerate(tokens):
            out[where + j] = token
            fixed[where + j] = True
    out[~fixed] = body
    return sizes, out


def _mask_batch(ids: np.ndarray, n: np.ndarray, s: np.ndarray, e: np.ndarray, spans: list[list[tuple[int, int]]],
                text_lengths: np.ndarray) -> np.ndarray:
    """`mask_labels` for every row at once. `mask_labels`'s pointer into the spans only moves forward, so for token i
    it points at the first span ending after max(start of tokens 0..i): with spans sorted by end, a
    searchsorted on the running maximum. Rows are shifted apart along one axis (each by the lengths
    of the texts before it, plus one) so that one searchsorted serves the batch; a row whose spans are
    not sorted by end, or a batch with an offset outside its text, goes through `mask_labels` itself."""
    rows = len(n)
    row_of = np.repeat(np.arange(rows), n)
    shift = _starts(text_lengths + 1)
    counts = np.fromiter(map(len, spans), np.int64, rows)
    flat = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(spans)), np.int64,
                       2 * int(counts.sum()))
    span_row = np.repeat(np.arange(rows), counts)
    a, b = flat[0::2] + shift[span_row], flat[1::2] + shift[span_row]
    unsorted = np.zeros(rows, bool)
    same_row = span_row[1:] == span_row[:-1]
    unsorted[span_row[1:][same_row & (b[1:] < b[:-1])]] = True
    in_text = (s <= text_lengths[row_of]).all()
    labels = np.full(len(ids), IGNORE, np.int64)
    if in_text:
        keep = ~unsorted[span_row]
        a, b, span_row = a[keep], b[keep], span_row[keep]
        start = s + shift[row_of]
        k = np.searchsorted(b, np.maximum.accumulate(start), side="right")
        if len(b):
            j = np.minimum(k, len(b) - 1)
            trained = (k < len(b)) & (span_row[j] == row_of) & (e + shift[row_of] > a[j]) & (start < b[j])
            labels[trained] = ids[trained]
    row_starts = _starts(n)
    for r in (np.flatnonzero(unsorted) if in_text else range(rows)):
        lo, hi = row_starts[r], row_starts[r] + n[r]
        labels[lo:hi] = mask_labels(ids[lo:hi].tolist(), list(zip(s[lo:hi].tolist(), e[lo:hi].tolist())), spans[r])
    return labels


def _straddling_rows(n: np.ndarray, s: np.ndarray, e: np.ndarray, spans: list[list[tuple[int, int]]],
                     text_lengths: np.ndarray) -> np.ndarray:
    """The rows in which a token crosses the start of a trained span (`boundary.straddled` for every row at
    once): rows shifted apart along one axis as in `_mask_batch`, a cut is crossed when the furthest end of
    the tokens starting before it lies past it. Offsets that go backwards or past their text: every row
    with spans is checked one by one."""
    rows = len(n)
    row_of = np.repeat(np.arange(rows), n)
    shift = _starts(text_lengths + 1)
    counts = np.fromiter(map(len, spans), np.int64, rows)
    cuts = np.fromiter((a for row in spans for a, _ in row), np.int64, int(counts.sum()))
    span_row = np.repeat(np.arange(rows), counts)
    start, end = s + shift[row_of], e + shift[row_of]
    if not len(cuts) or not len(start):
        return np.zeros(0, np.int64)
    if (np.diff(start) < 0).any() or (e > text_lengths[row_of]).any():
        return np.array([r for r in range(rows) if spans[r] and _row_crossed(n, s, e, r, spans[r])], np.int64)
    k = np.searchsorted(start, cuts + shift[span_row], side="left") - 1
    reach = np.maximum.accumulate(end)
    crossed = (k >= 0) & (reach[np.maximum(k, 0)] > cuts + shift[span_row])
    return np.unique(span_row[crossed])


def _row_crossed(n, s, e, r, row_spans) -> bool:
    lo = int(n[:r].sum())
    offsets = list(zip(s[lo:lo + n[r]].tolist(), e[lo:lo + n[r]].tolist()))
    return bool(straddled(offsets, [a for a, _ in row_spans]))


def _reference_batch(values, indices, tokenizer, template, column, train_on, max_length) -> dict[str, list]:
    """The per-row definition, for inputs the batch path leaves to it (text that is not a string, no EOS id,
    a `max_length` that is not an int): whatever it gives or raises is the answer."""
    out = {"input_ids": [], "labels": [], "truncated": []}
    for value, index in zip(values, indices):
        try:
            if column == "messages":
                row = encode_conversation(tokenizer, template, value, train_on=train_on, max_length=max_length)
            else:
                row = encode_conversation(tokenizer, template, text=value, max_length=max_length)
        except ValueError as exc:
            raise EncodeError(f"row {index}: {exc}") from exc
        for key in out:
            out[key].append(row[key])
    return out
