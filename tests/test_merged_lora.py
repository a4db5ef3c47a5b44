"""LoRA folded into each base weight before its product (sftlib.training.merged_lora), against PEFT's own
modules on the tests' random Llama and the real pretrained stories260K: the same outputs and the same gradients
of the input and of both LoRA matrices. On the GPU it runs over Unsloth's 4-bit weights (tests/test_gpu.py).

    pytest tests/test_merged_lora.py -q
"""

from __future__ import annotations

import threading

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


def same(got: list, want: list, leaves: list):
    """The outputs and the gradients of `leaves` under one random weighting of the outputs agree."""
    for a, b in zip(got + list(_grads(got, leaves)), want + list(_grads(want, leaves)), strict=True):
        close(a, b)


def _input(projs, rows: int, length: int, seed: int):
    """X for projections sharing their input, and the leaves whose gradients are compared: X, each A and B."""
    X = torch.randn(rows, length, projs[0].in_features, generator=torch.Generator().manual_seed(seed),
                    requires_grad=True)
    return X, [X] + [t for p in projs for t in (p.lora_A["default"].weight, p.lora_B["default"].weight)]


@pytest.mark.parametrize("model", ["tiny_model_dir", "stories_dir"])
def test_attention_projections_match_peft(request, model):
    layer = _adapted(request.getfixturevalue(model))
    attn = layer.self_attn
    projs = [attn.q_proj, attn.k_proj, attn.v_proj]
    X, leaves = _input(projs, 2, 19, seed=1)

    want = [p(X) for p in projs]  # PEFT: base(x) + lora_B(lora_A(x)) * scaling
    same(list(merged_lora.shared(X, [_params(p) for p in projs], copy)), want, leaves)

    o = attn.o_proj
    Xo = X[..., :o.in_features]
    same(list(merged_lora.shared(Xo, [_params(o)], copy)), [o(Xo)],
         [X, o.lora_A["default"].weight, o.lora_B["default"].weight])


@pytest.mark.parametrize("model", ["tiny_model_dir", "stories_dir"])
def test_mlp_matches_peft(request, model):
    layer = _adapted(request.getfixturevalue(model))
    block = layer.mlp
    projs = [block.gate_proj, block.up_proj, block.down_proj]
    X, leaves = _input(projs, 3, 11, seed=2)

    want = block(X)  # transformers' LlamaMLP over PEFT's projections: down(silu(gate(x)) * up(x))
    same([merged_lora.mlp(X, *[_params(p) for p in projs], copy)], [want], leaves)


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
    """From these many tokens per micro-batch a group merges: 1.5x where merging starts to move fewer bytes."""
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


# ---- the routing put on each layer (merged_lora._wrappers), on real bitsandbytes NF4 weights -------------------
# Unsloth cannot import without a GPU; its fast_lora module is stood in for by what the wrappers call there: the
# three original kernels (here the three-product formula itself, recording each call), its test for a plain
# adapter, and get_lora_parameters (None for A and B while the adapter is disabled, as for DPO's reference pass).


class _Proj:
    def __init__(self, out_features, in_features, gen):
        import bitsandbytes.functional as bnbf

        weight = (torch.randn(out_features, in_features, generator=gen) * 0.1).to(torch.bfloat16)
        self.W, self.quant = bnbf.quantize_4bit(weight, quant_type="nf4", blocksize=64)
        self.A = (torch.randn(16, in_features, generator=gen) * 0.1).requires_grad_()
        self.B = (torch.randn(out_features, 16, generator=gen) * 0.1).requires_grad_()
        self.s, self.disabled, self.dropout, self.fake_quant = 0.5, False, False, False


def _dequantize(W, quant, buffer):
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(W, quant)


def _get(proj):
    return (proj.W, proj.quant, None, None, None) if proj.disabled else (proj.W, proj.quant, proj.A, proj.B, proj.s)


def _formula(X, proj):
    W, quant, A, B, s = _get(proj)
    Wd = _dequantize(W, quant, False).to(X.dtype)
    out = X @ Wd.t()
    return out if A is None else out + s * (X @ A.to(X.dtype).t()) @ B.to(X.dtype).t()


class _FastLora:
    """What merged_lora's wrappers use of unsloth.kernels.fast_lora."""

    def __init__(self):
        self.originals = self.checks = 0

    def apply_lora_qkv(self_fl, self, X):  # noqa: N805 - stands in for a module function taking (self, X)
        self_fl.originals += 1
        return tuple(_formula(X, p) for p in (self.q_proj, self.k_proj, self.v_proj))

    def apply_lora_o(self_fl, self, X):  # noqa: N805
        self_fl.originals += 1
        return _formula(X, self.o_proj)

    def apply_lora_mlp_swiglu(self_fl, self, X):  # noqa: N805
        self_fl.originals += 1
        return _formula(merged_lora.silu_mul(_formula(X, self.gate_proj), _formula(X, self.up_proj)), self.down_proj)

    @staticmethod
    def _has_multiple_active_adapters(proj):
        return False

    @staticmethod
    def _has_active_dora_adapter(proj):
        return False

    @staticmethod
    def _has_activation_fake_quantizer(proj):
        return proj.fake_quant

    def _lora_dropout_and_bias(self, projs, X):
        self.checks += 1
        return ("dropout" if any(p.dropout for p in projs) else None), (None,) * len(projs)


def _layer(hidden=64, kv=16, intermediate=128):
    """Projections shaped like a small Llama layer: break-even at 43 tokens for q/k/v, 64 for o, 86 for the MLP."""
    gen = torch.Generator().manual_seed(7)
    attn = type("Attn", (), {})()
    attn.q_proj, attn.k_proj, attn.v_proj = _Proj(hidden, hidden, gen), _Proj(kv, hidden, gen), _Proj(kv, hidden, gen)
    attn.o_proj = _Proj(hidden, hidden, gen)
    mlp = type("MLP", (), {})()
    mlp.gate_proj, mlp.up_proj = _Proj(intermediate, hidden, gen), _Proj(intermediate, hidden, gen)
    mlp.down_proj = _Proj(hidden, intermediate, gen)
    return attn, mlp


def _run(setting, tokens, dtype=torch.bfloat16, change=None):
    """(merged calls, original calls, outputs and gradients through the wrappers, the same through the formula)."""
    fl = _FastLora()
    qkv, o, mlp_forward = merged_lora._wrappers(fl, _get, _dequantize, merged_lora.silu_mul,
                                                merged_lora.silu_mul_backward, setting)
    attn, mlp = _layer()
    if change:
        change(attn, mlp)
    X = torch.randn(1, tokens, 64, generator=torch.Generator().manual_seed(8)).to(dtype).requires_grad_()
    leaves = [X] + [t for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                                mlp.down_proj) for t in (p.A, p.B) if not p.disabled]
    before = merged_lora.calls()["merged"]
    got = [*qkv(attn, X), o(attn, X), mlp_forward(mlp, X)]
    merged = merged_lora.calls()["merged"] - before
    originals = fl.originals
    groups = [(attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,), (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    if setting == "auto" and tokens < min(merged_lora._switch_size(_get, g) for g in groups):
        assert fl.checks == 0  # too few tokens: sent on at once, Unsloth's checks not run twice
    want = [*_FastLora.apply_lora_qkv(fl, attn, X), _FastLora.apply_lora_o(fl, attn, X),
            _FastLora.apply_lora_mlp_swiglu(fl, mlp, X)]
    return merged, originals, got + list(_grads(got, leaves)), want + list(_grads(want, leaves))


def _near(got, want, rel):
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert (a.float() - b.float()).abs().max() <= rel * b.float().abs().max(), \
            float((a.float() - b.float()).abs().max() / b.float().abs().max())


def test_routing_by_tokens_on_nf4_weights():
    merged, originals, got, want = _run("auto", 100)  # above every group's break-even
    assert (merged, originals) == (3, 0)
    _near(got, want, 3e-2)  # bfloat16: the merged weight and each product rounded once
    merged, originals, got, want = _run("auto", 50)  # q/k/v merge (43), o (64) and the MLP (86) do not
    assert (merged, originals) == (1, 2)
    _near(got, want, 3e-2)
    merged, originals, got, want = _run("auto", 40)
    assert (merged, originals) == (0, 3)
    _near(got, want, 0)  # nothing merged: the original kernels' own results
    merged, originals, got, want = _run("on", 8)  # forced, however small
    assert (merged, originals) == (3, 0)
    _near(got, want, 3e-2)


def test_float32_merged_path_equals_the_formula_on_nf4_weights():
    """With 16-bit weights dequantized from NF4 and float32 inputs the quantization type differs from X's: the
    wrappers leave those to Unsloth. Forced through `shared`/`mlp` directly, the path equals the formula."""
    merged, originals, got, want = _run("auto", 100, dtype=torch.float32)
    assert (merged, originals) == (0, 3)  # Unsloth's kernels compute in the quantized dtype: not ours to take
    attn, mlp = _layer()
    X = torch.randn(1, 100, 64, generator=torch.Generator().manual_seed(9), requires_grad=True)

    def f32(p):
        return (p.W, p.quant, p.A, p.B, p.s)

    def dequantize32(W, quant, buffer):
        return _dequantize(W, quant, buffer).float()

    projs = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    leaves = [X] + [t for p in projs for t in (p.A, p.B)]
    got = [*merged_lora.shared(X, [f32(p) for p in projs[:3]], dequantize32),
           *merged_lora.shared(X, [f32(attn.o_proj)], dequantize32),
           merged_lora.mlp(X, *[f32(p) for p in projs[4:]], dequantize32)]
    want = [_formula(X, p) for p in projs[:4]]
    want.append(_formula(merged_lora.silu_mul(_formula(X, mlp.gate_proj), _formula(X, mlp.up_proj)), mlp.down_proj))
    _near(got + list(_grads(got, leaves)), want + list(_grads(want, leaves)), 1e-5)


def test_disabled_adapters_dropout_and_fake_quantizers_keep_the_original_kernels():
    """DPO's reference pass disables the adapter: no LoRA term may be merged in then; dropout and QAT's activation
    fake-quantizers are Unsloth's (or PEFT's) too."""
    def disable(attn, mlp):
        for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            p.disabled = True

    merged, originals, got, want = _run("on", 100, change=disable)
    assert (merged, originals) == (0, 3)
    _near(got, want, 0)

    def dropout(attn, mlp):
        attn.k_proj.dropout = True

    merged, originals, got, want = _run("on", 100, change=dropout)
    assert (merged, originals) == (2, 1)  # o and the MLP merge; q/k/v, one of which has dropout, do not
    _near(got, want, 3e-2)

    def fake_quant(attn, mlp):  # quantization-aware training's activation fake-quantizer on down_proj
        mlp.down_proj.fake_quant = True

    merged, originals, got, want = _run("on", 100, change=fake_quant)
    assert (merged, originals) == (2, 1)
    _near(got, want, 3e-2)


# ---- recomputation: the down product skipped where nobody reads it ------------------------------------------
# Unsloth's checkpointers run a layer's forward without autograd, keep its input, and in the backward pass run the
# forward again under a thread-local mark (unsloth_zoo's in_gradient_checkpoint_recompute) before going backward
# from its output. The stand-in below does the same, with its own mark.

_MARK = threading.local()


def _recomputing() -> bool:
    return getattr(_MARK, "active", False)


class _Checkpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, X):
        ctx.fn = fn
        ctx.save_for_backward(X)
        with torch.no_grad():
            return fn(X)

    @staticmethod
    def backward(ctx, dY):
        (X,) = ctx.saved_tensors
        X = X.detach().requires_grad_()
        _MARK.active = True
        try:
            with torch.enable_grad():
                out = ctx.fn(X)
        finally:
            _MARK.active = False
        torch.autograd.backward(out, dY)
        return None, X.grad


def _two_layers(recomputing, checkpointed=True):
    """(output, gradients of X and every A and B) of two Llama-like layers on NF4 weights, each recomputed in the
    backward pass: h = X + o(q(X)); out = h + mlp(norm(h)), the MLP's output only added to the residual."""
    fl = _FastLora()
    qkv, o, mlp_forward = merged_lora._wrappers(fl, _get, _dequantize, merged_lora.silu_mul,
                                                merged_lora.silu_mul_backward, "on", recomputing)
    layers = [_layer(), _layer()]
    X = torch.randn(1, 100, 64, generator=torch.Generator().manual_seed(10)).to(torch.bfloat16).requires_grad_()

    def layer(attn, mlp):
        def fn(x):
            h = x + o(attn, qkv(attn, x)[0])
            return h + mlp_forward(mlp, torch.nn.functional.rms_norm(h, (64,)))
        return fn

    out = X
    for attn, mlp in layers:
        out = _Checkpoint.apply(layer(attn, mlp), out) if checkpointed else layer(attn, mlp)(out)
    leaves = [X] + [t for attn, mlp in layers for p in (attn.q_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                                                        mlp.down_proj) for t in (p.A, p.B)]
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(12))
    (out.float() * weights).sum().backward()  # as a trainer does: the recomputed layers add to each leaf's .grad
    return [out, *[t.grad for t in leaves]]


def test_recomputed_layers_skip_the_down_product_with_the_same_gradients():
    before = merged_lora.calls()["skipped"]
    skipping = _two_layers(_recomputing)
    assert merged_lora.calls()["skipped"] - before == 2  # once per layer, in its recomputation only
    computing = _two_layers(None)
    plain = _two_layers(None, checkpointed=False)
    assert merged_lora.calls()["skipped"] - before == 2
    for a, b, c in zip(skipping, computing, plain, strict=True):
        assert torch.equal(a, b) and torch.equal(b, c)  # bit for bit: the same operations on the same values


def test_a_skipped_call_dequantizes_and_multiplies_gate_and_up_only():
    attn, mlp = _layer()
    X = torch.randn(2, 50, 64, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    params = [_get(p) for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    seen = []

    def dequantize(W, quant, buffer):
        seen.append(tuple(quant.shape))
        return _dequantize(W, quant, buffer)

    want = merged_lora.mlp(X, *params, dequantize)
    assert seen == [(128, 64), (128, 64), (64, 128)]
    seen.clear()
    got = merged_lora.mlp(X, *params, dequantize, skip=True)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert seen == [(128, 64), (128, 64)]  # gate and up only: down's weight is neither dequantized nor multiplied


@pytest.mark.parametrize("model", ["tiny_model_dir", "stories_dir"])
def test_recomputed_real_layer_skips_the_down_product_with_the_same_gradients(request, model):
    """The residual MLP half of a real decoder layer (its own RMSNorm, PEFT's LoRA on its projections), recomputed by
    the stand-in checkpointer: skipping the down product there changes no output and no gradient, bit for bit."""
    layer = _adapted(request.getfixturevalue(model))
    block, norm = layer.mlp, layer.post_attention_layernorm
    projs = [block.gate_proj, block.up_proj, block.down_proj]
    leaves = [t for p in projs for t in (p.lora_A["default"].weight, p.lora_B["default"].weight)]
    dequantized = []

    def counting_copy(W, quant, buffer):
        dequantized.append(tuple(W.shape))
        return copy(W, quant, buffer)

    def half_layer(h):
        return h + merged_lora.mlp(norm(h), *[_params(p) for p in projs], counting_copy, skip=_recomputing())

    def run(checkpointed):
        for t in leaves:
            t.grad = None
        dequantized.clear()
        X = torch.randn(2, 13, block.gate_proj.in_features, generator=torch.Generator().manual_seed(13),
                        requires_grad=True)
        out = _Checkpoint.apply(half_layer, X) if checkpointed else half_layer(X)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(14))).sum().backward()
        return [out.detach(), X.grad] + [t.grad.clone() for t in leaves], list(dequantized)

    skipping, seen = run(True)
    down = tuple(block.down_proj.base_layer.weight.shape)
    # forward: gate, up, down; recomputation: gate and up only; backward: down, gate, up
    assert seen.count(down) == 2 and len(seen) == 8, seen
    plain, seen = run(False)
    assert seen.count(down) == 2 and len(seen) == 6, seen
    for a, b in zip(skipping, plain, strict=True):
        assert b.abs().max() > 0 and torch.equal(a, b)


def test_recompute_skip_switch(monkeypatch):
    monkeypatch.delenv("SFTLIB_RECOMPUTE_SKIP", raising=False)
    assert merged_lora.recompute_skip() is True  # on by default since measured on a GPU
    monkeypatch.setenv("SFTLIB_RECOMPUTE_SKIP", "0")
    assert merged_lora.recompute_skip() is False
    assert merged_lora._recompute_probe([]) is None
    monkeypatch.setenv("SFTLIB_RECOMPUTE_SKIP", "1")
    assert merged_lora.recompute_skip() is True
    assert merged_lora._recompute_probe([]) is None  # no Unsloth here: nothing to skip with
    monkeypatch.setenv("SFTLIB_RECOMPUTE_SKIP", "sometimes")
    with pytest.raises(ValueError, match="SFTLIB_RECOMPUTE_SKIP must be 0 or 1"):
        merged_lora.recompute_skip()
