"""Run the GPU tests (tests/test_gpu.py) and write what they did as a markdown report.

    python benchmarks/gpu_tests_report.py                          # -> benchmarks/results/gpu_tests.md
    python benchmarks/gpu_tests_report.py --out /tmp/r --model /tmp/llama-2l

The report lists each test's outcome and duration and, per backend, what the scenario measured:
the memory plan `auto` chose, losses before and after, training speed and peak memory, the streamed
reply, how closely each saved model reproduces the trained one, and the size of each output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_tests(out: Path, model: str | None, timeout: float) -> tuple[int, str, float]:
    env = dict(os.environ, SFTLIB_GPU_REPORT_DIR=str(out),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if model:
        env["SFTLIB_GPU_MODEL"] = model
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-rA",
           f"--junitxml={out / 'gpu_tests.xml'}", "-p", "no:cacheprovider"]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, text + f"\n[timed out after {timeout:.0f}s]", time.perf_counter() - start


def outcomes(xml: Path) -> list[tuple[str, str, float, str]]:
    if not xml.exists():
        return []
    rows = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        status, detail = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                status, detail = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind], \
                    (node.get("message") or "")[:300]
        rows.append((case.get("name"), status, float(case.get("time") or 0), detail))
    return rows


def backend_section(report: dict) -> list[str]:
    t = report.get("train", {})
    reply = report.get("reply", {})
    return [
        f"### backend `{report.get('backend_used')}` ({report.get('gpu')})", "",
        f"- {report.get('backend')}",
        f"- {report.get('plan')}",
        f"- 4-bit layers in the base: {report.get('four_bit_layers')}; tokens added: {report.get('added_tokens')}",
        f"- held-out loss {report.get('loss_before', float('nan')):.3f} -> {report.get('loss_after', float('nan')):.3f}; "
        f"{t.get('steps')} steps, {t.get('tokens_per_s', 0):,.0f} tokens/s, peak {t.get('peak_memory_gib', 0):.2f} GiB",
        f"- streamed reply ({reply.get('new_tokens')} tokens, stopped at end of turn: {reply.get('stopped')}): "
        f"`{(reply.get('text') or '')[:120]!s}`",
        f"- logits cosine: reloaded adapters vs trained model {report.get('cos_adapters_vs_trained', 0):.4f}; "
        f"merged 16-bit vs adapters {report.get('cos_merged16_vs_adapters', 0):.5f}; merged 4-bit vs merged 16-bit "
        f"{report.get('cos_merged4_vs_merged16', 0):.4f}",
        "- sftlib.export (each output loaded back and checked against the trained model):",
        *[f"  - {e['format']}: {'ok' if e['ok'] else 'FAILED'}, {e['bytes'] / 2 ** 30:.3f} GiB in {e['seconds']:.1f}s; "
          f"{e['summary']}" for e in report.get("export", [])],
        f"- output sizes (GiB): {report.get('sizes_gib')}",
        f"- seconds: pipeline {report.get('seconds_pipeline')}, whole scenario {report.get('seconds_total')}", "",
    ]


def last_exception(log: str) -> str:
    """The last `SomethingError: message` line of a traceback in `log`, or ""."""
    for line in reversed(log.splitlines()):
        head = line.split(":", 1)[0].strip()
        if ":" in line and head.isidentifier() and head.endswith(("Error", "Exception")):
            return line.strip()
    return ""


def render(out: Path, code: int, seconds: float) -> str:
    """The markdown report from what a run left in `out` (junit XML, per-backend JSON and logs)."""
    lines = ["# GPU tests", "", "Command: `python benchmarks/gpu_tests_report.py` (runs "
             "`pytest -m gpu tests/test_gpu.py`)", "",
             f"pytest exit status {code} after {seconds:.0f}s.", "", "| test | outcome | seconds | cause |",
             "|---|---|---:|---|"]
    for name, status, secs, detail in outcomes(out / "gpu_tests.xml"):
        if status in ("failed", "error"):
            backend = "unsloth" if "unsloth" in name else "hf"
            log = out / f"gpu-{backend}.log"
            detail = (last_exception(log.read_text()) if log.exists() else "") or detail.splitlines()[0]
        lines.append(f"| {name} | {status} | {secs:.0f} | {detail.replace('|', '/')[:300]} |")
    lines.append("")
    for backend in ("unsloth", "hf"):
        path = out / f"gpu-{backend}.json"
        if path.exists():
            lines += backend_section(json.loads(path.read_text()))
    versions = {}
    from importlib.metadata import PackageNotFoundError, version

    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "unsloth", "unsloth_zoo"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    lines += ["Versions: " + json.dumps(versions), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--model", default=None, help="model folder (default: the tests build a 2-layer 8B-width one)")
    p.add_argument("--timeout", type=float, default=1200)
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    code, log, seconds = run_tests(a.out, a.model, a.timeout)
    (a.out / "gpu_tests.log").write_text(log[-200_000:])
    text = render(a.out, code, seconds)
    (a.out / "gpu_tests.md").write_text(text)
    print(text)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
