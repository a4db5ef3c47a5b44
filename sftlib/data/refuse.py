"""Data that is not supervised fine-tuning data, refused before anything is trained on it as such.

    from sftlib.data.refuse import refuse_preference, refuse_tool_calls
    refuse_preference(rows, mapping, source="`pairs.json`")   # DataError for chosen/rejected pairs or KTO labels
    refuse_tool_calls(rows, layout, source="`glaive.json`")    # DataError for tool-calling turns or a `tools` column

Each error says what the rows are, why training on them as conversations would be wrong, and a way out that
really works: the mapping or the few lines of Python that keep the part sftlib can train on, or another trainer.
Converting such rows anyway would train on the undesirable replies (KTO), mix or drop one reply of each pair
(preference pairs: `train.method: dpo | orpo` trains on them, through sftlib.data.pairs), or teach function
calls as plain text without the function definitions (tool calling).
"""

from __future__ import annotations

import json
from typing import Any

import datasets

from sftlib.data.detect import DataError, Layout


PREFERENCE_COLUMNS = ("chosen", "rejected")
KTO_LABEL_COLUMNS = ("label", "kto_tag")  # TRL's and LLaMA-Factory's names for "this reply is desirable"
TOOL_ROLES = ("function_call", "observation", "tool", "function", "ipython", "tool_call", "tool_response")
TOOL_TURN_KEYS = ("tool_calls", "function_call")  # OpenAI-style calls on an assistant turn
TOOLS_COLUMNS = ("tools", "functions")  # function definitions, one JSON list per row
OTHER_TRAINERS = "preference tuning, DPO or ORPO: set `train.method: dpo` (or `orpo`)"


def read_columns(mapping: dict) -> set[str]:
    """The columns `data.mapping` names: reading one of them is the user's own choice."""
    return {mapping[k] for k in ("messages", "instruction", "input", "output", "text") if k in mapping}


def refuse_preference(ds: datasets.Dataset, mapping: dict, source: str | None = None) -> None:
    """DataError when the rows are preference pairs (`chosen`/`rejected`) or KTO rows (a true/false `label`),
    unless `data.mapping` reads the `chosen` column itself (as the advice for such data says)."""
    where = source or "the data"
    columns = ds.column_names
    reads = read_columns(mapping)
    pair = [c for c in PREFERENCE_COLUMNS if c in columns]
    if pair and "chosen" not in reads:
        raise DataError(f"{where}: these rows are preference data ({'/'.join(f'`{c}`' for c in pair)}: a preferred "
                        "and a dispreferred reply to each prompt); `train.method: sft` fine-tunes on conversations "
                        "and does not train on preference pairs: to tune on the pairs, set `train.method: dpo` (or "
                        f"`orpo`; see sftlib.data.pairs). {chosen_advice(ds, mapping)}")
    for name in KTO_LABEL_COLUMNS:
        labels = bool_labels(ds, name) if name in columns and name not in reads else None
        if labels is None:
            continue
        bad = sum(1 for v in labels if v is False)
        keep = f'r["{name}"] is True' if ds.features[name].dtype == "bool" else f'r["{name}"].strip().lower() == "true"'
        raise DataError(
            f"{where}: these rows are KTO data: the true/false `{name}` column marks {bad} of {len(labels)} replies "
            "undesirable, and supervised fine-tuning would train on them as good examples. To fine-tune on the "
            f"desirable replies only, keep the rows labelled true and drop the column, e.g. in Python "
            f'`rows.filter(lambda r: {keep}).remove_columns("{name}")`, then save them as JSON Lines '
            "for `data.source` or pass them to `to_messages`; or train on all rows with a KTO trainer (e.g. TRL's "
            "KTOTrainer)"
        )


def chosen_advice(ds: datasets.Dataset, mapping: dict) -> str:
    """How to train on the chosen replies only, for the shape this data's `chosen` column has."""
    chosen = ds.features.get("chosen")
    prompt = next((c for c in (mapping.get("messages"), "conversations", "messages", "prompt")
                   if c and c in ds.column_names and c not in PREFERENCE_COLUMNS), None)
    tail = f"; or train on the pairs with {OTHER_TRAINERS}"
    if is_turn_list(chosen) and prompt is None:  # each `chosen` is a whole conversation
        return ('To fine-tune on the chosen conversations only, set `data.mapping` to {"messages": "chosen"} '
                f"(the `rejected` column is then dropped){tail}")
    if isinstance(chosen, datasets.Value) and chosen.dtype in ("string", "large_string") and prompt == "prompt" \
            and isinstance(ds.features["prompt"], datasets.Value):
        return ('To fine-tune on the chosen replies only, set `data.mapping` to {"instruction": "prompt", '
                f'"output": "chosen"}} (the `rejected` column is then dropped){tail}')
    if prompt is not None and (isinstance(chosen, dict) or is_turn_list(chosen)) and is_turn_list(ds.features[prompt]):
        reply = '[r["chosen"]]' if isinstance(chosen, dict) else 'r["chosen"]'
        out = "messages" if prompt == "prompt" else prompt  # a column that format detection knows
        drop = [c for c in (*PREFERENCE_COLUMNS, prompt) if c in ds.column_names and c != out]
        return ("To fine-tune on the chosen replies only, end each conversation with its chosen reply and drop "
                f'the pair, e.g. in Python `rows.map(lambda r: {{"{out}": r["{prompt}"] + {reply}}}, '
                f"remove_columns={json.dumps(drop)})`, then save the rows as JSON Lines for `data.source` or pass "
                f"them to `to_messages`{tail}")
    return ("To fine-tune on the chosen replies only, write rows whose conversation ends with the chosen reply "
            f"and no `rejected` column{tail}")


def is_turn_list(feature: Any) -> bool:
    return isinstance(feature, (datasets.List, datasets.Sequence)) and isinstance(feature.feature, dict)


def bool_labels(ds: datasets.Dataset, name: str) -> list[bool | None] | None:
    """The column as true/false values when it holds only booleans (or the words true/false), else None."""
    feature = ds.features.get(name)
    if not isinstance(feature, datasets.Value):
        return None
    if feature.dtype == "bool":
        return ds[name]
    if feature.dtype in ("string", "large_string"):
        words = {v.strip().lower() for v in ds.unique(name) if v is not None}
        if words and words <= {"true", "false"}:
            return [None if v is None else v.strip().lower() == "true" for v in ds[name]]
    return None


def refuse_tool_calls(ds: datasets.Dataset, lay: Layout, source: str | None = None) -> None:
    """DataError when chat rows hold tool calls (tool roles or call keys in turns) or a `tools` column of function
    definitions: neither can be trained as plain conversations without losing what they mean."""
    where = source or "the data"
    names, role_key, rows = tool_turns(ds, lay)
    tools = next((c for c in TOOLS_COLUMNS if c in ds.column_names and c not in lay.keys), None)
    defined = sum(1 for v in ds[tools] if v and v != "[]") if tools else 0
    if not rows and not defined:
        return
    what = []
    if rows:
        shown = ", ".join(n if n.startswith("`") else repr(n) for n in names)
        what.append(f"{rows} of {len(ds)} rows have tool turns ({shown})")
    if defined:
        what.append(f"{defined} row{' defines' if defined == 1 else 's define'} functions in the `{tools}` column")
    keep = "; ".join(what)
    fix = " Use a trainer with tool-calling support"
    if role_key or not names:  # the rows without tools can be told apart by one role key
        listed = ", ".join(map(json.dumps, names))
        condition = [f'all(t["{role_key}"] not in ({listed},) for t in r["{lay.column}"])'] if names else []
        condition += [f'(not r["{tools}"] or r["{tools}"] == "[]")'] if tools else []
        drop = f'.remove_columns("{tools}")' if tools else ""
        fix = (f" To fine-tune on the rows without tools, keep them{' and drop the column' if tools else ''}, "
               f"e.g. in Python `rows.filter(lambda r: {' and '.join(condition)}){drop}`, then save them as JSON "
               "Lines for `data.source` or pass them to `to_messages`; or use a trainer with tool-calling support")
    raise DataError(
        f"{where}: these rows are tool-calling data: {keep}. sftlib does not train tool calling yet: its chat "
        "templates have no format for function definitions, calls and results, and mapping tool roles onto "
        f"user/assistant would train the calls as plain text without the definitions.{fix}"
    )


def tool_turns(ds: datasets.Dataset, lay: Layout) -> tuple[list[str], str | None, int]:
    """(tool role names and call keys seen, the turn key holding those roles, rows that have any) in a chat
    column Arrow can read as a list of turns; ([], None, 0) for other layouts or shapes (the row checks report
    those). Role key None: the rows cannot be told apart by one role key (a call key, or roles under two keys).
    Names given a role by `data.mapping` are the user's choice and do not count."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if lay.format not in ("sharegpt", "openai") or lay.column not in ds.column_names:
        return [], None, 0
    col = ds.with_format("arrow")[lay.column]
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not pa.types.is_list(col.type) or not pa.types.is_struct(col.type.value_type) or len(col) == 0:
        return [], None, 0
    turns = col.flatten()
    tool_names = [n for n in TOOL_ROLES if n not in dict(lay.custom_roles)]
    mask = pa.array([False] * len(turns))
    seen: list[str] = []
    keys: list[str] = []
    for key in dict.fromkeys(lay.role_keys):
        index = turns.type.get_field_index(key)
        if index < 0 or not pa.types.is_string(turns.type.field(index).type):
            continue
        names = turns.field(index)
        hit = pc.fill_null(pc.is_in(pc.utf8_lower(names), value_set=pa.array(tool_names)), False)
        if pc.any(hit).as_py():
            keys.append(key)
            seen += [n for n in pc.unique(names.filter(hit)).to_pylist() if n not in seen]
            mask = pc.or_(mask, hit)
    for key in TOOL_TURN_KEYS:
        index = turns.type.get_field_index(key)
        if index < 0 or key in lay.role_keys + lay.content_keys:
            continue
        values = turns.field(index)
        hit = pc.is_valid(values)
        if pa.types.is_list(values.type):
            hit = pc.and_(hit, pc.greater(pc.fill_null(pc.list_value_length(values), 0), 0))
        if pc.any(hit).as_py():
            seen.append(f"`{key}`")
            keys += [key, key]  # a call key is no role: no single role key tells these rows apart
            mask = pc.or_(mask, hit)
    parents = pc.list_parent_indices(col).filter(mask)
    return seen, keys[0] if len(keys) == 1 else None, len(pc.unique(parents))
