"""Training: which engine runs (backend.py), the model and its tokenizer (model.py, tokenizer.py), the
adapters (lora.py), the trainer (trainer.py) with its checkpoints (checkpoints.py), and the memory
plan on a GPU (memory.py, autotune.py, packed_attention.py)."""

import os


def env_switch(name: str, default: bool) -> bool:
    """An on/off environment variable of sftlib's (1/true/yes/on or 0/false/no/off; unset or empty: `default`);
    anything else is an error, not a silent default."""
    raw = os.environ.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 0 or 1, got {raw!r}")
