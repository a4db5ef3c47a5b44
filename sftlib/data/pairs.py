"""Preference pairs (a prompt, a chosen and a rejected reply) in one form, every row checked.

    from sftlib.data.pairs import load_pairs, to_pairs
    train_ds, eval_ds = load_pairs(cfg.data)       # what DPO and ORPO train on: source, split, mapping, eval_size, ...
    ds = to_pairs(rows)                            # columns prompt (turns), chosen, rejected (one reply each)

Layouts (the columns pick one; `data.mapping.messages` names the prompt column when it is called otherwise):

    prompt    {"prompt": "Hi" | [turns], "chosen": "Hello" | turn | [turns], "rejected": ...}    (TRL's layout)
    sharegpt  {"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Hello"},
               "rejected": {...}}                                                  (LLaMA-Factory's dpo_en_demo)
    openai    {"messages": [{"role": "user", "content": "Hi"}], "chosen": ..., "rejected": ...}
    implicit  {"chosen": [whole conversation], "rejected": [whole conversation]}  (the shared turns are the prompt)

A reply may be a string, one turn, or a list of turns holding one assistant turn. Turns are read as in SFT
data (sftlib.data.detect: from/value or role/content, the same role names and `data.mapping` roles). The
checks, each reported with its row number (rows are numbered from 0 within the loaded split): a prompt that
is missing, empty or does not end on a user turn; a reply that is missing, empty or not the assistant's;
a chosen reply equal to the rejected one (nothing to learn from the pair).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import datasets

from sftlib.data.check import MAX_SHOWN
from sftlib.data.detect import DataError, check_mapping, pick, role_of

PAIR_LAYOUTS = ("prompt", "sharegpt", "openai", "implicit")
TURN = {"role": datasets.Value("string"), "content": datasets.Value("string")}
PAIR_FEATURES = datasets.Features({"prompt": datasets.List(TURN), "chosen": datasets.List(TURN),
                                   "rejected": datasets.List(TURN)})
SIDES = ("chosen", "rejected")


def is_pairs(columns) -> bool:
    """Whether rows with these columns are preference pairs (both a `chosen` and a `rejected` column)."""
    return all(side in columns for side in SIDES)


def pair_layout(columns, mapping: Mapping | None = None) -> tuple[str, str | None]:
    """(layout, the prompt column or None for `implicit`) from the column names."""
    m = check_mapping(mapping)
    if not is_pairs(columns):
        raise DataError(f"preference data needs a `chosen` and a `rejected` column; the data has "
                        f"{', '.join(f'`{c}`' for c in columns)}")
    if "messages" in m:
        if m["messages"] not in columns:
            raise DataError(f"`data.mapping.messages` names the prompt column `{m['messages']}`, which the data "
                            f"does not have (its columns: {', '.join(f'`{c}`' for c in columns)})")
        return "prompt", m["messages"]
    found = [(name, col) for name, col in (("prompt", "prompt"), ("sharegpt", "conversations"),
                                           ("openai", "messages")) if col in columns]
    if len(found) > 1:
        raise DataError(f"the prompt could be in any of {', '.join(f'`{c}`' for _, c in found)}; name the one to "
                        'use with `data.mapping`, e.g. {"messages": "' + found[0][1] + '"}')
    return found[0] if found else ("implicit", None)


def _turns(value: Any, where: str, default_role: str, lay: dict) -> tuple[list[dict] | None, str | None]:
    """A side of a pair as [{"role", "content"}] (None and the problem when it cannot be read)."""
    if value is None:
        return None, f"{where} is missing"
    if isinstance(value, str):
        return [{"role": default_role, "content": value}], None
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list):
        return None, f"{where} must be a string, a turn or a list of turns, got {type(value).__name__}"
    out = []
    for j, turn in enumerate(value):
        if not isinstance(turn, Mapping):
            return None, f"{where} turn {j} is a {type(turn).__name__}, not a turn with a role and content"
        name, key = pick(turn, lay["role_keys"])
        content, ckey = pick(turn, lay["content_keys"])
        role = role_of(name, lay["custom"])
        if role is None:
            return None, (f"{where} turn {j} has the role {name!r} (key `{key}`), which is none of system, user, "
                          'assistant; name it with `data.mapping`, e.g. {"user": "' + str(name) + '"}')
        if not isinstance(content, str):
            return None, f"{where} turn {j} has no text in `{ckey}`"
        out.append({"role": role, "content": content})
    return out, None


def _split_implicit(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen reply, rejected reply) of two whole conversations: the turns they share open the prompt
    (at least the last turn of each is a reply, so that two equal conversations are caught as an equal pair)."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def pair_problem(row: Mapping, layout: str, column: str | None, lay: dict) -> tuple[dict | None, str | None]:
    """One row as {"prompt", "chosen", "rejected"} (turn lists), or None and what is wrong with it."""
    sides = {}
    for side in SIDES:
        turns, problem = _turns(row.get(side), f"`{side}`", "assistant", lay)
        if problem:
            return None, problem
        sides[side] = turns
    if layout == "implicit":
        prompt, sides["chosen"], sides["rejected"] = _split_implicit(sides["chosen"], sides["rejected"])
        if not prompt:
            return None, ("`chosen` and `rejected` share no opening turns: with no prompt column, both must be whole "
                          "conversations that start with the same prompt")
    else:
        prompt, problem = _turns(row.get(column), f"`{column}`", "user", lay)
        if problem:
            return None, problem
    if not prompt:
        return None, f"`{column}` is an empty list: a pair needs a prompt"
    for j, turn in enumerate(prompt):
        if not turn["content"].strip():
            return None, f"the prompt's turn {j} ({turn['role']}) is empty"
    if prompt[-1]["role"] != "user":
        return None, (f"the prompt ends on {'an' if prompt[-1]['role'] == 'assistant' else 'a'} "
                      f"{prompt[-1]['role']} turn; it must end on the user's turn that the chosen and rejected "
                      "replies answer")
    for side in SIDES:
        turns = sides[side]
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            roles = ", ".join(t["role"] for t in turns) or "nothing"
            return None, f"`{side}` must be one assistant reply, got {roles}"
        if not turns[0]["content"].strip():
            return None, f"`{side}` is empty" + (" (only whitespace)" if turns[0]["content"] else "")
    if sides["chosen"][0]["content"] == sides["rejected"][0]["content"]:
        return None, "`chosen` equals `rejected`: the pair prefers nothing; drop the row"
    return {"prompt": prompt, **sides}, None


def to_pairs(ds: Any, mapping: Mapping | None = None, *, source: str | None = None) -> datasets.Dataset:
    """Columns `prompt` (turns ending on a user turn), `chosen` and `rejected` (one assistant turn each), every
    row checked first: a DataError lists the problems with their row numbers (the first MAX_SHOWN, and the count)."""
    from sftlib.data.load import load_rows

    where = source or "the data"
    m = check_mapping(mapping)
    if not isinstance(ds, datasets.Dataset):
        ds = load_rows(ds)
    if len(ds) == 0:
        raise DataError(f"{where} has no rows")
    try:
        layout, column = pair_layout(ds.column_names, m)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    lay = {"role_keys": (m["role"],) if "role" in m else ("role", "from"),
           "content_keys": (m["content"],) if "content" in m else ("content", "value"),
           "custom": {name: role for role in ("system", "user", "assistant") for name in m.get(role, ())}}
    out, problems = {"prompt": [], "chosen": [], "rejected": []}, []
    for i, row in enumerate(ds):
        pair, problem = pair_problem(row, layout, column, lay)
        if problem:
            problems.append(f"row {i}: {problem}")
            continue
        for key in out:
            out[key].append(pair[key])
    if problems:
        shown = "\n  ".join(problems[:MAX_SHOWN])
        more = f"\n  ... and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
        raise DataError(f"{where}: {len(problems)} of {len(ds)} preference rows ({layout} layout) cannot be used:"
                        f"\n  {shown}{more}")
    return datasets.Dataset.from_dict(out, features=PAIR_FEATURES)


def load_pairs(data_cfg: Any) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, held-out|None) preference pairs from a DataConfig, as sftlib.data.load_dataset does for
    conversations: load_rows -> first `max_rows` -> to_pairs -> split_eval. `source: demo` is the bundled pairs."""
    from sftlib.data.load import load_rows, split_name
    from sftlib.data.split import split_eval

    source, split = data_cfg.source, data_cfg.split or "train"
    if source == "demo":
        from sftlib import demo

        source = demo.pairs_path()
    if data_cfg.format not in ("auto", "sharegpt", "openai"):
        raise DataError(f"`data.format: {data_cfg.format}` holds no preference pairs; use `auto` (the columns tell "
                        "the layout: prompt, conversations or messages, with chosen and rejected)")
    rows = load_rows(source, split)
    if data_cfg.max_rows is not None and data_cfg.max_rows < len(rows):
        rows = rows.select(range(data_cfg.max_rows))
    label = None
    if isinstance(source, (str, os.PathLike)):
        label = f"`{os.fspath(source)}`" + (f" (split `{split}`)" if split != split_name(split) else "")
    pairs = to_pairs(rows, data_cfg.mapping, source=label)
    return split_eval(pairs, data_cfg.eval_size or 0, data_cfg.shuffle_seed or 0)
