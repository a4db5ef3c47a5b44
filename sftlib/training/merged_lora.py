"""LoRA folded into each dequantized base weight before its product, under Unsloth with a 4-bit base.

    from sftlib.training.merged_lora import enable
    note = enable(model)     # after Unsloth's get_peft_model; None when nothing was changed

Unsloth's LoRA kernels make three products per projection: the base one over the freshly dequantized weight,
X·Aᵀ, and an add of s·(X·Aᵀ)·Bᵀ into the whole output, which reads and writes that output once more; the
backward pass does the same to the whole input gradient and reads X again for each of q, k, v (and gate, up).
For T tokens and a weight of `out` x `in`, those extra passes read or write about T·(in + 2·out) elements
forward and T·(out + 2·in) backward, 3·T·(out + in) in all. The weight is dequantized into a buffer anyway:
adding s·B·A to it there reads and writes out·in elements in each direction, 4·out·in in all, so merging
moves less once T is above 4/3·out·in / (out + in). The switch is set at 2·out·in / (out + in) tokens, half
again as many (a margin for what this count leaves out), summed over a group: for Llama-3-8B 2,731 for
q/k/v, 4,096 for o_proj, 6,372 for the MLP; eight packed 2048-token rows are 16,384. Each group decides per
call from its own tokens, so short micro-batches keep Unsloth's products. The LoRA gradients are computed as
before from X and the output gradient, reading X once for the whole group.

What changes numerically: the merged weight is rounded to bfloat16 once per product, as a merged 16-bit
export rounds it; the error is about 2⁻⁹ of a weight, far below the 4-bit quantization's own. With B at
zero (the start of training) it is exact. `enable()` first checks the path on the model's first layer
against the three-product formula (outputs and gradients of X, A and B within bfloat16 rounding); when
that fails, or the model is not a 4-bit Llama-like one patched by Unsloth, nothing changes and the note
says why. Per call, whatever Unsloth's kernels would not run plainly stays with them: a disabled adapter
(DPO's reference pass), LoRA dropout or bias, DoRA, several active adapters, activation fake-quantizers,
an input dtype other than the weights'. `SFTLIB_MERGED_LORA=0` turns it off, `=1` merges whatever the
micro-batch size (to measure both).

With recomputation (gradient checkpointing), each checkpointed layer runs its forward pass twice: once for its
output, and again in the backward pass to rebuild what the gradients need. In that second run the layer's output
is only the root of the backward pass, never read, and in a Llama-like layer it is the residual plus the MLP's
down product; the backward pass needs that product's input and weight, not its result. So in that run the merged
MLP skips the down product (and the dequantizing and merging of its weight): about a quarter of the recomputed
products (Llama-3-8B: 58.7 M of 218 M weights per layer). The gradients are the same operations on the same values
(tests/test_merged_lora.py checks them bit for bit). Only where Unsloth marks the recomputation and runs its Llama
decoder layer, one layer per checkpoint, outside a compiled block (`_recompute_probe`). On by default: on an H100
under a 15 GiB cap (Llama-3.1-8B in 4-bit, 8 x 2 packed rows, every layer recomputed) it took a step from 2.81-2.90 s
to 2.60-2.68 s (11,483-11,522 against 12,401-12,458 tokens/s, two runs each), the first five losses within 0.001
(benchmarks/results/gpu_bench.md, call 9). `SFTLIB_RECOMPUTE_SKIP=0` turns it off; the benchmark setting
`sftlib:auto-15GiB-noskip` measures the plan without it.
"""

from __future__ import annotations

import os

_CALLS = {"merged": 0, "unsloth": 0, "skipped": 0}


def mode() -> str:
    """"auto" (merge where it moves less), "on" (always) or "off", from SFTLIB_MERGED_LORA."""
    raw = os.environ.get("SFTLIB_MERGED_LORA", "auto").strip().lower()
    if raw in ("0", "false", "no", "off"):
        return "off"
    if raw in ("1", "true", "yes", "on", "always"):
        return "on"
    if raw in ("", "auto"):
        return "auto"
    raise ValueError(f"SFTLIB_MERGED_LORA must be 0, 1 or auto, got {raw!r}")


def recompute_skip() -> bool:
    """Whether a recomputed layer skips its MLP's down product (SFTLIB_RECOMPUTE_SKIP: 1, the default, or 0)."""
    from sftlib.training import env_switch

    return env_switch("SFTLIB_RECOMPUTE_SKIP", True)


def break_even_tokens(shapes) -> float:
    """Tokens per micro-batch from which a group of weights of (out, in) `shapes` is merged: 1.5 x the size above
    which merging moves fewer bytes than Unsloth's LoRA passes (see the module's docstring)."""
    return 2 * sum(o * i for o, i in shapes) / sum(o + i for o, i in shapes)


def calls() -> dict[str, int]:
    """How many grouped forward calls took the merged path and how many Unsloth's, since the process began; of the
    merged MLP calls, how many skipped the down product while recomputing ("skipped")."""
    return dict(_CALLS)


def _merged(W, quant, A, B, s, dequantize, buffer):
    """The base weight (out, in) dequantized, plus s·B·A, in the dequantized dtype."""
    Wd = dequantize(W, quant, buffer)
    return Wd.addmm_(B.to(Wd.dtype), A.to(Wd.dtype), alpha=s)


def _lora_grads(X2, dYs, projs):
    """dA and dB for projections sharing the input X2 (T, in): X read twice for the group, not twice each."""
    import torch

    r = [p[2].shape[0] for p in projs]
    dtype = X2.dtype
    XA = X2 @ torch.cat([p[2] for p in projs]).to(dtype).t()  # (T, sum r)
    YB = torch.cat([dY @ (p[3].to(dtype) * p[4]) for dY, p in zip(dYs, projs)], dim=1)  # (T, sum r), scaled
    dA = (YB.t() @ X2).split(r)  # (r, in) each
    dB = [(dY.t() @ xa).mul_(p[4]) for dY, xa, p in zip(dYs, XA.split(r, dim=1), projs)]
    return dA, dB


def _functions():
    import torch

    class Shared(torch.autograd.Function):
        """Projections with LoRA over one input (q/k/v, or o alone): Y_j = X·(W_j + s_j·B_j·A_j)ᵀ."""

        @staticmethod
        def forward(ctx, X, dequantize, *flat):
            projs = [flat[k:k + 5] for k in range(0, len(flat), 5)]  # (W, quant, A, B, s) each
            X2 = X.reshape(-1, X.shape[-1])
            outs = [(X2 @ _merged(*p, dequantize, True).t()).view(*X.shape[:-1], -1) for p in projs]
            ctx.dequantize, ctx.projs = dequantize, [(p[0], p[1], p[4]) for p in projs]
            ctx.save_for_backward(X, *[t for p in projs for t in (p[2], p[3])])
            return tuple(outs)

        @staticmethod
        def backward(ctx, *grads):
            X, *ab = ctx.saved_tensors
            projs = [(W, q, ab[2 * k], ab[2 * k + 1], s) for k, (W, q, s) in enumerate(ctx.projs)]
            X2 = X.reshape(-1, X.shape[-1])
            dYs = [g.reshape(-1, g.shape[-1]).to(X.dtype) for g in grads]
            dA, dB = _lora_grads(X2, dYs, projs)
            dX = None
            if ctx.needs_input_grad[0]:
                for dY, p in zip(dYs, projs):
                    W = _merged(*p, ctx.dequantize, False)
                    dX = dY @ W if dX is None else dX.addmm_(dY, W)
                dX = dX.view(X.shape)
            out = [dX, None]
            for a, b in zip(dA, dB):
                out += [None, None, a, b, None]
            return tuple(out)

    class MLP(torch.autograd.Function):
        """down(act(gate(X)) · up(X)) with LoRA on all three, the activation recomputed in the backward pass
        (as Unsloth's kernel does: only X and the two pre-activation outputs are kept)."""

        @staticmethod
        def forward(ctx, X, dequantize, fg, dfg, skip, *flat):
            gate, up, down = flat[0:5], flat[5:10], flat[10:15]
            X2 = X.reshape(-1, X.shape[-1])
            e = X2 @ _merged(*gate, dequantize, True).t()
            g = X2 @ _merged(*up, dequantize, True).t()
            if skip:  # nobody reads the output (see `recompute_skip`): its shape, not its product
                out = X2.new_empty(X2.shape[0], down[3].shape[0])
            else:
                h = fg(e.view(*X.shape[:-1], -1), g.view(*X.shape[:-1], -1))
                out = h.reshape(-1, h.shape[-1]) @ _merged(*down, dequantize, True).t()
            ctx.dequantize, ctx.dfg = dequantize, dfg
            ctx.projs = [(p[0], p[1], p[4]) for p in (gate, up, down)]
            ctx.save_for_backward(X, e, g, gate[2], gate[3], up[2], up[3], down[2], down[3])
            return out.view(*X.shape[:-1], -1)

        @staticmethod
        def backward(ctx, dY):
            X, e, g, *ab = ctx.saved_tensors
            gate, up, down = [(W, q, ab[2 * k], ab[2 * k + 1], s) for k, (W, q, s) in enumerate(ctx.projs)]
            X2 = X.reshape(-1, X.shape[-1])
            dY = dY.reshape(-1, dY.shape[-1]).to(X.dtype)
            dh = dY @ _merged(*down, ctx.dequantize, False)
            h, dg, de = ctx.dfg(dh, e, g)  # h = act(e)·g again; dg, de: gradients of up's and gate's outputs
            (dA_down,), (dB_down,) = _lora_grads(h, [dY], [down])
            del h
            (dA_gate, dA_up), (dB_gate, dB_up) = _lora_grads(X2, [de, dg], [gate, up])
            dX = None
            if ctx.needs_input_grad[0]:
                dX = de @ _merged(*gate, ctx.dequantize, False)
                dX = dX.addmm_(dg, _merged(*up, ctx.dequantize, False)).view(X.shape)
            return (dX, None, None, None, None,
                    None, None, dA_gate, dB_gate, None,
                    None, None, dA_up, dB_up, None,
                    None, None, dA_down, dB_down, None)

    return Shared, MLP


_FUNCTIONS = None


def functions():
    """(Shared, MLP): the autograd functions, built on first use (torch is imported late)."""
    global _FUNCTIONS
    if _FUNCTIONS is None:
        _FUNCTIONS = _functions()
    return _FUNCTIONS


def silu_mul(e, g):
    """act(e)·g for SwiGLU, in torch (Unsloth's Triton kernel on the GPU)."""
    import torch

    return (torch.nn.functional.silu(e.float()) * g.float()).to(e.dtype)


def silu_mul_backward(dh, e, g):
    """(h, d/dg, d/de) of h = silu(e)·g for an incoming gradient dh, in float32, returned in e's dtype."""
    import torch

    ef, gf, dhf = e.float(), g.float(), dh.float()
    sig = torch.sigmoid(ef)
    act = ef * sig
    return ((act * gf).to(e.dtype), (dhf * act).to(e.dtype),
            (dhf * gf * sig * (1 + ef * (1 - sig))).to(e.dtype))


def shared(X, projs, dequantize):
    """Outputs of the projections `projs` ((W, quant, A, B, s) each) over X, LoRA merged into each weight."""
    Shared, _ = functions()
    return Shared.apply(X, dequantize, *[t for p in projs for t in p])


def mlp(X, gate, up, down, dequantize, fg=silu_mul, dfg=silu_mul_backward, skip=False):
    """down(act(gate(X))·up(X)) with each projection's LoRA merged into its weight. `skip`: the output's values
    are never read (a decoder layer's last product while it is recomputed for the backward pass): an uninitialised
    tensor of its shape comes back instead of the down product; what the backward pass keeps and gives is the same."""
    _, MLP = functions()
    return MLP.apply(X, dequantize, fg, dfg, bool(skip), *gate, *up, *down)


# ---- Unsloth -----------------------------------------------------------------------------------------


def _bnb_4bit(quant) -> bool:
    return type(quant).__name__ == "QuantState" and getattr(quant, "shape", None) is not None


def _decoder_layers(model):
    return [m for m in model.modules() if hasattr(m, "self_attn") and hasattr(m, "mlp")]


def _plain(fl, projs, X) -> bool:
    """Whether Unsloth would run these projections' fused path with no dropout and no LoRA bias (its own tests;
    activation fake-quantizers of quantization-aware training, where this Unsloth has the test, leave it too)."""
    fake_quant = getattr(fl, "_has_activation_fake_quantizer", None)
    if any(fl._has_multiple_active_adapters(p) or fl._has_active_dora_adapter(p) or (fake_quant and fake_quant(p))
           for p in projs):
        return False
    return fl._lora_dropout_and_bias(projs, X) == (None, (None,) * len(projs))


def _params(get, projs, X):
    """(W, quant, A, B, s) per projection when every one is a 4-bit base with an active adapter, else None."""
    out = []
    for proj in projs:
        W, quant, A, B, s = get(proj)
        if A is None or not _bnb_4bit(quant) or quant.dtype != X.dtype:
            return None
        out.append((W, quant, A, B, s))
    return out


def _switch_size(get, projs) -> float:
    """The group's switch size from its 4-bit weights' shapes; infinite when one is not 4-bit."""
    quants = [get(p)[1] for p in projs]
    if not all(_bnb_4bit(q) for q in quants):
        return float("inf")
    return break_even_tokens([tuple(q.shape) for q in quants])


def _wrappers(fl, get, dequantize, fg, dfg, setting, recomputing=None):
    """The three replacements for Unsloth's apply_lora_qkv, apply_lora_o and apply_lora_mlp_swiglu. `recomputing`:
    a function telling whether a checkpointed layer is being recomputed now, when the MLP's output is not read
    then (see `_recompute_probe`), else None."""
    sizes = {}  # the switch size of each group, by its first projection: the shapes never change

    def chosen(projs, X):
        """(W, quant, A, B, s) per projection when this call takes the merged path, else None (Unsloth's).
        Small micro-batches are sent on by their token count alone: Unsloth runs its own checks again."""
        params, size = None, sizes.get(id(projs[0]))
        if size is None:
            size = sizes[id(projs[0])] = _switch_size(get, projs)
        if setting == "on" or X.numel() // X.shape[-1] >= size:
            params = _plain(fl, projs, X) and _params(get, projs, X)
        _CALLS["merged" if params else "unsloth"] += 1
        return params or None

    def apply_qkv(self, X, original=fl.apply_lora_qkv):
        params = chosen((self.q_proj, self.k_proj, self.v_proj), X)
        return original(self, X) if params is None else shared(X, params, dequantize)

    def apply_o(self, X, original=fl.apply_lora_o):
        params = chosen((self.o_proj,), X)
        return original(self, X) if params is None else shared(X, params, dequantize)[0]

    def mlp_forward(self, X, original=fl.apply_lora_mlp_swiglu):
        params = chosen((self.gate_proj, self.up_proj, self.down_proj), X)
        if params is None:
            return original(self, X)
        skip = recomputing is not None and recomputing()
        _CALLS["skipped"] += skip
        return mlp(X, *params, dequantize, fg, dfg, skip=skip)

    return apply_qkv, apply_o, mlp_forward


def _recompute_probe(layers):
    """Unsloth's test for "a checkpointed layer is being recomputed for the backward pass", where skipping the MLP's
    down product then is safe for all of `layers`, else None. Safe: each layer is a checkpointed unit of its own
    (transformers' GradientCheckpointingLayer; Unsloth's checkpointers recompute one layer at a time) and runs
    Unsloth's Llama decoder layer (Llama, Mistral, Qwen2, Qwen3), where the MLP's output is only added to the
    residual to make the layer's output, and a recomputed layer's output is only the root of the backward pass
    that follows: its values are never read. (Gemma's post-MLP norm, for one, reads them: such layers keep the
    product.)"""
    if not recompute_skip():
        return None
    try:
        import inspect

        import torch
        from transformers.modeling_layers import GradientCheckpointingLayer
        from unsloth.models.llama import LlamaDecoderLayer_fast_forward
        from unsloth_zoo.gradient_checkpointing import in_gradient_checkpoint_recompute
    except ImportError:
        return None
    # Unsloth wraps the layer's forward for its per-block compile (functools.wraps): the function inside counts
    if not all(isinstance(layer, GradientCheckpointingLayer)
               and inspect.unwrap(type(layer).forward) is LlamaDecoderLayer_fast_forward for layer in layers):
        return None

    def recomputing() -> bool:  # never inside a compiled block: its traced graph must not depend on the mark
        return not torch.compiler.is_compiling() and in_gradient_checkpoint_recompute()

    return recomputing


def _check(layer, get, dequantize, fg, dfg) -> str | None:
    """None when the merged path matches the three-product formula on this layer's real weights (random
    LoRA matrices, B not zero, 64 tokens), outputs and gradients of X, A and B; else what differed."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(0)
    attn, block = layer.self_attn, layer.mlp
    names = [(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    names += [(block, n) for n in ("gate_proj", "up_proj", "down_proj")]
    params = {}
    for owner, name in names:
        W, quant, A, B, s = get(getattr(owner, name))
        A = (torch.randn(A.shape, generator=gen, device="cuda") * 0.02).requires_grad_()
        B = (torch.randn(B.shape, generator=gen, device="cuda") * 0.02).requires_grad_()
        params[name] = (W, quant, A, B, float(s))
    dtype = params["q_proj"][1].dtype

    def reference(X, p):
        W = dequantize(p[0], p[1], False).float()
        return X.float() @ W.t() + p[4] * (X.float() @ p[2].t()) @ p[3].t()

    def compare(what, got, want):
        err = (got.float() - want.float()).abs().max().item()
        scale = want.float().abs().max().item() + 1e-6
        return None if err <= 3e-2 * scale else f"{what} differs by {err:.3g} (scale {scale:.3g})"

    hidden = params["q_proj"][1].shape[1]
    for group in (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj", "down_proj")):
        inputs = params["o_proj"][1].shape[1] if group == ("o_proj",) else hidden
        X = torch.randn(1, 64, inputs, generator=gen, device="cuda", dtype=dtype).requires_grad_()
        ps = [params[n] for n in group]
        if group[0] == "gate_proj":
            got = [mlp(X, *ps, dequantize, fg, dfg)]
            e, g = reference(X, ps[0]), reference(X, ps[1])
            want = [reference(torch.nn.functional.silu(e) * g, ps[2])]
        else:
            got = list(shared(X, ps, dequantize))
            want = [reference(X, p) for p in ps]
        weights = [torch.randn(w.shape, generator=gen, device="cuda") for w in want]
        leaves = [X] + [t for p in ps for t in (p[2], p[3])]
        grads_got = torch.autograd.grad(sum((o.float() * w).sum() for o, w in zip(got, weights)), leaves)
        grads_want = torch.autograd.grad(sum((o * w).sum() for o, w in zip(want, weights)), leaves)
        labels = ["output"] * len(got) + ["dX"] + [f"d{a}({n})" for n in group for a in "AB"]
        for label, a, b in zip(labels, got + list(grads_got), want + list(grads_want)):
            problem = compare(f"{'/'.join(group)} {label}", a, b)
            if problem:
                return problem
    return None


def enable(model) -> str | None:
    """Put the merged path on every decoder layer Unsloth gave its fused LoRA kernels; returns what was done
    (or why not), or None when it is switched off."""
    setting = mode()
    if setting == "off":
        return None
    try:
        import torch
        import unsloth.kernels.fast_lora as fl
        from unsloth.kernels.swiglu import swiglu_DWf_DW_dfg_kernel, swiglu_fg_kernel
        from unsloth.kernels.utils import fast_dequantize, get_lora_parameters
        for name in ("_lora_dropout_and_bias", "_has_multiple_active_adapters", "_has_active_dora_adapter",
                     "apply_lora_qkv", "apply_lora_o", "apply_lora_mlp_swiglu"):
            getattr(fl, name)
    except (ImportError, AttributeError) as exc:
        return f"merged LoRA: not used (this Unsloth's LoRA kernels differ: {exc})"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "merged LoRA: not used under FSDP (the kernels read whole weights)"

    def dequantize(W, quant, buffer):
        return fast_dequantize(W, quant, use_global_buffer=buffer)

    def fused(layer) -> bool:
        forward = layer.mlp.__dict__.get("forward")
        func = getattr(forward, "__func__", None)
        return (layer.self_attn.__dict__.get("apply_qkv") is fl.apply_lora_qkv
                and layer.self_attn.__dict__.get("apply_o") is fl.apply_lora_o
                and func is fl.apply_lora_mlp_swiglu and "_unsloth_forward" not in layer.mlp.__dict__)

    layers = [layer for layer in _decoder_layers(model) if fused(layer)]
    if not layers:
        return "merged LoRA: not used (no decoder layer has Unsloth's fused SwiGLU LoRA kernels)"
    first = layers[0]
    quants = [get_lora_parameters(getattr(m, n))[1] for m, n in
              ((first.self_attn, "q_proj"), (first.mlp, "down_proj"))]
    if not all(_bnb_4bit(q) for q in quants):
        return "merged LoRA: not used (the base is not bitsandbytes 4-bit)"
    try:
        with torch.enable_grad():
            problem = _check(first, get_lora_parameters, dequantize, swiglu_fg_kernel, swiglu_DWf_DW_dfg_kernel)
    except Exception as exc:  # noqa: BLE001 - a kernel this build lacks: keep Unsloth's products
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        return f"merged LoRA: not used (the check on the first layer failed: {problem})"
    import types

    recomputing = _recompute_probe(layers)
    qkv, o, mlp_forward = _wrappers(fl, get_lora_parameters, dequantize, swiglu_fg_kernel,
                                    swiglu_DWf_DW_dfg_kernel, setting, recomputing)
    for layer in layers:
        layer.self_attn.apply_qkv = qkv
        layer.self_attn.apply_o = o
        layer.mlp.forward = types.MethodType(mlp_forward, layer.mlp)
    when = "every micro-batch" if setting == "on" else "micro-batches from each group's switch size on"
    skipping = "; a recomputed layer skips its MLP's down product" if recomputing else ""
    return f"merged LoRA: {len(layers)} layers fold LoRA into the dequantized weights ({when}{skipping})"
