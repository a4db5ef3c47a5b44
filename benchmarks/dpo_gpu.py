"""DPO throughput and memory on one GPU: sftlib vs raw Unsloth with its DPO notebook's settings (vs plain TRL).

    python benchmarks/make_model.py --out /tmp/llama-8b --quantize        # once: random 8B, NF4 copy
    python benchmarks/dpo_gpu.py --model /tmp/llama-8b-bnb-4bit --out benchmarks/results
    python benchmarks/dpo_gpu.py --cpu-smoke --out /tmp/dpo-smoke          # the CPU parts, on a tiny model

Every contender tunes the same pre-quantized 4-bit folder on the same synthetic pairs with the settings
of Unsloth's DPO notebook (Zephyr DPO): LoRA r=64, alpha=64 on the 7 linear layers, no dropout, no
rsLoRA, Unsloth's gradient checkpointing, batch 2 x grad-accum 4, lr 5e-6, linear schedule with 10%
warm-up, adamw_8bit, weight decay 0, beta 0.1, the sigmoid loss, sequences up to 1024 tokens; no reference
model is passed (`ref_model=None`): the reference is the starting model, scored through the adapters
(TRL keeps a frozen copy of the new adapters), with no second copy of the base:

- `unsloth:notebook`: `FastLanguageModel` + `PatchDPOTrainer()` + TRL's DPOTrainer, as the notebook does;
- `sftlib:notebook`: sftlib's own path (`load_model`, `add_lora`, sftlib.training.preference.train_pairs)
  with the same settings in its run config, on its Unsloth backend;
- `hf:notebook`: transformers + PEFT + bitsandbytes + TRL's DPOTrainer, without Unsloth.

Data: pairs of random ordinary token ids, a prompt (lognormal length, median 200) and two replies
(median 250 and 200), each pair capped at 1024 tokens, fixed seed; all contenders get them already
tokenized (`prompt_ids`, `chosen_ids`, `rejected_ids`), so tokenization is not timed. Each contender
runs in its own process (Unsloth patches transformers and TRL on import). Measured: real (non-padding)
tokens per second over the optimizer steps after `--warmup` (both sequences of each pair, as TRL counts
them in `num_tokens`; the reference pass is not counted as tokens), and peak allocated and reserved GPU
memory.

`--cpu-smoke` runs the sftlib and hf contenders on the CPU with a tiny random Llama (2 layers, 64 wide)
in float32, without 4-bit, 8-bit optimizers or checkpointing, for 3 steps: it checks this script, not
speed. Results: `OUT/dpo_gpu.json` and `OUT/dpo_gpu.md`, rewritten after every contender.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import gpu_bench  # noqa: E402  (its worker launcher)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NOTEBOOK = dict(r=64, alpha=64, batch=2, accum=4, max_length=1024, lr=5e-6, beta=0.1, optim="adamw_8bit",
                weight_decay=0.0, gc="unsloth", seed=42)
CPU_SMOKE = dict(NOTEBOOK, r=8, alpha=8, max_length=128, lr=1e-4, optim="adamw_torch", gc="false")
CONTENDERS = ("unsloth", "sftlib", "hf")
DEFAULT_RUNS = "unsloth:notebook,sftlib:notebook,hf:notebook"


# ---- data -------------------------------------------------------------------------------------------


def make_pairs(n: int, *, vocab: int, max_length: int, seed: int = 0, low: int = 0):
    """`n` pairs of random token ids in [low, vocab): prompt (median 200), chosen (250), rejected (200),
    prompt + the longer reply at most `max_length` (medians scale down with a smaller `max_length`)."""
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    scale = min(1.0, max_length / 1024)

    def lengths(median):
        return np.clip(rng.lognormal(math.log(median * scale), 0.5, n).round().astype(int), 4, None)

    prompt, chosen, rejected = lengths(200), lengths(250), lengths(200)
    rows = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for p, c, r in zip(prompt, chosen, rejected):
        p = min(p, max_length // 2)
        room = max_length - p
        for key, length in (("prompt_ids", p), ("chosen_ids", min(c, room)), ("rejected_ids", min(r, room))):
            rows[key].append(rng.integers(low, vocab, length).tolist())
    return Dataset.from_dict(rows)


def pair_tokens(ds) -> int:
    return sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]))


# ---- measuring --------------------------------------------------------------------------------------


def step_timer(cuda: bool):
    """A TrainerCallback recording the time at the start and after each optimizer step."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_train_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.marks = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

    return StepTimer()


def summarise(marks: list[float], log_history: list[dict], warmup: int, cuda: bool) -> dict:
    """Tokens/s over the steps after `warmup`, from the step times and TRL's cumulative `num_tokens` log."""
    import torch

    seconds = [t1 - t0 for t0, t1 in zip(marks, marks[1:])]
    totals = {int(x["step"]): float(x["num_tokens"]) for x in log_history if "num_tokens" in x and "step" in x}
    per_step = [totals.get(k + 1, math.nan) - totals.get(k, 0.0) for k in range(len(seconds))]
    timed = list(zip(seconds, per_step))[warmup:]
    time_s, tokens = sum(s for s, _ in timed), sum(n for _, n in timed)
    return {
        "tokens_per_s": tokens / time_s if time_s > 0 and timed and not math.isnan(tokens) else None,
        "tokens_per_step": tokens / len(timed) if timed else None,
        "step_seconds": [round(s, 3) for s in seconds],
        "measured_steps": len(timed),
        "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
        "reserved_gib": torch.cuda.max_memory_reserved() / 2 ** 30 if cuda else None,
        "first_losses": [round(float(x["loss"]), 4) for x in log_history if "loss" in x][:5],
        "last_margin": next((float(x["rewards/margins"]) for x in reversed(log_history) if "rewards/margins" in x),
                            None),
    }


versions = gpu_bench.versions


# ---- contenders (each in its own process) ------------------------------------------------------------


def warmup_steps(max_steps: int) -> int:
    """The notebook's warmup_ratio 0.1, as steps (transformers 5 takes steps only)."""
    return max(1, round(0.1 * max_steps))


def dpo_args(out: str, s: dict, max_steps: int, cuda: bool):
    from trl import DPOConfig

    return DPOConfig(
        output_dir=out, per_device_train_batch_size=s["batch"], gradient_accumulation_steps=s["accum"],
        max_steps=max_steps, learning_rate=s["lr"], lr_scheduler_type="linear", warmup_steps=warmup_steps(max_steps),
        weight_decay=s["weight_decay"], optim=s["optim"], seed=s["seed"], logging_steps=1, save_strategy="no",
        report_to=[], bf16=cuda, use_cpu=not cuda, beta=s["beta"], loss_type=["sigmoid"],
        max_length=s["max_length"], dataloader_num_workers=0, disable_tqdm=True)


def pretokenized(trainer_cls):
    """`trainer_cls` taking rows that are tokenized already (TRL's own column names) as they are."""
    class Pretokenized(trainer_cls):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return Pretokenized


def run_unsloth(model_dir: str, s: dict, data, max_steps: int, out: str, timer, cuda: bool):
    from unsloth import FastLanguageModel, PatchDPOTrainer  # first: it patches transformers, TRL and PEFT

    PatchDPOTrainer()
    from trl import DPOTrainer

    model, tokenizer = FastLanguageModel.from_pretrained(model_name=model_dir, max_seq_length=s["max_length"],
                                                         dtype=None, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(
        model, r=s["r"], lora_alpha=s["alpha"], lora_dropout=0, target_modules=LORA_TARGETS, bias="none",
        use_gradient_checkpointing="unsloth", random_state=s["seed"], use_rslora=False)
    trainer = pretokenized(DPOTrainer)(model=model, ref_model=None, args=dpo_args(out, s, max_steps, cuda),
                                       train_dataset=data, processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return trainer.state.log_history, {}


def run_hf(model_dir: str, s: dict, data, max_steps: int, out: str, timer, cuda: bool):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa", device_map={"": 0} if cuda else None)
    gc = s["gc"] != "false"
    if cuda:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=s["r"], lora_alpha=s["alpha"], lora_dropout=0.0,
                                             target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    args = dpo_args(out, s, max_steps, cuda)
    args.gradient_checkpointing, args.gradient_checkpointing_kwargs = gc, {"use_reentrant": False}
    trainer = pretokenized(DPOTrainer)(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                       callbacks=[timer])
    trainer.train()
    return trainer.state.log_history, {}


def run_sftlib(model_dir: str, s: dict, data, max_steps: int, out: str, timer, cuda: bool):
    from sftlib.training.backend import choose_backend  # imports Unsloth first where it can run

    backend = choose_backend("unsloth" if cuda else "cpu")
    from transformers import TrainerCallback

    from sftlib.config import RunConfig
    from sftlib.training.lora import add_lora
    from sftlib.training.model import load_model
    from sftlib.training.preference import train_pairs

    cfg = RunConfig.from_dict({
        "backend": backend.name,
        "model": {"name": model_dir, "max_seq_length": s["max_length"], "dtype": "bfloat16" if cuda else "float32",
                  "load_in_4bit": cuda},
        "lora": {"r": s["r"], "alpha": s["alpha"], "use_rslora": False, "train_embeddings": "never"},
        "train": {"method": "dpo", "beta": s["beta"], "loss_type": "sigmoid", "batch_size": s["batch"],
                  "grad_accum": s["accum"], "learning_rate": s["lr"], "weight_decay": s["weight_decay"],
                  "optim": s["optim"], "gradient_checkpointing": s["gc"], "max_steps": max_steps,
                  "warmup_steps": warmup_steps(max_steps), "seed": s["seed"], "output_dir": out,
                  "logging_steps": 1, "save_steps": 0, "resume": "never"},
    })
    model, tokenizer = load_model(cfg, backend)
    model = add_lora(model, cfg, backend)
    captured = {}

    class Keep(TrainerCallback):  # the trainer's log history, which the result summarises away
        def on_train_end(self, args, state, control, **kw):
            captured["history"] = list(state.log_history)

    result = train_pairs(cfg, model, tokenizer, data, backend=backend, callbacks=[timer, Keep()])
    return captured.get("history", []), {"backend_reason": backend.reason,
                                         "sftlib_tokens_per_s": result.tokens_per_s}


def worker(a) -> None:
    """One contender in this process; prints one JSON line starting with RESULT."""
    contender, setting = a.run.split(":")
    s = CPU_SMOKE if a.cpu_smoke else NOTEBOOK
    cuda = not a.cpu_smoke
    if contender in ("unsloth", "sftlib") and cuda:
        import unsloth  # noqa: F401  before transformers, TRL and PEFT (the timer imports transformers)
    config = json.loads((Path(a.model) / "config.json").read_text())
    data = make_pairs(a.pairs, vocab=config["vocab_size"] - (256 if cuda else 16), max_length=s["max_length"],
                      seed=0, low=0 if cuda else 8)
    timer = step_timer(cuda)
    out = os.path.join(a.scratch, a.run.replace(":", "-"))
    fn = {"unsloth": run_unsloth, "hf": run_hf, "sftlib": run_sftlib}[contender]
    history, extra = fn(a.model, s, data, a.warmup + a.steps, out, timer, cuda)
    import torch

    row = {"contender": contender, "setting": setting, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
           "r": s["r"], "batch": s["batch"], "accum": s["accum"], "max_length": s["max_length"], **extra}
    row.update(summarise(timer.marks, history, a.warmup, cuda))
    row["versions"] = versions()
    print("RESULT " + json.dumps(row), flush=True)


# ---- orchestration and report -------------------------------------------------------------------------


def write_report(out: Path, rows: list[dict], command: str, smoke: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "dpo_gpu.json").write_text(json.dumps(rows, indent=2) + "\n")
    s = CPU_SMOKE if smoke else NOTEBOOK
    lines = ["# DPO benchmark: sftlib vs Unsloth's DPO notebook settings" + (" (CPU smoke run: not a speed figure)"
                                                                             if smoke else ""), "",
             f"Command: `{command}`", "",
             f"Settings: LoRA r={s['r']}, alpha={s['alpha']}, 7 modules; batch {s['batch']} x accum {s['accum']}; "
             f"pairs up to {s['max_length']} tokens; lr {s['lr']}, {s['optim']}, beta {s['beta']}, sigmoid loss; "
             "reference = the starting model through its adapters, no second base. Tokens: both sequences of each "
             "pair, non-padding.", "",
             "| contender | device | tokens/s | tokens/step | peak GiB | reserved GiB | first losses | last margin |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['contender']} | | failed | | | | {r['error'][:80]} | |")
            continue

        def num(key, fmt):
            return format(r[key], fmt) if r.get(key) is not None else "-"

        lines.append(f"| {r['contender']} | {r['device']} | {num('tokens_per_s', ',.0f')} | "
                     f"{num('tokens_per_step', ',.0f')} | {num('peak_gib', '.1f')} | {num('reserved_gib', '.1f')} | "
                     f"{', '.join(f'{x:.3f}' for x in r['first_losses'])} | {num('last_margin', '.3f')} |")
    versions_seen = next((r["versions"] for r in rows if r.get("versions")), {})
    lines += ["", "Versions: " + json.dumps(versions_seen), ""]
    (out / "dpo_gpu.md").write_text("\n".join(lines))


def tiny_model(folder: Path) -> Path:
    """A 2-layer, 64-wide random Llama and a small BPE tokenizer, for --cpu-smoke."""
    from sftlib.demo.tiny import build_tiny_model

    texts = [f"The review is {w}. We tried the {s} today." for w in ("positive", "negative", "great", "awful")
             for s in ("soup", "movie", "lamp", "train ride")] * 10
    return build_tiny_model(folder, texts, vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                            num_heads=4, num_kv_heads=2)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="pre-quantized 4-bit model folder (benchmarks/make_model.py --quantize)")
    p.add_argument("--out", default=str(HERE / "results"), help="folder for dpo_gpu.json and dpo_gpu.md")
    p.add_argument("--runs", default=DEFAULT_RUNS, help="comma-separated contender:notebook (unsloth, sftlib, hf)")
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps left out of the timing")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps timed")
    p.add_argument("--pairs", type=int, default=200, help="synthetic pairs (enough for the steps)")
    p.add_argument("--scratch", default="/tmp/sftlib-dpo-bench")
    p.add_argument("--timeout", type=float, default=900, help="seconds one contender may take")
    p.add_argument("--cpu-smoke", action="store_true", help="sftlib and hf contenders on the CPU, tiny model")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    command = "python benchmarks/dpo_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(a.out)
    runs = a.runs
    if a.cpu_smoke:
        a.model = a.model or str(tiny_model(Path(a.scratch) / "tiny-llama"))
        runs = "sftlib:notebook,hf:notebook" if a.runs == DEFAULT_RUNS else a.runs
        a.warmup, a.steps, a.pairs = min(a.warmup, 1), min(a.steps, 2), min(a.pairs, 64)
    elif not a.model:
        raise SystemExit("--model is required (or --cpu-smoke)")
    rows = []
    for name in runs.split(","):
        contender = name.split(":")[0]
        if contender not in CONTENDERS or not name.endswith(":notebook"):
            raise SystemExit(f"unknown run {name!r}; known: {', '.join(c + ':notebook' for c in CONTENDERS)}")
        t0 = time.perf_counter()
        args = ["--worker", "--run", name, "--model", a.model, "--warmup", str(a.warmup), "--steps", str(a.steps),
                "--pairs", str(a.pairs), "--scratch", a.scratch] + (["--cpu-smoke"] if a.cpu_smoke else [])
        row, log = gpu_bench.spawn(args, a.timeout, script=__file__)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "dpo_gpu_logs.txt").open("a") as f:
            f.write(f"\n===== {name} ({time.perf_counter() - t0:.0f}s) =====\n{log[-100_000:]}\n")
        if row is None:
            tail = [line for line in log.strip().splitlines() if line.strip()][-1:] or ["no output"]
            row = {"contender": contender, "setting": "notebook", "error": tail[0][-300:]}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(f"{name}: {row.get('tokens_per_s') or 0:,.0f} tok/s, peak {row.get('peak_gib') or 0:.1f} GiB "
              f"{row.get('error', '')}", flush=True)
        write_report(out, rows, command, a.cpu_smoke)


if __name__ == "__main__":
    main()
