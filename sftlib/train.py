"""Train with TRL's SFTTrainer on already-encoded rows; returns what happened as a `TrainResult`.

    from sftlib.train import train
    result = train(cfg, model, tokenizer, train_rows, backend=backend)
    result.losses, result.tokens_seen, result.tokens_per_s, result.peak_memory_gib

The rows carry their own `labels` (see encode.py), so TRL neither re-templates nor re-masks them.
Packing uses TRL's best-fit-decreasing strategy in padding-free form: packed conversations get
position ids that restart at 0, from which transformers builds a block-diagonal attention mask
(SDPA and eager) or variable-length FlashAttention calls, so packed conversations never attend to
each other, and the first token of each conversation is never predicted from the one before.

Checkpoints and resume (a Colab session can end at any time):

    cfg.train.output_dir = "/content/drive/MyDrive/run1"   # checkpoints outlive the session there
    cfg.train.save_steps = 50                              # a checkpoint-N folder every 50 steps
    cfg.train.resume = "auto"                              # the default; or "never", or a checkpoint path
    result = train(cfg, model, tokenizer, rows, backend=backend)   # same call after a restart
    result.resumed_from                                    # ".../checkpoint-100", or ""

A checkpoint counts only once `sftlib_checkpoint.json` is in it, written after every other file of
it and listing their sizes; a folder without it (the run was killed while saving) or whose files no
longer match is skipped with a warning. `auto` continues from the newest complete checkpoint whose
settings match this run (the marker records them; a changed learning rate or dataset is an error
rather than a silent mix of two runs), restoring adapters, optimizer, schedule, RNG state and the
position in the data, so the run ends where an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import resource
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

MARKER = "sftlib_checkpoint.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Settings that do not change what training computes: a checkpoint stays valid when only these differ.
_NEUTRAL_KEYS = ("train.output_dir", "train.resume", "train.save_steps", "train.logging_steps", "train.report_to",
                 "train.preflight")
ADAM_BYTES_PER_PARAM = 12  # the trained weights plus two float32 moments: a checkpoint's size, roughly


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed from; the message names the folder and the way out."""


@dataclass
class TrainResult:
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, training loss)
    steps: int = 0
    tokens_seen: int = 0          # real (non-padding) input tokens
    runtime_s: float = 0.0
    tokens_per_s: float = 0.0
    peak_memory_gib: float = 0.0  # GPU: max allocated; CPU: the process's peak resident memory
    memory_kind: str = "cpu-rss"
    output_dir: str = ""
    resumed_from: str = ""        # the checkpoint folder training continued from, "" for a fresh start

    @property
    def first_loss(self) -> float:
        return self.losses[0][1] if self.losses else math.nan

    @property
    def final_loss(self) -> float:
        return self.losses[-1][1] if self.losses else math.nan

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _peak_rss_gib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / (1024 ** 2) if sys.platform != "darwin" else kib / (1024 ** 3)


def sft_config(cfg, backend):
    """The `trl.SFTConfig` for `cfg`: every value comes from the run config, nothing hidden."""
    import torch
    from trl import SFTConfig

    t = cfg.train
    bf16 = fp16 = False
    if backend.cuda:
        bf16 = cfg.model.dtype == "bfloat16" or (cfg.model.dtype == "auto" and torch.cuda.is_bf16_supported())
        fp16 = not bf16 and cfg.model.dtype != "float32"
    return SFTConfig(
        output_dir=t.output_dir,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        optim=t.optim,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps > 0 else "no",
        save_steps=t.save_steps if t.save_steps > 0 else 500,
        report_to=t.report_to if t.report_to != "none" else [],
        max_length=cfg.model.max_seq_length,
        packing=t.packing,
        packing_strategy="bfd",
        gradient_checkpointing=False,  # set up by sftlib.model.add_lora (or Unsloth) already
        bf16=bf16,
        fp16=fp16,
        use_cpu=not backend.cuda,
        include_num_input_tokens_seen="non_padding",
        eval_strategy="no",
        per_device_eval_batch_size=t.batch_size,
        dataloader_num_workers=0,
        remove_unused_columns=True,
        disable_tqdm=False,
    )


# ---- checkpoints ----------------------------------------------------------------------------------


def run_settings(cfg) -> dict:
    """The dotted config values that decide what training computes (recorded in each checkpoint)."""
    flat = {}
    for section, values in cfg.to_dict().items():
        if section == "export":
            continue
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            flat[section] = values
    return {k: v for k, v in flat.items() if k not in _NEUTRAL_KEYS}


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why `folder` is not a complete sftlib checkpoint, or None when it is."""
    folder = Path(folder)
    if not folder.is_dir():
        return "it is not a folder"
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"it has no `{MARKER}`, so its saving never finished (the run was probably stopped while saving)"
    except (OSError, ValueError) as exc:
        return f"its `{MARKER}` cannot be read ({exc})"
    for name, size in marker.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"its file `{name}` is missing"
        if path.stat().st_size != size:
            return f"its file `{name}` has {path.stat().st_size} bytes, not the {size} it was saved with"
    return None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Every `checkpoint-N` folder in `output_dir`, complete or not, oldest step first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path, *, warn: bool = True) -> Path | None:
    """The newest complete checkpoint in `output_dir` (None if there is none); newer incomplete ones are
    skipped, with a warning each when `warn`."""
    for folder in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        if warn:
            warnings.warn(f"skipping checkpoint `{folder}`: {problem}", stacklevel=2)
    return None


def _diff(saved: dict, now: dict) -> list[str]:
    keys = sorted(set(saved) | set(now))
    return [f"`{k}`: {saved.get(k)!r} then, {now.get(k)!r} now" for k in keys if saved.get(k) != now.get(k)]


def resolve_resume(cfg, explicit: str | bool | None = None) -> Path | None:
    """The checkpoint to continue from, per `explicit` (an argument of `train`) or else `train.resume`."""
    mode = getattr(cfg.train, "resume", "auto") if explicit is None else explicit
    mode = {True: "auto", False: "never"}.get(mode, mode) if isinstance(mode, bool) else str(mode)
    out = Path(cfg.train.output_dir)
    if mode == "never":
        if list_checkpoints(out):
            warnings.warn(f"`train.resume: never`: starting over; the checkpoints in `{out}` are replaced as "
                          "training reaches their steps", stacklevel=3)
        return None
    if mode == "auto":
        chosen = latest_checkpoint(out)
        if chosen is None:
            return None
    else:
        chosen = Path(mode).expanduser()
        problem = checkpoint_problem(chosen)
        if problem:
            raise CheckpointError(f"`train.resume` = `{mode}` cannot be resumed from: {problem}; give a complete "
                                  "checkpoint folder, `auto` (the newest complete one in `train.output_dir`) or "
                                  "`never`")
    saved = json.loads((chosen / MARKER).read_text(encoding="utf-8")).get("settings", {})
    changed = _diff(saved, run_settings(cfg))
    if changed and mode == "auto":
        raise CheckpointError(
            f"`train.output_dir` (`{out}`) holds checkpoints of a run with other settings ({'; '.join(changed)}); "
            "resuming would mix two runs. Use a new `train.output_dir`, set `train.resume: never` to start over, "
            f"or set `train.resume` to `{chosen}` to continue from it anyway"
        )
    if changed:
        warnings.warn(f"resuming from `{chosen}`, saved with other settings: {'; '.join(changed)}", stacklevel=3)
    return chosen


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some network file systems cannot; the marker still comes after the files
        pass
    finally:
        os.close(fd)


def _checkpoint_callback(settings: dict):
    from transformers import TrainerCallback

    class MarkCompleteCheckpoints(TrainerCallback):
        """Write the completion marker once a checkpoint's files are all saved; remove a stale one first."""

        def on_step_end(self, args, state, control, **kwargs):
            # Runs before the trainer saves: a folder being rewritten must not keep an old run's marker.
            if control.should_save and state.is_world_process_zero:
                (Path(args.output_dir) / f"checkpoint-{state.global_step}" / MARKER).unlink(missing_ok=True)

        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            files = {}
            for path in sorted(folder.rglob("*")):
                if path.is_file() and path.name != MARKER:
                    _fsync(path)
                    files[path.relative_to(folder).as_posix()] = path.stat().st_size
            tmp = folder / f".{MARKER}.tmp"
            tmp.write_text(json.dumps({"step": state.global_step, "files": files, "settings": settings}, indent=1))
            _fsync(tmp)
            os.replace(tmp, folder / MARKER)

    return MarkCompleteCheckpoints()


class _KnownSafePackingWarning(logging.Filter):
    """Drop TRL's warning that packing without FlashAttention may mix conversations.

    transformers builds a block-diagonal mask from the restarting position ids for SDPA and eager
    attention too (tests/test_encode.py::test_packed_conversations_do_not_see_each_other proves it),
    as long as no KV cache is passed, which `train` ensures.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "Flash Attention variant" not in record.getMessage()


def train(cfg, model, tokenizer, train_rows, *, backend, eval_rows=None, callbacks=None,
          resume_from_checkpoint: str | bool | None = None) -> TrainResult:
    """Fine-tune `model` on `train_rows` (columns `input_ids`, `labels`); returns a `TrainResult`.

    `resume_from_checkpoint`: a `checkpoint-N` folder, True for the newest complete one in
    `train.output_dir`, False to start over; None (the default) does what `train.resume` says.
    The adapters, optimizer, schedule and data position continue from there (`model` must have the
    same LoRA layout as when the checkpoint was saved).
    """
    import torch
    from trl import SFTTrainer

    from sftlib.save import check_free_space

    drop = [c for c in train_rows.column_names if c not in ("input_ids", "labels")]
    if drop:
        train_rows = train_rows.remove_columns(drop)
    resume = resolve_resume(cfg, resume_from_checkpoint)
    args = sft_config(cfg, backend)
    if cfg.train.save_steps > 0:
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        check_free_space(cfg.train.output_dir, trained * ADAM_BYTES_PER_PARAM, "a training checkpoint",
                         setting="train.output_dir")
    callbacks = [_checkpoint_callback(run_settings(cfg)), *(callbacks or [])]
    # A KV cache during training hides the packed-sequence boundaries from the mask builder.
    model.config.use_cache = False
    trl_logger = logging.getLogger("trl.trainer.sft_trainer")
    quiet = _KnownSafePackingWarning()
    trl_logger.addFilter(quiet)
    try:
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_rows, processing_class=tokenizer,
                             callbacks=callbacks)
    finally:
        trl_logger.removeFilter(quiet)
    if backend.cuda:
        torch.cuda.reset_peak_memory_stats()
    tokens_before = 0
    if resume is not None:
        state_file = resume / "trainer_state.json"
        tokens_before = int(json.loads(state_file.read_text()).get("num_input_tokens_seen", 0)) \
            if state_file.is_file() else 0
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    runtime = time.perf_counter() - start
    state = trainer.state
    result = TrainResult(
        # after a resume the history holds the steps before it too (from the checkpoint's trainer state)
        losses=[(log["step"], float(log["loss"])) for log in state.log_history if "loss" in log],
        steps=state.global_step,
        tokens_seen=int(state.num_input_tokens_seen),
        runtime_s=runtime,
        output_dir=str(Path(args.output_dir)),
        resumed_from=str(resume) if resume is not None else "",
    )
    session_tokens = result.tokens_seen - tokens_before  # this session's speed, not diluted by resumed steps
    result.tokens_per_s = session_tokens / runtime if runtime > 0 else 0.0
    if backend.cuda:
        result.peak_memory_gib = torch.cuda.max_memory_allocated() / 1024 ** 3
        result.memory_kind = "cuda-allocated"
    else:
        result.peak_memory_gib = _peak_rss_gib()
    model.config.use_cache = True
    return result
