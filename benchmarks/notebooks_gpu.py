"""Run the five notebooks headless with papermill on a GPU, under a preset and a memory cap; table and JSON.

    python benchmarks/notebooks_gpu.py --model /tmp/llama-2l-bnb-4bit --preset colab-a100 --cap-gib 40 --out OUT
    python benchmarks/notebooks_gpu.py --model ... --preset colab-t4 --cap-gib 15 --simulate-t4 --out OUT

Each notebook runs in its own Jupyter kernel, in order (02_train saves the adapters 03 and 04 load), on
the bundled demo data (the Hub is out of reach on the benchmark host), with `--max-steps` training
steps. The kernels get a `sitecustomize` (written here into OUT's work folder) that caps the process
with `torch.cuda.set_per_process_memory_fraction` and records the peak of allocated memory at exit;
with `--simulate-t4` it also makes torch report no bfloat16 and, to every caller outside Triton and
torch themselves (which must compile for the real chip), compute capability 7.5, as a T4 does, so that
what sftlib and Unsloth decide from those answers (dtype, the packed-attention kernel) goes the T4's
way. The GPU's real kernels still run: speed is not a T4's.

Writes OUT/notebooks_gpu_PRESET.json and .md (notebook, preset, backend, peak GiB, steps, seconds,
passed; the size of every adapter folder and checkpoint written), and each executed notebook's recorded
results (RESULTS_PATH files), not the notebooks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["00_quickstart", "01_data_and_templates", "02_train", "03_inference_and_eval", "04_export"]
PROMPT = "Review: The lamp is great, really wonderful.\nIs this review positive or negative?"

SITECUSTOMIZE = '''
import atexit, os
if os.environ.get("SFTLIB_BENCH_KERNEL") == "1":
    import torch
    if os.environ.get("SFTLIB_SIMULATE_T4") == "1":
        import sys
        real = torch.cuda.get_device_capability

        def capability(device=None):  # Triton and torch compile for the real chip; the rest decides as on a T4
            caller = sys._getframe(1).f_globals.get("__name__", "")
            return real(device) if caller.startswith(("triton", "torch")) else (7, 5)

        torch.cuda.get_device_capability = capability
        torch.cuda.is_bf16_supported = lambda *args, **kwargs: False
    cap = os.environ.get("SFTLIB_BENCH_CAP_GIB")
    if cap:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(float(cap) * 2 ** 30 / total)
        os.environ.setdefault("SFTLIB_GPU_MEMORY_GIB", cap)

    def _peak():
        path = os.environ.get("SFTLIB_BENCH_PEAK_FILE")
        if path and torch.cuda.is_initialized():
            with open(path, "w") as f:
                f.write(str(torch.cuda.max_memory_allocated() / 2 ** 30))

    atexit.register(_peak)
'''


def parameters(name: str, args, work: Path) -> dict:
    common = {"PRESET": args.preset, "RESULTS_PATH": str(work / f"{name}.json")}
    model = {"MODEL_NAME": args.model}
    data = {"DATA_SOURCE": "demo"}
    export_dir = str(work / "export")
    return {
        "00_quickstart": {**model, **data, "MAX_STEPS": args.max_steps, "EXPORT_FORMATS": "lora,merged_16bit",
                          "PROMPT": PROMPT, "MAX_NEW_TOKENS": 32},
        "01_data_and_templates": {**model, **data, "MAX_ROWS": 600},
        "02_train": {**model, **data, "MAX_STEPS": args.max_steps, "SAVE_STEPS": max(args.max_steps // 2, 1),
                     "EVAL_SIZE": 0.05, "OUTPUT_DIR": str(work / "train"), "EXPORT_DIR": export_dir},
        "03_inference_and_eval": {**model, **data, "EVAL_SIZE": 0.05, "EXPORT_DIR": export_dir, "PROMPT": PROMPT,
                                  "MAX_NEW_TOKENS": 32, "SAMPLES": 4},
        "04_export": {**model, "EXPORT_DIR": export_dir, "EXPORT_FORMATS": "lora,merged_16bit", "PROMPT": PROMPT,
                      "MAX_NEW_TOKENS": 32},
    }[name] | common


def write_report(out: Path, work: Path, args, rows: list[dict]) -> list[str]:
    # adapter folders and checkpoints the notebooks wrote: what a user's Drive has to hold
    folders = {str(f.parent.relative_to(work)): round(sum(x.stat().st_size for x in f.parent.rglob("*") if x.is_file())
                                                     / 2 ** 20, 1) for f in sorted(work.rglob("adapter_config.json"))}
    report = {"preset": args.preset, "cap_gib": args.cap_gib, "simulate_t4": args.simulate_t4,
              "model": args.model, "max_steps": args.max_steps, "rows": rows, "adapter_folders_mib": folders}
    (out / f"notebooks_gpu_{args.preset}.json").write_text(json.dumps(report, indent=2, default=str))
    lines = ["| notebook | preset | backend | peak GiB (process) | peak GiB (training) | steps | seconds | passed |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['notebook']} | {r['preset']} | {r['backend']} | {r['peak_gib']} | {r['train_peak_gib'] or ''} "
                     f"| {r['steps'] or ''} | {r['seconds']} | {'yes' if r['passed'] else 'NO: ' + r['error'][:200]} |")
    lines += ["", "| adapter folder (with checkpoints) | MiB |", "|---|---:|"]
    lines += [f"| {name} | {mib} |" for name, mib in folders.items()]
    (out / f"notebooks_gpu_{args.preset}.md").write_text("\n".join(lines) + "\n")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model folder (e.g. make_model.py's -bnb-4bit folder)")
    p.add_argument("--preset", required=True)
    p.add_argument("--cap-gib", type=float, default=None, help="per-process GPU memory cap")
    p.add_argument("--simulate-t4", action="store_true", help="torch reports compute capability 7.5, no bfloat16")
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--only", default="", help="comma-separated notebooks (default: all five)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    p.add_argument("--out", required=True, help="the tables and JSON")
    p.add_argument("--work", default=None, help="executed notebooks, adapters, exports (default OUT/work-PRESET)")
    args = p.parse_args(argv)
    import papermill

    out = Path(args.out)
    work = Path(args.work) if args.work else out / f"work-{args.preset}"
    work.mkdir(parents=True, exist_ok=True)
    site = work / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")])
    os.environ.update(SFTLIB_BENCH_KERNEL="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                      SFTLIB_SIMULATE_T4="1" if args.simulate_t4 else "0")
    if args.cap_gib:
        os.environ["SFTLIB_BENCH_CAP_GIB"] = str(args.cap_gib)
    rows = []
    for name in [n for n in NOTEBOOKS if not args.only or n in args.only.split(",")]:
        peak_file = work / f"{name}.peak"
        os.environ["SFTLIB_BENCH_PEAK_FILE"] = str(peak_file)
        params = parameters(name, args, work)
        started = time.perf_counter()
        error = ""
        try:
            papermill.execute_notebook(str(REPO / "notebooks" / f"{name}.ipynb"), str(work / f"{name}.ipynb"),
                                       parameters=params, kernel_name="python3", cwd=str(work),
                                       progress_bar=False, execution_timeout=args.timeout)
        except Exception as exc:  # noqa: BLE001 - recorded in the table, the next notebook still runs
            error = f"{type(exc).__name__}: {str(exc)[-1500:]}"
            traceback.print_exc()
        seconds = time.perf_counter() - started
        results = json.loads(Path(params["RESULTS_PATH"]).read_text()) if Path(params["RESULTS_PATH"]).is_file() else {}
        peak = float(peak_file.read_text()) if peak_file.is_file() else None
        rows.append({"notebook": name, "preset": args.preset, "backend": results.get("backend"),
                     "peak_gib": round(peak, 2) if peak is not None else None,
                     "train_peak_gib": results.get("peak_memory_gib"), "steps": results.get("steps"),
                     "seconds": round(seconds, 1), "passed": not error, "error": error, "results": results})
        print(f"{name}: {'passed' if not error else 'FAILED'} in {seconds:.0f}s, peak {peak}", flush=True)
        write_report(out, work, args, rows)  # after every notebook: a run cut short keeps what it measured
    lines = write_report(out, work, args, rows)
    print("\n".join(lines))
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
