"""The whole run, one plain function per step: what `python -m sftlib train` and the demo call.

    from sftlib.config import RunConfig
    from sftlib.pipeline import run
    result = run(RunConfig.preset("cpu-demo"))
    result.before["loss"], result.after["loss"], result.outputs["lora"]

Steps: validate the config -> choose the backend (and adapt the config to it, saying what changed)
-> load the data -> load the model -> fit the tokenizer to the chat template -> encode with the loss
mask -> held-out loss before -> add LoRA -> train -> held-out loss after -> save. Each step is a
function of its own module and can be called alone (see the notebooks).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class RunResult:
    backend: str = ""
    notes: list[str] = field(default_factory=list)
    template: str = ""
    added_tokens: list[str] = field(default_factory=list)
    pad_token: str = ""
    train_rows: int = 0
    eval_rows: int = 0
    truncated_rows: int = 0
    trained_token_share: float = 0.0
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    train: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    preflight: dict = field(default_factory=dict)  # sftlib.preflight.Report.to_dict()

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)


def _is_main_process() -> bool:
    """False only on the non-zero ranks of a multi-process (accelerate/torchrun) launch."""
    import os

    # The launchers (torchrun, accelerate launch) set RANK. accelerate's PartialState, asked before the
    # trainer has set up the process group, can answer "main" on every CPU rank: both then saved.
    return int(os.environ.get("RANK", "0")) == 0


def _silent(_: str) -> None:
    pass


def run(cfg, *, log: Callable[[str], None] = print, answer_samples: int = 0, show_answers: int = 0,
        callbacks=None) -> RunResult:
    """Fine-tune as `cfg` says and save the outputs; returns a `RunResult` (also written as JSON)."""
    from sftlib import backend as backends
    from sftlib.data import load_dataset
    from sftlib.encode import encode_dataset
    from sftlib.evaluate import accuracy, answers, heldout_loss, side_by_side
    from sftlib.model import add_lora, load_model, prepare_tokenizer
    from sftlib.templates import get_template
    from sftlib.train import train

    cfg.validate()
    if "gguf" in cfg.export.formats:  # a missing llama.cpp toolchain should stop the run now, not after training
        from sftlib.gguf_setup import require_toolchain

        require_toolchain()
    result = RunResult()
    main = _is_main_process()
    if not main:  # under `accelerate launch`, one process speaks, evaluates and saves
        log = _silent
        answer_samples = 0
    chosen = backends.choose_backend(cfg.backend)
    result.backend = chosen.name
    log(str(chosen))
    result.notes = backends.resolve(cfg, chosen)
    template = get_template(cfg.model.chat_template)
    result.template = template.name

    train_ds, eval_ds = load_dataset(cfg.data)
    log(f"data: {len(train_ds)} training rows, {len(eval_ds) if eval_ds is not None else 0} held out")
    model, tokenizer = load_model(cfg, chosen)
    info = prepare_tokenizer(model, tokenizer, template)
    result.added_tokens, result.pad_token = info.added_tokens, info.pad_token
    if info.added_tokens:
        log(f"template {template.name}: added tokens {info.added_tokens}; embeddings resized and trained")
    log(f"pad token: {info.pad_token!r} (not EOS, so EOS stays trained)")

    encode = dict(train_on=cfg.data.train_on, max_length=cfg.model.max_seq_length)
    train_rows = encode_dataset(train_ds, tokenizer, template, **encode)
    eval_rows = encode_dataset(eval_ds, tokenizer, template, **encode) if eval_ds is not None else None
    result.train_rows, result.eval_rows = len(train_rows), len(eval_rows) if eval_rows is not None else 0
    result.truncated_rows = sum(train_rows["truncated"])
    # counted in Arrow: a Python loop over every label of FineTome-100k takes seconds
    import pyarrow.compute as pc

    columns = train_rows.with_format("arrow")  # as the rows are seen (a selection included)
    labels = pc.list_flatten(columns["labels"])
    trained = len(labels) - pc.sum(pc.equal(labels, -100)).as_py() if len(labels) else 0
    total = len(pc.list_flatten(columns["input_ids"]))
    result.trained_token_share = trained / total if total else 0.0
    log(f"tokens: {total} in training rows, {result.trained_token_share:.0%} trained "
        f"({cfg.data.train_on}), {result.truncated_rows} rows cut at {cfg.model.max_seq_length}")
    if cfg.train.preflight != "off":  # before any training: fatal findings stop here, saying what to change
        from sftlib.preflight import preflight

        from sftlib.memory import embeddings_trained_by

        embeddings = embeddings_trained_by(cfg, bool(info.added_tokens), chosen.name)
        report = preflight(cfg, tokenizer, template, train_rows, raw_rows=train_ds, model=model,
                           backend=chosen.name, embeddings_trained=embeddings)
        result.preflight = report.to_dict()
        log(report.to_text())
        if cfg.train.preflight == "stop":
            report.raise_if_fatal()
    if trained == 0:
        raise ValueError("no token is trained: check `data.train_on` and `model.chat_template`")

    conversations = []
    if eval_ds is not None and answer_samples and "messages" in eval_ds.column_names:
        conversations = eval_ds.select(range(min(answer_samples, len(eval_ds))))["messages"]
    if eval_rows is not None and main:
        result.before = heldout_loss(model, eval_rows)
        log(f"held-out loss before: {result.before['loss']:.3f} (perplexity {result.before['perplexity']:.1f})")
    before_answers = answers(model, tokenizer, template, conversations) if conversations else []
    if before_answers:
        result.accuracy_before = accuracy(before_answers)

    model = add_lora(model, cfg, chosen, train_embeddings=bool(info.added_tokens),
                     new_token_ids=info.added_token_ids)
    if getattr(model, "sftlib_plan", None) is not None:  # `auto` settings: say what was chosen and why
        log(str(model.sftlib_plan))
    trained_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} rslora={cfg.lora.use_rslora}: {trained_params:,} trainable parameters")
    outcome = train(cfg, model, tokenizer, train_rows, backend=chosen, callbacks=callbacks)
    result.train = json.loads(outcome.to_json())
    log(f"trained {outcome.steps} steps in {outcome.runtime_s:.1f}s: loss {outcome.first_loss:.3f} -> "
        f"{outcome.final_loss:.3f}, {outcome.tokens_per_s:,.0f} tokens/s, peak {outcome.peak_memory_gib:.2f} GiB")
    if outcome.resumed_from:
        log(f"resumed from {outcome.resumed_from} (`train.resume: {cfg.train.resume}`)")

    if not main:
        return result
    if eval_rows is not None:
        result.after = heldout_loss(model, eval_rows)
        log(f"held-out loss after: {result.after['loss']:.3f} (perplexity {result.after['perplexity']:.1f})")
    after_answers = answers(model, tokenizer, template, conversations) if conversations else []
    if after_answers:
        result.accuracy_after = accuracy(after_answers)
        log(f"held-out exact answers: {result.accuracy_before:.0%} before, {result.accuracy_after:.0%} after "
            f"({len(after_answers)} conversations)")
        if show_answers:
            log(side_by_side(before_answers[:show_answers], after_answers[:show_answers]))

    out = Path(cfg.export.output_dir)
    if cfg.export.formats:
        from sftlib.exporter import export

        # the adapters are what the training made: always kept, whatever else is asked for
        formats = list(dict.fromkeys(["lora", *cfg.export.formats]))
        report = export(model, tokenizer, cfg, formats, out=out, template=template, log=log)
        result.outputs.update(report.outputs)
        result.outputs["export_report"] = report.report_path
    if result.outputs:  # the model card travels with the files (and is what the Hub shows)
        from sftlib.card import write_card

        result.outputs["card"] = str(write_card(out, cfg, result, train_ds=train_ds, template=template))
        log(f"wrote the model card {result.outputs['card']}")
    Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.train.output_dir) / "run_result.json").write_text(result.to_json())
    if cfg.export.push_to_hub:  # last, so that a failed upload leaves every local output in place
        from sftlib.hub import push_plan, upload_plan

        plan = upload_plan(out, cfg.export.hub_repo, revision=cfg.export.hub_revision, private=cfg.export.hub_private)
        log(plan.table())  # what is uploaded is exactly this list
        result.outputs["hub"] = push_plan(plan)
        log(f"uploaded {out} to {result.outputs['hub']}")
        (Path(cfg.train.output_dir) / "run_result.json").write_text(result.to_json())
    result.model, result.tokenizer, result.template_obj = model, tokenizer, template
    return result
