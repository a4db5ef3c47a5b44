"""Every row checked against its layout before anything is converted, each problem with its row number.

    from sftlib.data.check import raise_problems
    raise_problems(rows, layout, mapping, source="`chats.jsonl`")   # DataError listing the first 10 problems

Content is kept exactly as written (nothing is stripped); content that is empty or only whitespace is an
error. Rows are numbered from 0 within the loaded split.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import datasets

from sftlib.data.detect import DEFAULT_ROLE_NAMES, DataError, Layout, formats_of, pick, present_keys, role_of


MAX_SHOWN = 10  # problems listed in one error; the total count is always given


def text_problem(value: Any, where: str) -> str | None:
    if value is None:
        return f"{where} is missing"
    if not isinstance(value, str):
        return f"{where} must be a string, got {type(value).__name__}"
    if not value.strip():
        return f"{where} is empty" + (" (only whitespace)" if value else "")
    return None



def row_problem(row: Mapping, lay: Layout, custom: dict[str, str], unknown: set | None = None) -> str | None:
    """What is wrong with one row, in the user's terms, or None. Only the first problem of a row is reported;
    unknown role names are added to `unknown` so that one piece of advice can cover them all."""
    if lay.format == "text":
        return text_problem(row.get(lay.column), f"`{lay.column}`")
    if lay.format == "alpaca":
        for key in (lay.instruction, lay.output):
            problem = text_problem(row.get(key), f"`{key}`")
            if problem:
                return problem
        extra = row.get(lay.input)
        if extra is not None and not isinstance(extra, str):
            return f"`{lay.input}` must be a string, got {type(extra).__name__}"
        return None

    col = lay.column
    turns = row.get(col)
    if turns is None:
        return f"`{col}` is missing"
    if not isinstance(turns, list):
        hint = ("; a CSV cell holds only text: store conversations as JSON Lines or parquet, each a list of "
                f"objects with `{lay.role_keys[0]}` and `{lay.content_keys[0]}`" if isinstance(turns, str) else "")
        return f"`{col}` must be a list of turns, got {type(turns).__name__}{hint}"
    if not turns:
        return f"`{col}` is an empty list: drop the row"
    role = None
    has_assistant = False
    for j, turn in enumerate(turns):
        where = f"`{col}[{j}]`"
        if not isinstance(turn, Mapping):
            return (
                f"{where} must be an object with `{lay.role_keys[0]}` and `{lay.content_keys[0]}`, "
                f"got {type(turn).__name__}"
            )
        name, role_key = pick(turn, lay.role_keys)
        if name is None:
            return f"{where} has no `{role_key}`: name the key that holds the role with `data.mapping.role`"
        if not isinstance(name, str):
            return f"`{col}[{j}].{role_key}` must be a role name (text), got {type(name).__name__}"
        role = role_of(name, custom)
        if role is None:
            if unknown is not None:  # every unknown name in the row, for the advice under the list
                unknown.update(n for n in (pick(t, lay.role_keys)[0] for t in turns if isinstance(t, Mapping))
                               if isinstance(n, str) and role_of(n, custom) is None)
            return f"`{col}[{j}].{role_key}` is {name!r}, not a known role"
        content, content_key = pick(turn, lay.content_keys)
        problem = text_problem(content, f"`{col}[{j}].{content_key}`")
        if problem:
            return problem
        if role == "system" and j > 0:
            return f"{where} is a system turn after the first turn; only the first turn may be a system prompt"
        has_assistant = has_assistant or role == "assistant"
    if not has_assistant:
        return "has no assistant turn, so there is nothing to train on: drop the row"
    if role != "assistant":
        return (
            f"ends on a {role} turn (`{col}[{len(turns) - 1}]`); the last turn must be the assistant's: "
            "drop the trailing turn"
        )
    return None


def iter_rows(rows: Any):
    if isinstance(rows, datasets.Dataset):
        # Batches decode much faster than single rows.
        for batch in rows.iter(batch_size=1000):
            names = list(batch)
            for values in zip(*batch.values()):
                yield dict(zip(names, values))
    else:
        yield from rows


def raise_problems(rows: Any, lay: Layout, mapping: dict, source: str | None) -> None:
    """Check every row; raise one DataError listing the first `MAX_SHOWN` problems and how many rows have one."""
    custom = dict(lay.custom_roles)
    where = source or "the data"
    shown: list[str] = []
    count = 0
    unknown: set[str] = set()
    for i, row in enumerate(iter_rows(rows)):
        if all(row.get(key) is None for key in lay.keys):
            # Nothing of this layout here: if the row fits another one, the file mixes layouts.
            others = [f for f in formats_of(row, mapping) if f != lay.format]
            if others:
                keys = ", ".join(f"`{k}`" for k in present_keys(row))
                raise DataError(
                    f"{where}: row {i} is in the `{others[0]}` format (keys {keys}) but the data was read as "
                    f"`{lay.format}` (from row 0 or `data.format`); one dataset must use one format: convert the "
                    "odd rows or split the file"
                )
        problem = row_problem(row, lay, custom, unknown)
        if problem:
            count += 1
            if len(shown) < MAX_SHOWN:
                shown.append(f"  row {i}: {problem}")
    if not count:
        return
    head = f"{where} ({lay.format} format): {count} row{'s have' if count != 1 else ' has'} problems"
    if count > len(shown):
        head += f"; the first {len(shown)}"
    lines = [head + ":", *shown]
    if unknown:
        names = sorted(map(str, unknown))
        known = ", ".join(dict.fromkeys([*DEFAULT_ROLE_NAMES, *custom]))
        lines.append(
            f"  unknown role names: {', '.join(repr(n) for n in names)} (known: {known}); give each one a role with "
            f'`data.mapping`, e.g. {{"assistant": "{names[0]}"}} or {{"user": "{names[0]}"}}, or drop such turns'
        )
    raise DataError("\n".join(lines))


