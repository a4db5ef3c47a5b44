"""A DataConfig to training rows and held-out rows: load, convert, split.

    from sftlib.data.dataset import load_dataset
    train_ds, eval_ds = load_dataset(cfg.data)    # source, split, format, mapping, eval_size, max_rows, shuffle_seed

`source: demo` is the bundled demo data.
"""

from __future__ import annotations

import os
from typing import Any

import datasets

from sftlib.data.convert import to_messages
from sftlib.data.detect import DataError
from sftlib.data.load import load_rows, split_name
from sftlib.data.split import split_eval



def load_dataset(data_cfg: Any) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, eval|None) from a DataConfig: load_rows -> first `max_rows` -> to_messages -> split_eval.

    Uses data_cfg.source, .split, .format, .mapping, .eval_size, .max_rows and .shuffle_seed. `source: demo`
    is the bundled demo data.
    """
    source = getattr(data_cfg, "source", None)
    split = getattr(data_cfg, "split", None) or "train"
    if source == "demo":
        from sftlib import demo

        source = demo.data_path()
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
        if split != split_name(split):
            label += f" (split `{split}`; rows are numbered within it)"
    ds = to_messages(rows, getattr(data_cfg, "format", "auto") or "auto", getattr(data_cfg, "mapping", None), source=label)
    return split_eval(ds, getattr(data_cfg, "eval_size", 0) or 0, getattr(data_cfg, "shuffle_seed", 0) or 0)

