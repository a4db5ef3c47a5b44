"""Did preference tuning work? Held-out pairs scored before and after: preference accuracy and reward margin.

    from sftlib.checks.preference_eval import pair_logps, preference_figures
    before = pair_logps(model, eval_pairs)                 # [(log p(chosen), log p(rejected))], before training
    after = pair_logps(trained, eval_pairs)
    figs = preference_figures(before, after, beta=0.1)
    figs["accuracy_before"], figs["accuracy_after"], figs["reward_margin"]

`eval_pairs` are rows of sftlib.data.encode_pairs (prompt, chosen and rejected ids). A reply's score is
the summed log-probability of its tokens (its words and end-of-turn token) after the prompt, the quantity
DPO's reward is built on. Figures:
- accuracy: the share of pairs whose chosen reply scores above the rejected one (before, after);
- logp_margin: the mean of log p(chosen) - log p(rejected) (before, after);
- reward_margin: DPO's implicit reward margin against the model before training (the reference),
  beta x [(after - before) of the chosen minus (after - before) of the rejected], averaged; 0 before by
  definition. reward_accuracy: the share of pairs where that margin is positive (TRL's rewards/accuracies).
"""

from __future__ import annotations

import math


def pair_logps(model, rows, *, max_rows: int | None = None) -> list[tuple[float, float]]:
    """(chosen, rejected) summed log-probabilities of each pair's replies given its prompt, in eval mode."""
    import torch

    from sftlib.infer import autocast_for

    was_training = model.training
    model.eval()
    n = len(rows) if max_rows is None else min(max_rows, len(rows))
    out = []
    with torch.no_grad(), autocast_for(model):
        for i in range(n):
            row = rows[i]
            prompt = list(row["prompt_ids"])
            scores = []
            for side in ("chosen_ids", "rejected_ids"):
                reply = list(row[side])
                ids = torch.tensor([prompt + reply], device=model.device)
                logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
                target = ids[0, len(prompt):]
                scores.append(torch.log_softmax(logits, -1).gather(-1, target[:, None]).sum().item())
            out.append((scores[0], scores[1]))
    if was_training:
        model.train()
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def preference_figures(before: list[tuple[float, float]], after: list[tuple[float, float]] | None = None,
                       *, beta: float = 0.1) -> dict:
    """The held-out figures (see the module docstring); the `_after` and reward entries need `after`."""
    figs = {"pairs": len(before), "accuracy_before": _mean(c > r for c, r in before),
            "logp_margin_before": _mean(c - r for c, r in before)}
    if after is not None:
        rewards = [beta * ((ca - cb) - (ra - rb)) for (cb, rb), (ca, ra) in zip(before, after)]
        figs.update(accuracy_after=_mean(c > r for c, r in after), logp_margin_after=_mean(c - r for c, r in after),
                    reward_margin=_mean(rewards), reward_accuracy=_mean(m > 0 for m in rewards))
    return figs


def figures_text(figs: dict) -> str:
    """Two lines for logs and the model card."""
    line = (f"held-out preference accuracy (chosen scored above rejected, {figs['pairs']} pairs): "
            f"{figs['accuracy_before']:.0%} before")
    if "accuracy_after" in figs:
        line += (f", {figs['accuracy_after']:.0%} after\nmean log-probability margin {figs['logp_margin_before']:.2f} "
                 f"-> {figs['logp_margin_after']:.2f}; reward margin against the model before training "
                 f"{figs['reward_margin']:.3f} (positive for {figs['reward_accuracy']:.0%} of pairs)")
    return line
