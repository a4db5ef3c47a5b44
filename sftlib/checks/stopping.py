"""Can the model learn to stop? How likely the base finds the end-of-turn token where assistant turns end.

    from sftlib.checks.stopping import probe_stop, stop_findings
    info.stop_probability, info.weak_stop_ids = probe_stop(model, train_rows, info.stop_token_ids)
    findings += stop_findings(info, tokenizer, template, rows_trained=True)

A base that never produced its end-of-turn token (stories260K was trained with BOS only; a tokenizer
whose `eos_token` is not in its vocabulary gets it added as a fresh row) gives it almost no probability,
and with its row frozen (tied to the head, or a new row left untrained) LoRA alone rarely teaches it:
after training the model still talks past its answer. `lora.train_embeddings: auto` trains such rows
(sftlib.training.lora); pre-flight says when they stay frozen.
"""

from __future__ import annotations

from sftlib.checks.report import INFO, WARNING, Finding
from sftlib.data.encode import IGNORE

UNLIKELY = 1e-3  # below this mean probability at the ends of assistant turns, the stop row is trained


def probe_stop(model, rows, stop_ids: list[int], *, max_rows: int = 8, max_length: int = 512
               ) -> tuple[float | None, list[int]]:
    """(mean probability the model gives the trained stop token where it stands in `rows`, the stop ids
    below `UNLIKELY`). Only positions whose label is a stop id count; (None, []) when no row has one."""
    import torch

    stops = set(stop_ids)
    per_id: dict[int, list[float]] = {}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for k in range(min(len(rows), 4 * max_rows)):
                ids, labels = list(rows[k]["input_ids"])[:max_length], list(rows[k]["labels"])[:max_length]
                where = [i for i in range(1, len(ids)) if labels[i] != IGNORE and labels[i] in stops]
                if not where:
                    continue
                logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
                probs = torch.softmax(logits[[i - 1 for i in where]], dim=-1)
                for row, i in enumerate(where):
                    per_id.setdefault(labels[i], []).append(float(probs[row, labels[i]]))
                if sum(len(v) for v in per_id.values()) >= max_rows:
                    break
    finally:
        model.train(was_training)
    if not per_id:
        return None, []
    values = [p for v in per_id.values() for p in v]
    weak = sorted(i for i, v in per_id.items() if sum(v) / len(v) < UNLIKELY)
    return sum(values) / len(values), weak


def stop_findings(info, tokenizer, template, *, rows_trained: bool) -> list[Finding]:
    """Findings about the end-of-turn token's row: `end_of_turn_not_in_vocab` (the eos_token was added as
    a fresh row) and `end_of_turn_unlikely` (the base gives it almost no probability). A warning when that
    row stays frozen (`rows_trained` False), else a note that it is trained."""
    out = []
    eot = template.end_of_turn_text(tokenizer.eos_token)
    frozen = ("its row is not trained (`lora.train_embeddings: never`), so the model can hardly learn to stop and "
              "talks past its answers. Fix: `lora.train_embeddings: auto` (that row alone is trained), or `always`")
    trained = "`lora.train_embeddings` trains its row, so the model can learn to stop"
    if getattr(info, "eos_added", False):
        out.append(Finding(WARNING if not rows_trained else INFO, "end_of_turn_not_in_vocab", (
            f"the eos_token `{tokenizer.eos_token}` is not in the base's vocabulary: transformers added it as a new "
            f"token whose embedding the base never learned; {frozen if not rows_trained else trained}")))
    p = getattr(info, "stop_probability", None)
    if p is not None and getattr(info, "weak_stop_ids", None):
        out.append(Finding(WARNING if not rows_trained else INFO, "end_of_turn_unlikely", (
            f"the base gives the end-of-turn token `{eot}` a mean probability of {p:.1e} where assistant turns end "
            f"(under {UNLIKELY:g}: it has never learned to stop); {frozen if not rows_trained else trained}")))
    return out
