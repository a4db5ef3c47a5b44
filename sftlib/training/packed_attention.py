"""Packed training under Unsloth: one variable-length flash-attention call per layer, not one per document.

    from sftlib.training.packed_attention import enable
    note = enable()        # after `import unsloth`; None when there is nothing to change

sftlib trains packed, padding-free batches: a micro-batch is one row of several conversations, told
apart by position ids that restart at 0. Unsloth 2026.10 runs attention over such a row with torch's
`varlen_attn` when that function takes grouped key/value heads (`enable_gqa`, torch 2.12 and newer).
On torch 2.10 and 2.11 it does not, and Unsloth falls back to one SDPA call per run of equal-length
documents: with conversation-like lengths nearly every document is a run of its own, so a micro-batch
of 8 x 2048 tokens makes about 36 small attention launches per layer, forward and backward, plus the
copies to split and join them.

The flash kernel that SDPA itself calls (`aten._flash_attention_forward` / `_backward`) takes
cumulative sequence lengths and fewer key/value heads than query heads directly. `enable()` hands
Unsloth a `varlen_attn` with `enable_gqa` built on that kernel, so each layer makes one call. It
checks the kernel first, on a small packed batch with grouped heads, against per-document SDPA
(outputs and all three gradients within bfloat16 rounding); when the check fails, or the kernel or
Unsloth's hook is missing, nothing is changed and the note says why. `SFTLIB_PACKED_VARLEN=0` turns
it off (to measure the difference).
"""

from __future__ import annotations

from sftlib.training import env_switch

_NOTE: str | None = None
_DONE = False
_ACTIVE = False


def _function():
    import torch

    class FlashVarlen(torch.autograd.Function):
        """Causal (or windowed) flash attention over a packed row: q (T, H, D), k/v (T, H_kv, D)."""

        @staticmethod
        def forward(ctx, q, k, v, cu, max_len, is_causal, scale, left, right):
            out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
                q, k, v, cu, cu, max_len, max_len, 0.0, is_causal, False,
                scale=scale, window_size_left=left, window_size_right=right)
            ctx.save_for_backward(q, k, v, cu, out, lse, rng, unused)
            ctx.args = (max_len, is_causal, scale, left, right)
            return out

        @staticmethod
        def backward(ctx, grad):
            q, k, v, cu, out, lse, rng, unused = ctx.saved_tensors
            max_len, is_causal, scale, left, right = ctx.args
            dq, dk, dv = torch.ops.aten._flash_attention_backward(
                grad.contiguous(), q, k, v, out, lse, cu, cu, max_len, max_len, 0.0, is_causal, rng, unused,
                scale=scale, window_size_left=left, window_size_right=right)
            return dq, dk, dv, None, None, None, None, None, None

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                    enable_gqa=False):
        # Unsloth passes the same offsets for queries and keys (self-attention over the packed row)
        if cu_seq_k is not None and cu_seq_k is not cu_seq_q and not torch.equal(cu_seq_q, cu_seq_k):
            raise ValueError("packed attention: queries and keys must share their sequence offsets")
        if key.shape[1] != query.shape[1] and not enable_gqa:
            raise ValueError("packed attention: key/value heads differ from query heads without enable_gqa")
        left, right = window_size
        return FlashVarlen.apply(query, key, value, cu_seq_q.to(torch.int32), int(max_q), window_size == (-1, 0),
                                 scale, left, right)

    return varlen_attn


def _check(fn) -> str | None:
    """None when `fn` matches per-document SDPA on a packed batch with grouped heads; else what differed."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator(device="cuda").manual_seed(0)
    lengths = [37, 200, 5, 128, 64, 1]
    heads, kv_heads, dim = 8, 2, 64
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, dim, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    grad = torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), device="cuda", dtype=torch.int32)
    out = fn(q, k, v, cu, cu, max(lengths), max(lengths), window_size=(-1, 0), enable_gqa=True)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    pieces, start = [], 0
    for n in lengths:
        s = slice(start, start + n)
        pieces.append(F.scaled_dot_product_attention(q[s].transpose(0, 1)[None], k[s].transpose(0, 1)[None],
                                                     v[s].transpose(0, 1)[None], is_causal=True,
                                                     enable_gqa=True)[0].transpose(0, 1))
        start += n
    ref_out = torch.cat(pieces)
    want = (ref_out, *torch.autograd.grad(ref_out, (q, k, v), grad))
    for name, a, b in zip(("output", "dq", "dk", "dv"), got, want):
        if a.shape != b.shape:
            return f"{name} has shape {tuple(a.shape)}, per-document SDPA {tuple(b.shape)}"
        err = (a.float() - b.float()).abs().max().item()
        scale = b.float().abs().max().item() + 1e-6
        if err > 2e-2 * scale:
            return f"{name} differs from per-document SDPA by {err:.3g} (scale {scale:.3g})"
    return None


def enable() -> str | None:
    """Give Unsloth a grouped-head varlen attention where it lacks one; returns what was done, or None."""
    global _NOTE, _DONE
    if _DONE:
        return _NOTE
    on = env_switch("SFTLIB_PACKED_VARLEN", True)  # a bad value raises before anything is decided
    _DONE = True
    if not on:
        return None
    try:
        import unsloth.utils.attention_dispatch as dispatch
    except Exception:  # noqa: BLE001 - another Unsloth layout: leave it as it is
        return None
    if getattr(dispatch, "_TORCH_VARLEN_ATTN", "absent") is not None or not getattr(dispatch, "_SDPA_PACKED_SEGMENTS", False):
        return None  # Unsloth has a varlen path already, or this version routes packed attention otherwise
    import torch

    if not torch.cuda.is_available() or not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return None
    if torch.cuda.get_device_capability() < (8, 0):  # a T4 (7.5): torch's flash kernel needs Ampere or newer
        _NOTE = ("packed attention: Unsloth's per-document SDPA kept (the flash kernel needs compute capability "
                 f"8.0, this GPU has {'.'.join(map(str, torch.cuda.get_device_capability()))})")
        return _NOTE
    fn = _function()
    try:
        problem = _check(fn)
    except Exception as exc:  # noqa: BLE001 - a kernel this GPU or build lacks: keep Unsloth's own path
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        _NOTE = f"packed attention: Unsloth's per-document SDPA kept (the varlen flash check failed: {problem})"
        return _NOTE
    global _ACTIVE
    dispatch._TORCH_VARLEN_ATTN = fn
    _ACTIVE = True
    _NOTE = "packed attention: one varlen flash call per layer (torch's flash kernel, grouped K/V heads)"
    return _NOTE


def active() -> bool:
    """Whether `enable()` gave Unsloth the one-call-per-layer kernel (sftlib.training.autotune plans memory by it)."""
    return _ACTIVE
