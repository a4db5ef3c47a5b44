"""Held-out figures before and after training: loss, perplexity, answers side by side.

    from sftlib.evaluate import heldout_loss, compare_answers
    before = heldout_loss(model, eval_rows)          # {"loss": 2.31, "perplexity": 10.1, "tokens": 512}
    table = compare_answers(model, tokenizer, template, conversations)

The loss is the mean negative log-likelihood over trained tokens only (labels != -100), one
conversation at a time, so it is comparable across packing and batch settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def heldout_loss(model, rows, *, max_rows: int | None = None) -> dict:
    """Token-weighted mean loss and perplexity of `model` over encoded rows (`input_ids`, `labels`)."""
    import torch

    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    n = len(rows) if max_rows is None else min(max_rows, len(rows))
    with torch.no_grad():
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
