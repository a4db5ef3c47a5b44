"""Add LoRA adapters as the config says, with the rows of added tokens trained.

    from sftlib.training.lora import add_lora
    model = add_lora(model, cfg, backend, tokens=info)     # info: what prepare_tokenizer added
"""

from __future__ import annotations

import warnings

from sftlib.config import ConfigError, Problem


def linear_module_names(model) -> list[str]:
    import torch

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__.startswith("Linear"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def trainable_parameters(model) -> dict[str, int]:
    """{parameter name: element count} of what the optimizer updates, in the model's order."""
    return {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}


def add_lora(model, cfg, backend, tokens=None):
    """Wrap `model` with LoRA adapters as `cfg.lora` says. `tokens` is what `prepare_tokenizer` returned:
    when it added tokens, their embeddings are trained too (or the model could never emit them).

    With `lora.train_embeddings: auto` and the ids of the added tokens, only those rows of the input
    embeddings are trained (PEFT's trainable tokens), and an untied LM head is trained whole, instead
    of both matrices with their optimizer states (about 10 GiB for Llama 3.1 8B, which would not fit
    a T4). `always` trains both matrices whole; Unsloth always does.
    """
    lora = cfg.lora
    new_token_ids = list(getattr(tokens, "added_token_ids", None) or [])
    train_embeddings = bool(getattr(tokens, "added_tokens", None))
    rows_only = lora.train_embeddings == "auto" and bool(new_token_ids) and backend.name != "unsloth"
    if lora.train_embeddings == "always":
        train_embeddings = True
    elif lora.train_embeddings == "never":
        if train_embeddings:
            warnings.warn("tokens were added but `lora.train_embeddings: never`: the model cannot learn to emit them")
        train_embeddings = False
    missing = [m for m in lora.target_modules if m not in linear_module_names(model)]
    if missing:
        raise ConfigError(Problem("lora.target_modules", f"`lora.target_modules`: {missing} not found in this "
                                  f"model; its linear layers are {linear_module_names(model)}"))
    narrowest = min((min(m.in_features, m.out_features) for name, m in model.named_modules()
                     if name.rpartition(".")[2] in lora.target_modules and hasattr(m, "in_features")), default=None)
    if narrowest is not None and lora.r > narrowest:  # a rank above a layer's width adds nothing and wastes memory
        raise ConfigError(Problem("lora.r", f"`lora.r` is {lora.r}, above the width of the narrowest adapted layer "
                                  f"({narrowest}) of this model; use at most {narrowest} (8-128 is usual)"))
    saved = ["embed_tokens", "lm_head"] if train_embeddings else None
    plan = None
    if cfg.train.gradient_checkpointing == "auto" or cfg.train.auto_batch:
        from sftlib.training import autotune  # decided here: Unsloth sets checkpointing up when it adds LoRA

        plan = autotune.plan_for_model(cfg, model, backend)
        autotune.apply(cfg, plan)
    gc = cfg.train.gradient_checkpointing
    if backend.name == "unsloth":
        from unsloth import FastLanguageModel

        targets = list(lora.target_modules) + (saved or [])
        model = FastLanguageModel.get_peft_model(
            model, r=lora.r, target_modules=targets, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            bias=lora.bias, use_gradient_checkpointing={"unsloth": "unsloth", "true": True, "false": False}[gc],
            random_state=cfg.train.seed, use_rslora=lora.use_rslora, use_dora=lora.use_dora,
        )
        model.sftlib_plan = plan
        return model
    from peft import LoraConfig, get_peft_model

    if gc in ("true", "unsloth"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    token_rows = None
    if rows_only and train_embeddings:
        ids = sorted(set(new_token_ids))
        token_rows = {"embed_tokens": ids}
        # An untied head needs its new rows trained too, or the model never predicts the new tokens. TRL's
        # loss multiplies by `lm_head.weight` (and `.bias`) directly, which a row adapter cannot serve, so
        # the head is trained whole: about 3 GiB for Llama 3.1 8B instead of 10 for both matrices.
        saved = None if getattr(model.config, "tie_word_embeddings", False) else ["lm_head"]
    peft_cfg = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
        bias=lora.bias, use_rslora=lora.use_rslora, use_dora=lora.use_dora, task_type="CAUSAL_LM",
        modules_to_save=saved, trainable_token_indices=token_rows,
    )
    import torch

    torch.manual_seed(cfg.train.seed)  # LoRA's A matrices are random: same seed, same start
    model = get_peft_model(model, peft_cfg)
    model.sftlib_plan = plan  # the memory plan when `auto` chose the settings, else None
    return model
