"""One attention layer over a packed row, forward + backward: Unsloth's per-document SDPA vs sftlib's varlen call.

    python benchmarks/packed_attention_bench.py --out OUT        # on a CUDA GPU with Unsloth installed

The row is what a micro-batch of the GPU benchmark becomes under padding-free packing: 8 x 2048 tokens
of documents with the benchmark's lognormal lengths (median 450, capped at 2048), Llama-3.1-8B's
attention shape (32 query heads, 8 key/value heads, head size 128), bfloat16. Timed with CUDA events,
median of `--repeats` after warm-up; the outputs and gradients of both are compared. Results:
OUT/packed_attention.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def rows_of(lengths: list[int], width: int) -> list[list[int]]:
    """First-fit-decreasing packing into rows of `width` tokens (what TRL's BFD packing approximates)."""
    rows: list[list[int]] = []
    for n in sorted(lengths, reverse=True):
        for row in rows:
            if sum(row) + n <= width:
                row.append(n)
                break
        else:
            rows.append([n])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args(argv)
    import unsloth  # noqa: F401
    import torch
    import unsloth.utils.attention_dispatch as dispatch

    from gpu_bench import doc_lengths
    from sftlib.training.packed_attention import _check, _function

    fn = _function()
    check = _check(fn)
    packed = rows_of(doc_lengths(400, seed=0), 2048)
    rows = packed[:: max(1, len(packed) // 8)][:8]  # spread over the list: its head holds one long document a row
    lengths = [n for row in rows for n in row]
    total = sum(lengths)
    heads, kv_heads, dim = 32, 8, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    Q = torch.randn(1, heads, total, dim, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    K = torch.randn(1, kv_heads, total, dim, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    V = torch.randn(1, kv_heads, total, dim, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    grad = torch.randn(1, total, heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), device="cuda", dtype=torch.int32)

    def segments():
        return dispatch._sdpa_packed_segments(Q, K, V, tuple(lengths), n_groups=heads // kv_heads, is_causal=True,
                                              sliding_window=None, sdpa_kwargs={}, training=True)

    def varlen():
        q, k, v = (x.squeeze(0).transpose(0, 1).contiguous() for x in (Q, K, V))
        return fn(q, k, v, cu, cu, max(lengths), max(lengths), window_size=(-1, 0), enable_gqa=True).unsqueeze(0)

    def timed(f):
        times = []
        for i in range(a.repeats + 3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = f()
            gq, gk, gv = torch.autograd.grad(out, (Q, K, V), grad)
            end.record()
            torch.cuda.synchronize()
            if i >= 3:
                times.append(start.elapsed_time(end))
        return statistics.median(times), out.detach(), (gq, gk, gv)

    t_seg, o_seg, g_seg = timed(segments)
    t_var, o_var, g_var = timed(varlen)
    errors = {"output": (o_seg.float() - o_var.float()).abs().max().item()}
    for name, x, y in zip(("dq", "dk", "dv"), g_seg, g_var):
        errors[name] = (x.float() - y.float()).abs().max().item()
    result = {"documents": len(lengths), "tokens": total, "rows": len(rows), "heads": heads, "kv_heads": kv_heads,
              "head_dim": dim, "per_document_sdpa_ms": t_seg, "varlen_ms": t_var, "speedup": t_seg / t_var,
              "max_abs_error": errors, "self_check": check or "passed", "gpu": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "unsloth_native_varlen": dispatch._TORCH_VARLEN_ATTN is not None}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "packed_attention.json").write_text(json.dumps(result, indent=2))
    md = ["# Packed attention: one layer, forward + backward", "",
          "Command: `python benchmarks/packed_attention_bench.py --out OUT`", "",
          f"{result['gpu']}, torch {result['torch']}; {len(lengths)} documents in {len(rows)} rows, {total} tokens; "
          f"{heads} query heads, {kv_heads} key/value heads, head size {dim}, bfloat16.", "",
          "| path | ms (median of {}) |".format(a.repeats), "|---|---:|",
          f"| Unsloth, one SDPA call per run of equal-length documents | {t_seg:.2f} |",
          f"| sftlib, one varlen flash call (sftlib/packed_attention.py) | {t_var:.2f} |", "",
          f"Speed-up {t_seg / t_var:.2f}x. Largest differences between the two: "
          + ", ".join(f"{k} {v:.3g}" for k, v in errors.items()) + f". Self-check: {result['self_check']}."]
    (a.out / "packed_attention.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
