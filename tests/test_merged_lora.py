"""LoRA folded into each base weight before its product (sftlib.training.merged_lora), against PEFT's own
modules on the tests' random Llama and the real pretrained stories260K: the same outputs and the same gradients
of the input and of both LoRA matrices. On the GPU it runs over Unsloth's 4-bit weights (tests/test_gpu.py).

    pytest tests/test_merged_lora.py -q
"""

from __future__ import annotations

import pytest
import torch

from sftlib.config import RunConfig
from sftlib.training import merged_lora
from sftlib.training.backend import Backend
from sftlib.training.lora import add_lora

CPU = Backend("cpu", "cpu", "test")


def copy(W, quant, buffer):
    """The 'dequantized' weight of a 16-bit base: a copy, since the merge writes into it."""
    assert quant is None
    return W.detach().clone()


def _adapted(folder, dtype=torch.float32):
    """The first decoder layer of `folder` with PEFT LoRA (rsLoRA, r 16) on all seven projections, B random."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    cfg = RunConfig.preset("cpu-demo", {"lora.train_embeddings": "never", "lora.dropout": 0.0, "lora.r": 16,
                                        "lora.alpha": 16, "lora.use_rslora": True})
    peft_model = add_lora(model, cfg, CPU)
    gen = torch.Generator().manual_seed(3)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    layer = next(m for m in peft_model.modules() if hasattr(m, "self_attn") and hasattr(m, "mlp"))
    return layer


def _params(proj):
    """(W, quant, A, B, s) as Unsloth's get_lora_parameters gives them."""
    return (proj.base_layer.weight, None, proj.lora_A["default"].weight, proj.lora_B["default"].weight,
            proj.scaling["default"])


def close(a, b, rel=1e-5):
    """Equal to float32 rounding, measured against the tensor's largest element (sums of products near zero
    differ in their last bits)."""
    assert a.shape == b.shape and b.abs().max() > 0
    assert (a - b).abs().max() <= rel * b.abs().max(), float((a - b).abs().max() / b.abs().max())


def _grads(outputs, leaves, seed=5):
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float32) for o in outputs]
    total = sum((o.float() * w).sum() for o, w in zip(outputs, weights))
    return torch.autograd.grad(total, leaves)


@pytest.mark.parametrize("model", ["tiny_model_dir", "stories_dir"])
def test_attention_projections_match_peft(request, model):
    layer = _adapted(request.getfixturevalue(model))
    attn = layer.self_attn
    projs = [attn.q_proj, attn.k_proj, attn.v_proj]
    X = torch.randn(2, 19, attn.q_proj.in_features, generator=torch.Generator().manual_seed(1), requires_grad=True)
    leaves = [X] + [t for p in projs for t in (p.lora_A["default"].weight, p.lora_B["default"].weight)]

    want = [p(X) for p in projs]  # PEFT: base(x) + lora_B(lora_A(x)) * scaling
    got = list(merged_lora.shared(X, [_params(p) for p in projs], copy))
    for a, b in zip(got, want):
        close(a, b)
    for a, b in zip(_grads(got, leaves), _grads(want, leaves)):
        close(a, b)

    o = attn.o_proj
    leaves = [X, o.lora_A["default"].weight, o.lora_B["default"].weight]
    Xo = X[..., :o.in_features]
    (got,) = merged_lora.shared(Xo, [_params(o)], copy)
    close(got, o(Xo))
    for a, b in zip(_grads([got], leaves), _grads([o(Xo)], leaves)):
        close(a, b)


@pytest.mark.parametrize("model", ["tiny_model_dir", "stories_dir"])
def test_mlp_matches_peft(request, model):
    layer = _adapted(request.getfixturevalue(model))
    block = layer.mlp
    projs = [block.gate_proj, block.up_proj, block.down_proj]
    X = torch.randn(3, 11, block.gate_proj.in_features, generator=torch.Generator().manual_seed(2), requires_grad=True)
    leaves = [X] + [t for p in projs for t in (p.lora_A["default"].weight, p.lora_B["default"].weight)]

    want = block(X)  # transformers' LlamaMLP over PEFT's projections: down(silu(gate(x)) * up(x))
    got = merged_lora.mlp(X, *[_params(p) for p in projs], copy)
    close(got, want)
    for a, b in zip(_grads([got], leaves), _grads([want], leaves)):
        close(a, b)


def test_bfloat16_keeps_the_lora_term_and_is_exact_while_b_is_zero(tiny_model_dir):
    layer = _adapted(tiny_model_dir, dtype=torch.bfloat16)
    q = layer.self_attn.q_proj
    X = torch.randn(4, 64, q.in_features, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    W, _, A, B, s = _params(q)
    exact = X.float() @ (W.float() + s * B.float() @ A.float()).t()
    base = X.float() @ W.float().t()
    (got,) = merged_lora.shared(X, [_params(q)], copy)
    # one bfloat16 rounding of the merged weight and of the output: far closer than the LoRA term's own size
    assert (got.float() - exact).abs().max() < 0.1 * (exact - base).abs().max()
    with torch.no_grad():
        B.zero_()
    (start,) = merged_lora.shared(X, [_params(q)], copy)
    assert torch.equal(start, X @ W.t())  # the start of training: bit for bit the base product


def test_break_even_sizes_for_llama_3_8b():
    """Above these many tokens per micro-batch, merging moves fewer bytes than Unsloth's LoRA passes."""
    h, i, kv = 4096, 14336, 1024
    assert merged_lora.break_even_tokens([(h, h)]) == 4096  # o_proj
    assert round(merged_lora.break_even_tokens([(h, h), (kv, h), (kv, h)])) == 2731  # q, k, v
    assert round(merged_lora.break_even_tokens([(i, h), (i, h), (h, i)])) == 6372  # gate, up, down
    assert 2048 < merged_lora.break_even_tokens([(h, h)]) < 8 * 2048  # one row keeps the products, eight merge


def test_the_switch(monkeypatch):
    for value, want in (("", "auto"), ("auto", "auto"), ("0", "off"), ("off", "off"), ("1", "on")):
        monkeypatch.setenv("SFTLIB_MERGED_LORA", value)
        assert merged_lora.mode() == want
    monkeypatch.setenv("SFTLIB_MERGED_LORA", "sometimes")
    with pytest.raises(ValueError, match="SFTLIB_MERGED_LORA"):
        merged_lora.mode()
    monkeypatch.setenv("SFTLIB_MERGED_LORA", "0")
    assert merged_lora.enable(torch.nn.Linear(2, 2)) is None  # off: nothing looked at, nothing changed


def test_without_unsloth_nothing_changes(monkeypatch):
    monkeypatch.delenv("SFTLIB_MERGED_LORA", raising=False)
    note = merged_lora.enable(torch.nn.Linear(2, 2))
    assert note.startswith("merged LoRA: not used")
