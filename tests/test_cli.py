"""The command line as a user types it, and the bundled demo data.

    pytest tests/test_cli.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from sftlib.demo import build_data as build

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "sftlib", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_config_prints_a_preset_that_reloads(tmp_path):
    proc = _cli("config", "--preset", "article", "--set", "lora.r=32")
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load(proc.stdout)
    assert data["lora"]["r"] == 32 and data["data"]["train_on"] == "all"
    path = tmp_path / "run.yaml"
    path.write_text(proc.stdout)
    again = _cli("config", "--config", str(path))
    assert again.returncode == 0 and yaml.safe_load(again.stdout) == data


def test_config_errors_are_listed_and_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lora:\n  rank: 8\ntrain:\n  learning_rate: 10\n")
    proc = _cli("config", "--config", str(path))
    assert proc.returncode == 2
    assert "`lora.rank`" in proc.stderr and "did you mean `lora.r`" in proc.stderr
    assert "`train.learning_rate`" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bundled_demo_data_is_what_the_builder_writes():
    assert build.render_jsonl(build.build()) == build.OUT.read_text(encoding="utf-8")


def test_bundled_demo_pairs_are_what_the_builder_writes():
    import json

    from sftlib.demo import build_pairs

    rows = build_pairs.build()
    assert [json.loads(line) for line in build_pairs.OUT.read_text(encoding="utf-8").splitlines()] == rows
    styles = sum(r["rejected"]["content"].endswith("I think.") for r in rows)
    assert all(r["chosen"]["content"].endswith(", I think.") for r in rows) and 0.2 < styles / len(rows) < 0.4



def test_demo_method_dpo_tunes_the_sft_demo_on_the_bundled_pairs(tmp_path):
    """`python -m sftlib demo --method dpo`: the SFT demo (one epoch here), then DPO from its adapters on the
    bundled pairs; the held-out preference accuracy rises and the card says what was trained."""
    proc = _cli("demo", "--output", str(tmp_path / "demo"), "--epochs", "1", "--samples", "4", "--method", "dpo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "preference tuning (dpo) of the SFT demo's adapters on the bundled pairs" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("preference accuracy"))
    before, after = (int(v.rstrip("%")) for v in line.split()[2:5:2])
    assert after >= before + 30, line
    assert (tmp_path / "demo" / "dpo" / "model" / "lora" / "adapter_config.json").is_file()
    assert "a LoRA preference tune (DPO)" in (tmp_path / "demo" / "dpo" / "model" / "README.md").read_text()
