"""Shared fixtures: a tiny random Llama and its tokenizer, built offline once per test session.

    pytest -q                   # everything here runs on the CPU, offline, in minutes
"""

from __future__ import annotations

import os
import json
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



def _shared_fixtures() -> Path:
    """The real fixtures folder: `SFTLIB_FIXTURES` when set, else `shared/fixtures` beside the repository
    (a checkout whose parent holds `shared/`); tests that need it skip when it is not there."""
    if os.environ.get("SFTLIB_FIXTURES"):
        return Path(os.environ["SFTLIB_FIXTURES"]).expanduser()
    return Path(__file__).resolve().parents[2] / "shared" / "fixtures"


SHARED_FIXTURES = _shared_fixtures()
STORIES = SHARED_FIXTURES / "model" / "stories260K"
needs_stories = pytest.mark.skipif(not STORIES.is_dir(), reason="the shared fixture model/stories260K is not here "
                                   "(set SFTLIB_FIXTURES to the fixtures folder)")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the demo model cache, the encoded-rows cache and HF caches inside the test session's temporary folder."""
    os.environ.setdefault("SFTLIB_CACHE", str(tmp_path_factory.mktemp("sftlib-cache")))
    os.environ.setdefault("SFTLIB_ENCODE_CACHE", str(tmp_path_factory.mktemp("sftlib-encoded")))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from sftlib.demo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", CORPUS, vocab_size=400, hidden_size=64,
                            intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)


def stories260k_to_hf(folder: Path, out: Path) -> Path:
    """llama2.c's legacy checkpoint -> a transformers Llama folder (layout facts from the fixture README)."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    raw = (folder / "stories260K.bin").read_bytes()
    dim, hidden, layers, heads, kv_heads, vocab, _ = np.frombuffer(raw[:28], dtype="<i4")
    data, pos = np.frombuffer(raw[28:], dtype="<f4"), 0
    head_dim, kv_dim = dim // heads, dim // heads * kv_heads

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        pos += n
        return torch.from_numpy(data[pos - n:pos].reshape(shape).copy())

    def unpermute(w, n_heads):  # interleaved rotary pairs -> transformers' half-split layout
        rows, cols = w.shape
        return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    emb, att_norm = take(vocab, dim), take(layers, dim)
    wq, wk, wv, wo = take(layers, dim, dim), take(layers, kv_dim, dim), take(layers, kv_dim, dim), take(layers, dim, dim)
    ffn_norm, w1, w2, w3 = take(layers, dim), take(layers, hidden, dim), take(layers, dim, hidden), take(layers, hidden, dim)
    final_norm = take(dim)
    config = LlamaConfig(vocab_size=int(vocab), hidden_size=int(dim), intermediate_size=int(hidden),
                         num_hidden_layers=int(layers), num_attention_heads=int(heads), num_key_value_heads=int(kv_heads),
                         max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, head_dim=int(head_dim))
    model = LlamaForCausalLM(config)
    state = {"model.embed_tokens.weight": emb, "model.norm.weight": final_norm, "lm_head.weight": emb}
    for i in range(layers):
        p = f"model.layers.{i}."
        state.update({p + "input_layernorm.weight": att_norm[i], p + "post_attention_layernorm.weight": ffn_norm[i],
                      p + "self_attn.q_proj.weight": unpermute(wq[i], heads),
                      p + "self_attn.k_proj.weight": unpermute(wk[i], kv_heads),
                      p + "self_attn.v_proj.weight": wv[i], p + "self_attn.o_proj.weight": wo[i],
                      p + "mlp.gate_proj.weight": w1[i], p + "mlp.down_proj.weight": w2[i], p + "mlp.up_proj.weight": w3[i]})
    model.load_state_dict(state)
    model.save_pretrained(out)
    tok_dir = out.parent / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.model").write_bytes((folder / "tok512.model").read_bytes())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True}))
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def stories_dir(tmp_path_factory) -> Path:
    """The real pretrained stories260K as a transformers folder (tied embeddings, its SentencePiece tokenizer),
    checked against its model card: the card's token ids, and greedy text from BOS."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not STORIES.is_dir():
        pytest.skip("the shared fixture model/stories260K is not here (set SFTLIB_FIXTURES)")
    out = stories260k_to_hf(STORIES, tmp_path_factory.mktemp("stories") / "hf")
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("Once upon a time, there was a little girl named Lily.")["input_ids"] == \
        [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426]  # as in the card
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = [1]
    with torch.no_grad():
        for _ in range(24):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert tok.decode(ids, skip_special_tokens=True).startswith("Once upon a time, there was a little girl named Lily.")
    return out


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


@pytest.fixture(scope="module")
def datasets_cache_in_tmp(tmp_path_factory):
    """Keep the Arrow copies that `datasets` makes of every file a test module loads out of the user's cache."""
    import datasets

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets"))
        yield


def turns(*pairs):
    """A conversation from (role, content) pairs."""
    return [{"role": role, "content": content} for role, content in pairs]
