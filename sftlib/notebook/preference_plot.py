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

from sftlib.notebook.helpers import live_loss_plot


def live_preference_plot(every_s: float = 2.0):
    """A transformers TrainerCallback drawing loss and reward margin as they are logged (a function, so that
    importing sftlib.notebook does not import transformers)."""
    return live_loss_plot(every_s, reward_margin=True)
