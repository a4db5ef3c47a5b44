"""A live plot of preference tuning for notebooks: the training loss and the reward margin, side by side.

    from sftlib import notebook as nb
    plot = nb.live_preference_plot()                 # a callback for sftlib.train with `train.method: dpo | orpo`
    outcome = sftlib.train(cfg, model, s, data, callbacks=[plot])
    plot.losses, plot.margins                        # (step, value) as TRL logged them in this run

The reward margin is TRL's `rewards/margins`: for DPO, beta x the log-ratio margin of chosen over rejected
against the reference; for ORPO, beta x the log-odds margin. It rises as the model comes to prefer the
chosen replies. Redrawn at most every `every_s` seconds and once at the end, in one output replaced in place.
"""

from __future__ import annotations

import math
import time


def live_preference_plot(every_s: float = 2.0):
    """A transformers TrainerCallback drawing loss and reward margin as they are logged (a function, so that
    importing sftlib.notebook does not import transformers)."""
    from transformers import TrainerCallback

    class _LivePreferencePlot(TrainerCallback):
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
            if "rewards/margins" in logs:
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

            fig, axes = plt.subplots(1, 2, figsize=(10, 3))
            for ax, points, label, colour in ((axes[0], self.losses, "training loss", "#4a7bd0"),
                                              (axes[1], self.margins, "reward margin (chosen - rejected)", "#2e7d32")):
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, marker="." if len(steps) < 30 else None, color=colour)
                    ax.set_title(f"step {steps[-1]}: {values[-1]:.3f}")
                ax.set_xlim(0, max(max_steps, self.losses[-1][0]))
                ax.set_xlabel("step")
                ax.set_ylabel(label)
            axes[1].axhline(0, color="#999", linewidth=0.8)
            fig.tight_layout()
            if self._handle is None:
                self._handle = display(fig, display_id=True)
            else:
                self._handle.update(fig)
            plt.close(fig)
            self.draws += 1

    return _LivePreferencePlot()
