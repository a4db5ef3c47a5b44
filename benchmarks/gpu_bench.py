"""Training throughput on one GPU: sftlib (automatic settings) vs raw Unsloth vs transformers + PEFT + TRL.

    python benchmarks/make_model.py --out /tmp/llama-8b --quantize          # once: random 8B, NF4 copy
    python benchmarks/gpu_bench.py --model /tmp/llama-8b-bnb-4bit --out benchmarks/results
    python benchmarks/gpu_bench.py --model ... --runs unsloth:article,sftlib:auto --steps 5 --deadline 500

Every contender trains the same synthetic data with the article's hyperparameters (LoRA r=16,
alpha=16 on all 7 linear layers, rsLoRA, batch 8 x grad-accum 2, 2048 tokens, adamw_8bit, lr 3e-4,
linear schedule with 10 warm-up steps, packing) from the same pre-quantized 4-bit folder:

- `sftlib:auto`: sftlib's own path (`load_model`, `add_lora`, `train`) with
  `train.gradient_checkpointing: auto` and `train.auto_batch: true` (see sftlib/autotune.py);
  `sftlib:article` forces the article's settings (to measure sftlib's own overhead against Unsloth);
  `sftlib:auto-40GiB` / `-15GiB` cap the process with `torch.cuda.set_per_process_memory_fraction`.
- `unsloth:article`: the article's code, `FastLanguageModel` + TRL's SFTTrainer, Unsloth's offloaded
  gradient checkpointing.
- `hf:article`: transformers (SDPA attention) + PEFT + bitsandbytes + TRL, as users write it without
  Unsloth (TRL's default gradient checkpointing, non-reentrant).

Data: documents of random token ids with lognormal lengths (median 450, sigma 0.8, capped at 2048),
fixed seed; the loss is on every token, as in the article. Each contender runs in its own process
(Unsloth patches transformers and TRL on import). Measured per contender: real (non-padding) tokens
per second over the optimizer steps after `--warmup` (compilation and autotuning excluded), peak
allocated and reserved GPU memory, MFU against a bf16 matrix-product rate measured in the same run,
and the first logged losses. Model FLOPs per token count the forward pass and the backward pass
through the frozen base (2N + 2N for N matmul weights, LM head included), 6 x the LoRA parameters,
and causal attention within each document (6 x l x heads x head_dim x layers for a document of l);
recomputation by gradient checkpointing is not counted as useful work.

Results: `OUT/gpu_bench.json` (a list of objects with contender, setting, gpu, tokens_per_s,
peak_gib, mfu, first_losses, versions and the details) and `OUT/gpu_bench.md`, rewritten after every
contender so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARTICLE = dict(r=16, alpha=16, batch=8, accum=2, seq=2048, lr=3e-4, warmup_steps=10, optim="adamw_8bit",
               weight_decay=0.01, seed=0)
# contender:setting -> what it runs. gc: gradient checkpointing; cap: per-process memory cap in GiB.
SETTINGS = {
    "unsloth:article": dict(gc="unsloth", batch=8, accum=2),
    "sftlib:auto": dict(gc="auto", auto_batch=True, batch=8, accum=2),
    "hf:article": dict(gc="true", batch=8, accum=2),
    "sftlib:article": dict(gc="unsloth", batch=8, accum=2),
    "sftlib:auto-40GiB": dict(gc="auto", auto_batch=True, batch=8, accum=2, cap=40),
    "sftlib:auto-15GiB": dict(gc="auto", auto_batch=True, batch=8, accum=2, cap=15),
    "unsloth:nogc-8x2": dict(gc="false", batch=8, accum=2),
    "unsloth:nogc-4x4": dict(gc="false", batch=4, accum=4),
    # SFTLIB_PACKED_VARLEN=0: sftlib without its packed-attention kernel (sftlib/packed_attention.py)
    "sftlib:auto-novarlen": dict(gc="auto", auto_batch=True, batch=8, accum=2, env={"SFTLIB_PACKED_VARLEN": "0"}),
    "sftlib:article-novarlen": dict(gc="unsloth", batch=8, accum=2, env={"SFTLIB_PACKED_VARLEN": "0"}),
    # SFTLIB_PAD_MULTIPLE=0: packed micro-batches not rounded up to a multiple of 8 tokens (sftlib/training/trainer.py)
    "sftlib:auto-nopad": dict(gc="auto", auto_batch=True, batch=8, accum=2, env={"SFTLIB_PAD_MULTIPLE": "0"}),
    # SFTLIB_MERGED_LORA: LoRA folded into the dequantized weights (sftlib/training/merged_lora.py) off, or forced on
    "sftlib:auto-nomerge": dict(gc="auto", auto_batch=True, batch=8, accum=2, env={"SFTLIB_MERGED_LORA": "0"}),
    "sftlib:auto-15GiB-nomerge": dict(gc="auto", auto_batch=True, batch=8, accum=2, cap=15,
                                      env={"SFTLIB_MERGED_LORA": "0"}),
    # SFTLIB_RECOMPUTE_SKIP=0: recomputed layers make their MLP's down product too (sftlib/training/merged_lora.py)
    "sftlib:auto-15GiB-noskip": dict(gc="auto", auto_batch=True, batch=8, accum=2, cap=15,
                                     env={"SFTLIB_RECOMPUTE_SKIP": "0"}),
    # SFTLIB_AUTO_KEEP=1: the plan keeps as many layers from recomputation as its estimate fits (training/autotune.py)
    "sftlib:auto-15GiB-autokeep": dict(gc="auto", auto_batch=True, batch=8, accum=2, cap=15,
                                       env={"SFTLIB_AUTO_KEEP": "1"}),
    "sftlib:15GiB-gc-2x8-keep16-nomerge": dict(gc="unsloth", batch=2, accum=8, cap=15, keep=16,
                                               env={"SFTLIB_MERGED_LORA": "0"}),
    "sftlib:15GiB-nogc-1x16-merge": dict(gc="false", batch=1, accum=16, cap=15, env={"SFTLIB_MERGED_LORA": "1"}),
    # under the T4-sized cap: one 2048-token row per micro-batch and no recomputation, instead of 8 x 2 recomputed
    "sftlib:15GiB-nogc-1x16": dict(gc="false", batch=1, accum=16, cap=15),
    "sftlib:15GiB-gc-8x2": dict(gc="unsloth", batch=8, accum=2, cap=15),
    # Unsloth's recomputation without moving the saved activations to the host
    "sftlib:15GiB-gctrue-8x2": dict(gc="true", batch=8, accum=2, cap=15),
    # Unsloth's offloaded recomputation on all but `keep` evenly spaced decoder layers (train.checkpoint_keep_layers),
    # so fewer, larger micro-batches than one row fit without recomputing every layer
    "sftlib:15GiB-gc-2x8": dict(gc="unsloth", batch=2, accum=8, cap=15),
    "sftlib:15GiB-gc-2x8-keep12": dict(gc="unsloth", batch=2, accum=8, cap=15, keep=12),
    "sftlib:15GiB-gc-2x8-keep16": dict(gc="unsloth", batch=2, accum=8, cap=15, keep=16),
    "sftlib:15GiB-gc-4x4-keep6": dict(gc="unsloth", batch=4, accum=4, cap=15, keep=6),
    # the plan's 8 x 2 recomputed, with some of the memory it leaves under the cap spent on two layers kept
    "sftlib:15GiB-gc-8x2-keep2": dict(gc="unsloth", batch=8, accum=2, cap=15, keep=2),
}
DEFAULT_RUNS = "unsloth:article,sftlib:auto,hf:article,sftlib:article,sftlib:auto-40GiB,sftlib:auto-15GiB"


# ---- data -------------------------------------------------------------------------------------------


def doc_lengths(n: int, seed: int = 0, median: float = 450, sigma: float = 0.8, cap: int = 2048) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(math.log(median), sigma, n).round().astype(int), 16, cap).tolist()


def make_dataset(n_docs: int, seed: int = 0, vocab: int = 128000, bos: int = 128000):
    """`n_docs` documents of random ordinary token ids, each starting with BOS."""
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(seed + 1)
    rows = [[bos] + rng.integers(0, vocab, n - 1).tolist() for n in doc_lengths(n_docs, seed)]
    return Dataset.from_dict({"input_ids": rows})


# ---- measuring --------------------------------------------------------------------------------------


def matmul_tflops(n: int = 8192, repeats: int = 10) -> float:
    """bf16 n x n x n matrix products on random data: the median rate in TFLOP/s."""
    import torch

    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n ** 3 / sorted(times)[len(times) // 2] / 1e12


def flops_per_token(config: dict, lengths: list[int], r: int = 16) -> float:
    """Useful training FLOPs per token (see the module docstring)."""
    h, i, L, v = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"]
    hd = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    matmul = L * (h * q + 2 * h * kv + q * h + 3 * h * i) + v * h
    lora = L * r * ((h + q) + 2 * (h + kv) + (q + h) + 3 * (h + i))
    attention = 6 * q * L * sum(n * n for n in lengths) / sum(lengths)  # causal: 2 l^2 q per layer forward, x3
    return 4 * matmul + 6 * lora + attention


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "unsloth", "unsloth_zoo", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def step_timer():
    """A TrainerCallback recording, after each optimizer step, the time and the tokens seen so far."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks = []  # (time, tokens seen) at the start and after each optimizer step

        def on_train_begin(self, args, state, control, **kw):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.marks = [(time.perf_counter(), state.num_input_tokens_seen)]

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

    return StepTimer()


def summarise(timer, log_history, warmup: int) -> dict:
    import torch

    steps = [(t1 - t0, n1 - n0) for (t0, n0), (t1, n1) in zip(timer.marks, timer.marks[1:])]
    measured = steps[warmup:]
    seconds, tokens = sum(s for s, _ in measured), sum(n for _, n in measured)
    return {
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "tokens_per_step": tokens / len(measured) if measured else None,
        "step_seconds": [round(s, 3) for s, _ in steps],
        "measured_steps": len(measured),
        "tokens_seen": timer.marks[-1][1] - timer.marks[0][1] if timer.marks else None,  # all steps, warm-up too
        "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
        "reserved_gib": torch.cuda.max_memory_reserved() / 2 ** 30,
        # cudaMalloc failures answered by emptying the cache and retrying: each one synchronises the device
        "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries"),
        # the allocator's settings (importing unsloth_zoo sets expandable segments where they work)
        "alloc_conf": os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "first_losses": [round(float(x["loss"]), 4) for x in log_history if "loss" in x][:5],
    }


# ---- contenders (each in its own process) ------------------------------------------------------------


def sft_args(output_dir: str, s: dict, max_steps: int, **extra):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=output_dir, per_device_train_batch_size=s["batch"], gradient_accumulation_steps=s["accum"],
        max_steps=max_steps, learning_rate=ARTICLE["lr"], lr_scheduler_type="linear",
        warmup_steps=ARTICLE["warmup_steps"], weight_decay=ARTICLE["weight_decay"], optim=ARTICLE["optim"],
        seed=ARTICLE["seed"], data_seed=ARTICLE["seed"], logging_steps=1, save_strategy="no", report_to=[],
        max_length=ARTICLE["seq"], packing=True, packing_strategy="bfd", bf16=True,
        include_num_input_tokens_seen="non_padding", dataloader_num_workers=0, disable_tqdm=True, **extra)


def run_unsloth(model_dir: str, s: dict, data, max_steps: int, out: str, timer):
    from unsloth import FastLanguageModel  # first: it patches transformers, TRL and PEFT
    from trl import SFTTrainer

    model, tokenizer = FastLanguageModel.from_pretrained(model_name=model_dir, max_seq_length=ARTICLE["seq"],
                                                         dtype=None, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(
        model, r=ARTICLE["r"], lora_alpha=ARTICLE["alpha"], lora_dropout=0, target_modules=LORA_TARGETS,
        bias="none", use_gradient_checkpointing={"unsloth": "unsloth", "true": True, "false": False}[s["gc"]],
        random_state=ARTICLE["seed"], use_rslora=True)
    static = _allocated_gib()
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=data,
                         args=sft_args(out, s, max_steps), callbacks=[timer])
    trainer.train()
    return trainer, {"static_gib": static}


def run_hf(model_dir: str, s: dict, data, max_steps: int, out: str, timer):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                 device_map={"": 0})
    gc = s["gc"] != "false"
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=ARTICLE["r"], lora_alpha=ARTICLE["alpha"], lora_dropout=0.0,
                                             target_modules=LORA_TARGETS, use_rslora=True, task_type="CAUSAL_LM"))
    static = _allocated_gib()
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=data, callbacks=[timer],
                         args=sft_args(out, s, max_steps, gradient_checkpointing=gc,
                                       gradient_checkpointing_kwargs={"use_reentrant": False}))
    trainer.train()
    return trainer, {"static_gib": static}


def run_sftlib(model_dir: str, s: dict, data, max_steps: int, out: str, timer):
    from sftlib.training.backend import choose_backend  # imports Unsloth first where it can run

    backend = choose_backend("unsloth")
    from sftlib.config import RunConfig
    from sftlib.training.lora import add_lora
    from sftlib.training.model import load_model
    from sftlib.training.trainer import train

    cfg = RunConfig.from_dict({
        "backend": "unsloth", "model": {"name": model_dir, "max_seq_length": ARTICLE["seq"], "dtype": "bfloat16"},
        "lora": {"r": ARTICLE["r"], "alpha": ARTICLE["alpha"], "use_rslora": True},
        "data": {"train_on": "all"},
        "train": {"batch_size": s["batch"], "grad_accum": s["accum"], "gradient_checkpointing": s["gc"],
                  "auto_batch": s.get("auto_batch", False), "max_steps": max_steps, "output_dir": out,
                  "logging_steps": 1, "save_steps": 0, "checkpoint_keep_layers": s.get("keep", 0)},
    })
    if hasattr(cfg.train, "resume"):
        cfg.train.resume = "never"
    model, tokenizer = load_model(cfg, backend)
    model = add_lora(model, cfg, backend)
    from transformers.modeling_layers import GradientCheckpointingLayer

    # read before training: the flags say nothing after it (they read False for every layer then)
    recomputed = [bool(m.gradient_checkpointing) for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    static = _allocated_gib()
    captured = {}

    from transformers import TrainerCallback

    class Keep(TrainerCallback):  # the trainer's log history, which TrainResult summarises away
        def on_train_end(self, args, state, control, **kw):
            captured["history"] = list(state.log_history)

    result = train(cfg, model, tokenizer, data, backend=backend, callbacks=[timer, Keep()])
    from sftlib.training import merged_lora
    plan = getattr(model, "sftlib_plan", None)
    extra = {"layers_recomputed": f"{sum(recomputed)} of {len(recomputed)}",
             "static_gib": static, "plan": plan.to_dict() if plan else None, "sftlib_tokens_per_s": result.tokens_per_s,
             "backend_reason": backend.reason,
             "batch": cfg.train.batch_size, "accum": cfg.train.grad_accum, "gc": cfg.train.gradient_checkpointing,
             "keep_layers": cfg.train.checkpoint_keep_layers,
             "merged_lora": getattr(model, "sftlib_merged_lora", None), "merged_lora_calls": merged_lora.calls()}

    class History:  # what summarise() reads from a trainer
        class state:
            log_history = captured.get("history", [])

    return History, extra


def _allocated_gib() -> float:
    import torch

    return torch.cuda.memory_allocated() / 2 ** 30


def worker(a) -> None:
    """One contender and setting in this process; prints one JSON line starting with RESULT."""
    name = a.run
    contender, setting = name.split(":")
    s = dict(SETTINGS[name])
    os.environ.update(s.get("env", {}))
    if contender in ("unsloth", "sftlib"):
        import unsloth  # noqa: F401  before transformers, TRL and PEFT (the timer imports transformers)
    if s.get("cap"):
        import torch

        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(s["cap"] * 2 ** 30 / total)
        if not hasattr(torch.cuda, "get_per_process_memory_fraction"):  # sftlib cannot read the cap: say it
            os.environ["SFTLIB_GPU_MEMORY_GIB"] = str(s["cap"])
    data = make_dataset(a.docs, seed=ARTICLE["seed"])
    timer = step_timer()
    out = os.path.join(a.scratch, name.replace(":", "-"))
    fn = {"unsloth": run_unsloth, "hf": run_hf, "sftlib": run_sftlib}[contender]
    trainer, extra = fn(a.model, s, data, a.warmup + a.steps, out, timer)
    import torch

    row = {"contender": contender, "setting": setting, "gpu": torch.cuda.get_device_name(0),
           "batch": s["batch"], "accum": s["accum"], "gc": s["gc"], "cap_gib": s.get("cap"), **extra}
    row.update(summarise(timer, trainer.state.log_history, a.warmup))
    row["versions"] = versions()
    print("RESULT " + json.dumps(row), flush=True)


def probe(a) -> None:
    """GPU name, memory, versions, the bf16 matrix rate and which packed-attention path Unsloth takes."""
    import inspect

    import torch

    info = {"gpu": torch.cuda.get_device_name(0), "total_gib": torch.cuda.get_device_properties(0).total_memory / 2 ** 30,
            "matmul_tflops": matmul_tflops(), "versions": versions(),
            "has_memory_fraction_getter": hasattr(torch.cuda, "get_per_process_memory_fraction")}
    try:
        from torch.nn.attention.varlen import varlen_attn

        info["varlen_attn_signature"] = str(inspect.signature(varlen_attn))
    except Exception as exc:  # older torch: no varlen attention
        info["varlen_attn_signature"] = f"unavailable: {exc}"
    info["flash_sdp"] = torch.backends.cuda.flash_sdp_enabled()
    print("RESULT " + json.dumps(info), flush=True)


# ---- orchestration and report -------------------------------------------------------------------------


def spawn(args: list[str], timeout: float, script: str = __file__) -> tuple[dict | None, str]:
    """Run `script` (this file unless told) with `args` in a fresh interpreter: its last RESULT line, and its output."""
    cmd = [sys.executable, str(Path(script).resolve()), *args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        text = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        return None, text + f"\n[timed out after {timeout:.0f}s]"
    rows = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return (json.loads(rows[-1]) if rows else None), text


def failure_line(log: str) -> str:
    """What a failed run's output says went wrong: its last exception line (`torch.OutOfMemoryError: ...`), else
    its last non-empty line (a progress bar often comes after the traceback)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"[\w.]*(Error|Exception|Interrupt)\b(:|$)", line)]
    return ((raised or lines)[-1:] or ["no output"])[0][:300]


def write_report(out: Path, rows: list[dict], probe_info: dict, command: str, notes: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["# GPU benchmark: sftlib vs Unsloth vs transformers + PEFT + TRL", "",
             f"Command: `{command}`", "",
             f"GPU: {probe_info.get('gpu')} ({probe_info.get('total_gib', 0):.0f} GiB); bf16 matmul "
             f"{probe_info.get('matmul_tflops', 0):.0f} TFLOP/s measured in this run (8192^3, median of 10).",
             "Workload: Llama-3.1-8B config, random weights, NF4 4-bit; LoRA r=16, alpha=16, rsLoRA, 7 modules; "
             "effective batch 16 x 2048 tokens, packed (lognormal document lengths, median 450); adamw_8bit.", "",
             "| contender | setting | checkpointing | batch x accum | tokens/s | peak GiB | reserved GiB | MFU | first losses |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['contender']} | {r['setting']} | | | failed | | | | {r['error'][:80]} |")
            continue
        tps = r.get("tokens_per_s")
        lines.append(
            f"| {r['contender']} | {r['setting']} | {r.get('gc')} | {r.get('batch')} x {r.get('accum')} | "
            f"{tps:,.0f} | {r['peak_gib']:.1f} | {r['reserved_gib']:.1f} | "
            f"{(r.get('mfu') or 0) * 100:.1f}% | {', '.join(f'{x:.3f}' for x in r['first_losses'])} |")
    lines += ["", "Memory model check (activation bytes per token = (peak - memory held before training) / tokens per "
              "micro-batch):", "", "| contender | setting | checkpointing | held before GiB | peak GiB | MiB per token |",
              "|---|---|---|---:|---:|---:|"]
    for r in rows:
        if r.get("error") or not r.get("static_gib"):
            continue
        per_token = (r["peak_gib"] - r["static_gib"]) * 1024 / (r["batch"] * 2048)
        lines.append(f"| {r['contender']} | {r['setting']} | {r.get('gc')} | {r['static_gib']:.2f} | "
                     f"{r['peak_gib']:.2f} | {per_token:.3f} |")
    lines += ["", *notes, "", "Versions: " + json.dumps(probe_info.get("versions", {})), ""]
    (out / "gpu_bench.md").write_text("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="pre-quantized 4-bit model folder (benchmarks/make_model.py)")
    p.add_argument("--out", default=str(HERE / "results"), help="folder for gpu_bench.json and gpu_bench.md")
    p.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma-separated contender:setting ({', '.join(SETTINGS)})")
    p.add_argument("--warmup", type=int, default=3, help="optimizer steps left out of the timing")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps timed")
    p.add_argument("--hf-steps", type=int, default=3, help="timed steps for the (slow) hf contender")
    p.add_argument("--docs", type=int, default=2500, help="synthetic documents (enough for the steps)")
    p.add_argument("--deadline", type=float, default=0, help="seconds from start after which no run starts")
    p.add_argument("--scratch", default="/tmp/sftlib-bench")
    p.add_argument("--timeout", type=float, default=420, help="seconds one contender may take")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.probe:
        return probe(a)
    if a.worker:
        return worker(a)

    start = time.perf_counter()
    command = "python benchmarks/gpu_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(a.out)
    probe_info, log = spawn(["--probe", "--model", a.model], 300)
    if probe_info is None:
        print(log)
        raise SystemExit("the probe failed: no GPU?")
    print(json.dumps(probe_info, indent=1), flush=True)
    config = json.loads((Path(a.model) / "config.json").read_text())
    lengths = doc_lengths(a.docs, ARTICLE["seed"])
    fpt = flops_per_token(config, lengths)
    rows, notes, durations = [], [], []
    for name in a.runs.split(","):
        if name not in SETTINGS:
            raise SystemExit(f"unknown run {name!r}; known: {', '.join(SETTINGS)}")
        elapsed = time.perf_counter() - start
        need = max(durations) if durations else 60
        if a.deadline and elapsed + need > a.deadline:
            notes.append(f"- `{name}` not run: {elapsed:.0f}s elapsed, the deadline was {a.deadline:.0f}s")
            continue
        steps = a.hf_steps if name.startswith("hf:") else a.steps
        budget = min(a.deadline - elapsed, a.timeout) if a.deadline else a.timeout
        t0 = time.perf_counter()
        row, log = spawn(["--worker", "--run", name, "--model", a.model, "--warmup", str(a.warmup), "--steps",
                          str(steps), "--docs", str(a.docs), "--scratch", a.scratch, "--out", a.out], budget)
        durations.append(time.perf_counter() - t0)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "gpu_bench_logs.txt").open("a") as f:  # every contender's output, one file
            f.write(f"\n===== {name} ({durations[-1]:.0f}s) =====\n{log[-100_000:]}\n")
        if row is None:
            row = {"contender": name.split(":")[0], "setting": name.split(":")[1], "gpu": probe_info["gpu"],
                   "tokens_per_s": None, "peak_gib": None, "mfu": None, "first_losses": [], "versions": {},
                   "error": failure_line(log)}
        else:
            row["flops_per_token"] = fpt
            row["matmul_tflops"] = probe_info["matmul_tflops"]
            row["mfu"] = row["tokens_per_s"] * fpt / (probe_info["matmul_tflops"] * 1e12) if row["tokens_per_s"] else None
            row["seconds"] = round(durations[-1], 1)
        rows.append(row)
        print(f"{name}: {row.get('tokens_per_s') or 0:,.0f} tok/s, peak {row.get('peak_gib') or 0:.1f} GiB, "
              f"{durations[-1]:.0f}s {row.get('error', '')}", flush=True)
        write_report(out, rows, probe_info, command, notes)
    write_report(out, rows, probe_info, command, notes)


if __name__ == "__main__":
    main()
