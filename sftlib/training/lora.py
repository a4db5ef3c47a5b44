"""Add LoRA adapters as the config says, with the rows of added tokens trained.

    from sftlib.training.lora import add_lora
    model = add_lora(model, cfg, backend, tokens=info)     # info: what prepare_tokenizer added
"""

from __future__ import annotations

import warnings

from sftlib.config import ConfigError, Problem
from sftlib.training import autotune


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


def _module_name(model, module) -> str | None:
    return next((name.rsplit(".", 1)[-1] for name, m in model.named_modules() if m is module), None)


def rows_trained_only(model) -> bool:
    """Whether the output embeddings of this (peft) model are trained as rows (PEFT trainable tokens): then
    the loss must go through the head's own forward, which applies the rows (see sftlib.training.trainer)."""
    return type(model.get_output_embeddings()).__name__ == "TrainableTokensWrapper"


def embedding_plan(cfg, backend: str | None, tokens) -> tuple[list[int], bool]:
    """(rows trained as PEFT trainable tokens, whether embeddings and head are trained whole instead).

    `auto`: the rows `tokens.rows_to_train` lists, on every backend (Unsloth included: its loss reads the
    head's weight with the trained rows written in)."""
    mode = cfg.lora.train_embeddings
    if mode == "always":
        return [], True
    if mode == "never" or tokens is None:
        return [], False
    return list(getattr(tokens, "rows_to_train", None) or getattr(tokens, "added_token_ids", None) or []), False


def stop_rows_trained(cfg, backend: str | None, tokens) -> bool:
    """Whether training will move the rows of the stop tokens pre-flight found unlikely (or newly added)."""
    rows, whole = embedding_plan(cfg, backend, tokens)
    wanted = set(getattr(tokens, "weak_stop_ids", None) or [])
    return whole or wanted <= set(rows)


def check_targets(model, lora) -> None:
    """ConfigError when `lora.target_modules` names a module this model lacks, or `lora.r` is above the width of
    the narrowest adapted layer. Needs only the model's modules, not its weights: pre-flight passes a skeleton
    built on the meta device (sftlib.checks.skeleton), training the loaded model, so both refuse alike."""
    layers = linear_module_names(model)
    missing = [m for m in lora.target_modules if m not in layers]
    if missing:
        raise ConfigError(Problem("lora.target_modules", f"`lora.target_modules`: {missing} not found in this "
                                  f"model; its linear layers are {layers}"))
    narrowest = min((min(m.in_features, m.out_features) for name, m in model.named_modules()
                     if name.rpartition(".")[2] in lora.target_modules and hasattr(m, "in_features")), default=None)
    if narrowest is not None and lora.r > narrowest:  # a rank above a layer's width adds nothing and wastes memory
        raise ConfigError(Problem("lora.r", f"`lora.r` is {lora.r}, above the width of the narrowest adapted layer "
                                  f"({narrowest}) of this model; use at most {narrowest} (8-128 is usual)"))


def add_lora(model, cfg, backend, tokens=None):
    """Wrap `model` with LoRA adapters as `cfg.lora` says. `tokens` is what `prepare_tokenizer` returned
    (after sftlib.checks.stopping.probe_stop, when prepare_data ran): the rows it lists in `rows_to_train`
    (added tokens, rows beyond the base's matrix, stop tokens the base never predicts) are trained too, or
    the model could never emit them.

    With `lora.train_embeddings: auto`, only those rows are trained, of the input embeddings and of the
    LM head (PEFT's trainable tokens on both; a tied head shares them), and only they are saved with the
    adapters: a few MB instead of two vocab x hidden matrices and their optimizer states (about 10 GiB to
    train and 4 GiB to save for Llama 3.1 8B). `always` trains both matrices whole.
    """
    lora = cfg.lora
    rows, whole = embedding_plan(cfg, backend.name, tokens)
    if lora.train_embeddings == "never" and getattr(tokens, "rows_to_train", None):
        warnings.warn("tokens were added (or the base never predicts its end-of-turn token) but "
                      "`lora.train_embeddings: never`: the model cannot learn to emit them")
    rows_only = bool(rows) and not whole
    check_targets(model, lora)
    embed_name = _module_name(model, model.get_input_embeddings()) or "embed_tokens"
    head = model.get_output_embeddings()
    head_name = _module_name(model, head) or "lm_head"
    tied = head is None or head.weight is model.get_input_embeddings().weight
    saved = [embed_name] + ([] if head is None else [head_name]) if whole else None
    plan = None
    if cfg.train.gradient_checkpointing == "auto" or cfg.train.auto_batch:
        # decided here: Unsloth sets checkpointing up when it adds LoRA
        plan = autotune.plan_for_model(cfg, model, backend)
        autotune.apply(cfg, plan)
    gc = cfg.train.gradient_checkpointing
    keep = cfg.train.checkpoint_keep_layers if gc != "false" else 0
    token_rows = None
    if rows_only:
        # A tied head shares the input rows (PEFT ties the two wrappers); an untied one gets the same rows
        # of its own, or the model could read the new tokens but never predict them.
        token_rows = {embed_name: rows} if tied else {embed_name: rows, head_name: rows}
    if backend.name == "unsloth":
        from unsloth import FastLanguageModel

        # Unsloth passes extra arguments on to PEFT's LoraConfig; its fused loss reads `lm_head.weight`, which
        # PEFT's trainable-tokens wrapper gives with the trained rows written in, so their gradient flows.
        rows_arg = {"trainable_token_indices": token_rows} if token_rows else {}
        if keep:  # Unsloth's own per-layer switch, which its later calls to re-enable checkpointing respect
            if not autotune.unsloth_can_keep_layers():
                raise ConfigError(Problem("train.checkpoint_keep_layers", "this Unsloth cannot keep some layers' "
                                          "activations (no `checkpoint_skip_layers`); upgrade it or set 0"))
            rows_arg["checkpoint_skip_layers"] = keep
        model = FastLanguageModel.get_peft_model(
            model, r=lora.r, target_modules=list(lora.target_modules) + (saved or []), lora_alpha=lora.alpha,
            lora_dropout=lora.dropout, bias=lora.bias,
            use_gradient_checkpointing={"unsloth": "unsloth", "true": True, "false": False}[gc],
            random_state=cfg.train.seed, use_rslora=lora.use_rslora, use_dora=lora.use_dora, **rows_arg,
        )
        from sftlib.training import merged_lora

        model.sftlib_merged_lora = merged_lora.enable(model)  # one product per projection for large micro-batches
    else:
        from peft import LoraConfig, get_peft_model

        if gc in ("true", "unsloth"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        peft_cfg = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
            bias=lora.bias, use_rslora=lora.use_rslora, use_dora=lora.use_dora, task_type="CAUSAL_LM",
            modules_to_save=saved, trainable_token_indices=token_rows,
        )
        import torch

        torch.manual_seed(cfg.train.seed)  # LoRA's A matrices are random: same seed, same start
        model = get_peft_model(model, peft_cfg)
        if keep:
            keep_activations(model, keep)
    if rows_only:
        _train_rows(model)
        _save_rows_only(model)
    model.sftlib_plan = plan  # the memory plan when `auto` chose the settings, else None
    return model


def keep_activations(model, count: int) -> list[int]:
    """Recomputation off for `count` decoder layers spread evenly over the stack (transformers' per-layer switch,
    after checkpointing was enabled): they keep their activations for the backward pass, the rest recompute
    theirs. Same gradients, less recomputation, one layer's activations more per kept layer. Returns the indices."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    count = min(count, len(layers))
    chosen = [(2 * k + 1) * len(layers) // (2 * count) for k in range(count)]
    for i in chosen:
        layers[i].gradient_checkpointing = False
    return chosen


def _train_rows(model) -> None:
    """Make the trained rows (PEFT trainable tokens) train, whoever set the model up, and readable as a head.

    - Unsloth's LoRA setup freezes every parameter that is not a LoRA matrix, the rows included (seen on a
      GPU: they never moved and the model never learned to stop): they are made trainable again here.
    - They are kept in float32, as LoRA's matrices are: a half-precision parameter cannot take float16
      training's scaled gradients and loses small updates. They are written into the head and embedding in
      the model's own dtype when applied.
    - TRL 1.15 computes the loss from `lm_head.weight` and `lm_head.bias` (its fused LM head). PEFT's wrapper
      gives the weight with the rows written in, but no `bias`: the head's own bias (None for Llama) is set on
      the wrapper, so the loss reads both and the rows' gradient flows through the weight."""
    import torch

    for name, p in model.named_parameters():
        if "trainable_tokens_delta" in name:
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
            p.requires_grad_(True)
    head = model.get_output_embeddings()
    if rows_trained_only(model) and not hasattr(head, "bias"):  # a plain attribute: no second bias parameter
        object.__setattr__(head, "bias", getattr(head.token_adapter.base_layer, "bias", None))


def _save_rows_only(model) -> None:
    """Save (adapters and checkpoints alike) the LoRA matrices and the trained rows, not the embedding
    matrices: PEFT writes them whole, in float32, whenever the vocabulary grew, unless told not to. Loading
    resizes the base (sftlib.exports.merged.load_adapters) and every new row comes from the adapter."""
    import functools

    model.save_pretrained = functools.partial(type(model).save_pretrained, model, save_embedding_layers=False)
