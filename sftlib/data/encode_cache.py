"""Encoded rows kept on disk: a second run on the same data and settings loads them instead of encoding again.

    from sftlib.data.encode_cache import cached_encode
    rows = cached_encode(ds, tokenizer, template, train_on="assistant", max_length=2048, log=print)
    # first time: encode_dataset(...), then "encoded rows: saved to the cache .../3f9c..."
    # again, in this process or another: "encoded rows: reused from the cache .../3f9c..." (a memory map, no work)

The key is a hash of everything the ids and labels depend on:
- the data: the dataset's fingerprint (`datasets` derives it from the files loaded, or the rows given, and
  every transform since: a changed file, split, `max_rows`, mapping or shuffle seed gives another one);
- the template: all its fields, its Jinja text included (not only its name);
- the tokenizer: a hash of its serialized content (vocabulary, merges, added tokens, normalizer, pre- and
  post-processor) and its BOS/EOS/special-token settings, not its name;
- the settings: `train_on`, `max_length`, and the column encoded (`messages` or `text`);
- the encoder itself: a hash of the source of sftlib's encoding and template modules, and the versions of
  transformers (its Jinja renderer), jinja2 and tokenizers, so that a change there never reuses rows encoded
  by the old code.

Where: `$SFTLIB_ENCODE_CACHE` when set (`off` turns the cache off), else `sftlib-encoded` in the `datasets`
cache (`$HF_DATASETS_CACHE`, by default `~/.cache/huggingface/datasets`). One folder per key, written by
`Dataset.save_to_disk` into a hidden temporary folder and renamed into place in one step, so an interrupted
write leaves no entry (its temporary folder is removed, or swept by a later write). The `KEEP` entries used
last are kept; the folder can be deleted at any time. A tokenizer without a Rust backend (a slow one) has no
serialized content to hash: its rows are encoded each time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

from sftlib.data.encode import adds_bos

KEEP = 8  # entries kept (a run writes two: training and held-out rows); the ones used longest ago go first
STALE_SECONDS = 3600  # a temporary folder this old is a write that was cut short
OFF = ("off", "0", "false", "no", "none")


def cache_folder() -> Path | None:
    """The folder entries go to, or None when `SFTLIB_ENCODE_CACHE` turns the cache off."""
    env = os.environ.get("SFTLIB_ENCODE_CACHE")
    if env is not None:
        return None if env.strip().lower() in OFF or not env.strip() else Path(env).expanduser()
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "sftlib-encoded"


def tokenizer_hash(tokenizer) -> str | None:
    """sha256 of the tokenizer's serialized content and its special-token settings; None for a slow one."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    h = hashlib.sha256(backend.to_str().encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token, tokenizer.bos_token_id,
                         tokenizer.eos_token_id, adds_bos(tokenizer), bool(getattr(tokenizer, "split_special_tokens",
                                                                                    False))]).encode())
    return h.hexdigest()


def _encoder_hash() -> str:
    import jinja2
    import tokenizers
    import transformers

    from sftlib.data import boundary, encode, encode_batch, templates

    h = hashlib.sha256()
    for module in (encode, encode_batch, boundary, templates):
        h.update(Path(module.__file__).read_bytes())
    h.update(json.dumps([transformers.__version__, jinja2.__version__, tokenizers.__version__]).encode())
    return h.hexdigest()


def cache_key(dataset, tokenizer, template, *, train_on: str, max_length: int | None) -> tuple[str, dict] | None:
    """(key, its parts) for these rows and settings; None where the rows cannot be keyed (no fingerprint, a
    slow tokenizer, a template that is not a dataclass)."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    tok = tokenizer_hash(tokenizer)
    if not fingerprint or tok is None or not dataclasses.is_dataclass(template):
        return None
    column = "messages" if "messages" in dataset.column_names else "text"
    parts = {"data_fingerprint": fingerprint, "rows": len(dataset), "column": column,
             "template": dataclasses.asdict(template), "tokenizer_sha256": tok, "train_on": train_on,
             "max_length": max_length, "encoder_sha256": _encoder_hash()}
    key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()[:32]
    return key, parts


def cached_encode(dataset, tokenizer, template, *, train_on: str = "assistant", max_length: int | None = None,
                  folder: str | os.PathLike | None = None, log=print, stats: dict | None = None):
    """`encode_dataset(dataset, tokenizer, template, train_on=..., max_length=...)`, reused from the cache
    folder (`folder`, else `cache_folder()`) when an entry with the same key is there, else encoded and
    saved there. Says which in one line through `log`. `stats`, if given, gets `reused` (bool), the
    seconds spent (`key_seconds`, `encode_seconds`, `save_seconds`, `load_seconds`) and the `entry`."""
    from sftlib.data.encode_batch import encode_dataset

    stats = {} if stats is None else stats
    stats.update(reused=False, entry=None, key_seconds=0.0, encode_seconds=0.0, save_seconds=0.0, load_seconds=0.0)
    t0 = time.perf_counter()
    root = Path(folder).expanduser() if folder is not None else cache_folder()
    keyed = cache_key(dataset, tokenizer, template, train_on=train_on, max_length=max_length) if root else None
    stats["key_seconds"] = time.perf_counter() - t0
    if keyed is None:
        t0 = time.perf_counter()
        rows = encode_dataset(dataset, tokenizer, template, train_on=train_on, max_length=max_length)
        stats["encode_seconds"] = time.perf_counter() - t0
        return rows
    key, parts = keyed
    entry = stats["entry"] = root / key
    if entry.is_dir():
        t0 = time.perf_counter()
        rows = _load(entry, log)
        stats["load_seconds"] = time.perf_counter() - t0
        if rows is not None:
            stats["reused"] = True
            with contextlib.suppress(OSError):  # a read-only cache is still read
                os.utime(entry)  # used now: kept over older entries
            log(f"encoded rows: reused from the cache {entry} ({len(rows)} rows; same data fingerprint, template, "
                "tokenizer and settings)")
            return rows
    t0 = time.perf_counter()
    rows = encode_dataset(dataset, tokenizer, template, train_on=train_on, max_length=max_length)
    stats["encode_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        _save(rows, root, key, parts)
        stats["save_seconds"] = time.perf_counter() - t0
    except OSError as exc:  # a full or read-only disk costs the reuse, not the run
        log(f"encoded rows: not saved to the cache {root} ({exc}); set SFTLIB_ENCODE_CACHE to another folder or `off`")
        return rows
    log(f"encoded rows: saved to the cache {entry} (SFTLIB_ENCODE_CACHE=off turns it off)")
    return rows


def _load(entry: Path, log):
    """The entry's rows, or None (and the entry removed) when it cannot be read as what was saved."""
    import datasets

    try:
        rows = datasets.load_from_disk(str(entry))
        if isinstance(rows, datasets.Dataset) and set(rows.column_names) == {"input_ids", "labels", "truncated"}:
            return rows
        problem = f"columns {rows.column_names}"
    except Exception as exc:  # noqa: BLE001 - any unreadable entry is encoded again, not a failed run
        problem = f"{type(exc).__name__}: {exc}"
    log(f"encoded rows: the cache entry {entry} could not be read ({problem}); encoding again")
    shutil.rmtree(entry, ignore_errors=True)
    return None


def _save(rows, root: Path, key: str, parts: dict) -> None:
    """Write into a hidden temporary folder, then rename it to the key: readers see a whole entry or none."""
    root.mkdir(parents=True, exist_ok=True)
    _sweep(root)
    tmp = root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        rows.save_to_disk(str(tmp))
        (tmp / "sftlib_key.json").write_text(json.dumps(parts, indent=2, sort_keys=True, default=repr) + "\n")
        try:
            os.rename(tmp, root / key)
        except OSError:
            if not (root / key).is_dir():  # not another run that saved the same rows first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sweep(root: Path) -> None:
    """Remove temporary folders of writes cut short, and all but the `KEEP - 1` entries used last."""
    now = time.time()
    entries = []
    for path in root.iterdir():
        try:
            mtime = path.stat().st_mtime
        except OSError:
            continue
        if path.name.startswith(".tmp-"):
            if now - mtime > STALE_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
        elif path.is_dir() and (path / "sftlib_key.json").is_file():
            entries.append((mtime, path))
    for _, path in sorted(entries, reverse=True)[KEEP - 1:]:
        shutil.rmtree(path, ignore_errors=True)
