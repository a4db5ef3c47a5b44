"""Which of the four layouts rows are in, and where each layout keeps its fields.

    from sftlib.data.detect import detect_format
    detect_format(rows)                                   # "sharegpt", "openai", "alpaca" or "text"
    detect_format(rows, {"messages": "dialog"})           # with the dataset's own names

Layouts (row 0's keys pick one unless `data.format` is given):

    sharegpt  {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    openai    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    alpaca    {"instruction": "Translate", "input": "chat", "output": "cat"}      (`input` optional)
    text      {"text": "Once upon a time"}                                       (raw text: one `text` column out)

Turn keys are looked up leniently: a ShareGPT turn may also use role/content and an OpenAI turn from/value.
Role names: human/user -> user, gpt/assistant/model -> assistant, system -> system (any letter case).
`data.mapping` renames for other datasets; role entries add names and the standard ones keep working.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import datasets

from sftlib.errors import SftlibError


FORMATS = ("sharegpt", "openai", "alpaca", "text")
ROLES = ("system", "user", "assistant")
MAPPING_KEYS = ("messages", "role", "content", "user", "assistant", "system", "instruction", "input", "output", "text")

DEFAULT_ROLE_NAMES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
}


class DataError(SftlibError):
    """Training data that cannot be used as given; the message names the file, row and field, and the fix."""


def check_mapping(mapping: Any) -> dict[str, Any]:
    """`data.mapping`, checked; role entries become tuples of names."""
    if not mapping:
        return {}
    if not isinstance(mapping, Mapping):
        raise DataError(
            f"`data.mapping` must be a dict such as {{\"messages\": \"dialog\"}}, got {type(mapping).__name__}"
        )
    problems: list[str] = []
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if key not in MAPPING_KEYS:
            close = difflib.get_close_matches(str(key), MAPPING_KEYS, n=1)
            hint = f"did you mean `{close[0]}`?" if close else f"valid keys: {', '.join(MAPPING_KEYS)}"
            problems.append(f"unknown key `data.mapping.{key}`; {hint}")
            continue
        if key in ROLES:
            names = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else ()
            if not names or not all(isinstance(n, str) and n for n in names):
                problems.append(f"`data.mapping.{key}` must be the dataset's name for the {key} role, got {value!r}")
                continue
            out[key] = names
        elif not isinstance(value, str) or not value:
            problems.append(f"`data.mapping.{key}` must be a column or key name, got {value!r}")
        else:
            out[key] = value
    owners: dict[str, str] = {}
    for role in ROLES:
        for name in out.get(role, ()):
            if name in owners:
                problems.append(f"`data.mapping` gives the role name {name!r} to both `{owners[name]}` and `{role}`")
            owners[name] = role
    if problems:
        raise DataError("\n".join(problems))
    return out


def present_keys(row: Mapping) -> list[str]:
    return [key for key, value in row.items() if value is not None]


def formats_of(row: Mapping, mapping: dict) -> list[str]:
    """Every layout whose keys this row has (Arrow gives absent keys as None, so None counts as absent)."""
    present = set(present_keys(row))
    found = []
    if "messages" in mapping:
        if mapping["messages"] in present:
            turns = row[mapping["messages"]]
            first = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], Mapping) else {}
            found.append("sharegpt" if first.get("from") is not None else "openai")
    else:
        if "conversations" in present:
            found.append("sharegpt")
        if "messages" in present:
            found.append("openai")
    if mapping.get("instruction", "instruction") in present and mapping.get("output", "output") in present:
        found.append("alpaca")
    if mapping.get("text", "text") in present:
        found.append("text")
    return found


def first_row(rows: Any) -> Mapping:
    if isinstance(rows, datasets.Dataset):
        if len(rows) == 0:
            raise DataError("the data has no rows")
        return rows[0]
    rows = list(rows[:1]) if isinstance(rows, (list, tuple)) else list(itertools.islice(rows, 1))
    if not rows:
        raise DataError("the data has no rows")
    if not isinstance(rows[0], Mapping):
        raise DataError(f"row 0 is a {type(rows[0]).__name__}, not a dict of named fields")
    return rows[0]


def detect_format(rows: Any, mapping: Mapping | None = None) -> str:
    """"sharegpt", "openai", "alpaca" or "text", from the keys of row 0 (with `mapping`'s names, if given).

    Every later row is checked against this choice by `to_messages`, so a file that mixes layouts is caught there.
    """
    m = check_mapping(mapping)
    row = first_row(rows)
    found = formats_of(row, m)
    if len(found) == 1:
        return found[0]
    keys = ", ".join(f"`{k}`" for k in present_keys(row)) or "none with a value"
    if not found:
        note = (" (`chosen`/`rejected` look like preference (DPO) data; supervised fine-tuning needs whole "
                "conversations that end with the assistant's reply)" if {"chosen", "rejected"} <= set(row) else "")
        raise DataError(
            f"cannot tell the data format from row 0, whose keys are {keys}{note}. Expected `conversations` "
            "(sharegpt), `messages` (openai), `instruction` + `output` (alpaca) or `text` (text). Set `data.format` "
            f"to one of {', '.join(FORMATS)} and, if the names differ, `data.mapping`, e.g. "
            '{"messages": "dialog", "role": "speaker", "content": "text"}'
        )
    raise DataError(
        f"row 0 fits more than one format ({', '.join(found)}); its keys are {keys}. Set `data.format` to the "
        "one to train on"
    )


@dataclass(frozen=True)
class Layout:
    """Where one format keeps its fields, after `data.mapping`. Hashable, so `Dataset.map` can cache by it."""

    format: str
    column: str = ""  # the turns column (chat) or the text column
    role_keys: tuple[str, ...] = ()  # tried in order within a turn
    content_keys: tuple[str, ...] = ()
    custom_roles: tuple[tuple[str, str], ...] = ()  # (dataset's name, our role), from `data.mapping`
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"

    @property
    def keys(self) -> tuple[str, ...]:
        """The row keys this layout reads: a row with none of them is probably in another layout."""
        if self.format == "alpaca":
            return (self.instruction, self.input, self.output)
        return (self.column,)


def layout_for(fmt: str, mapping: dict, columns: list[str]) -> Layout:
    custom = tuple((name, role) for role in ROLES for name in mapping.get(role, ()))
    if fmt in ("sharegpt", "openai"):
        default_column, roles, contents = (
            ("conversations", ("from", "role"), ("value", "content"))
            if fmt == "sharegpt"
            else ("messages", ("role", "from"), ("content", "value"))
        )
        layout = Layout(
            fmt,
            column=mapping.get("messages", default_column),
            role_keys=(mapping["role"],) if "role" in mapping else roles,
            content_keys=(mapping["content"],) if "content" in mapping else contents,
            custom_roles=custom,
        )
        needed = [layout.column]
    elif fmt == "alpaca":
        layout = Layout(
            fmt,
            instruction=mapping.get("instruction", "instruction"),
            input=mapping.get("input", "input"),
            output=mapping.get("output", "output"),
        )
        needed = [layout.instruction, layout.output]
    else:
        layout = Layout(fmt, column=mapping.get("text", "text"))
        needed = [layout.column]
    missing = [key for key in needed if key not in columns]
    if missing:
        key = "messages" if fmt in ("sharegpt", "openai") else missing[0]
        hint = f'`data.mapping`, e.g. {{"{key}": "<your column>"}}'
        raise DataError(
            f"format `{fmt}` reads the column(s) {', '.join(f'`{k}`' for k in missing)}, which the data does not "
            f"have (its columns: {', '.join(f'`{c}`' for c in columns)}); name yours with {hint}"
        )
    return layout


def role_of(name: Any, custom: dict[str, str]) -> str | None:
    if not isinstance(name, str):
        return None
    return custom.get(name) or DEFAULT_ROLE_NAMES.get(name.lower())


def pick(turn: Mapping, keys: tuple[str, ...]) -> tuple[Any, str]:
    """The first of `keys` with a value in `turn` (and that key), else (None, the main key)."""
    for key in keys:
        value = turn.get(key)
        if value is not None:
            return value, key
    return None, keys[0]


