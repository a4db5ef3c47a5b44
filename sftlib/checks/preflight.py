"""Pre-flight checks: catch a run that would train the wrong thing, or not fit, before it starts.

    from sftlib.checks.preflight import preflight
    report = preflight(cfg, tokenizer, template, train_rows, raw_rows=train_ds, model=model)
    report                     # in a notebook: findings, label-mask preview with trained tokens highlighted
    print(report.to_ansi())    # in a terminal; report.to_text() for logs (trained text between « »)
    report.raise_if_fatal()    # PreflightError listing every fatal finding and what to change

    python -m sftlib preflight --config run.yaml    # the same without loading the weights; exit 1 if fatal

`train_rows` are encoded rows (`input_ids`, `labels`, optionally `truncated`, see sftlib.data.encode);
`raw_rows` the `messages` (or `text`) rows they came from, in the same order: with them the report
knows how many assistant turns each row has and how long the rows cut at `model.max_seq_length`
really were. Findings have a severity (fatal, warning, info), a code and a message that says what
to change. The checks:

- no_trained_tokens / rows_without_trained_tokens: the loss mask trains nothing, or nothing in some rows;
- end_of_turn_not_trained: an assistant turn whose end-of-turn token is masked (the model never stops);
- pad_is_eos / pad_is_end_of_turn / no_pad_token: padding must not be the token the model must learn;
- double_bos / missing_bos: BOS exactly once at the start, as in pre-training;
- special_token_split / no_eos_token: the template's markers exist as single tokens;
- marker_pieces_odd: the template's markers tokenize oddly on this tokenizer: a lone "▁" piece next to a
  special token (Mistral v1's template on a v3 tokenizer), or a token of the tokenizer split into pieces;
- end_of_turn_unlikely / end_of_turn_not_in_vocab: the base never predicts its end-of-turn token, or its
  eos_token was added as a new row; a warning when that row is not trained (sftlib.checks.stopping);
- chat_template_differs: `tokenizer.chat_template` renders what training saw (inference uses it);
- truncated_rows, lengths, trained_share: what `model.max_seq_length` cuts and what is trained;
- memory / memory_tight / memory_too_big: sftlib.training.memory's estimate against the GPU (too big is
  fatal, with the least harmful change that makes it fit).
"""

from __future__ import annotations

import random
import statistics

from sftlib.data.encode import IGNORE, adds_bos, encode_conversation, render
# PreflightError and the severities are part of this module's API; the report's rendering lives apart.
from sftlib.checks.report import FATAL, INFO, WARNING, Finding, PreflightError, Preview, Report  # noqa: F401
from sftlib.checks.memory_finding import memory_finding, shape_of

# ---- the checks ---------------------------------------------------------------------------------------


def _single_token_id(tokenizer, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def _rows_list(indices: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return f"row{'s' if len(indices) > 1 else ''} {shown}{', ...' if len(indices) > limit else ''}"


def _segments(tokenizer, ids: list[int], labels: list[int], limit: int = 1500) -> list[tuple[str, bool]]:
    """Runs of trained / untrained tokens as decoded text; long rows keep their start and end."""
    runs: list[tuple[list[int], bool]] = []
    for tok, lab in zip(ids, labels):
        on = lab != IGNORE
        if runs and runs[-1][1] == on:
            runs[-1][0].append(tok)
        else:
            runs.append(([tok], on))
    segs = [(tokenizer.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False), on) for r, on in runs]
    total = sum(len(t) for t, _ in segs)
    if total <= limit:
        return segs
    head, tail = limit // 3, limit - limit // 3  # the trained answer is usually at the end
    out, pos, gap = [], 0, False
    for text, on in segs:
        start, end = pos, pos + len(text)
        if start < head:
            out.append((text[: head - start], on))
        if end > total - tail:
            if not gap:
                out.append((f" … {total - head - tail} characters … ", False))
                gap = True
            out.append((text[max(0, total - tail - start):], on))
        pos = end
    return [(t, on) for t, on in out if t]


def _check_tokenizer(tokenizer, template, findings: list[Finding]) -> int | None:
    """Special tokens, EOS, pad; returns the end-of-turn token id (None when it is not one token)."""
    eos = tokenizer.eos_token
    if "{eos}" in template.end_of_turn and not eos:
        findings.append(Finding(FATAL, "no_eos_token", f"template `{template.name}` ends each turn with EOS, but the "
                                "tokenizer has no `eos_token`; set `tokenizer.eos_token` or pick another template"))
    eot = template.end_of_turn_text(eos)
    for text in dict.fromkeys([*template.special_tokens, eot]):
        if not text:
            continue
        pieces = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            shown = tokenizer.convert_ids_to_tokens(pieces)[:6]
            findings.append(Finding(FATAL, "special_token_split", (
                f"`{text}` of template `{template.name}` is not one token in this tokenizer but {len(pieces)} "
                f"({', '.join(repr(p) for p in shown)}{', ...' if len(pieces) > 6 else ''}): the model sees it as "
                "ordinary text and generation cannot stop on it. Fix: call "
                "sftlib.training.tokenizer.prepare_tokenizer(model, tokenizer, template), which adds it as one special token "
                "and trains its embedding, or pick a template whose tokens the model has (llama-3.1 for Llama 3.x)")))
    eot_id = _single_token_id(tokenizer, eot) if eot else None
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    fix = "Fix: sftlib.training.tokenizer.prepare_tokenizer picks a pad token that is neither (or adds `<|pad|>`)"
    if pad_id is None:
        findings.append(Finding(WARNING, "no_pad_token", "the tokenizer has no pad token, so trainers fall back to "
                                f"EOS, and collators that mask padding then mask every EOS. {fix}"))
    elif pad_id == eos_id:
        findings.append(Finding(FATAL, "pad_is_eos", (
            f"the pad token is the EOS token `{eos}`: collators that set padding labels to -100 mask every EOS "
            f"too, so the model never learns to stop. {fix}")))
    elif eot_id is not None and pad_id == eot_id:
        findings.append(Finding(FATAL, "pad_is_end_of_turn", (
            f"the pad token is the end-of-turn token `{eot}` of template `{template.name}`: masking padding "
            f"masks every end of turn, so the model never learns to stop. {fix}")))
    _check_marker_pieces(tokenizer, template, findings)
    if tokenizer.chat_template not in (None, template.jinja):
        findings.append(Finding(WARNING, "chat_template_differs", (
            f"`tokenizer.chat_template` is not template `{template.name}`: apply_chat_template at inference would "
            "render other text than training saw. Fix: sftlib.training.tokenizer.prepare_tokenizer sets it")))
    return eot_id


_SAMPLE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
           {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "Bye"},
           {"role": "assistant", "content": "Bye now"}]


def _check_marker_pieces(tokenizer, template, findings: list[Finding]) -> None:
    """Render a short conversation and look at the pieces around the template's markers: a "▁" piece
    alone beside a special token is a space the template writes where the model's own format has none
    (it costs a token per marker and is not what the model was tuned on); a token of the tokenizer's own
    added vocabulary that the rendered text holds but the ids do not is a marker cut into pieces."""
    sample = _SAMPLE if template.supports_system else _SAMPLE[1:]
    try:
        text = render(template, tokenizer, sample)
    except ValueError:
        return  # the template cannot render with this tokenizer; other findings say why
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    pieces = tokenizer.convert_ids_to_tokens(ids)
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    lone = [(pieces[k + 1] if k + 1 < len(ids) and ids[k + 1] in special else pieces[k - 1])
            for k, p in enumerate(pieces) if p == "\u2581" and
            ((k + 1 < len(ids) and ids[k + 1] in special) or (k > 0 and ids[k - 1] in special))]
    if lone:
        findings.append(Finding(WARNING, "marker_pieces_odd", (
            f"template `{template.name}` puts a lone '\u2581' piece beside {', '.join(sorted(set(lone)))} on this "
            f"tokenizer ({len(lone)} in a two-exchange conversation): a space the model's own format does not have. "
            "Fix: pick the template made for this tokenizer (`mistral-v3` for Mistral v0.3 / v3 tokenizers)")))
    cut = [t for t, i in tokenizer.get_added_vocab().items() if t.strip() and t in text and i not in ids]
    if cut:
        findings.append(Finding(WARNING, "marker_pieces_odd", (
            f"template `{template.name}` writes {', '.join(repr(t) for t in cut)}, one token in this tokenizer, but "
            "the rendered text tokenizes it as several pieces. Fix: pick the template made for this tokenizer")))


def _expected_ends(raw: dict | None, ids: list[int], labels: list[int], end_id: int, cut: bool) -> tuple[int, int]:
    """(assistant turns whose end token should be trained, how many are) for one row."""
    trained_ends = sum(1 for t, lab in zip(ids, labels) if t == end_id and lab != IGNORE)
    if raw is not None and "messages" in raw:
        return sum(m["role"] == "assistant" for m in raw["messages"]), trained_ends
    # Without the conversation: every run of trained tokens must hold an end token (a cut last run may not).
    runs, ended, holds = 0, 0, False
    for k, lab in enumerate(labels):
        if lab == IGNORE:
            continue
        holds = holds or ids[k] == end_id
        if k + 1 == len(labels) or labels[k + 1] == IGNORE:
            if not (k + 1 == len(labels) and cut):
                runs, ended = runs + 1, ended + holds
            holds = False
    return runs, ended


def preflight(cfg, tokenizer, template, train_rows, *, raw_rows=None, model=None, backend: str | None = None,
              gpu=None, embeddings_trained: bool | None = None, shape=None, sample: int = 2000,
              preview: int = 3, row_numbers: list[int] | None = None, tokens=None) -> Report:
    """Check encoded `train_rows` (and the run's memory) before training; returns a `Report`.

    Up to `sample` rows are checked (a seeded random sample, the first `preview` rows always among
    them). `model`, `shape` (sftlib.training.memory.ModelShape), `backend`, `gpu` and `embeddings_trained` feed
    the memory estimate; without `model` or `shape` the shape is read from `cfg.model.name`'s config.
    `row_numbers[i]` names row i in messages (default: i), for rows taken from a larger dataset.
    `tokens` (sftlib.training.tokenizer.TokenizerInfo, after sftlib.checks.stopping.probe_stop) feeds the
    end-of-turn findings.
    """
    train_on, limit = cfg.data.train_on, cfg.model.max_seq_length
    report = Report(rows_total=len(train_rows), max_seq_length=limit)
    findings = report.findings
    eot_id = _check_tokenizer(tokenizer, template, findings)
    eos_id, bos_id = tokenizer.eos_token_id, tokenizer.bos_token_id
    wants_bos = bos_id is not None and adds_bos(tokenizer)

    n = len(train_rows)
    first = list(range(min(preview, n)))
    rest = random.Random(0).sample(range(len(first), n), min(max(0, sample - len(first)), n - len(first)))
    indices = first + sorted(rest)
    report.rows_checked = len(indices)
    empty, cut_empty, bad_end, double, no_bos, cut = [], [], [], [], [], []
    lost, lost_unknown = 0, False
    for k in indices:
        row = train_rows[k]
        raw = raw_rows[k] if raw_rows is not None else None
        i = row_numbers[k] if row_numbers is not None else k
        ids, labels = list(row["input_ids"]), list(row["labels"])
        trained = sum(lab != IGNORE for lab in labels)
        was_cut = bool(row.get("truncated", False))
        full_len, full_trained = len(ids), trained
        if was_cut and raw is not None:  # how long was it? encode it again without the limit
            again = (encode_conversation(tokenizer, template, raw["messages"], train_on=train_on)
                     if "messages" in raw else encode_conversation(tokenizer, template, text=raw["text"]))
            full_len, full_trained = len(again["input_ids"]), sum(x != IGNORE for x in again["labels"])
        elif was_cut:
            lost_unknown = True
        elif len(ids) > limit:  # not cut yet: the trainer will cut it at max_length
            trained, was_cut = sum(lab != IGNORE for lab in labels[:limit]), True
        if was_cut:
            cut.append(i)
            lost += full_trained - trained
        report.tokens += min(len(ids), limit)
        report.trained_tokens += trained
        report.row_shares.append(trained / max(1, min(len(ids), limit)))
        report.lengths.append(full_len)
        if trained == 0:
            (cut_empty if was_cut else empty).append(i)
        end_id = eos_id if raw is not None and "text" in raw and "messages" not in raw else eot_id
        if end_id is not None and not was_cut and trained:
            expected, got = _expected_ends(raw, ids, labels, end_id, was_cut)
            if got < expected:
                bad_end.append(i)
        if bos_id is not None and ids[:2] == [bos_id, bos_id]:
            double.append(i)
        elif wants_bos and ids[:1] != [bos_id]:
            no_bos.append(i)
        if len(report.previews) < preview:
            segments = _segments(tokenizer, ids[:limit], labels[:limit])
            if was_cut:  # show where the row ends for the model
                segments.append((f" ✂ cut here by `model.max_seq_length` ({full_len - limit} more tokens)", False))
            report.previews.append(Preview(i, segments, min(len(ids), limit), trained))
    report.truncated_rows = len(cut)
    report.trained_lost = None if lost_unknown else lost
    _row_findings(report, cfg, template, tokenizer, empty, cut_empty, bad_end, double, no_bos, cut, model)
    memory_finding(report, cfg, tokenizer, model, shape, backend, gpu, embeddings_trained)
    if tokens is not None:
        from sftlib.checks.stopping import stop_findings

        from sftlib.training.lora import stop_rows_trained

        findings += stop_findings(tokens, tokenizer, template, rows_trained=stop_rows_trained(cfg, backend, tokens))
    order = {FATAL: 0, WARNING: 1, INFO: 2}
    report.findings.sort(key=lambda f: order[f.severity])
    return report


def _row_findings(report, cfg, template, tokenizer, empty, cut_empty, bad_end, double, no_bos, cut, model) -> None:
    from sftlib.checks.skeleton import max_positions

    add, checked, limit = report.findings.append, report.rows_checked, report.max_seq_length
    of = f"of the {checked} rows checked"
    eot = template.end_of_turn_text(tokenizer.eos_token)
    if report.tokens:
        shares = report.row_shares
        add(Finding(INFO, "trained_share", (
            f"{report.trained_tokens / report.tokens:.1%} of {report.tokens:,} tokens are trained "
            f"(`data.train_on: {cfg.data.train_on}`); per row min {min(shares):.1%}, median "
            f"{statistics.median(shares):.1%}, max {max(shares):.1%}")))
    if checked and report.trained_tokens == 0 and len(cut_empty) == checked:
        add(Finding(FATAL, "no_trained_tokens", (
            f"no token {of} is trained: every row is cut at `model.max_seq_length` ({limit}) before its first "
            f"answer, so the loss is empty and training changes nothing. Fix: raise `model.max_seq_length` "
            f"(the longest row has {max(report.lengths)} tokens)")))
    elif checked and report.trained_tokens == 0:
        add(Finding(FATAL, "no_trained_tokens", (
            f"no token {of} is trained: the loss is empty and training changes nothing. With `data.train_on: "
            f"assistant` the mask must cover the assistant turns: the rows need assistant turns, and the mask must "
            f"come from the template the rows were rendered with (TRL's `assistant_only_loss` needs "
            "`{% generation %}` markers in the chat template and masks everything without them). Fix: encode with "
            "sftlib.data.encode, which finds the assistant turns by rendering the template itself, or use "
            "`data.train_on: all`")))
    elif empty or cut_empty:
        why = (f"; {len(cut_empty)} of them {'was' if len(cut_empty) == 1 else 'were'} cut at "
               f"`model.max_seq_length` ({limit}) before the first trained token" if cut_empty else "")
        add(Finding(WARNING, "rows_without_trained_tokens", (
            f"{len(empty) + len(cut_empty)} {of} have no trained token ({_rows_list(sorted(empty + cut_empty))})"
            f"{why}: they cost compute and teach nothing. Fix: drop them, or raise `model.max_seq_length`")))
    if bad_end:
        add(Finding(FATAL, "end_of_turn_not_trained", (
            f"in {len(bad_end)} {of} ({_rows_list(bad_end)}) an assistant turn's end-of-turn token `{eot}` is not "
            "trained: the model never learns to stop and talks past its answer. Usual causes: pad token = EOS with a "
            "collator that masks padding, or a response mask that ends before the end-of-turn token. Fix: encode with "
            "sftlib.data.encode (it trains each turn's end-of-turn token) after sftlib.training.tokenizer.prepare_tokenizer")))
    bos = tokenizer.bos_token
    if double:
        add(Finding(FATAL, "double_bos", (
            f"{len(double)} {of} ({_rows_list(double)}) start with BOS twice (`{bos}{bos}`): the template wrote "
            "one and tokenizing added another, which the model never saw in pre-training. Fix: tokenize rendered "
            "text with `add_special_tokens=False` (sftlib.data.encode does), or set the template's `uses_bos`")))
    if no_bos:
        add(Finding(WARNING, "missing_bos", (
            f"{len(no_bos)} {of} ({_rows_list(no_bos)}) do not start with BOS `{bos}`, which this tokenizer puts "
            "in front of every text. Fix: encode with sftlib.data.encode, which adds it exactly once")))
    lengths = sorted(report.lengths)
    if lengths:
        p99 = lengths[int(0.99 * (len(lengths) - 1))]
        add(Finding(INFO, "lengths", (
            f"row lengths in tokens: min {lengths[0]}, median {lengths[len(lengths) // 2]}, 99th percentile {p99}, "
            f"max {lengths[-1]}; `model.max_seq_length` is {limit}")))
        if cut:
            share = f"{len(cut) / checked:.1%}"
            lost = ("an unknown number of trained tokens (pass raw_rows to count them)" if report.trained_lost is None
                    else f"{report.trained_lost:,} trained tokens "
                         f"({report.trained_lost / max(1, report.trained_tokens + report.trained_lost):.1%} of them)")
            wanted, cap = -(-p99 // 64) * 64, max_positions(cfg, model)  # never beyond what the model reads
            fix = ("drop the few longest rows, or raise `model.max_seq_length`" if p99 <= limit else
                   f"raise `model.max_seq_length` to {wanted} (covers 99% of rows)" if wanted <= cap else
                   f"drop or split the longest rows (99% of rows are under {p99} tokens, more than the {cap} this "
                   "model reads)" if limit >= cap else
                   f"raise `model.max_seq_length` to {cap}, the most this model reads, and drop or split the rows "
                   f"still longer (99% of rows are under {p99} tokens)")
            add(Finding(WARNING, "truncated_rows", (
                f"{len(cut)} {of} ({share}) are longer than `model.max_seq_length` ({limit}) and are cut, losing "
                f"{lost}; the longest has {lengths[-1]} tokens. Fix: {fix}")))


def preflight_from_config(cfg, *, gpu=None, sample: int = 2000, preview: int = 3) -> Report:
    """What `python -m sftlib preflight` runs: the tokenizer, the data and the model's config.json, no weights.

    Only a seeded sample of `sample` rows is encoded, so checking a large dataset takes seconds.
    """
    from sftlib.checks.skeleton import check_model_settings
    from sftlib.data import encode_dataset, load_dataset
    from sftlib.data.length import refuse_overlong
    from sftlib.data.templates import get_template
    from sftlib.training import memory
    from sftlib.training.model import load_tokenizer
    from sftlib.training.tokenizer import prepare_tokenizer

    cfg.validate()
    check_model_settings(cfg)  # what training refuses once the model is loaded, refused here without it
    template = get_template(cfg.model.chat_template)
    tokenizer = load_tokenizer(cfg)
    info = prepare_tokenizer(None, tokenizer, template)  # as training will: missing tokens added, pad != EOS
    if cfg.train.method != "sft":  # preference pairs: their own checks (sftlib.checks.preflight_pairs)
        return _pairs_from_config(cfg, tokenizer, template, info, gpu, sample, preview)
    train_ds, _ = load_dataset(cfg.data)
    refuse_overlong(train_ds, cfg.model.max_seq_length, source=f"`{cfg.data.source}`")  # before tokenizing it
    n = len(train_ds)
    first = list(range(min(preview, n)))
    rest = random.Random(0).sample(range(len(first), n), min(max(0, sample - len(first)), n - len(first)))
    numbers = first + sorted(rest)
    subset = train_ds.select(numbers)
    rows = encode_dataset(subset, tokenizer, template, train_on=cfg.data.train_on, max_length=cfg.model.max_seq_length)
    try:
        shape = shape_of(cfg)
    except Exception:  # no config.json to read: the memory finding says so
        shape = None
    backend = cfg.backend if cfg.backend != "auto" else None
    if shape is not None and tokenizer.eos_token_id is not None:  # an eos_token the base's vocabulary lacks
        info.eos_added = tokenizer.eos_token_id >= shape.vocab
    embeddings = memory.embeddings_trained_by(cfg, info.resized or info.eos_added, backend)
    report = preflight(cfg, tokenizer, template, rows, raw_rows=subset, shape=shape, gpu=gpu, backend=backend,
                       embeddings_trained=embeddings, sample=len(rows), preview=preview, row_numbers=numbers,
                       tokens=info)
    report.rows_total = n
    return report


def _pairs_from_config(cfg, tokenizer, template, info, gpu, sample: int, preview: int) -> Report:
    """preflight_from_config for `train.method: dpo | orpo`: a seeded sample of the training pairs, encoded."""
    from sftlib.checks.preflight_pairs import preflight_pairs
    from sftlib.data.encode_pairs import encode_pairs
    from sftlib.data.pairs import load_pairs
    from sftlib.training import memory

    train_ds, _ = load_pairs(cfg.data)
    n = len(train_ds)
    numbers = sorted(random.Random(0).sample(range(n), min(sample, n)))
    rows, dropped = encode_pairs(train_ds.select(numbers), tokenizer, template, max_length=cfg.model.max_seq_length)
    try:
        shape = shape_of(cfg)
    except Exception:  # no config.json to read: the memory finding says so
        shape = None
    backend = cfg.backend if cfg.backend != "auto" else None
    embeddings = memory.embeddings_trained_by(cfg, info.resized or info.eos_added, backend)
    report = preflight_pairs(cfg, tokenizer, template, rows, shape=shape, gpu=gpu, backend=backend,
                             embeddings_trained=embeddings, preview=min(preview, 1),
                             dropped=[numbers[i] for i in dropped],
                             row_numbers=[x for i, x in enumerate(numbers) if i not in set(dropped)])
    report.rows_total = n
    return report
