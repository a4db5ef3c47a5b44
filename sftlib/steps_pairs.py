"""The parts of the steps (sftlib.steps) that differ for preference runs (`train.method: dpo | orpo`).

    data = _prepare_pairs(cfg, setup, log)      # what sftlib.steps.prepare_data returns for pairs
    model = _load_adapters(cfg, setup, log)     # `lora.start_from`: trained adapters instead of new ones

Called by the steps only; use sftlib.steps (setup, prepare_data, evaluate, add_adapters, train).
"""

from __future__ import annotations

from pathlib import Path

from sftlib.errors import SftlibError


def _prepare_pairs(cfg, setup, log):
    """Encode the pairs `setup` loaded (the run's template, the SFT mask on each reply) and run their pre-flight."""
    from sftlib.data.encode_pairs import encode_pairs
    from sftlib.steps import Data

    tokenizer, template, (train_ds, eval_ds) = setup.tokenizer, setup.template, setup.rows
    limit = cfg.model.max_seq_length
    train_rows, dropped = encode_pairs(train_ds, tokenizer, template, max_length=limit)
    eval_rows, eval_dropped = encode_pairs(eval_ds, tokenizer, template, max_length=limit) if eval_ds is not None \
        else (None, [])
    if eval_dropped:  # the held-out figures describe the pairs they score: keep `data.eval` in step with them
        eval_ds = eval_ds.select([i for i in range(len(eval_ds)) if i not in set(eval_dropped)])
        log(f"held-out pairs: {len(eval_dropped)} dropped, their prompt alone fills `model.max_seq_length` ({limit})")
    prompts = sum(map(len, train_rows["prompt_ids"]))
    replies = sum(map(len, train_rows["chosen_ids"])) + sum(map(len, train_rows["rejected_ids"]))
    total = 2 * prompts + replies
    cut = sum(1 for c, r in zip(train_rows["chosen_cut"], train_rows["rejected_cut"]) if c or r)
    data = Data(train_ds, eval_ds, train_rows, eval_rows, tokens=total, trained_share=replies / total if total else 0.0,
                truncated_rows=cut, beta=cfg.train.beta)
    log(f"tokens: {total} in {len(train_rows)} pairs (both sides), {data.trained_share:.0%} in the replies "
        f"({cfg.train.method} compares them), {cut} pairs cut at {limit}, {len(dropped)} dropped (prompt too long)")
    if cfg.train.preflight != "off":
        from sftlib.checks.preflight_pairs import preflight_pairs
        from sftlib.training.lora import embedding_plan

        name = setup.backend.name
        rows, whole = embedding_plan(cfg, name, setup.tokens)
        data.preflight = preflight_pairs(cfg, tokenizer, template, train_rows, model=setup.model, backend=name,
                                         embeddings_trained=True if whole else "rows" if rows else False,
                                         dropped=dropped)
        log(data.preflight.to_text())
        if cfg.train.preflight == "stop":
            data.preflight.raise_if_fatal()
    return data


def _evaluate_pairs(model, setup, data, out, samples, max_new_tokens, log, label, reference):
    """sftlib.steps.evaluate for pairs: held-out pair scores, figures against `reference`, answers to prompts."""
    from sftlib.checks.evaluate import accuracy, answers
    from sftlib.checks.preference_eval import figures_text, pair_logps, preference_figures

    out.pair_logps = pair_logps(model, data.eval_rows)
    if reference is not None and reference.pair_logps:
        out.preference = preference_figures(reference.pair_logps, out.pair_logps, beta=data.beta)
        log(figures_text(out.preference))
    else:
        out.preference = preference_figures(out.pair_logps)
        log(f"held-out preference accuracy{' ' + label if label else ''}: {out.preference['accuracy_before']:.0%} of "
            f"{len(out.pair_logps)} pairs (mean log-probability margin {out.preference['logp_margin_before']:.2f})")
    if samples:
        conversations = [p + c for p, c in zip(data.eval["prompt"][:samples], data.eval["chosen"][:samples])]
        out.answers = answers(model, setup.tokenizer, setup.template, conversations, max_new_tokens=max_new_tokens)
        out.accuracy = accuracy(out.answers)
    return out


def _load_adapters(cfg, setup, log):
    """`setup.model` with the trained adapters of `lora.start_from`, trainable (PEFT's own loading)."""
    from peft import PeftModel

    folder = Path(cfg.lora.start_from).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise SftlibError(f"`lora.start_from`: `{folder}` holds no adapter_config.json; give the folder of trained "
                          "LoRA adapters, e.g. the `lora` folder an SFT run's export wrote")
    gc = cfg.train.gradient_checkpointing
    if setup.backend.name != "unsloth" and gc in ("true", "unsloth"):
        setup.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        setup.model.enable_input_require_grads()
    try:
        model = PeftModel.from_pretrained(setup.model, str(folder), is_trainable=True)
    except (RuntimeError, ValueError) as e:  # another base or vocabulary than these adapters were trained on
        raise SftlibError(f"`lora.start_from`: the adapters in `{folder}` do not fit `{cfg.model.name}` with template "
                          f"`{cfg.model.chat_template}` ({str(e).splitlines()[0][:300]}); use the base model and "
                          "template of the run that trained them") from e
    if setup.backend.name != "unsloth" and gc in ("true", "unsloth") and cfg.train.checkpoint_keep_layers:
        from sftlib.training.lora import keep_activations

        keep_activations(model, cfg.train.checkpoint_keep_layers)
    if cfg.lora.train_embeddings == "never":  # the adapters' saved embeddings and head rows stay as trained
        for name, p in model.named_parameters():
            if "modules_to_save" in name or "trainable_tokens" in name:
                p.requires_grad_(False)
    peft_cfg = model.peft_config["default"]
    log(f"continuing from the adapters in {folder} (r={peft_cfg.r}, alpha={peft_cfg.lora_alpha}); "
        "`lora.r`, `lora.alpha` and `lora.target_modules` are theirs")
    model.sftlib_plan = None
    return model
