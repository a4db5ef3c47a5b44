"""Small helpers the notebooks call: the data as stored, the adapters folder, a live loss plot, and the
results file that papermill runs and tests read.

    from sftlib import notebook as nb
    raw = nb.raw_rows(cfg.data)                                # rows as stored, cut to data.max_rows
    adapters = nb.adapters_folder(ADAPTERS, cfg)               # ADAPTERS or <export.output_dir>/lora, checked
    plot = nb.live_loss_plot()                                 # a callback for sftlib.train / sftlib.run
    nb.save_results(RESULTS_PATH, {"final_loss": 0.42})        # JSON for papermill runs and tests

Nothing here trains or changes a model. transformers is imported only inside functions, because on a
GPU Unsloth must be imported before it (see sftlib.training.backend).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from sftlib.errors import SftlibError


def raw_rows(data_cfg):
    """The rows of `data.source` as stored (columns untouched), cut to `data.max_rows`: what detection sees."""
    from sftlib.data import load_rows

    source = data_cfg.source
    if source == "demo":
        from sftlib import demo

        source = demo.data_path()
    rows = load_rows(source, data_cfg.split)
    if data_cfg.max_rows is not None and data_cfg.max_rows < len(rows):
        rows = rows.select(range(data_cfg.max_rows))
    return rows


def adapters_folder(adapters: str | os.PathLike, cfg) -> Path:
    """The LoRA adapter folder to load: `adapters`, or else `<export.output_dir>/lora`, where 02_train saves
    them. ValueError naming the folder and the fix when no adapters are there."""
    folder = Path(adapters) if adapters else Path(cfg.export.output_dir) / "lora"
    if not (folder / "adapter_config.json").is_file():
        raise SftlibError(f"no LoRA adapters in `{folder}`: run 02_train with the same preset first, or set "
                         "ADAPTERS to the folder that holds adapter_config.json")
    return folder


def live_loss_plot(every_s: float = 2.0, *, reward_margin: bool = False):
    """A transformers TrainerCallback that redraws the training loss as it is logged (and, with
    `reward_margin`, TRL's `rewards/margins` of preference tuning in a second panel).

    Redraws at most every `every_s` seconds and once at the end, so plotting costs little training
    time. The points logged in this run stay in `.losses` (and `.margins`) as (step, value). A function
    returning an instance, so that importing this module does not import transformers.
    """
    from transformers import TrainerCallback

    class _LiveLossPlot(TrainerCallback):
        def __init__(self):
            self.losses: list[tuple[int, float]] = []
            self.margins: list[tuple[int, float]] = []
            self.draws = 0
            self._handle = None
            self._last = -math.inf

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            self.losses.append((state.global_step, float(logs["loss"])))
            if reward_margin and "rewards/margins" in logs:
                self.margins.append((state.global_step, float(logs["rewards/margins"])))
            if time.monotonic() - self._last >= every_s:
                self._draw(state.max_steps)

        def on_train_end(self, args, state, control, **kwargs):
            self._draw(state.max_steps)

        def _draw(self, max_steps: int) -> None:
            self._last = time.monotonic()
            if not self.losses:
                return
            import matplotlib.pyplot as plt
            from IPython.display import display

            panels = [(self.losses, "training loss", "loss", "#4a7bd0")]
            if reward_margin:
                panels.append((self.margins, "reward margin (chosen - rejected)", "margin", "#2e7d32"))
            fig, axes = plt.subplots(1, len(panels), figsize=(7 if len(panels) == 1 else 10, 3), squeeze=False)
            for ax, (points, label, short, colour) in zip(axes[0], panels):
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, marker="." if len(steps) < 30 else None, color=colour)
                    ax.set_title(f"step {steps[-1]}: {short} {values[-1]:.3f}")
                ax.set_xlim(0, max(max_steps, self.losses[-1][0]))
                ax.set_xlabel("step")
                ax.set_ylabel(label)
            if reward_margin:
                axes[0][1].axhline(0, color="#999", linewidth=0.8)
            fig.tight_layout()
            if self._handle is None:  # one output that is replaced in place, not a new figure per redraw
                self._handle = display(fig, display_id=True)
            else:
                self._handle.update(fig)
            plt.close(fig)
            self.draws += 1

    return _LiveLossPlot()


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def save_results(path: str | os.PathLike, results: dict) -> dict:
    """Write `results` as JSON to `path` (skipped when `path` is empty); returns them as plain JSON values."""
    plain = _plain(results)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(plain, indent=2) + "\n", encoding="utf-8")
    return plain
