"""Where the GPU's time goes in one training step of the 8B workload: a breakdown by kind of work.

    python benchmarks/make_model.py --out /tmp/llama-8b --quantize
    python benchmarks/profile_8b.py --model /tmp/llama-8b-bnb-4bit --out benchmarks/results

The workload is benchmarks/gpu_bench.py's `sftlib:auto` (same data, same settings, same code path:
`load_model`, `add_lora`, `train`). After `--warmup` optimizer steps (compilation and autotuning), the
next `--steps` are timed without the profiler, then `--profiled` more run under torch.profiler. Every
CUDA kernel of the profiled steps is put in one bucket:

- cross-entropy over the vocabulary: kernels launched inside the loss (the loss call is wrapped in a
  named range, forward and the gradients it computes there);
- optimizer: kernels inside `Optimizer.step` (torch names that range itself);
- 4-bit dequantize: bitsandbytes' dequantize kernels (the base's NF4 weights to 16 bits, forward and
  backward);
- LoRA matmuls / base matmuls: matrix products (cuBLAS, CUTLASS) of an op one of whose inputs has
  the LoRA rank as a dimension / all others (the 16-bit products with the dequantized weights, the
  LM head's outside the loss);
- attention: flash / memory-efficient attention kernels;
- RoPE, norms, activations: Unsloth's Triton kernels for RMSNorm, RoPE and SwiGLU;
- other kernels: copies, casts, element-wise adds, reductions;
- host gaps: the profiled steps' wall time minus the kernels' time (the GPU waiting on Python, kernel
  launches, synchronisation). With one stream, kernels do not overlap, so the buckets add up to the
  wall time. The profiler slows the host down; the unprofiled step time is reported beside it.

Writes OUT/profile_8b.json and OUT/profile_8b.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

LOSS_RANGE = "sftlib::cross_entropy"
BUCKETS = ["4-bit dequantize", "base matmuls", "LoRA matmuls", "attention", "RoPE, norms, activations",
           "cross-entropy over the vocabulary", "optimizer", "other kernels", "host gaps"]


def bucket(kernel: str, ancestors: list[str], shapes: list, rank: int) -> str:
    """The bucket of one kernel, from its name, the names of the ops and ranges it ran under (innermost
    first) and the input shapes of those ops."""
    k = kernel.lower()
    if any(a == LOSS_RANGE for a in ancestors):
        return "cross-entropy over the vocabulary"
    if any(a.startswith("Optimizer.step") for a in ancestors):
        return "optimizer"
    if "dequant" in k:
        return "4-bit dequantize"
    if any(s in k for s in ("flash", "fmha", "attention", "attn")):
        return "attention"
    if any(s in k for s in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_", "splitk")):
        lora = any(rank in dims for shape in shapes for dims in (shape if isinstance(shape, list) else [])
                   if isinstance(dims, list))
        return "LoRA matmuls" if lora else "base matmuls"
    if any(s in k for s in ("rms", "rope", "fg_kernel", "swiglu", "silu", "layernorm")):
        return "RoPE, norms, activations"
    return "other kernels"


def breakdown(prof, rank: int) -> dict:
    """Microseconds per bucket and the ten largest kernels of each, from a finished torch profiler."""
    totals, kernels = defaultdict(float), defaultdict(lambda: defaultdict(float))
    for event in prof.events():
        if not getattr(event, "kernels", None):
            continue
        ancestors, shapes, e = [], [], event
        while e is not None:
            ancestors.append(e.name)
            if e.name.startswith("aten::") and getattr(e, "input_shapes", None):
                shapes.append(e.input_shapes)
            e = e.cpu_parent
        for k in event.kernels:
            b = bucket(k.name, ancestors, shapes, rank)
            totals[b] += k.duration
            kernels[b][k.name[:90]] += k.duration
    top = {b: sorted(v.items(), key=lambda kv: -kv[1])[:10] for b, v in kernels.items()}
    return {"kernel_us": dict(totals), "top_kernels_us": top}


def wrap_loss() -> str:
    """Name the loss call so its kernels can be told apart: Unsloth's fused loss, or the model's loss
    function on the transformers path."""
    import torch

    def named(fn):
        def inner(*args, **kwargs):
            with torch.profiler.record_function(LOSS_RANGE):
                return fn(*args, **kwargs)
        return inner

    try:
        import unsloth.models.llama as ul

        ul.unsloth_fused_ce_loss = named(ul.unsloth_fused_ce_loss)
        return "unsloth_fused_ce_loss"
    except (ImportError, AttributeError):
        return "not wrapped"


def callback(warmup: int, steps: int, profiled: int, state: dict):
    import torch
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_step_begin(self, args, st, control, **kw):
            if st.global_step == warmup + steps and "prof" not in state:  # once, at the first micro-batch
                torch.cuda.synchronize()
                state["prof"] = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
                    record_shapes=True)
                state["prof"].__enter__()
                state["profiled_start"] = time.perf_counter()

        def on_step_end(self, args, st, control, **kw):
            torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), st.num_input_tokens_seen))
            if st.global_step == warmup + steps + profiled and "prof" in state and "profiled_seconds" not in state:
                state["profiled_seconds"] = time.perf_counter() - state["profiled_start"]
                state["prof"].__exit__(None, None, None)

        def on_train_begin(self, args, st, control, **kw):
            torch.cuda.synchronize()
            self.marks = [(time.perf_counter(), st.num_input_tokens_seen)]

    return Profile()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--setting", default="sftlib:auto", help="a gpu_bench.py setting of sftlib")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps without the profiler")
    p.add_argument("--profiled", type=int, default=2)
    p.add_argument("--docs", type=int, default=3000)
    a = p.parse_args(argv)
    import unsloth  # noqa: F401  first: it patches transformers, TRL and PEFT

    import gpu_bench
    import torch

    setting = gpu_bench.SETTINGS[a.setting]
    os.environ.update(setting.get("env", {}))
    if setting.get("cap"):  # as gpu_bench.py caps it: the process sees a GPU of that size
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(setting["cap"] * 2 ** 30 / total)
        if not hasattr(torch.cuda, "get_per_process_memory_fraction"):
            os.environ["SFTLIB_GPU_MEMORY_GIB"] = str(setting["cap"])
    wrapped = wrap_loss()
    state: dict = {}
    cb = callback(a.warmup, a.steps, a.profiled, state)
    data = gpu_bench.make_dataset(a.docs, seed=gpu_bench.ARTICLE["seed"])
    total_steps = a.warmup + a.steps + a.profiled
    trainer, extra = gpu_bench.run_sftlib(a.model, dict(setting), data, total_steps,
                                          "/tmp/profile-8b", cb)
    marks = cb.marks
    steps = [(t1 - t0, n1 - n0) for (t0, n0), (t1, n1) in zip(marks, marks[1:])]
    plain = steps[a.warmup:a.warmup + a.steps]
    profiled = steps[a.warmup + a.steps:]
    result = breakdown(state["prof"], gpu_bench.ARTICLE["r"])
    wall_us = state["profiled_seconds"] * 1e6
    result["kernel_us"]["host gaps"] = max(wall_us - sum(result["kernel_us"].values()), 0.0)
    row = {
        "setting": a.setting, "gpu": torch.cuda.get_device_name(0), "loss_wrapped": wrapped,
        "plan": extra.get("plan"), "batch": extra.get("batch"), "accum": extra.get("accum"), "gc": extra.get("gc"),
        "step_seconds_plain": [round(s, 3) for s, _ in plain], "step_seconds_profiled": [round(s, 3) for s, _ in profiled],
        "tokens_per_s_plain": sum(n for _, n in plain) / sum(s for s, _ in plain),
        "profiled_wall_us": wall_us, **result, "versions": gpu_bench.versions(),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_8b.json").write_text(json.dumps(row, indent=2, default=str) + "\n")
    total = sum(row["kernel_us"].values())
    lines = ["# Where a training step's time goes (8B workload)", "",
             f"Command: `python benchmarks/profile_8b.py --model MODEL --setting {a.setting}`; GPU: {row['gpu']}; "
             f"batch {row['batch']} x {row['accum']}, checkpointing {row['gc']}.", "",
             f"Unprofiled: {row['tokens_per_s_plain']:,.0f} tokens/s, steps of "
             f"{', '.join(str(s) for s in row['step_seconds_plain'])} s. Profiled steps: "
             f"{', '.join(str(s) for s in row['step_seconds_profiled'])} s.", "",
             "| bucket | ms (profiled steps) | share |", "|---|---:|---:|"]
    for b in BUCKETS:
        us = row["kernel_us"].get(b, 0.0)
        lines.append(f"| {b} | {us / 1e3:,.1f} | {us / total:.1%} |")
    lines += ["", "Largest kernels per bucket (ms):", ""]
    for b in BUCKETS:
        for name, us in row["top_kernels_us"].get(b, [])[:4]:
            lines.append(f"- {b}: `{name}` {us / 1e3:,.1f}")
    (out / "profile_8b.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
