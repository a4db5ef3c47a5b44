"""Pre-flight's memory finding: sftlib.training.memory's estimate for the run, against the GPU it is meant for.

    from sftlib.checks.memory_finding import memory_finding, shape_of
    memory_finding(report, cfg, tokenizer, model, shape, backend, gpu, embeddings_trained)  # appends one finding
    shape = shape_of(cfg)      # the model's shape from its config.json (or a known fallback), no weights

Too big is fatal, with the least harmful change that makes it fit; tight is a warning; else information.
"""

from __future__ import annotations

from sftlib.checks.report import FATAL, INFO, WARNING, Finding


def memory_finding(report, cfg, tokenizer, model, shape, backend, gpu, embeddings_trained) -> None:
    import torch

    from sftlib.training import memory

    add = report.findings.append
    if model is not None:
        device = next(model.parameters()).device.type
    elif backend == "cpu":
        device = "cpu"
    else:  # the GPU the config is meant for, even when checked on a laptop
        targeted = backend in ("unsloth", "hf") or gpu is not None or memory._gpu(cfg, None)[0] is not None
        device = "cuda" if targeted or cfg.model.load_in_4bit or torch.cuda.is_available() else "cpu"
    if device == "cuda" and gpu is None and torch.cuda.is_available():
        gpu = (torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory / 1024 ** 3)
    if shape is None:
        try:
            shape = memory.ModelShape.from_model(model) if model is not None else shape_of(cfg)
        except Exception as exc:  # an unreadable config must not stop the other checks
            add(Finding(INFO, "memory", f"no memory estimate: the shape of `{cfg.model.name}` is unknown ({exc})"))
            return
    if embeddings_trained is None:  # as sftlib.training.lora.add_lora decides: `auto` = the vocabulary grew
        try:
            grew = len(tokenizer) > shape_of(cfg).vocab
        except Exception:  # no config.json to compare with: assume nothing was added
            grew = False
        embeddings_trained = memory.embeddings_trained_by(cfg, grew, backend)
    est = memory.estimate_memory(cfg, shape, device=device, gpu=gpu, backend=backend,
                                 embeddings_trained=embeddings_trained)
    report.estimate = est
    time = (f"; about {est.step_seconds:.3g} s per optimizer step of {est.tokens_per_step:,} tokens"
            if est.step_seconds else "")
    size = f"{est.peak_gib:.1f} GiB" if est.peak_gib >= 1 else f"{est.peak_gib * 1024:.0f} MiB"
    head = f"peak training memory about {size}"
    if est.verdict == "too big":
        add(Finding(FATAL, "memory_too_big", f"{head}, more than the {est.gpu}'s {est.gpu_gib:.0f} GiB: it will run "
                    f"out of memory. Fix: {est.suggestion}"))
    elif est.verdict == "tight":
        add(Finding(WARNING, "memory_tight", f"{head}, close to the {est.gpu}'s {est.gpu_gib:.0f} GiB (the estimate "
                    f"is good to about 10%). To be safe: {est.suggestion}"))
    elif est.verdict == "fits":
        add(Finding(INFO, "memory", f"{head}, fits the {est.gpu}'s {est.gpu_gib:.0f} GiB{time}"))
    elif device == "cuda":
        add(Finding(INFO, "memory", f"{head} on a GPU{time}; give the GPU (T4, A100, H100 or its GiB) to compare"))
    else:
        add(Finding(INFO, "memory", f"{head} on the CPU"))


def shape_of(cfg):
    from sftlib.training.memory import ModelShape, fallback_shape
    from sftlib.training.model import resolve_model_name

    name = resolve_model_name(cfg.model.name)
    try:
        return ModelShape.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code)
    except OSError:
        shape = fallback_shape(name)
        if shape is None:
            raise
        return shape
