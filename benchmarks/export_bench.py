"""Time and size of every export format, each verified: the demo model on the CPU, the 8B on a GPU.

    python benchmarks/export_bench.py --base demo --out benchmarks/results/export_demo
    python benchmarks/export_bench.py --base /tmp/llama-8b --template llama-3 \\
        --formats lora,merged_16bit,gguf:f16,gguf:q4_k_m --out OUT          # the 8B (benchmarks/make_model.py)

`--base demo` fine-tunes the embedded demo model first (the CPU demo preset, about 10-30 s on 2
cores), so the checks see a model that answers and stops. Any other base gets LoRA adapters on all 7
linear modules (r=16, rsLoRA, the article's) with small random B matrices, standing in for a trained
run: merging, converting and quantizing cost the same whatever the values. On a GPU that base is
loaded in 4-bit as in training (the hf backend: transformers + peft + bitsandbytes).

Every format goes through `sftlib.export`, which writes it and loads it back to check it (see
sftlib/exporter.py); the table gives the seconds to write, the size, and the check. GGUF rows' seconds
are the conversion (f16) or the quantization from it; checking them is timed apart in the JSON.
Results: OUT/export_bench.md and OUT/export_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _trained_demo(work: Path):
    from sftlib.config import RunConfig
    from sftlib.steps import run

    cfg = RunConfig.preset("cpu-demo").with_overrides({
        "train.output_dir": str(work / "train"), "export.output_dir": str(work / "unused"), "export.formats": [],
        "train.preflight": "off"})
    result = run(cfg, log=lambda s: None)
    return result.model, result.tokenizer, cfg


def _adapters_on(base: str, template: str, seed: int, max_len: int):
    import torch

    from sftlib.training.backend import choose_backend, resolve
    from sftlib.config import RunConfig
    from sftlib.training.lora import add_lora
    from sftlib.training.model import load_model
    from sftlib.training.tokenizer import prepare_tokenizer
    from sftlib.data.templates import get_template

    cuda = torch.cuda.is_available()
    cfg = RunConfig().with_overrides({
        "backend": "hf", "model.name": base, "model.chat_template": template, "model.max_seq_length": max_len,
        "model.load_in_4bit": cuda, "model.dtype": "bfloat16" if cuda else "float32"})
    backend = choose_backend(cfg.backend)
    resolve(cfg, backend)
    model, tokenizer = load_model(cfg, backend)
    info = prepare_tokenizer(model, tokenizer, get_template(template))
    model = add_lora(model, cfg, backend, info)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=gen) * 2e-3).to(p.dtype))
    model.eval()
    return model, tokenizer, cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="demo", help="`demo`, or a model folder (e.g. from make_model.py)")
    p.add_argument("--formats", default="lora,merged_16bit,merged_4bit,gguf:f16,gguf:q8_0,gguf:q4_k_m")
    p.add_argument("--template", default="chatml")
    p.add_argument("--pre-tokenizer", default=None)
    p.add_argument("--max-new-tokens", type=int, default=48, help="length of the reference replies the checks use")
    p.add_argument("--prompts", type=int, default=3, help="check prompts (generic ones unless --base demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-verify", action="store_true", help="write only: no file is loaded back and checked")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=None, help="where the exports are written (default OUT/work)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import sftlib
    from sftlib.exports.reference import DEFAULT_CONVERSATIONS, config_conversations

    a.out.mkdir(parents=True, exist_ok=True)
    work = a.work or a.out / "work"
    t0 = time.perf_counter()
    if a.base == "demo":
        model, tokenizer, cfg = _trained_demo(work)
        conversations = (config_conversations(cfg, limit=a.prompts) or DEFAULT_CONVERSATIONS)[: a.prompts]
        prepared = "the demo model fine-tuned with the cpu-demo preset"
    else:
        model, tokenizer, cfg = _adapters_on(a.base, a.template, a.seed, 2048)
        conversations = DEFAULT_CONVERSATIONS[: a.prompts]
        prepared = "LoRA r=16 on all 7 linear modules with random B (std 2e-3)" + \
                   (", base loaded in 4-bit NF4" if torch.cuda.is_available() else "")
    setup_s = time.perf_counter() - t0
    print(f"model ready in {setup_s:.1f}s ({prepared})", flush=True)
    report = sftlib.export(model, tokenizer, cfg, a.formats, out=work / "export", conversations=conversations,
                           pre_tokenizer=a.pre_tokenizer, max_new_tokens=a.max_new_tokens, verify=not a.no_verify,
                           log=lambda s: print(s, flush=True))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    rows = [{"format": w.format, "bytes": w.bytes, "seconds_write": round(w.seconds, 2),
             "seconds_check": round(w.check.get("seconds", 0.0), 2), "ok": w.ok, "check": w.summary} for w in report.items]
    result = {"base": a.base, "prepared": prepared, "formats": a.formats, "rows": rows,
              "seconds_total": round(report.seconds, 1), "seconds_setup": round(setup_s, 1), "gpu": gpu,
              "cpus": os.cpu_count(), "python": platform.python_version(),
              "versions": {m: getattr(sys.modules.get(m), "__version__", None) for m in ("torch", "transformers", "peft")}}
    (a.out / "export_bench.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Export: time and size per format ({a.base})", "",
             "Command: `python benchmarks/export_bench.py " + " ".join(sys.argv[1:] if argv is None else argv) + "`", "",
             f"Model: {prepared}. Machine: {gpu or 'CPU only'}, {os.cpu_count()} CPUs. "
             f"Whole export {report.seconds:.1f}s (setup before it {setup_s:.1f}s).", "",
             "| format | size | write s | check s | verified | check |", "|---|---:|---:|---:|---|---|"]
    for r in rows:
        size = f"{r['bytes'] / 1e9:.2f} GB" if r["bytes"] >= 1e8 else f"{r['bytes'] / 1e6:.2f} MB"
        verdict = {True: "ok", False: "FAILED", None: "not verified"}[r["ok"]]
        lines.append(f"| {r['format']} | {size} | {r['seconds_write']} | {r['seconds_check']} | {verdict} | {r['check'].replace('|', chr(92) + '|')} |")
    (a.out / "export_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
