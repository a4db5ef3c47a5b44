"""sftlib: supervised fine-tuning of open LLMs that is hard to get wrong. See README.md.

    import sftlib
    cfg = sftlib.RunConfig.preset("cpu-demo")
    result = sftlib.run(cfg)                       # or the steps one by one: see sftlib.steps
    report = sftlib.export(result.model, result.tokenizer, cfg, ["lora", "merged_16bit", "gguf:q4_k_m"])

The package by stage: config/ (schema, validation, presets), data/ (load, detect, check, convert, split,
templates, encode; pairs and encode_pairs for preference data), training/ (backend, model, tokenizer, LoRA,
trainer, preference (DPO/ORPO), checkpoints, memory, autotune), checks/ (pre-flight, evaluation, both also
for pairs), exports/ (api, merged, verify, gguf/, card, modelfile, hub),
notebook/ (form, helpers), demo/; steps.py chains them and cli.py is `python -m sftlib`.
"""

from sftlib.errors import SftlibError

# loaded on first use, so that `import sftlib` stays light (no torch) for the CLI and the notebooks' forms
_LAZY = {
    "setup": "sftlib.steps", "prepare_data": "sftlib.steps", "evaluate": "sftlib.steps",
    "add_adapters": "sftlib.steps", "train": "sftlib.steps", "export": "sftlib.steps", "run": "sftlib.steps",
    "RunConfig": "sftlib.config", "trainable_parameters": "sftlib.training.lora",
}

__all__ = ["SftlibError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sftlib' has no attribute {name!r}")
