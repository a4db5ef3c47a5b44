"""Train with TRL's SFTTrainer on already-encoded rows; returns what happened as a `TrainResult`.

    from sftlib.training.trainer import train
    result = train(cfg, model, tokenizer, train_rows, backend=backend)
    result.losses, result.tokens_seen, result.tokens_per_s, result.peak_memory_gib, result.checkpoints

The rows carry their own `labels` (see sftlib.data.encode), so TRL neither re-templates nor re-masks
them. Packing uses TRL's best-fit-decreasing strategy in padding-free form: packed conversations get
position ids that restart at 0, from which transformers builds a block-diagonal attention mask
(SDPA and eager) or variable-length FlashAttention calls, so packed conversations never attend to
each other, and the first token of each conversation is never predicted from the one before.
Checkpoints and resume: see sftlib.training.checkpoints (`train.save_steps`, `train.resume`).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sftlib.files import check_free_space, folder_lock
from sftlib.training.checkpoints import (checkpoint_callback, checkpoint_problem, list_checkpoints, loss_carry_callback,
                                         resolve_resume, run_settings)

ADAM_BYTES_PER_PARAM = 12  # the trained weights plus two float32 moments: a checkpoint's size, roughly


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
    checkpoints: list[str] = field(default_factory=list)  # the complete checkpoints in output_dir afterwards

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


def sft_config(cfg, backend, model=None):
    """The `trl.SFTConfig` for `cfg`: every value comes from the run config, nothing hidden; `model` (with
    its adapters) picks the loss path."""
    import torch
    from trl import SFTConfig

    t = cfg.train
    bf16 = fp16 = False
    if backend.cuda:
        bf16 = cfg.model.dtype == "bfloat16" or (cfg.model.dtype == "auto" and torch.cuda.is_bf16_supported())
        fp16 = not bf16 and cfg.model.dtype != "float32"
    loss = _loss_type(model)  # only when it must differ: TRL's (and Unsloth's) default otherwise, never None
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
        gradient_checkpointing=False,  # set up by sftlib.training.lora.add_lora (or Unsloth) already
        bf16=bf16,
        fp16=fp16,
        use_cpu=not backend.cuda,
        include_num_input_tokens_seen="non_padding",
        eval_strategy="no",
        per_device_eval_batch_size=t.batch_size,
        dataloader_num_workers=0,
        remove_unused_columns=True,
        disable_tqdm=False,
        pad_to_multiple_of=pad_multiple(t.packing, backend.cuda),
        **({"loss_type": loss} if loss else {}),
    )


PAD_MULTIPLE = 8  # bfloat16 elements in 16 bytes: the alignment cuBLAS's fast kernels want


def pad_multiple(packing: bool, cuda: bool) -> int | None:
    """How many tokens a packed micro-batch's length is rounded up to, or None.

    A packed, padding-free micro-batch is one row of all its conversations, so its length is whatever
    they add up to. Under Unsloth, the LoRA weight gradients multiply matrices whose leading dimension
    is that length; when it is not a multiple of 8, cuBLAS falls back to its unaligned kernels
    (`..._align1`), a quarter of the LoRA matmul time in benchmarks/results/profile_8b.md. Up to 7 pad
    tokens (label -100, position id 0; a segment of their own, attending to no conversation) make it
    aligned; the loss and the gradients are unchanged (tests/test_pad_multiple.py). On by default on a
    GPU with packing; `SFTLIB_PAD_MULTIPLE=0` turns it off, another number sets the multiple (also on
    the CPU, where it only costs).
    """
    import os

    raw = os.environ.get("SFTLIB_PAD_MULTIPLE", "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"SFTLIB_PAD_MULTIPLE must be a whole number of tokens (0 turns it off), "
                             f"not {raw!r}") from None
        return value if value > 1 and packing else None
    return PAD_MULTIPLE if packing and cuda else None


def _loss_type(model) -> str | None:
    """TRL's default loss (`chunked_nll`) reads `lm_head.weight` and `.bias` and skips the head's forward. A
    head trained as rows (PEFT trainable tokens, see sftlib.training.lora) applies its rows in that forward
    and has no `.bias`: its loss goes through the forward (`nll`), which costs the full logits (counted by
    sftlib.training.memory), not a whole trained head."""
    from sftlib.training.lora import rows_trained_only

    return "nll" if model is not None and rows_trained_only(model) else None


# ---- checkpoints ----------------------------------------------------------------------------------



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
    same LoRA layout as when the checkpoint was saved). `train.output_dir` is held for the whole
    time (sftlib.files.folder_lock): a second run on the same folder stops, naming this one.
    """
    with folder_lock(cfg.train.output_dir, log=print):
        return _train(cfg, model, tokenizer, train_rows, backend=backend, eval_rows=eval_rows, callbacks=callbacks,
                      resume_from_checkpoint=resume_from_checkpoint)


def _train(cfg, model, tokenizer, train_rows, *, backend, eval_rows=None, callbacks=None,
           resume_from_checkpoint: str | bool | None = None) -> TrainResult:
    import torch
    from trl import SFTTrainer

    
    drop = [c for c in train_rows.column_names if c not in ("input_ids", "labels")]
    if drop:
        train_rows = train_rows.remove_columns(drop)
    resume = resolve_resume(cfg, resume_from_checkpoint)
    args = sft_config(cfg, backend, model)
    if cfg.train.save_steps > 0:
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        check_free_space(cfg.train.output_dir, trained * ADAM_BYTES_PER_PARAM, "a training checkpoint",
                         setting="train.output_dir")
    carry = loss_carry_callback(resume)  # before the marker's callback: the marker lists its file
    callbacks = [carry, checkpoint_callback(run_settings(cfg)), *(callbacks or [])]
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
    carry.trainer = trainer
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
    return finish(result, model, backend, args.output_dir)


def finish(result, model, backend, output_dir) -> "TrainResult":
    """What every training run records at its end: peak memory (the GPU's allocator, or the process's
    resident memory on a CPU) and its complete checkpoints; the model gets its KV cache back for generation."""
    import torch

    if backend.cuda:
        result.peak_memory_gib = torch.cuda.max_memory_allocated() / 1024 ** 3
        result.memory_kind = "cuda-allocated"
    else:
        result.peak_memory_gib = _peak_rss_gib()
    result.checkpoints = [str(p) for p in list_checkpoints(output_dir) if checkpoint_problem(p) is None]
    model.config.use_cache = True
    return result
