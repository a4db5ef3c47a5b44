"""Training data: four common layouts in, one `messages` (or `text`) column out, every row checked.

    from sftlib.data import load_dataset
    train_ds, eval_ds = load_dataset(cfg.data)    # source, split, format, mapping, eval_size, max_rows, shuffle_seed

    # or step by step
    from sftlib.data import load_rows, detect_format, to_messages, split_eval
    rows = load_rows("chats.jsonl", split="train[:1000]")   # a file, a folder, a Hub name, a list of dicts or a Dataset
    detect_format(rows)                                      # "sharegpt"
    ds = to_messages(rows)                                   # one column: [{"role": ..., "content": ...}, ...]
    train_ds, eval_ds = split_eval(ds, eval_size=0.05, seed=0)

Layouts (row 0's keys pick one unless `format` is given):

    sharegpt  {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    openai    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    alpaca    {"instruction": "Translate", "input": "chat", "output": "cat"}      (`input` optional)
    text      {"text": "Once upon a time"}                                       (raw text: one `text` column out)

Turn keys are looked up leniently: a ShareGPT turn may also use role/content and an OpenAI turn from/value.
Role names: human/user -> user, gpt/assistant/model -> assistant, system -> system (any letter case).
`mapping` renames for other datasets; role entries add names and the standard ones keep working:

    to_messages(ds, mapping={"messages": "dialog", "role": "speaker", "content": "text",
                             "user": "customer", "assistant": "agent"})

Content is kept exactly as written (nothing is stripped); content that is empty or only whitespace is an error.
Problems are reported for every row at once (the first 10 shown), as a `DataError` naming the file, the row
(0-based, counted within the loaded split) and the fix.
"""

from __future__ import annotations

import csv
import difflib
import functools
import itertools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

FORMATS = ("sharegpt", "openai", "alpaca", "text")
ROLES = ("system", "user", "assistant")
MAPPING_KEYS = ("messages", "role", "content", "user", "assistant", "system", "instruction", "input", "output", "text")
FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

# Names the two chat layouts use in the wild; matched without regard to case ("Human", "GPT").
DEFAULT_ROLE_NAMES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
}
MAX_SHOWN = 10  # problems listed in one error; the total count is always given
ARROW_BATCH_ROWS = 10_000  # rows per batch that Arrow checks and converts (see `_arrow_messages`)

# Suffixes that only a local path would have: such a source is never sent to the Hub. (A Hub name may contain
# a dot, as in "teknium/OpenHermes-2.5", so "has a suffix" alone is not enough.)
_FILE_SUFFIXES = set(FILE_TYPES) | {
    ".txt", ".tsv", ".ndjson", ".arrow", ".xlsx", ".xls", ".yaml", ".yml", ".gz", ".bz2", ".xz", ".zst", ".zip", ".tar",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_FILE_KINDS = {"json": "JSON (a list of objects) or JSON Lines (one object per line)", "csv": "CSV", "parquet": "parquet"}


class DataError(ValueError):
    """Training data that cannot be used as given; the message names the file, row and field, and the fix."""


# ---------------------------------------------------------------------------------------------- loading


def load_rows(source: Any, split: str = "train") -> datasets.Dataset:
    """Rows as a `datasets.Dataset`, columns untouched.

    `source`: a `datasets.Dataset` (or `DatasetDict`), a list of dicts, a local .json/.jsonl/.csv/.parquet file,
    a folder of such files (file names like `train.jsonl`/`test.jsonl` become splits), or a Hub dataset name.
    `split` uses the Hub's slicing syntax ("train", "train[:1000]", "train[10%:]") for every kind of source;
    a single local file has one split, `train`.
    """
    if not isinstance(split, str) or not split.strip():
        raise DataError(f"`data.split` must be a split name such as `train` or `train[:1000]`, got {split!r}")
    split = split.strip()
    if isinstance(source, datasets.DatasetDict):
        name = _split_name(split)
        if name not in source:
            raise DataError(f"split `{name}` is not in the given DatasetDict; it has {', '.join(source) or 'none'}")
        return _slice(source[name], split)
    if isinstance(source, datasets.Dataset):
        return _slice(source, split)
    if isinstance(source, (list, tuple)):
        return _slice(_from_list(list(source)), split)
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source).strip()
        if not text:
            raise DataError("`data.source` is empty; give a file path, a folder or a Hub dataset name")
        path = Path(text).expanduser()
        if path.is_dir():
            return _load_folder(path, split)
        if path.is_file():
            return _load_file(path, split)
        if _looks_local(text):
            raise DataError(
                f"file not found: `{text}` (looked for {path.resolve()}); check the path, which is relative to "
                f"the working directory {Path.cwd()}"
            )
        return _load_hub(text, split)
    raise DataError(
        "`data.source` must be a file path, a folder, a Hub dataset name, a list of dicts or a datasets.Dataset; "
        f"got {type(source).__name__}"
    )


def _looks_local(text: str) -> bool:
    return (
        Path(text).suffix.lower() in _FILE_SUFFIXES
        or text.startswith(("/", ".", "~"))
        or "\\" in text
        or not _HUB_ID.match(text)
    )


def _split_name(split: str) -> str:
    try:
        instruction = datasets.ReadInstruction.from_spec(split)
    except (ValueError, AssertionError) as e:
        raise DataError(
            f"`data.split` = `{split}` is not a split spec; use e.g. `train`, `train[:1000]`, `train[10%:]` or "
            f"`train[:90%]`"
        ) from e
    names = {rel.splitname for rel in instruction._relative_instructions}
    if len(names) != 1:
        raise DataError(f"`data.split` = `{split}` combines several splits ({', '.join(sorted(names))}); use one")
    return names.pop()


def _slice(ds: datasets.Dataset, split: str) -> datasets.Dataset:
    """Apply "train[10:20]"-style slicing to data that is already in memory (its split name is not checked)."""
    name = _split_name(split)
    if split == name:
        return ds
    parts = datasets.ReadInstruction.from_spec(split).to_absolute({name: len(ds)})
    if len(parts) == 1:
        picked = ds.select(range(parts[0].from_, parts[0].to))
    else:
        picked = ds.select([i for part in parts for i in range(part.from_, part.to)])
    if len(picked) == 0:
        raise DataError(f"`data.split` = `{split}` selects no rows out of {len(ds)}")
    return picked


def _from_list(rows: list) -> datasets.Dataset:
    if not rows:
        raise DataError("the list of rows is empty")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"row {i} is a {type(row).__name__}, not a dict of named fields")
    # Dataset.from_list takes its columns from the first row only: a key that appears later would be dropped
    # silently, hiding mixed layouts. Give every row every key.
    keys = list(dict.fromkeys(key for row in rows for key in row))
    filled = [{key: row.get(key) for key in keys} for row in rows]
    try:
        return datasets.Dataset.from_list(filled)
    except Exception as e:  # Arrow needs one type per field across rows
        # Say which row breaks it in the user's terms when the row checks can tell.
        try:
            fmt = detect_format(filled)
        except DataError:
            fmt = None
        if fmt is not None:
            try:
                _raise_problems(filled, _layout(fmt, {}, keys), {}, None)
            except DataError as diagnosed:
                raise diagnosed from e
        raise DataError(
            f"the rows cannot form one table: {_cause(e)}; every row must give each field the same type "
            "(for example `content` always a string)"
        ) from e


def _is_blank(path: Path) -> bool:
    size = path.stat().st_size
    if size == 0:
        return True
    if size > 1 << 16:
        return False
    return not path.read_bytes().strip()


def _csv_kwargs(path: Path) -> dict:
    # Read every column as text, and no cell as missing: otherwise pandas turns "007" into 7, "42" into an int,
    # and "NA" or "None" into a null, and the text would not be kept as written.
    kwargs: dict[str, Any] = {"keep_default_na": False}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), None)
    except (UnicodeDecodeError, csv.Error):
        return kwargs  # not text: let the reader report it
    if header and len(set(header)) == len(header) and all(header):
        kwargs["features"] = datasets.Features({name: datasets.Value("string") for name in header})
    return kwargs


def _load_file(path: Path, split: str) -> datasets.Dataset:
    builder = FILE_TYPES.get(path.suffix.lower())
    if builder is None:
        raise DataError(
            f"`{path}`: unsupported file type `{path.suffix or '(none)'}`; use {', '.join(FILE_TYPES)} "
            "(JSON may be a list of objects or JSON Lines)"
        )
    if _is_blank(path):
        raise DataError(f"`{path}` is empty: it has no rows")
    name = _split_name(split)
    if name != "train":
        raise DataError(
            f"`data.split` = `{split}`: a single file has one split, `train`; slice it instead, e.g. `train[:90%]`, "
            "or give a folder holding train/test files"
        )
    problem = _utf8_problem(path) if builder in ("json", "csv") else None
    if problem:
        raise DataError(f"`{path}` could not be read as {_FILE_KINDS[builder]}: {problem}")
    kwargs = _csv_kwargs(path) if builder == "csv" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split=split, **kwargs)
    except Exception as e:
        raise _read_error(f"`{path}`", builder, split, e, path) from e
    problem = _json_shape_problem(path) if builder == "json" else None
    if problem:
        raise DataError(f"`{path}` could not be read as {_FILE_KINDS[builder]}: {problem}")
    return ds


def _utf8_problem(path: Path) -> str | None:
    """Arrow reads invalid UTF-8 without complaint and fails much later, deep in a row check: find it first."""
    import codecs

    decoder, line = codecs.getincrementaldecoder("utf-8")(), 1
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                line += chunk.count(b"\n", 0, max(e.start, 0))
                bad = chunk[e.start:e.start + 1].hex() if e.start < len(chunk) else "?"
                return (f"line {line} is not valid UTF-8 (byte 0x{bad}); re-save the file as UTF-8, e.g. "
                        f"`iconv -f latin1 -t utf-8 in > out`")
            line += chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return f"ends inside a UTF-8 character (line {line}): the file is cut off or not UTF-8"
    return None


def _json_shape_problem(path: Path) -> str | None:
    """JSON that parses but is not rows of objects (a list of strings would silently become a `text` column)."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 16).lstrip()
    if head.startswith("["):
        head = head[1:].lstrip()
        if not head or head[0] in "{]":
            return None
        kind = "value"
    elif not head or head[0] == "{":
        return None
    else:
        kind = "line"
    if head[0] == '"':
        what = "a string"
    elif head[0] == "[":
        what = "a list"
    elif head.startswith(("null", "true", "false")) or head[0] in "-0123456789":
        what = "null, a number or true/false"
    else:
        return None  # not JSON at all: the parser says where
    return (f"row 0 is {what}, not an object: each row (each {kind}) must be an object with named fields, "
            'e.g. {"messages": [...]}, {"conversations": [...]} or {"text": "..."}')


def _json_location(path: Path) -> str | None:
    """Where a JSON or JSON Lines file stops parsing, with Python's exact message: `line 3, column 52: ...`."""
    import json

    if path.stat().st_size > 1 << 30:  # too big to parse a second time just for the message
        return None
    text = path.read_text(encoding="utf-8")
    try:
        json.loads(text)
        return None  # one JSON document: the reader failed for a reason parsing does not show
    except json.JSONDecodeError as whole:
        if text.lstrip().startswith("["):
            return _located(whole, text)
    for number, line in enumerate(text.splitlines(), 1):  # JSON Lines: one document per line
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                last = number == len(text.splitlines())
                cut = "; the file ends inside this row: was it cut off while being written?" \
                    if last and not text.endswith("\n") else ""
                return f"line {number}, column {e.colno}: {e.msg} (row {number - 1}){cut}"
    return None


def _located(e, text: str) -> str:
    cut = "; the file ends early: was it cut off while being written?" if not text.rstrip().endswith("]") else ""
    return f"line {e.lineno}, column {e.colno}: {e.msg}{cut}"


def _load_folder(path: Path, split: str) -> datasets.Dataset:
    files = [
        p
        for p in sorted(path.rglob("*"))
        if p.is_file()
        and p.suffix.lower() in FILE_TYPES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    if not files:
        raise DataError(f"folder `{path}` holds no data files ({', '.join(FILE_TYPES)})")
    builders = {FILE_TYPES[p.suffix.lower()] for p in files}
    if len(builders) > 1:
        raise DataError(
            f"folder `{path}` mixes file types ({', '.join(sorted({p.suffix.lower() for p in files}))}); "
            "keep one type per folder"
        )
    if all(_is_blank(p) for p in files):
        raise DataError(f"every data file in folder `{path}` is empty")
    builder = builders.pop()
    for file in files if builder in ("json", "csv") else []:
        problem = _utf8_problem(file)
        if problem:
            raise DataError(f"`{file}` could not be read as {_FILE_KINDS[builder]}: {problem}")
    kwargs = _csv_kwargs(files[0]) if builder == "csv" else {}
    try:
        return datasets.load_dataset(builder, data_dir=str(path), split=split, **kwargs)
    except Exception as e:
        raise _read_error(f"folder `{path}`", builder, split, e) from e


def _cause(e: BaseException) -> str:
    """The messages along an exception's chain: datasets wraps the reader's useful one in a generic one."""
    seen: list[str] = []
    node: BaseException | None = e
    while node is not None and len(seen) < 4:
        text = str(node).strip().splitlines()[0] if str(node).strip() else ""
        if text and text not in seen and not text.startswith("An error occurred while generating the dataset"):
            seen.append(text)
        node = node.__cause__ or node.__context__
    return "; ".join(seen) or type(e).__name__


def _read_error(where: str, builder: str, split: str, e: Exception, path: Path | None = None) -> DataError:
    text = str(e)
    if builder == "json" and path is not None:
        location = _json_location(path) or _json_shape_problem(path)
        if location:
            return DataError(f"{where} could not be read as {_FILE_KINDS[builder]}: {location}")
    if "corresponds to no data" in text:
        if split == _split_name(split):
            return DataError(f"{where} has no rows")
        return DataError(f"{where}: split `{split}` selects no rows")
    if text.startswith("Unknown split"):
        return DataError(f"{where}: {text.rstrip('.')}; set `data.split`")
    return DataError(f"{where} could not be read as {_FILE_KINDS[builder]}: {_cause(e)}")


def _load_hub(name: str, split: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(name, split=split)
    except ConnectionError as e:
        if datasets.config.HF_HUB_OFFLINE:
            cache = (
                "offline mode is on (HF_HUB_OFFLINE=1) and the dataset is not in the local cache "
                f"({datasets.config.HF_DATASETS_CACHE}); point HF_HOME or HF_DATASETS_CACHE at the cache that has it"
            )
        else:
            cache = (
                "if this dataset was downloaded before, set HF_HUB_OFFLINE=1 (and HF_HOME or HF_DATASETS_CACHE "
                "to that cache) to use the cached copy"
            )
        raise DataError(
            f"could not reach the Hugging Face Hub to load `{name}` ({_cause(e)}). Give a local file as "
            f"`data.source` (.json, .jsonl, .csv or .parquet) instead; or, {cache}"
        ) from e
    except datasets.exceptions.DatasetNotFoundError as e:
        raise DataError(
            f"`{name}` was not found on the Hugging Face Hub ({_cause(e)}); check the name, log in "
            "(`hf auth login` or HF_TOKEN) for a gated or private dataset, or give a local file path"
        ) from e
    except Exception as e:
        raise DataError(f"could not load `{name}` (split `{split}`) from the Hugging Face Hub: {_cause(e)}") from e


# ---------------------------------------------------------------------------------------------- layouts


def _check_mapping(mapping: Any) -> dict[str, Any]:
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


def _present(row: Mapping) -> list[str]:
    return [key for key, value in row.items() if value is not None]


def _formats_of(row: Mapping, mapping: dict) -> list[str]:
    """Every layout whose keys this row has (Arrow gives absent keys as None, so None counts as absent)."""
    present = set(_present(row))
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


def _first_row(rows: Any) -> Mapping:
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
    m = _check_mapping(mapping)
    row = _first_row(rows)
    found = _formats_of(row, m)
    if len(found) == 1:
        return found[0]
    keys = ", ".join(f"`{k}`" for k in _present(row)) or "none with a value"
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
class _Layout:
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


def _layout(fmt: str, mapping: dict, columns: list[str]) -> _Layout:
    custom = tuple((name, role) for role in ROLES for name in mapping.get(role, ()))
    if fmt in ("sharegpt", "openai"):
        default_column, roles, contents = (
            ("conversations", ("from", "role"), ("value", "content"))
            if fmt == "sharegpt"
            else ("messages", ("role", "from"), ("content", "value"))
        )
        layout = _Layout(
            fmt,
            column=mapping.get("messages", default_column),
            role_keys=(mapping["role"],) if "role" in mapping else roles,
            content_keys=(mapping["content"],) if "content" in mapping else contents,
            custom_roles=custom,
        )
        needed = [layout.column]
    elif fmt == "alpaca":
        layout = _Layout(
            fmt,
            instruction=mapping.get("instruction", "instruction"),
            input=mapping.get("input", "input"),
            output=mapping.get("output", "output"),
        )
        needed = [layout.instruction, layout.output]
    else:
        layout = _Layout(fmt, column=mapping.get("text", "text"))
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


def _role_of(name: Any, custom: dict[str, str]) -> str | None:
    if not isinstance(name, str):
        return None
    return custom.get(name) or DEFAULT_ROLE_NAMES.get(name.lower())


def _pick(turn: Mapping, keys: tuple[str, ...]) -> tuple[Any, str]:
    """The first of `keys` with a value in `turn` (and that key), else (None, the main key)."""
    for key in keys:
        value = turn.get(key)
        if value is not None:
            return value, key
    return None, keys[0]


def _text_problem(value: Any, where: str) -> str | None:
    if value is None:
        return f"{where} is missing"
    if not isinstance(value, str):
        return f"{where} must be a string, got {type(value).__name__}"
    if not value.strip():
        return f"{where} is empty" + (" (only whitespace)" if value else "")
    return None


# ---------------------------------------------------------------------------------------------- checking


def _row_problem(row: Mapping, lay: _Layout, custom: dict[str, str], unknown: set | None = None) -> str | None:
    """What is wrong with one row, in the user's terms, or None. Only the first problem of a row is reported;
    unknown role names are added to `unknown` so that one piece of advice can cover them all."""
    if lay.format == "text":
        return _text_problem(row.get(lay.column), f"`{lay.column}`")
    if lay.format == "alpaca":
        for key in (lay.instruction, lay.output):
            problem = _text_problem(row.get(key), f"`{key}`")
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
        name, role_key = _pick(turn, lay.role_keys)
        if name is None:
            return f"{where} has no `{role_key}`: name the key that holds the role with `data.mapping.role`"
        if not isinstance(name, str):
            return f"`{col}[{j}].{role_key}` must be a role name (text), got {type(name).__name__}"
        role = _role_of(name, custom)
        if role is None:
            if unknown is not None:  # every unknown name in the row, for the advice under the list
                unknown.update(n for n in (_pick(t, lay.role_keys)[0] for t in turns if isinstance(t, Mapping))
                               if isinstance(n, str) and _role_of(n, custom) is None)
            return f"`{col}[{j}].{role_key}` is {name!r}, not a known role"
        content, content_key = _pick(turn, lay.content_keys)
        problem = _text_problem(content, f"`{col}[{j}].{content_key}`")
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


def _iter_rows(rows: Any):
    if isinstance(rows, datasets.Dataset):
        # Batches decode much faster than single rows.
        for batch in rows.iter(batch_size=1000):
            names = list(batch)
            for values in zip(*batch.values()):
                yield dict(zip(names, values))
    else:
        yield from rows


def _raise_problems(rows: Any, lay: _Layout, mapping: dict, source: str | None) -> None:
    """Check every row; raise one DataError listing the first `MAX_SHOWN` problems and how many rows have one."""
    custom = dict(lay.custom_roles)
    where = source or "the data"
    shown: list[str] = []
    count = 0
    columns: set[str] = set()
    unknown: set[str] = set()
    for i, row in enumerate(_iter_rows(rows)):
        columns.update(row)
        if all(row.get(key) is None for key in lay.keys):
            # Nothing of this layout here: if the row fits another one, the file mixes layouts.
            others = [f for f in _formats_of(row, mapping) if f != lay.format]
            if others:
                keys = ", ".join(f"`{k}`" for k in _present(row))
                raise DataError(
                    f"{where}: row {i} is in the `{others[0]}` format (keys {keys}) but the data was read as "
                    f"`{lay.format}` (from row 0 or `data.format`); one dataset must use one format: convert the "
                    "odd rows or split the file"
                )
        problem = _row_problem(row, lay, custom, unknown)
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
    if {"chosen", "rejected"} <= columns:
        lines.append(
            "  note: `chosen`/`rejected` columns look like preference (DPO) data; supervised fine-tuning needs "
            "whole conversations that end with the assistant's reply"
        )
    raise DataError("\n".join(lines))


# ---------------------------------------------------------------------------------------------- converting


def _convert_batch(batch: dict[str, list], lay: _Layout) -> dict[str, list]:
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
                {"role": _role_of(_pick(turn, lay.role_keys)[0], custom), "content": _pick(turn, lay.content_keys)[0]}
                for turn in turns
            ]
            for turns in batch[lay.column]
        ]
    }


def _convert_table(table: Any, lay: _Layout, features: datasets.Features) -> Any:
    """`_convert_batch` for a pyarrow batch: Arrow builds the `messages` column where `_arrow_messages` can."""
    import pyarrow as pa

    messages = _arrow_messages(table, lay, features)
    if messages is None:  # the rows as `Dataset.map` would have given them to `_convert_batch`
        from datasets.formatting import PythonFormatter

        return _convert_batch(PythonFormatter(features=features).format_batch(table), lay)
    return pa.table({"messages": messages})


@functools.lru_cache(maxsize=1)
def _non_space_pattern() -> str:
    """A regex matching one character that `str.strip()` keeps: Python's own whitespace, not a copy of it."""
    spaces = (c for c in map(chr, range(0x110000)) if c.isspace())
    return "[^" + "".join(f"\\x{{{ord(c):x}}}" for c in spaces) + "]"


def _arrow_messages(table: Any, lay: _Layout, features: datasets.Features) -> Any:
    """The `messages` column `_convert_batch` would give, built by Arrow, when every row of this batch of chat rows is
    a plain list of turns that passes every check of `_row_problem`; else None (the Python checks and conversion
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

    def pick(keys: tuple[str, ...]):  # `_pick`: the first key with a value
        fields = [children[turns.type.get_field_index(k)] for k in keys if turns.type.get_field_index(k) >= 0]
        if not fields or any(f.type != pa.string() for f in fields):
            return None
        return fields[0] if len(fields) == 1 else pc.coalesce(*fields)

    names, contents = pick(lay.role_keys), pick(lay.content_keys)
    if names is None or contents is None or names.null_count or contents.null_count:
        return None
    distinct = pc.unique(names)
    known = [_role_of(name, dict(lay.custom_roles)) for name in distinct.to_pylist()]
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


def _arrow_checks_pass(ds: datasets.Dataset, lay: _Layout) -> bool:
    """True when Arrow shows that `_raise_problems` would find nothing (False: it has to look)."""
    return all(_arrow_messages(batch, lay, ds.features) is not None
               for batch in ds.with_format("arrow").iter(batch_size=ARROW_BATCH_ROWS))


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
    m = _check_mapping(mapping)
    if format not in ("auto", *FORMATS):
        close = difflib.get_close_matches(str(format), FORMATS, n=1)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        raise DataError(f"`data.format` must be auto, {', '.join(FORMATS)}; got {format!r}{hint}")
    if not isinstance(ds, datasets.Dataset):
        ds = load_rows(ds)
    if len(ds) == 0:
        raise DataError(f"{source or 'the data'} has no rows")
    try:
        fmt = detect_format(ds, m) if format == "auto" else format
        lay = _layout(fmt, m, ds.column_names)
    except DataError as e:
        raise DataError(f"{source}: {e}" if source else str(e)) from None
    arrow = fmt in ("sharegpt", "openai") and ds.format["type"] is None  # a formatted dataset maps as it is
    if not (arrow and _arrow_checks_pass(ds, lay)):
        _raise_problems(ds, lay, m, source)
    if arrow:  # converted by Arrow, batch by batch
        return ds.with_format("arrow").map(
            functools.partial(_convert_table, lay=lay, features=ds.features),
            batched=True,
            batch_size=ARROW_BATCH_ROWS,
            remove_columns=ds.column_names,
            features=MESSAGES_FEATURES,
            desc=f"{fmt} -> messages",
        ).with_format(None)
    return ds.map(
        functools.partial(_convert_batch, lay=lay),
        batched=True,
        remove_columns=ds.column_names,
        features=TEXT_FEATURES if fmt == "text" else MESSAGES_FEATURES,
        desc=f"{fmt} -> {'text' if fmt == 'text' else 'messages'}",
    )


# ---------------------------------------------------------------------------------------------- splitting


def split_eval(
    ds: datasets.Dataset, eval_size: float | int, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, eval): `eval_size` 0 holds out nothing (eval is None); a fraction in (0, 1) holds out that share of
    rows (rounded, at least 1); a whole number >= 1 holds out that many. The rows are drawn at random with `seed`."""
    if isinstance(eval_size, bool) or not isinstance(eval_size, (int, float)):
        raise DataError(f"`data.eval_size` must be a number, got {eval_size!r}")
    if eval_size == 0:
        return ds, None
    if eval_size < 0:
        raise DataError(f"`data.eval_size` must be 0, a fraction in (0, 1) or a row count >= 1, got {eval_size}")
    if eval_size < 1:
        n_eval = max(1, int(eval_size * len(ds) + 0.5))
    elif float(eval_size).is_integer():
        n_eval = int(eval_size)
    else:
        raise DataError(f"`data.eval_size` must be a fraction in (0, 1) or a whole number of rows, got {eval_size}")
    if n_eval >= len(ds):
        raise DataError(
            f"`data.eval_size` = {eval_size} holds out {n_eval} of {len(ds)} rows, leaving none to train on; "
            "use a smaller value or more data"
        )
    parts = ds.train_test_split(test_size=n_eval, shuffle=True, seed=seed)
    return parts["train"], parts["test"]


# ---------------------------------------------------------------------------------------------- all together


def load_dataset(data_cfg: Any) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, eval|None) from a DataConfig: load_rows -> first `max_rows` -> to_messages -> split_eval.

    Uses data_cfg.source, .split, .format, .mapping, .eval_size, .max_rows and .shuffle_seed. `source: demo`
    is the bundled demo data.
    """
    source = getattr(data_cfg, "source", None)
    split = getattr(data_cfg, "split", None) or "train"
    if source == "demo":
        from sftlib import demo_data

        source = demo_data.path()
    rows = load_rows(source, split)

    max_rows = getattr(data_cfg, "max_rows", None)
    if max_rows is not None:
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise DataError(f"`data.max_rows` must be a whole number >= 1 or null (all rows), got {max_rows!r}")
        if max_rows < len(rows):
            # The first rows, not a random sample: the same rows whatever the seed, as `train[:N]` would give.
            rows = rows.select(range(max_rows))

    label = None
    if isinstance(source, (str, os.PathLike)):
        label = f"`{os.fspath(source)}`"
        if split != _split_name(split):
            label += f" (split `{split}`; rows are numbered within it)"
    ds = to_messages(rows, getattr(data_cfg, "format", "auto") or "auto", getattr(data_cfg, "mapping", None), source=label)
    return split_eval(ds, getattr(data_cfg, "eval_size", 0) or 0, getattr(data_cfg, "shuffle_seed", 0) or 0)
