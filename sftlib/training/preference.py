"""Preference tuning (`train.method: dpo | orpo`) with TRL's DPOTrainer or ORPOTrainer on encoded pairs.

    from sftlib.training.preference import train_pairs
    result = train_pairs(cfg, model, tokenizer, pair_rows, backend=backend)   # pair_rows: sftlib.data.encode_pairs
    result.losses, result.margins, result.accuracies    # (step, value) as TRL logged them

The pairs arrive encoded by sftlib (the run's chat template, the SFT loss mask: see
sftlib.data.encode_pairs), so neither trainer re-templates or re-tokenizes them: DPO gets TRL's own
`prompt_ids`/`chosen_ids`/`rejected_ids` columns, ORPO the prompt/chosen/rejected ids and labels its
collator pads. `model` carries the LoRA adapters (sftlib.training.lora, or `lora.start_from`'s); DPO's
reference is that model as training starts: TRL keeps a frozen copy of the adapters (a few MB, none of
the base) and scores the reference with it, so with new adapters the reference is the base itself. The
copy is removed after training, so that exports see the trained adapters only. ORPO has no reference.
On the Unsloth backend, Unsloth's DPO patch is applied before the trainer is built (its ORPO runs through
the same patched code paths).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from sftlib.training.checkpoints import checkpoint_callback, loss_carry_callback, resolve_resume, run_settings
from sftlib.training.trainer import TrainResult, finish
from sftlib.files import folder_lock

REFERENCE_ADAPTER = "ref"  # the name TRL's DPOTrainer gives its frozen copy of the adapters


@dataclass
class PreferenceResult(TrainResult):
    method: str = "dpo"
    margins: list[tuple[int, float]] = field(default_factory=list)     # (step, mean reward margin chosen - rejected)
    accuracies: list[tuple[int, float]] = field(default_factory=list)  # (step, share of pairs with chosen ahead)


def _common_args(cfg, backend) -> dict:
    import torch

    t = cfg.train
    bf16 = fp16 = False
    if backend.cuda:
        bf16 = cfg.model.dtype == "bfloat16" or (cfg.model.dtype == "auto" and torch.cuda.is_bf16_supported())
        fp16 = not bf16 and cfg.model.dtype != "float32"
    return dict(
        output_dir=t.output_dir, per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs, max_steps=t.max_steps, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, optim=t.optim, seed=t.seed, data_seed=t.seed,
        logging_steps=t.logging_steps, save_strategy="steps" if t.save_steps > 0 else "no",
        save_steps=t.save_steps if t.save_steps > 0 else 500, report_to=t.report_to if t.report_to != "none" else [],
        gradient_checkpointing=False,  # set up by sftlib.training.lora.add_lora (or Unsloth) already
        bf16=bf16, fp16=fp16, use_cpu=not backend.cuda, eval_strategy="no", per_device_eval_batch_size=t.batch_size,
        dataloader_num_workers=0, disable_tqdm=False, beta=t.beta, max_length=cfg.model.max_seq_length,
    )


def preference_config(cfg, backend):
    """TRL's DPOConfig or ORPOConfig for `cfg` (`train.method`): every value from the run config."""
    args = _common_args(cfg, backend)
    if cfg.train.method == "dpo":
        from trl import DPOConfig

        t = cfg.train
        extra = dict(loss_type=[t.loss_type, "sft"], loss_weights=[1.0, t.sft_weight]) if t.sft_weight else \
            dict(loss_type=[t.loss_type])
        return DPOConfig(**args, **extra)
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig(**args, remove_unused_columns=False)


def _orpo_rows(rows):
    """sftlib's encoded pairs as the columns ORPO's collator pads: ids, attention masks, labels (prompt masked)."""
    def one(row):
        p = list(row["prompt_ids"])
        out = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
        for side in ("chosen", "rejected"):
            reply = list(row[f"{side}_ids"])
            out[f"{side}_input_ids"] = p + reply
            out[f"{side}_attention_mask"] = [1] * (len(p) + len(reply))
            out[f"{side}_labels"] = [-100] * len(p) + reply
        return out

    return rows.map(one, remove_columns=rows.column_names, desc="pairs -> ORPO rows")


def trainer_class(method: str):
    """DPOTrainer or ORPOTrainer, taking sftlib's encoded pairs as they are."""
    if method == "dpo":
        from trl import DPOTrainer

        class EncodedPairsDPOTrainer(DPOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                if "prompt_ids" in dataset.column_names:  # encoded by sftlib.data.encode_pairs already
                    return dataset
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        return EncodedPairsDPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    class EncodedPairsORPOTrainer(ORPOTrainer):
        def tokenize_row(self, feature, model=None):
            return {}  # the rows carry ORPO's columns already (_orpo_rows)

    return EncodedPairsORPOTrainer


def drop_reference(model) -> None:
    """Remove the frozen adapter copy TRL's DPOTrainer adds, leaving the trained adapters active."""
    if REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
        model.set_adapter("default")
        model.delete_adapter(REFERENCE_ADAPTER)


def _load_trained_adapters(model, checkpoint: Path) -> None:
    """Put the checkpoint's trained adapters into `model` before a resumed DPO run. The checkpoint holds them at
    its top and the reference copy in `ref/`; transformers' resume (5.x) loads only the adapters in subfolders
    when there are any, which would leave the trained ones at their start: the resumed run would start over
    against its own reference (a loss of log 2 again). Called after the trainer made its reference copy."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = checkpoint / "adapter_model.safetensors"
    if weights.is_file() and REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
        result = set_peft_model_state_dict(model, load_file(str(weights)), adapter_name="default")
        missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if missing:
            raise RuntimeError(f"checkpoint `{checkpoint}`: adapter weights not loaded: {missing[:3]}")


def train_pairs(cfg, model, tokenizer, pair_rows, *, backend, callbacks=None,
                resume_from_checkpoint: str | bool | None = None) -> PreferenceResult:
    """Tune `model` (with adapters) on encoded pairs as `train.method` says; `train.output_dir` is held meanwhile."""
    with folder_lock(cfg.train.output_dir, log=print):
        return _train_pairs(cfg, model, tokenizer, pair_rows, backend=backend, callbacks=callbacks,
                            resume_from_checkpoint=resume_from_checkpoint)


def _train_pairs(cfg, model, tokenizer, pair_rows, *, backend, callbacks, resume_from_checkpoint) -> PreferenceResult:
    import torch

    method = cfg.train.method
    if method not in ("dpo", "orpo"):
        raise ValueError(f"train_pairs trains `dpo` or `orpo`, not `{method}`")
    if backend.name == "unsloth":
        from unsloth import PatchDPOTrainer

        PatchDPOTrainer()
    keep = ["prompt_ids", "chosen_ids", "rejected_ids"]
    rows = pair_rows.remove_columns([c for c in pair_rows.column_names if c not in keep])
    pair_tokens = [2 * len(p) + len(c) + len(r) for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"],
                                                                    rows["rejected_ids"])]
    if method == "orpo":
        rows = _orpo_rows(rows)
    resume = resolve_resume(cfg, resume_from_checkpoint)
    args = preference_config(cfg, backend)
    carry = loss_carry_callback(resume)
    callbacks = [carry, checkpoint_callback(run_settings(cfg)), *(callbacks or [])]
    model.config.use_cache = False
    quiet = logging.getLogger("trl")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # ORPO's advice to set remove_unused_columns, which its config above does
    try:
        trainer = trainer_class(method)(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                                        callbacks=callbacks)
    finally:
        quiet.setLevel(level)
    carry.trainer = trainer
    if resume is not None and method == "dpo":
        _load_trained_adapters(model, resume)
    if backend.cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    finally:
        drop_reference(model)
    runtime = time.perf_counter() - start
    state = trainer.state
    history = state.log_history

    def series(key):
        return [(log["step"], float(log[key])) for log in history if key in log and "train_runtime" not in log]

    # every pair of a batch goes through the model whole: the tokens are the pairs' own, pass after pass
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    seen = state.global_step * per_step
    tokens = sum(pair_tokens) * (seen // len(pair_tokens)) + sum(pair_tokens[: seen % len(pair_tokens)])
    result = PreferenceResult(
        losses=series("loss"), steps=state.global_step, tokens_seen=tokens, runtime_s=runtime,
        output_dir=str(Path(args.output_dir)), resumed_from=str(resume) if resume is not None else "",
        method=method, margins=series("rewards/margins"), accuracies=series("rewards/accuracies"),
    )
    result.tokens_per_s = tokens / runtime if runtime > 0 and resume is None else 0.0
    return finish(result, model, backend, args.output_dir)
