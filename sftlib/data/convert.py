"""Rows of one layout turned into one `messages` column (or `text`), after every row is checked.

    from sftlib.data.convert import to_messages
    ds = to_messages(rows)        # [{"role": "system"|"user"|"assistant", "content": str}, ...] per row

Chat layouts are checked and converted by Arrow, batch by batch, where every row of a batch is a plain
list of turns that passes the checks (100,000 rows in well under a second); any other batch goes
through the Python checks, which name the row and the fix.
"""

from __future__ import annotations

import difflib
import functools
import warnings
from collections.abc import Mapping
from typing import Any

import datasets

from sftlib.data.check import raise_problems
from sftlib.data.detect import FORMATS, DataError, Layout, check_mapping, detect_format, layout_for, pick, role_of
from sftlib.data.load import load_rows
from sftlib.data.refuse import refuse_preference, refuse_tool_calls


ARROW_BATCH_ROWS = 10_000  # rows per batch that Arrow checks and converts (see `arrow_messages`)


def convert_batch(batch: dict[str, list], lay: Layout) -> dict[str, list]:
    """Rows of one layout -> `messages` (or `text`). Pure, and only ever sees rows that passed the checks."""
    if lay.format == "text":
        return {"text": batch[lay.column]}
    if lay.format == "alpaca":
        inputs = batch.get(lay.input) or [None] * len(batch[lay.instruction])
        messages = []
        for instruction, extra, output in zip(batch[lay.instruction], inputs, batch[lay.output]):
            prompt = instruction + "\n\n" + extra if extra and extra.strip() else instruction
            messages.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": output}])
        return {"messages": messages}
    custom = dict(lay.custom_roles)
    return {
        "messages": [
            [
                {"role": role_of(pick(turn, lay.role_keys)[0], custom), "content": pick(turn, lay.content_keys)[0]}
                for turn in turns
            ]
            for turns in batch[lay.column]
        ]
    }


def convert_table(table: Any, lay: Layout, features: datasets.Features) -> Any:
    """`convert_batch` for a pyarrow batch: Arrow builds the `messages` column where `arrow_messages` can."""
    import pyarrow as pa

    messages = arrow_messages(table, lay, features)
    if messages is None:  # the rows as `Dataset.map` would have given them to `convert_batch`
        from datasets.formatting import PythonFormatter

        return convert_batch(PythonFormatter(features=features).format_batch(table), lay)
    return pa.table({"messages": messages})


@functools.lru_cache(maxsize=1)
def _non_space_pattern() -> str:
    """A regex matching one character that `str.strip()` keeps: Python's own whitespace, not a copy of it."""
    spaces = (c for c in map(chr, range(0x110000)) if c.isspace())
    return "[^" + "".join(f"\\x{{{ord(c):x}}}" for c in spaces) + "]"


def arrow_messages(table: Any, lay: Layout, features: datasets.Features) -> Any:
    """The `messages` column `convert_batch` would give, built by Arrow, when every row of this batch of chat rows is
    a plain list of turns that passes every check of `row_problem`; else None (the Python checks and conversion
    then decide). For 100,000 rows this is well under a second; checking each row in Python took seconds."""
    import pyarrow as pa
    import pyarrow.compute as pc

    feature = features.get(lay.column)
    if lay.format not in ("sharegpt", "openai") or not (isinstance(feature, datasets.List)
                                                        and isinstance(feature.feature, dict)):
        return None  # e.g. a legacy Sequence column reads as a dict of lists in Python, which the checks refuse
    col = table.column(lay.column).combine_chunks()
    if not pa.types.is_list(col.type) or not pa.types.is_struct(col.type.value_type) or col.null_count:
        return None
    offsets = pc.subtract(col.offsets, col.offsets[0])  # this batch may be a slice
    turns = col.flatten()
    if len(col) == 0 or turns.null_count or pc.min(pc.list_value_length(col)).as_py() < 1:
        return None
    children = turns.flatten()

    def pick(keys: tuple[str, ...]):  # `pick`: the first key with a value
        fields = [children[turns.type.get_field_index(k)] for k in keys if turns.type.get_field_index(k) >= 0]
        if not fields or any(f.type != pa.string() for f in fields):
            return None
        return fields[0] if len(fields) == 1 else pc.coalesce(*fields)

    names, contents = pick(lay.role_keys), pick(lay.content_keys)
    if names is None or contents is None or names.null_count or contents.null_count:
        return None
    distinct = pc.unique(names)
    known = [role_of(name, dict(lay.custom_roles)) for name in distinct.to_pylist()]
    if None in known or not pc.all(pc.match_substring_regex(contents, _non_space_pattern())).as_py():
        return None
    roles = pa.array(known, pa.string()).take(pc.index_in(names, value_set=distinct))
    system = pc.equal(roles, "system")
    first = offsets[:-1]
    if (pc.sum(system).as_py() or 0) != (pc.sum(system.take(first)).as_py() or 0):
        return None  # a system turn after the first turn
    if not pc.all(pc.equal(roles.take(pc.subtract(offsets[1:], 1)), "assistant")).as_py():
        return None  # a row that does not end on the assistant's turn
    return pa.ListArray.from_arrays(offsets, pa.StructArray.from_arrays([roles, contents], names=["role", "content"]))


def arrow_checks_pass(ds: datasets.Dataset, lay: Layout) -> bool:
    """True when Arrow shows that `raise_problems` would find nothing (False: it has to look)."""
    return all(arrow_messages(batch, lay, ds.features) is not None
               for batch in ds.with_format("arrow").iter(batch_size=ARROW_BATCH_ROWS))


def warn_dropped(columns: list[str], lay: Layout, source: str | None) -> None:
    """One warning per conversion naming the columns that conversion leaves out (not the layout's own keys)."""
    dropped = [c for c in columns if c not in lay.keys]
    if dropped:
        names = ", ".join(f"`{c}`" for c in dropped)
        warnings.warn(
            f"{source or 'the data'}: the column{'s' if len(dropped) > 1 else ''} {names} "
            f"{'are' if len(dropped) > 1 else 'is'} not part of the {lay.format} format and "
            f"{'are' if len(dropped) > 1 else 'is'} not trained on (dropped when converting)",
            stacklevel=3,
        )


MESSAGES_FEATURES = datasets.Features(
    {"messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})}
)
TEXT_FEATURES = datasets.Features({"text": datasets.Value("string")})


def to_messages(
    ds: Any, format: str = "auto", mapping: Mapping | None = None, *, source: str | None = None
) -> datasets.Dataset:
    """One column out: `messages` ([{"role": "system"|"user"|"assistant", "content": str}, ...]) for the chat
    formats and alpaca, or `text` for raw text. Every row is checked first (see the module docstring).

    `format`: "auto" (from row 0's keys) or one of FORMATS. `mapping`: other key and role names.
    `source`: how to name the data in error messages, e.g. the file path.
    """
    m = check_mapping(mapping)
    if format not in ("auto", *FORMATS):
        close = difflib.get_close_matches(str(format), FORMATS, n=1)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        raise DataError(f"`data.format` must be auto, {', '.join(FORMATS)}; got {format!r}{hint}")
    if not isinstance(ds, datasets.Dataset):
        ds = load_rows(ds)
    if len(ds) == 0:
        raise DataError(f"{source or 'the data'} has no rows")
    refuse_preference(ds, m, source)  # before detection: pairs often fit no layout, and the error should say why
    try:
        fmt = detect_format(ds, m) if format == "auto" else format
        lay = layout_for(fmt, m, ds.column_names)
    except DataError as e:
        raise DataError(f"{source}: {e}" if source else str(e)) from None
    refuse_tool_calls(ds, lay, source)
    arrow = fmt in ("sharegpt", "openai") and ds.format["type"] is None  # a formatted dataset maps as it is
    if not (arrow and arrow_checks_pass(ds, lay)):
        raise_problems(ds, lay, m, source)
    warn_dropped(ds.column_names, lay, source)
    if arrow:  # converted by Arrow, batch by batch
        return ds.with_format("arrow").map(
            functools.partial(convert_table, lay=lay, features=ds.features),
            batched=True,
            batch_size=ARROW_BATCH_ROWS,
            remove_columns=ds.column_names,
            features=MESSAGES_FEATURES,
            desc=f"{fmt} -> messages",
        ).with_format(None)
    return ds.map(
        functools.partial(convert_batch, lay=lay),
        batched=True,
        remove_columns=ds.column_names,
        features=TEXT_FEATURES if fmt == "text" else MESSAGES_FEATURES,
        desc=f"{fmt} -> {'text' if fmt == 'text' else 'messages'}",
    )


