"""Held-out figures before and after training: loss, perplexity, answers side by side, a table, a plot.

    from sftlib.checks.evaluate import heldout_loss, answers, side_by_side, figures, results_table, plot_loss
    before = heldout_loss(model, eval_rows)          # {"loss": 2.31, "perplexity": 10.1, "tokens": 512}
    replies = answers(model, tokenizer, template, conversations)   # greedy, same template as training
    print(side_by_side(replies_before, replies_after))
    figs = figures_of(result)                        # a pipeline RunResult -> the before/after numbers
    print(results_table(figs)); write_figures("outputs/figures.json", figs)   # JSON for papermill runs
    fig = plot_loss(result.train["losses"])          # a matplotlib Figure, or None without matplotlib

The loss is the mean negative log-likelihood over trained tokens only (labels != -100), one
conversation at a time, so it is comparable across packing and batch settings. matplotlib is
imported only inside `plot_loss`: training never needs it.
"""

from __future__ import annotations

import html
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path


def heldout_loss(model, rows, *, max_rows: int | None = None) -> dict:
    """Token-weighted mean loss and perplexity of `model` over encoded rows (`input_ids`, `labels`)."""
    import torch

    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    n = len(rows) if max_rows is None else min(max_rows, len(rows))
    from sftlib.infer import autocast_for

    with torch.no_grad(), autocast_for(model):
        for i in range(n):
            ids = torch.tensor([rows[i]["input_ids"]], device=model.device)
            labels = torch.tensor([rows[i]["labels"]], device=model.device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            target = labels[:, 1:]
            mask = target != -100
            if not mask.any():
                continue
            nll = torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum")
            total += nll.item()
            count += int(mask.sum())
    if was_training:
        model.train()
    loss = total / count if count else math.nan
    return {"loss": loss, "perplexity": math.exp(loss) if count else math.nan, "tokens": count}


@dataclass
class Answer:
    prompt: str
    reference: str
    reply: str
    stopped: bool

    @property
    def correct(self) -> bool:
        return self.stopped and self.reply.strip() == self.reference.strip()


def answers(model, tokenizer, template, conversations: list[list[dict]], *, max_new_tokens: int = 32) -> list[Answer]:
    """Greedy replies to each conversation's last user turn (the conversation's last assistant turn is the reference)."""
    from sftlib.infer import chat

    out = []
    for messages in conversations:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        reply = chat(model, tokenizer, template, messages[:last], max_new_tokens=max_new_tokens)
        out.append(Answer(messages[last - 1]["content"], messages[last]["content"], reply.text, reply.stopped))
    return out


def accuracy(items: list[Answer]) -> float:
    return sum(a.correct for a in items) / len(items) if items else math.nan


def side_by_side(before: list[Answer], after: list[Answer], width: int = 38) -> str:
    """A plain-text table of prompt, reference, reply before and reply after."""

    def cut(text: str) -> str:
        text = text.replace("\n", " ")
        return text if len(text) <= width else text[: width - 1] + "…"

    def show(a: Answer) -> str:
        return cut(a.reply) + ("" if a.stopped else " [no stop]")

    lines = [f"{'prompt':<{width}} | {'before':<{width}} | after"]
    lines.append("-" * len(lines[0]))
    for b, a in zip(before, after):
        mark = "✓" if a.correct else "✗"
        lines.append(f"{cut(b.prompt):<{width}} | {show(b):<{width}} | {show(a)} {mark}")
    return "\n".join(lines)


def _number(x):
    """JSON has no NaN: missing or undefined figures become None."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def figures(before: dict, after: dict, *, accuracy_before: float | None = None, accuracy_after: float | None = None,
            train: dict | None = None) -> dict:
    """The before/after figures as one JSON-ready dict: {name: {"before", "after", "change"}} plus training facts."""
    out: dict = {}
    rows = [("heldout_loss", before.get("loss"), after.get("loss")),
            ("heldout_perplexity", before.get("perplexity"), after.get("perplexity"))]
    if accuracy_before is not None or accuracy_after is not None:
        rows.append(("exact_answers", accuracy_before, accuracy_after))
    for name, b, a in rows:
        b, a = _number(b), _number(a)
        if b is None and a is None:
            continue
        out[name] = {"before": b, "after": a, "change": a - b if a is not None and b is not None else None}
    if before.get("tokens") or after.get("tokens"):
        out["heldout_tokens"] = after.get("tokens") or before.get("tokens")
    if train:
        losses = train.get("losses") or []
        out["train"] = {k: _number(train.get(k)) for k in ("steps", "tokens_seen", "runtime_s", "tokens_per_s",
                                                            "peak_memory_gib") if k in train}
        if losses:
            out["train"]["first_loss"], out["train"]["final_loss"] = _number(losses[0][1]), _number(losses[-1][1])
    return out


def figures_of(result) -> dict:
    """`figures` of a `sftlib.steps.RunResult`."""
    return figures(result.before, result.after, accuracy_before=result.accuracy_before,
                   accuracy_after=result.accuracy_after, train=result.train)


def write_figures(path: str | Path, figs: dict) -> Path:
    """Write `figs` as JSON (what a papermill run leaves behind for tests and reports)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figs, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


_LABELS = {"heldout_loss": "held-out loss", "heldout_perplexity": "held-out perplexity",
           "exact_answers": "exact answers"}


def _cells(name: str, f: dict) -> tuple[str, str, str, str]:
    def show(x):
        if x is None:
            return "-"
        return f"{x:.1%}" if name == "exact_answers" else f"{x:.3f}" if abs(x) < 100 else f"{x:,.1f}"

    change = f["change"]
    sign = "" if change is None or change < 0 else "+"
    delta = "-" if change is None else (f"{sign}{change * 100:.1f} pts" if name == "exact_answers"
                                        else f"{sign}{show(change)}")
    return _LABELS.get(name, name), show(f["before"]), show(f["after"]), delta


def results_table(figs: dict) -> str:
    """A plain-text table of the before/after figures (lower loss and perplexity are better)."""
    rows = [("figure", "before", "after", "change")]
    rows += [_cells(k, v) for k, v in figs.items() if isinstance(v, dict) and "before" in v]
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(width[i]) if i == 0 else c.rjust(width[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    t = figs.get("train")
    if t:
        lines.append(f"trained {t.get('steps', '?')} steps, {t.get('tokens_seen') or 0:,} tokens"
                     + (f", loss {t['first_loss']:.3f} -> {t['final_loss']:.3f}" if t.get("final_loss") is not None
                        else ""))
    return "\n".join(lines)


def results_html(figs: dict) -> str:
    """The same table as HTML, for a notebook cell."""
    rows = [_cells(k, v) for k, v in figs.items() if isinstance(v, dict) and "before" in v]
    body = "".join("<tr>" + "".join(f"<td style='padding:2px 10px'>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    head = "".join(f"<th style='padding:2px 10px'>{h}</th>" for h in ("figure", "before", "after", "change"))
    return f"<table><tr>{head}</tr>{body}</table>"


def plot_loss(losses, *, heldout: tuple[float, float] | None = None, title: str = "training loss"):
    """A matplotlib Figure of the training loss per step, with the held-out loss (before, after) as two markers.

    `losses`: (step, loss) pairs, e.g. `result.train["losses"]`. Returns None, with a warning, when
    matplotlib is not installed: plots are for notebooks and never needed to train.
    """
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, works without a display
    except ImportError:
        warnings.warn("matplotlib is not installed, so there is no loss plot; `pip install matplotlib` for one")
        return None
    fig = Figure(figsize=(6, 3.2))
    ax = fig.add_subplot()
    if losses:
        steps, values = zip(*[(s, v) for s, v in losses])
        ax.plot(steps, values, label="training loss", linewidth=1.2)
    if heldout is not None:
        last = losses[-1][0] if losses else 1
        for label, x, y, marker in (("before", 0, heldout[0], "o"), ("after", last, heldout[1], "s")):
            if _number(y) is not None:
                ax.plot([x], [y], marker, label=f"held-out loss {label}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
