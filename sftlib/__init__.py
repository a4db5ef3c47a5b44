"""sftlib: supervised fine-tuning of open LLMs that is hard to get wrong. See README.md.

    import sftlib
    report = sftlib.export(model, tokenizer, cfg, formats=["lora", "merged_16bit", "gguf:q4_k_m"])
"""


def __getattr__(name: str):
    # loaded on first use, so that `import sftlib` stays light (no torch) for the CLI and the notebooks' forms
    if name == "export":
        from sftlib.exporter import export

        return export
    raise AttributeError(f"module 'sftlib' has no attribute {name!r}")
