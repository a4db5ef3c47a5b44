"""What the CPU demo runs on, bundled with sftlib: a ShareGPT dataset and a tiny model built offline.

    from sftlib import demo
    demo.data_path()        # reviews.jsonl: what `data.source: demo` loads
    demo.pairs_path()       # preferences.jsonl: what `data.source: demo` loads with `train.method: dpo | orpo`
    demo.model_folder()     # a tiny random Llama and a BPE tokenizer trained on that data: `model.name: demo`

The dataset (short product reviews and their sentiment) is written by `build_data.py` beside it, the
preference pairs (the same reviews, a one-word label preferred) by `build_pairs.py`; the
model is built once into `$SFTLIB_CACHE/demo-model-v1` (default `~/.cache/sftlib`) by sftlib.demo.tiny
and then loaded with `from_pretrained` like any other folder. `python -m sftlib demo` runs the whole
flow on them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def data_path() -> Path:
    """The bundled ShareGPT JSONL file that `data.source: demo` loads."""
    return Path(__file__).parent / "reviews.jsonl"


def pairs_path() -> Path:
    """The bundled preference pairs (OpenAI-messages layout) of the preference demo."""
    return Path(__file__).parent / "preferences.jsonl"


def cache_dir() -> Path:
    return Path(os.environ.get("SFTLIB_CACHE", Path.home() / ".cache" / "sftlib"))


def model_folder() -> Path:
    """Build (once) and return the embedded demo model: a tiny Llama and a tokenizer trained on the demo data."""
    from sftlib.demo.tiny import build_tiny_model

    rows = [json.loads(line) for line in data_path().read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [turn["value"] for row in rows for turn in row["conversations"]]
    return build_tiny_model(cache_dir() / "demo-model-v1", texts, vocab_size=1024, hidden_size=128,
                            intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2)
