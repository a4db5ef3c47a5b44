"""Rows as stored, from a file, a folder, a list, a `datasets.Dataset` or the Hub, columns untouched.

    from sftlib.data.load import load_rows
    rows = load_rows("chats.jsonl", split="train[:1000]")   # a file, a folder, a Hub name, a list of dicts or a Dataset

A file or folder that cannot be read is reported with the file, the line and column where it stops
parsing, and the fix, as a `DataError`.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets

from sftlib.data.check import raise_problems
from sftlib.data.detect import DataError, detect_format, layout_for
from sftlib.paths import path_problem


FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

# Suffixes that only a local path would have: such a source is never sent to the Hub. (A Hub name may contain
# a dot, as in "teknium/OpenHermes-2.5", so "has a suffix" alone is not enough.)
_FILE_SUFFIXES = set(FILE_TYPES) | {
    ".txt", ".tsv", ".ndjson", ".arrow", ".xlsx", ".xls", ".yaml", ".yml", ".gz", ".bz2", ".xz", ".zst", ".zip", ".tar",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_FILE_KINDS = {"json": "JSON (a list of objects) or JSON Lines (one object per line)", "csv": "CSV", "parquet": "parquet"}


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
        name = split_name(split)
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
        problem = path_problem(path) if os.path.lexists(path) else None
        if problem:  # a link to nothing or to itself, a pipe, a device, a file that cannot be read
            raise DataError(f"`data.source`: {problem}")
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


def split_name(split: str) -> str:
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
    name = split_name(split)
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
                raise_problems(filled, layout_for(fmt, {}, keys), {}, None)
            except DataError as diagnosed:
                raise diagnosed from e
        raise DataError(
            f"the rows cannot form one table: {cause(e)}; every row must give each field the same type "
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
    name = split_name(split)
    if name != "train":
        raise DataError(
            f"`data.split` = `{split}`: a single file has one split, `train`; slice it instead, e.g. `train[:90%]`, "
            "or give a folder holding train/test files"
        )
    problem = _text_problem(path, json_nesting=builder == "json") if builder in ("json", "csv") else None
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


MAX_NESTING = 64  # chat rows nest 3-6 deep; Arrow's JSON reader overflows its stack (a segfault) on very deep rows
_JSON_STRING = re.compile(rb'"(?:[^"\\\n]|\\.)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _text_problem(path: Path, *, json_nesting: bool) -> str | None:
    """What Arrow's readers would mishandle, found in one read of the file before any of them sees it: invalid
    UTF-8 (read without complaint, failing much later deep in a row check) and, for JSON, values nested deeper
    than MAX_NESTING (a segfault). Blocks end on a line break, which splits no UTF-8 character and no JSON string."""
    import codecs

    decoder, depth, line = codecs.getincrementaldecoder("utf-8")(), 0, 1
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            block += f.readline()
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                line += block.count(b"\n", 0, max(e.start, 0))
                bad = block[e.start:e.start + 1].hex() if e.start < len(block) else "?"
                return (f"line {line} is not valid UTF-8 (byte 0x{bad}); re-save the file as UTF-8, e.g. "
                        f"`iconv -f latin1 -t utf-8 in > out`")
            if json_nesting:
                depth, deep = _nesting(block, depth, line)
                if deep:
                    return (f"line {deep} nests values more than {MAX_NESTING} levels deep; a conversation "
                            "nests a few levels: is the file damaged or generated wrongly?")
            line += block.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return f"ends inside a UTF-8 character (line {line}): the file is cut off or not UTF-8"
    return None


def _nesting(block: bytes, depth: int, line: int) -> tuple[int, int | None]:
    """(the depth after `block`, the number of its first line nesting deeper than MAX_NESTING, or None). Strings
    are cut out (a bracket inside one is text); the depth is a running sum over the brackets left."""
    import numpy as np

    def levels(text: bytes, start: int):
        brackets = np.frombuffer(_JSON_STRING.sub(b"", text).translate(None, _NOT_BRACKETS), np.uint8)
        return start + np.cumsum(np.where(np.isin(brackets, (ord("["), ord("{"))), 1, -1))

    running = levels(block, depth)
    if len(running) and running.max() > MAX_NESTING:
        for number, text in enumerate(block.split(b"\n"), line):  # which line, for the message
            inside = levels(text, depth)
            if len(inside) and inside.max() > MAX_NESTING:
                return depth, number
            depth = int(inside[-1]) if len(inside) else depth
    return (int(running[-1]) if len(running) else depth), None


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
        problem = _text_problem(file, json_nesting=builder == "json")
        if problem:
            raise DataError(f"`{file}` could not be read as {_FILE_KINDS[builder]}: {problem}")
    kwargs = _csv_kwargs(files[0]) if builder == "csv" else {}
    try:
        return datasets.load_dataset(builder, data_dir=str(path), split=split, **kwargs)
    except Exception as e:
        raise _read_error(f"folder `{path}`", builder, split, e) from e


def cause(e: BaseException) -> str:
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
        if split == split_name(split):
            return DataError(f"{where} has no rows")
        return DataError(f"{where}: split `{split}` selects no rows")
    if text.startswith("Unknown split"):
        return DataError(f"{where}: {text.rstrip('.')}; set `data.split`")
    return DataError(f"{where} could not be read as {_FILE_KINDS[builder]}: {cause(e)}")


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
            f"could not reach the Hugging Face Hub to load `{name}` ({cause(e)}). Give a local file as "
            f"`data.source` (.json, .jsonl, .csv or .parquet) instead; or, {cache}"
        ) from e
    except datasets.exceptions.DatasetNotFoundError as e:
        raise DataError(
            f"`{name}` was not found on the Hugging Face Hub ({cause(e)}); check the name, log in "
            "(`hf auth login` or HF_TOKEN) for a gated or private dataset, or give a local file path"
        ) from e
    except Exception as e:
        raise DataError(f"could not load `{name}` (split `{split}`) from the Hugging Face Hub: {cause(e)}") from e


