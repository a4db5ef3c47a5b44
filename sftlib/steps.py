"""The flow as six steps, each a plain function with a clear input and output; `run` chains them.

    import sftlib
    cfg = sftlib.RunConfig.preset("cpu-demo")
    s = sftlib.setup(cfg)                  # checks, data rows, backend, model, tokenizer fitted to the template
    data = sftlib.prepare_data(cfg, s)     # encoded with the loss mask, pre-flight report
    before = sftlib.evaluate(s.model, s, data)
    model = sftlib.add_adapters(cfg, s)    # LoRA, and the rows of the tokens setup added
    outcome = sftlib.train(cfg, model, s, data)
    after = sftlib.evaluate(model, s, data)
    report = sftlib.export(model, s.tokenizer, cfg, ["lora", "merged_16bit"])

    result = sftlib.run(cfg)               # the same, in one call

With `train.method: dpo | orpo` the same steps run preference tuning on pairs (prompt, chosen, rejected;
see sftlib.data.pairs): `prepare_data` encodes the pairs, `evaluate` scores held-out pairs (pass the
first evaluation as `reference=` to the second for the reward margin), `train` runs TRL's DPO or ORPO
trainer. `lora.start_from` continues from trained adapters, e.g. an SFT run's.

`python -m sftlib train`, the demo, the notebooks (02_train calls one step per cell) and the tests
all go through these functions, so there is one copy of the flow. Each step prints what it decided
through `log`; each module it calls can also be used alone (see their docstrings).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from sftlib.errors import SftlibError

Log = Callable[[str], None]


@dataclass
class Setup:
    """What `setup` made ready: the data's rows, the engine, the model and its tokenizer fitted to the template."""

    backend: Any        # sftlib.training.backend.Backend
    model: Any          # the base model (None with `load_weights=False`)
    tokenizer: Any
    template: Any       # sftlib.data.templates.ChatTemplate
    tokens: Any         # sftlib.training.tokenizer.TokenizerInfo: tokens added, pad, stop ids
    rows: tuple = (None, None)  # (training, held-out) conversations, loaded and checked before any weights
    notes: list[str] = field(default_factory=list)  # what the backend changed in the config, and why


@dataclass
class Data:
    """What `prepare_data` made: the conversations, their encoded rows, and the pre-flight report."""

    train: Any                    # datasets.Dataset with `messages` (or `text`)
    eval: Any                     # the held-out rows, or None
    train_rows: Any               # input_ids, labels, truncated
    eval_rows: Any
    tokens: int = 0               # in the training rows
    trained_share: float = 0.0    # of those tokens, the share the loss sees
    truncated_rows: int = 0
    preflight: Any = None         # sftlib.checks.report.Report, or None with `train.preflight: off`
    beta: float = 0.1             # preference runs: `train.beta`, for the held-out reward margin


@dataclass
class Evaluation:
    """Held-out figures of one model: loss and perplexity on the assistant tokens, and greedy answers."""

    loss: dict = field(default_factory=dict)        # {"loss", "perplexity", "tokens"}; {} without held-out rows
    answers: list = field(default_factory=list)     # sftlib.checks.evaluate.Answer
    accuracy: float | None = None                   # exact answers that stop, among `answers`
    pair_logps: list = field(default_factory=list)  # pairs: (log p(chosen), log p(rejected)) of each held-out pair
    preference: dict = field(default_factory=dict)  # sftlib.checks.preference_eval.preference_figures


@dataclass
class RunResult:
    backend: str = ""
    method: str = "sft"
    notes: list[str] = field(default_factory=list)
    template: str = ""
    added_tokens: list[str] = field(default_factory=list)
    pad_token: str = ""
    train_rows: int = 0
    eval_rows: int = 0
    truncated_rows: int = 0
    trained_token_share: float = 0.0
    trainable_parameters: dict[str, int] = field(default_factory=dict)  # name -> count, what the optimizer updates
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    train: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    preflight: dict = field(default_factory=dict)  # sftlib.checks.report.Report.to_dict()
    preference: dict = field(default_factory=dict)  # preference runs: held-out figures before and after

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)


def is_main_process() -> bool:
    """False only on the non-zero ranks of a multi-process (accelerate/torchrun) launch."""
    # The launchers (torchrun, accelerate launch) set RANK. accelerate's PartialState, asked before the
    # trainer has set up the process group, can answer "main" on every CPU rank: both then saved.
    return int(os.environ.get("RANK", "0")) == 0


def _silent(_: str) -> None:
    pass


def _leave_process_group() -> None:
    """After training, in a multi-process launch: take this rank out of the process group, so that a rank
    with nothing left to do exits cleanly while rank 0 evaluates and saves (which need no other rank). Seen
    once on the CPU (gloo), under load: rank 1 aborted at exit ("terminate called without an active
    exception") and the launcher stopped rank 0 in the middle of its export."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- the steps ------------------------------------------------------------------------------------------


def output_problems(cfg) -> None:
    """Raise SftlibError when a folder the run writes to is a file, cannot be written or is in use by another
    run. `export.output_dir` counts only when something will be exported."""
    from sftlib.files import folder_in_use, writable_folder_problem

    folders = [("train.output_dir", cfg.train.output_dir)]
    if cfg.export.formats:
        folders.append(("export.output_dir", cfg.export.output_dir))
    problems = [p for setting, folder in folders if (p := writable_folder_problem(folder, setting))]
    if problems:
        raise SftlibError("; ".join(problems))
    busy = folder_in_use(cfg.train.output_dir)
    if busy is not None:
        raise busy
    from sftlib.training.checkpoints import explicit_resume_problem

    incomplete = explicit_resume_problem(cfg)  # a checkpoint cut short, found before the model loads
    if incomplete is not None:
        raise incomplete


def setup(cfg, *, load_weights: bool = True, log: Log = print) -> Setup:
    """Everything that can fail without weights first (the config, the output folders, the data: loaded,
    converted and every row checked), then the engine (adapting `cfg` to it, saying
    what changed), the model, and its tokenizer fitted to the chat template. `load_weights=False` fits the
    tokenizer alone (to look at data)."""
    from sftlib.data import load_dataset
    from sftlib.data.length import refuse_overlong
    from sftlib.data.templates import get_template
    from sftlib.training import backend as backends
    from sftlib.training.tokenizer import prepare_tokenizer

    cfg.validate()
    if load_weights:
        output_problems(cfg)  # a folder the run could not write, found now and not after training
    pairs = cfg.train.method != "sft"
    if pairs:
        from sftlib.data.pairs import load_pairs

        rows = load_pairs(cfg.data)
    else:
        rows = load_dataset(cfg.data)
    kind = "pairs" if pairs else "rows"
    log(f"data: {len(rows[0])} training {kind}, {len(rows[1]) if rows[1] is not None else 0} held out")
    chosen = backends.choose_backend(cfg.backend)
    log(str(chosen))
    notes = backends.resolve(cfg, chosen)
    for ds, split in zip(rows, ("training", "held-out")) if not pairs else ():  # before minutes of tokenizing
        refuse_overlong(ds, cfg.model.max_seq_length, source=f"`{cfg.data.source}`", split=split)
    template = get_template(cfg.model.chat_template)
    if load_weights:
        from sftlib.training.model import load_model

        model, tokenizer = load_model(cfg, chosen)
    else:
        from sftlib.training.model import load_tokenizer

        model, tokenizer = None, load_tokenizer(cfg)
    info = prepare_tokenizer(model, tokenizer, template)
    if info.added_tokens:
        log(f"template {template.name}: added tokens {info.added_tokens}" + ("; embeddings resized" if model else ""))
    log(f"pad token: {info.pad_token!r} (not EOS, so EOS stays trained); generation stops at "
        f"{tokenizer.convert_ids_to_tokens(info.stop_token_ids)}")
    return Setup(chosen, model, tokenizer, template, info, rows, notes)


def prepare_data(cfg, setup: Setup, *, log: Log = print) -> Data:
    """Encode the rows `setup` loaded with its tokenizer and template (the loss mask included), and run the
    pre-flight checks (`train.preflight: stop` raises on a fatal finding, after printing the report)."""
    import pyarrow.compute as pc

    from sftlib.data.encode_cache import cached_encode

    if cfg.train.method != "sft":
        return _prepare_pairs(cfg, setup, log)
    tokenizer, template, (train_ds, eval_ds) = setup.tokenizer, setup.template, setup.rows
    # a second run on the same data, template, tokenizer and settings loads the rows (sftlib.data.encode_cache)
    encode = dict(train_on=cfg.data.train_on, max_length=cfg.model.max_seq_length, log=log)
    train_rows = cached_encode(train_ds, tokenizer, template, **encode)
    eval_rows = cached_encode(eval_ds, tokenizer, template, **encode) if eval_ds is not None else None
    # counted in Arrow: a Python loop over every label of FineTome-100k takes seconds
    columns = train_rows.with_format("arrow")
    labels = pc.list_flatten(columns["labels"])
    trained = len(labels) - pc.sum(pc.equal(labels, -100)).as_py() if len(labels) else 0
    total = len(pc.list_flatten(columns["input_ids"]))
    data = Data(train_ds, eval_ds, train_rows, eval_rows, tokens=total, trained_share=trained / total if total else 0.0,
                truncated_rows=sum(train_rows["truncated"]))
    log(f"tokens: {total} in training rows, {data.trained_share:.0%} trained ({cfg.data.train_on}), "
        f"{data.truncated_rows} rows cut at {cfg.model.max_seq_length}")
    if setup.model is not None:
        from sftlib.checks.stopping import probe_stop

        # a base that never predicts its end-of-turn token cannot learn to stop through LoRA alone: under
        # `lora.train_embeddings: auto`, sftlib.training.lora trains the rows this finds
        info = setup.tokens
        info.stop_probability, info.weak_stop_ids = probe_stop(setup.model, train_rows, info.stop_token_ids)
        if info.stop_probability is not None:
            log(f"end of turn: the base gives it probability {info.stop_probability:.1e} where assistant turns end"
                + (f"; rows {info.weak_stop_ids} too unlikely, trained under `lora.train_embeddings: auto`"
                   if info.weak_stop_ids else ""))
    if cfg.train.preflight != "off":  # before any training: fatal findings stop here, saying what to change
        from sftlib.checks.preflight import preflight
        from sftlib.training.lora import embedding_plan

        name = setup.backend.name
        rows, whole = embedding_plan(cfg, name, setup.tokens)  # what add_adapters will train, for the estimate
        embeddings = True if whole else "rows" if rows else False
        data.preflight = preflight(cfg, tokenizer, template, train_rows, raw_rows=train_ds, model=setup.model,
                                   backend=name, embeddings_trained=embeddings, tokens=setup.tokens)
        log(data.preflight.to_text())
        if cfg.train.preflight == "stop":
            data.preflight.raise_if_fatal()
    if trained == 0:
        raise SftlibError("no token is trained: check `data.train_on` and `model.chat_template`")
    return data


def evaluate(model, setup: Setup, data: Data, *, samples: int = 0, max_new_tokens: int = 32,
             log: Log = print, label: str = "", reference: Evaluation | None = None) -> Evaluation:
    """Held-out loss and perplexity of `model` (the base from `setup`, or the trained one), and its greedy
    answers to the first `samples` held-out conversations (exact-answer accuracy among them). Empty
    without held-out rows. Preference runs: the held-out pairs' scores and figures instead of the loss
    (the reward margin against `reference`, the evaluation before training), answers to their prompts."""
    from sftlib.checks.evaluate import accuracy, answers, heldout_loss

    out = Evaluation()
    if data.eval_rows is None:
        return out
    if "prompt_ids" in data.eval_rows.column_names:
        return _evaluate_pairs(model, setup, data, out, samples, max_new_tokens, log, label, reference)
    out.loss = heldout_loss(model, data.eval_rows)
    log(f"held-out loss{' ' + label if label else ''}: {out.loss['loss']:.3f} (perplexity {out.loss['perplexity']:.2f})")
    if samples and "messages" in data.eval.column_names:
        conversations = data.eval.select(range(min(samples, len(data.eval))))["messages"]
        out.answers = answers(model, setup.tokenizer, setup.template, conversations, max_new_tokens=max_new_tokens)
        out.accuracy = accuracy(out.answers)
    return out


def add_adapters(cfg, setup: Setup, *, log: Log = print):
    """`setup.model` wrapped in LoRA adapters as `cfg.lora` says, the rows of the tokens `setup` added trained."""
    from sftlib.training.lora import add_lora, trainable_parameters

    if cfg.lora.start_from:
        model = _load_adapters(cfg, setup, log)
    else:
        model = add_lora(setup.model, cfg, setup.backend, setup.tokens)
    if getattr(model, "sftlib_plan", None) is not None:  # `auto` settings: say what was chosen and why
        log(str(model.sftlib_plan))
    if getattr(model, "sftlib_merged_lora", None):
        log(model.sftlib_merged_lora)
    count = sum(trainable_parameters(model).values())
    log(f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} rslora={cfg.lora.use_rslora}: {count:,} trainable parameters")
    return model


def train(cfg, model, setup: Setup, data: Data, *, callbacks=None, log: Log = print):
    """Train `model` (from `add_adapters`) on `data.train_rows` with packing, checkpoints and resume; returns a
    TrainResult (losses, tokens/s, peak memory, the complete checkpoints)."""
    from sftlib.training.trainer import train as fit

    if cfg.train.method != "sft":
        from sftlib.training.preference import train_pairs as fit
    outcome = fit(cfg, model, setup.tokenizer, data.train_rows, backend=setup.backend, callbacks=callbacks)
    margin = f", reward margin {outcome.margins[-1][1]:.3f}" if getattr(outcome, "margins", None) else ""
    method = f" ({cfg.train.method})" if cfg.train.method != "sft" else ""  # SFT's line as it always was
    log(f"trained {outcome.steps} steps{method} in {outcome.runtime_s:.1f}s: loss "
        f"{outcome.first_loss:.3f} -> {outcome.final_loss:.3f}{margin}, {outcome.tokens_per_s:,.0f} tokens/s, "
        f"peak {outcome.peak_memory_gib:.2f} GiB")
    if outcome.resumed_from:
        log(f"resumed from {outcome.resumed_from} (`train.resume: {cfg.train.resume}`)")
    return outcome


def export(model, tokenizer, cfg, formats=None, *, out: str | Path | None = None, template=None,
           result: RunResult | None = None, data: Data | None = None, push: bool | None = None, log: Log = print,
           **options):
    """Write `formats` (default `cfg.export.formats`), each loaded back and checked (sftlib.exports.export),
    then the model card beside them, then the upload when `push` (default `export.push_to_hub`) says so.
    Returns the ExportReport; `result` and `data`, when given, are described in the card (figures, data
    fingerprint), and `result` gets the outputs."""
    from sftlib.exports import export as write
    from sftlib.exports.card import write_card

    out = Path(out or cfg.export.output_dir)
    report = write(model, tokenizer, cfg, formats, out=out, template=template, log=log, **options)
    outputs = {**report.outputs, "export_report": report.report_path}
    if result is not None:  # the card lists the files of this export
        result.outputs.update(outputs)
    card = write_card(out, cfg, result or RunResult(outputs=outputs), template=template,
                      train_ds=data.train if data is not None else None)
    outputs["card"] = str(card)
    log(f"wrote the model card {card}")
    if push if push is not None else cfg.export.push_to_hub:  # last: a failed upload leaves every file in place
        from sftlib.exports.hub import push_plan, upload_plan

        plan = upload_plan(out, cfg.export.hub_repo, revision=cfg.export.hub_revision, private=cfg.export.hub_private)
        log(plan.table())  # what is uploaded is exactly this list
        outputs["hub"] = push_plan(plan)
        log(f"uploaded {out} to {outputs['hub']}")
    if result is not None:
        result.outputs.update(outputs)
    report.extra["outputs"] = outputs
    return report


from sftlib.steps_pairs import _evaluate_pairs, _load_adapters, _prepare_pairs  # noqa: E402  (they use Data)


# ---- the whole run ---------------------------------------------------------------------------------------


def _keep_adapters(model, tokenizer, cfg, log: Log) -> Path | None:
    """After a failed export: where the trained adapters are now safe on disk, saving them to a fallback folder
    when the export did not write them (None if they could be written nowhere)."""
    import tempfile
    import time

    from sftlib.exports.merged import save_adapters

    written = Path(cfg.export.output_dir) / "lora"
    if (written / "adapter_config.json").is_file():
        return written
    name = f"adapters-kept-{time.strftime('%Y%m%d-%H%M%S')}"
    for parent in (Path(cfg.train.output_dir), Path.home() / "sftlib-kept", Path(tempfile.gettempdir())):
        try:
            folder = save_adapters(model, tokenizer, parent / name)
        except OSError:
            continue
        log(f"the export failed: the trained adapters were saved to `{folder}`")
        return folder
    return None



def summarize(cfg, setup: Setup, data: Data, model, outcome, before: Evaluation | None = None,
              after: Evaluation | None = None, *, into: RunResult | None = None) -> RunResult:
    """The RunResult of the steps taken (what `run` returns and the model card shows), for a flow run step by
    step: pass it to `export(..., result=)`. `before`/`after`: the evaluations around training, if any."""
    from sftlib.training.lora import trainable_parameters

    result = into or RunResult(
        backend=setup.backend.name, method=cfg.train.method, notes=setup.notes, template=setup.template.name,
        added_tokens=setup.tokens.added_tokens, pad_token=setup.tokens.pad_token, train_rows=len(data.train_rows),
        eval_rows=len(data.eval_rows) if data.eval_rows else 0, truncated_rows=data.truncated_rows,
        trained_token_share=data.trained_share, trainable_parameters=trainable_parameters(model),
        train=json.loads(outcome.to_json()), preflight=data.preflight.to_dict() if data.preflight is not None else {})
    if before is not None and after is not None:
        result.before, result.after, result.preference = before.loss, after.loss, after.preference
        result.accuracy_before, result.accuracy_after = before.accuracy, after.accuracy
    return result


def run(cfg, *, log: Log = print, answer_samples: int = 0, show_answers: int = 0, callbacks=None) -> RunResult:
    """Fine-tune as `cfg` says and save the outputs: the six steps in order. Returns a `RunResult`, also written
    to `train.output_dir`/run_result.json; `.model`, `.tokenizer` and `.template_obj` are what was trained."""
    from sftlib.checks.evaluate import side_by_side

    main = is_main_process()
    if not main:  # under `accelerate launch`, one process speaks, evaluates and saves
        log, answer_samples = _silent, 0
    if main and any(f.split(":")[0] == "gguf" for f in cfg.export.formats):  # a missing toolchain stops now,
        from sftlib.exports.gguf.setup import require_toolchain     # not after training

        require_toolchain()
    s = setup(cfg, log=log)
    data = prepare_data(cfg, s, log=log)
    pairs = cfg.train.method != "sft"
    if pairs:  # "before" is the model as preference tuning starts: with `lora.start_from`, the adapters loaded
        model = add_adapters(cfg, s, log=log)
        before = evaluate(model, s, data, samples=answer_samples, log=log, label="before") if main else Evaluation()
    else:
        before = evaluate(s.model, s, data, samples=answer_samples, log=log, label="before") if main else Evaluation()
        model = add_adapters(cfg, s, log=log)
    outcome = train(cfg, model, s, data, callbacks=callbacks, log=log)
    _leave_process_group()
    result = summarize(cfg, s, data, model, outcome)
    if main:
        after = evaluate(model, s, data, samples=answer_samples, log=log, label="after",
                         reference=before if pairs else None)
        summarize(cfg, s, data, model, outcome, before, after, into=result)
        if after.answers:
            log(f"held-out exact answers: {before.accuracy:.0%} before, {after.accuracy:.0%} after "
                f"({len(after.answers)} conversations)")
            if show_answers:
                log(side_by_side(before.answers[:show_answers], after.answers[:show_answers]))
        if cfg.export.formats:  # the adapters are what the training made: always kept, whatever else is asked for
            try:
                export(model, s.tokenizer, cfg, list(dict.fromkeys(["lora", *cfg.export.formats])),
                       template=s.template, result=result, data=data, log=log)
            except (OSError, SftlibError) as e:
                where = _keep_adapters(model, s.tokenizer, cfg, log)
                if where is None:
                    raise
                raise SftlibError(f"{e}\n(the trained adapters are safe in `{where}`)") from e
        Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.train.output_dir) / "run_result.json").write_text(result.to_json())
    result.model, result.tokenizer, result.template_obj = model, s.tokenizer, s.template
    return result
