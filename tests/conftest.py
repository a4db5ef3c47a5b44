"""Shared fixtures: a tiny random Llama and its tokenizer, built offline once per test session.

    pytest -q                   # everything here runs on the CPU, offline, in minutes
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CORPUS = [
    "Hello there! How are you today?",
    "The capital of France is Paris.",
    "I like green apples and red cherries.",
    "You are a helpful assistant.",
    "What is two plus two? Two plus two is four.",
    "The review is positive. The review is negative.",
    "Which colour is the sky, grass, blood or the sun? The colour is blue, green, red or yellow.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12",
    "Tabs\tand\nnewlines, quotes \"like this\" and émojis 🙂 too.",
] * 20

SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the demo model cache and HF caches inside the test session's temporary folder."""
    os.environ.setdefault("SFTLIB_CACHE", str(tmp_path_factory.mktemp("sftlib-cache")))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from sftlib.demo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", CORPUS, vocab_size=400, hidden_size=64,
                            intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture()
def tiny(tiny_model_dir):
    """A fresh (model, tokenizer) pair loaded from the tiny folder, in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture()
def no_token(monkeypatch, tmp_path):
    """No token anywhere: not in the environment, not stored by `hf auth login`, no Colab, no prompt."""
    import sys

    from sftlib import tokens as hub

    for name in hub.TOKEN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr("huggingface_hub.constants.HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "tokens"))
    monkeypatch.setitem(sys.modules, "google.colab", None)  # `import google.colab` raises ImportError
    monkeypatch.setattr(hub, "_known", set())


def with_lora(cfg):
    """The steps up to training, as `sftlib.run` takes them, for tests that train a tiny model themselves:
    (model with LoRA, tokenizer, template, encoded training rows, backend)."""
    from sftlib.steps import add_adapters, prepare_data, setup

    quiet = lambda _: None  # noqa: E731
    s = setup(cfg, log=quiet)
    data = prepare_data(cfg, s, log=quiet)
    model = add_adapters(cfg, s, log=quiet)
    return model, s.tokenizer, s.template, data.train_rows, s.backend
