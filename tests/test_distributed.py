"""Data parallelism: 2 CPU processes (gloo) equal 1 process with the same global batch.

    pytest tests/test_distributed.py -q

Two ranks with a micro-batch of 4 each must produce the adapter that one process with a micro-batch
of 8 produces: the same packed rows per optimizer step, split across the ranks (each trains on its
own shard; gradients are averaged). If both ranks saw the same rows, the gradient would be the
gradient of half the batch and the adapters would differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def _config(tmp: Path, model_dir: Path, data: Path, name: str, batch: int) -> Path:
    import yaml

    cfg = {
        "backend": "cpu",
        "model": {"name": str(model_dir), "load_in_4bit": False, "dtype": "float32", "max_seq_length": 128},
        "data": {"source": str(data), "eval_size": 0},
        "train": {"batch_size": batch, "grad_accum": 1, "max_steps": 4, "learning_rate": 0.5, "warmup_steps": 0,
                  # plain SGD: updates are linear in the gradient. Adam divides by sqrt(v), which turns
                  # float-rounding differences of near-zero gradients into visible weight differences.
                  "optim": "sgd", "gradient_checkpointing": "false", "logging_steps": 1,
                  # unpacked, 96 rows split evenly into global batches of 8: no rank ever pads its
                  # last batch with repeated rows, which would make the two runs see different data
                  "packing": False,
                  "output_dir": str(tmp / name / "out")},
        "export": {"formats": ["lora", "merged_16bit"], "output_dir": str(tmp / name / "model")},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(args, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_two_processes_equal_one_with_the_same_global_batch(tiny_model_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    with data.open("w") as f:
        for i in range(96):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Count to {i % 7}."},
                                             {"role": "assistant", "content": " ".join(map(str, range(i % 7 + 1)))}]})
                    + "\n")
    single = _config(tmp_path, tiny_model_dir, data, "single", batch=8)
    double = _config(tmp_path, tiny_model_dir, data, "ddp", batch=4)
    _run([sys.executable, "-m", "sftlib", "train", "--config", str(single)], tmp_path)
    # On GPUs `accelerate launch --multi_gpu` starts ranks through torch's launcher; on the CPU accelerate
    # only offers mpirun, so the ranks are started with torch's launcher directly (gloo backend).
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547"]
    proc = _run([*launch, "-m", "sftlib", "train", "--config", str(double)], tmp_path)
    assert proc.stdout.count("export: lora written to") == 1  # only rank 0 saves (two ranks raced on the rename)

    one = load_file(tmp_path / "single" / "model" / "lora" / "adapter_model.safetensors")
    two = load_file(tmp_path / "ddp" / "model" / "lora" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    # float32 on the CPU; all-reduce sums in another order than one batch does, so not bit-equal
    assert worst < 1e-5, worst
    moved = max(one[k].abs().max().item() for k in one if "lora_B" in k)
    assert moved > 1e-4  # the adapters did train (lora_B starts at zero)
    r1 = json.loads((tmp_path / "single" / "out" / "run_result.json").read_text())
    r2 = json.loads((tmp_path / "ddp" / "out" / "run_result.json").read_text())
    assert r1["train"]["steps"] == r2["train"]["steps"] == 4
    assert r2["train"]["tokens_seen"] == r1["train"]["tokens_seen"]  # both ranks' tokens are counted
    for (_, a), (_, b) in zip(r1["train"]["losses"], r2["train"]["losses"]):
        assert a == pytest.approx(b, rel=1e-4)
