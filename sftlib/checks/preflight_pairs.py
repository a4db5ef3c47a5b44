"""Pre-flight for preference pairs: the tokenizer, the mask of both replies, lengths, truncation, memory.

    from sftlib.checks.preflight_pairs import preflight_pairs
    report = preflight_pairs(cfg, tokenizer, template, pair_rows, model=model, backend="cpu")
    print(report.to_text()); report.raise_if_fatal()

`pair_rows` are sftlib.data.encode_pairs rows. The report is the SFT pre-flight's `Report` (same renderings):
- the tokenizer checks of sftlib.checks.preflight (special tokens one token each, pad token not EOS, ...);
- a preview of the first pair, chosen and rejected, the trained tokens (the reply and its end-of-turn token,
  what DPO and ORPO score) between « »;
- pairs left out because their prompt alone fills `model.max_seq_length` (a warning);
- lengths: a pair's length is its prompt plus its longer reply, uncut; pairs whose replies are cut at
  `model.max_seq_length` (a warning: a cut reply loses its end-of-turn token, and DPO compares a part of
  it), and the tokens cut from the chosen and from the rejected replies;
- memory: each pair is two sequences (chosen and rejected go through the model in one batch of
  2 x `train.batch_size` padded rows), estimated as such by sftlib.training.memory; DPO's reference adds
  a forward pass without gradients, which the activations of the trained pass exceed.
"""

from __future__ import annotations

import copy

from sftlib.checks.memory_finding import memory_finding
from sftlib.checks.preflight import _check_tokenizer, _rows_list, _segments
from sftlib.checks.report import FATAL, INFO, WARNING, Finding, Preview, Report
from sftlib.data.encode import IGNORE


def preflight_pairs(cfg, tokenizer, template, pair_rows, *, model=None, backend: str | None = None, gpu=None,
                    embeddings_trained: bool | None = None, shape=None, preview: int = 1,
                    dropped: list[int] | None = None, row_numbers: list[int] | None = None) -> Report:
    """The report on encoded pairs; `dropped`: the row numbers of the pairs sftlib.data.encode_pairs left out.
    Rows are named by their number in the pairs before dropping (`row_numbers[i]` names `pair_rows[i]`; by
    default the numbers `dropped` skips), so that every number points at the same pair."""
    limit = cfg.model.max_seq_length
    report = Report(rows_total=len(pair_rows), rows_checked=len(pair_rows), max_seq_length=limit)
    add = report.findings.append
    _check_tokenizer(tokenizer, template, report.findings)
    cut, lost = [], {"chosen": 0, "rejected": 0}
    gone = set(dropped or ())
    numbers = row_numbers or [i for i in range(len(pair_rows) + len(gone)) if i not in gone]
    report.rows_checked = report.rows_total = len(pair_rows) + len(gone)
    for k, row in enumerate(pair_rows):
        i = numbers[k]
        prompt = list(row["prompt_ids"])
        longest = 0
        for side in ("chosen", "rejected"):
            reply, n_cut = list(row[f"{side}_ids"]), int(row[f"{side}_cut"])
            longest = max(longest, len(reply) + n_cut)
            lost[side] += n_cut
            report.tokens += len(prompt) + len(reply)
            report.trained_tokens += len(reply)
            if k < preview:
                segments = _segments(tokenizer, prompt + reply, [IGNORE] * len(prompt) + reply)
                if n_cut:
                    segments.append((f" ✂ {side} reply cut by `model.max_seq_length` ({n_cut} more tokens)", False))
                report.previews.append(Preview(i, [(f"[{side}] ", False), *segments], len(prompt) + len(reply),
                                               len(reply)))
        if row["chosen_cut"] or row["rejected_cut"]:
            cut.append(i)
        report.lengths.append(len(prompt) + longest)
        report.row_shares.append(0.0)
    report.truncated_rows, report.trained_lost = len(cut), lost["chosen"] + lost["rejected"]
    if report.tokens:
        add(Finding(INFO, "trained_share", f"{len(pair_rows)} pairs, {report.tokens:,} tokens with both sides; the "
                    f"replies (words and end-of-turn token) are {report.trained_tokens / report.tokens:.1%} of them"))
    lengths = sorted(report.lengths)
    if lengths:
        add(Finding(INFO, "lengths", f"pair lengths in tokens (prompt + longer reply): min {lengths[0]}, median "
                    f"{lengths[len(lengths) // 2]}, max {lengths[-1]}; `model.max_seq_length` is {limit}"))
    if dropped:
        add(Finding(WARNING, "dropped_pairs", (
            f"{len(dropped)} of {len(pair_rows) + len(dropped)} pairs ({_rows_list(dropped)}) "
            f"are left out: their prompt alone fills `model.max_seq_length` ({limit}), leaving no reply to compare. "
            "Fix: raise `model.max_seq_length`, or accept training without them")))
    if cut:
        add(Finding(WARNING, "truncated_pairs", (
            f"{len(cut)} of {len(pair_rows)} pairs ({_rows_list(cut)}) do not fit `model.max_seq_length` ({limit}): "
            f"their replies are cut, {lost['chosen']:,} tokens of chosen and {lost['rejected']:,} of rejected replies "
            "lost, with their end-of-turn tokens, so those pairs compare parts of replies. Fix: raise "
            f"`model.max_seq_length` (the longest pair has {lengths[-1]} tokens) or drop the longest pairs")))
        if len(cut) == len(pair_rows):
            add(Finding(FATAL, "every_pair_cut", f"every pair is cut at `model.max_seq_length` ({limit}): no reply "
                        "is compared whole. Fix: raise `model.max_seq_length`"))
    pairs_cfg = copy.deepcopy(cfg)  # two padded sequences per pair
    pairs_cfg.train.batch_size, pairs_cfg.train.packing = 2 * cfg.train.batch_size, False
    memory_finding(report, pairs_cfg, tokenizer, model, shape, backend, gpu, embeddings_trained)
    if report.findings and report.findings[-1].code.startswith("memory"):
        last = report.findings[-1]
        last.message += (f" (a pair is two sequences: estimated for {pairs_cfg.train.batch_size} padded rows of "
                         f"{limit} tokens per step; any batch advice above counts sequences, halve it for pairs)")
    order = {FATAL: 0, WARNING: 1, INFO: 2}
    report.findings.sort(key=lambda f: order[f.severity])
    return report
