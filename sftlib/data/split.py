"""Holding rows out for evaluation.

    from sftlib.data.split import split_eval
    train_ds, eval_ds = split_eval(ds, eval_size=0.05, seed=0)    # eval_ds is None for eval_size 0
"""

from __future__ import annotations

import datasets

from sftlib.data.detect import DataError



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


