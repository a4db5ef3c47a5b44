"""Interruption and resume, and outputs that survive a crash: checkpoints, SIGKILL, atomic folders, full disks.

    pytest tests/test_resume.py -q

The kill test trains the tiny model three times in subprocesses (CPU, one thread each, same seed):
once straight through, once killed with SIGKILL right after its first checkpoint, and once more to
resume the killed run. The resumed run must end with the same adapter weights, the same loss at
every step and the same token count as the uninterrupted one. Before resuming, a newer checkpoint
folder that was "killed while saving" (no completion marker, a truncated weight file) is planted:
it must be skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sftlib.config import RunConfig
from sftlib.exports.merged import save_adapters, save_merged
from sftlib.files import DiskSpaceError, atomic_dir, check_free_space
from sftlib.training.checkpoints import CheckpointError, MARKER, checkpoint_problem, latest_checkpoint, resolve_resume

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 20, 4
# On the CPU with one thread the resumed run replays the same float operations in the same order;
# measured differences are exactly 0. The tolerances leave room only for a different BLAS build.
WEIGHT_ATOL, LOSS_RTOL = 1e-6, 1e-6

WORKER = '''
import sys, time
import torch
torch.set_num_threads(1)
from transformers import TrainerCallback
from sftlib.config import RunConfig
from sftlib.steps import run

class Throttle(TrainerCallback):
    """Slow each step down (without changing any number) so the kill lands between checkpoints."""
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(float(sys.argv[2]))

run(RunConfig.from_yaml(sys.argv[1]), callbacks=[Throttle()] if len(sys.argv) > 2 else None)
'''


def _config(tiny_model_dir: Path, out: Path) -> Path:
    cfg = {
        "backend": "cpu",
        "model": {"name": str(tiny_model_dir), "load_in_4bit": False, "dtype": "float32", "max_seq_length": 128,
                  "chat_template": "chatml"},
        "lora": {"r": 8, "alpha": 8},
        "data": {"source": "demo", "max_rows": 64, "eval_size": 0},
        # 20 steps of 4 packed sequences = about 1.7 epochs, so the resumed run crosses an epoch boundary
        "train": {"max_steps": STEPS, "save_steps": SAVE_EVERY, "batch_size": 4, "grad_accum": 1, "logging_steps": 1,
                  "optim": "adamw_torch", "learning_rate": 1e-3, "warmup_steps": 2, "gradient_checkpointing": "false",
                  "output_dir": str(out / "train")},
        "export": {"formats": ["lora"], "output_dir": str(out / "model")},
    }
    path = out / "run.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(worker: Path, config: Path, *throttle: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    log = open(config.parent / f"log-{time.time_ns()}.txt", "w")
    return subprocess.Popen([sys.executable, str(worker), str(config), *throttle], env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> None:
    assert proc.wait(timeout=timeout) == 0, Path(proc.stdout.name).read_text()[-3000:]


def _outcome(out: Path) -> tuple[dict, dict]:
    result = json.loads((out / "train" / "run_result.json").read_text())
    return result["train"], load_file(out / "model" / "lora" / "adapter_model.safetensors")


def test_killed_run_resumes_to_the_same_adapter_and_losses(tiny_model_dir, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    straight = _start(worker, _config(tiny_model_dir, tmp_path / "straight"))
    killed_cfg = _config(tiny_model_dir, tmp_path / "killed")
    killed = _start(worker, killed_cfg, "0.5")
    first = tmp_path / "killed" / "train" / f"checkpoint-{SAVE_EVERY}"
    deadline = time.time() + 240
    while not (first / MARKER).exists():
        assert killed.poll() is None, "the run ended before its first checkpoint: " + \
            Path(killed.stdout.name).read_text()[-2000:]
        assert time.time() < deadline, "no checkpoint within 4 minutes"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "train" / "run_result.json").exists()
    assert not (tmp_path / "killed" / "model").exists()
    complete = latest_checkpoint(tmp_path / "killed" / "train", warn=False)
    assert complete is not None and int(complete.name.split("-")[1]) < STEPS

    # A newer checkpoint that was killed while saving: no marker, its adapter file cut short.
    half = complete.with_name(f"checkpoint-{int(complete.name.split('-')[1]) + SAVE_EVERY}")
    if half.exists():
        shutil.rmtree(half)
    shutil.copytree(complete, half)
    (half / MARKER).unlink()
    weights = half / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    with pytest.warns(UserWarning, match=f"skipping checkpoint `.*{half.name}`"):
        assert latest_checkpoint(tmp_path / "killed" / "train") == complete
    resumed = _start(worker, killed_cfg)
    _finish(straight)
    _finish(resumed)

    want, want_weights = _outcome(tmp_path / "straight")
    got, got_weights = _outcome(tmp_path / "killed")
    assert got["resumed_from"] == str(complete) and want["resumed_from"] == ""
    assert got["steps"] == want["steps"] == STEPS
    assert got["tokens_seen"] == want["tokens_seen"]
    assert [s for s, _ in got["losses"]] == [s for s, _ in want["losses"]] == list(range(1, STEPS + 1))
    got_losses, want_losses = torch.tensor([x for _, x in got["losses"]]), torch.tensor([x for _, x in want["losses"]])
    torch.testing.assert_close(got_losses, want_losses, rtol=LOSS_RTOL, atol=0)
    assert got_weights.keys() == want_weights.keys()
    for name in want_weights:
        torch.testing.assert_close(got_weights[name], want_weights[name], atol=WEIGHT_ATOL, rtol=0, msg=name)
    # the planted half-written folder was overwritten by a real, complete save of that step
    assert checkpoint_problem(half) is None


def test_resume_between_two_logs_logs_what_the_uninterrupted_run_logs(tiny_model_dir, tmp_path):
    """`train.logging_steps: 3`, `train.save_steps: 4`: checkpoint-4 lies between the logs of steps 3 and 6. The
    resumed run's log at step 6 must average steps 5 and 6 with the 4th, as the uninterrupted run's does (it once
    averaged only 5 and 6)."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    configs = {}
    for name in ("straight", "resumed"):
        config = _config(tiny_model_dir, tmp_path / name)
        cfg = yaml.safe_load(config.read_text())
        cfg["train"].update(max_steps=12, save_steps=4, logging_steps=3)
        config.write_text(yaml.safe_dump(cfg))
        configs[name] = config
    _finish(_start(worker, configs["straight"]))
    checkpoint = tmp_path / "straight" / "train" / "checkpoint-4"
    assert checkpoint_problem(checkpoint) is None
    carried = json.loads((checkpoint / "sftlib_loss_since_log.json").read_text())
    assert carried["step"] == 4 and carried["steps_since_log"] == 1 and carried["loss_since_log"] > 0
    assert "sftlib_loss_since_log.json" in json.loads((checkpoint / MARKER).read_text())["files"]
    cfg = yaml.safe_load(configs["resumed"].read_text())
    cfg["train"]["resume"] = str(checkpoint)  # continue the straight run's step 4 in a folder of its own
    configs["resumed"].write_text(yaml.safe_dump(cfg))
    _finish(_start(worker, configs["resumed"]))
    want, _ = _outcome(tmp_path / "straight")
    got, _ = _outcome(tmp_path / "resumed")
    assert got["resumed_from"] == str(checkpoint)
    assert [s for s, _ in got["losses"]] == [s for s, _ in want["losses"]] == [3, 6, 9, 12]
    torch.testing.assert_close(torch.tensor([x for _, x in got["losses"]]),
                               torch.tensor([x for _, x in want["losses"]]), rtol=LOSS_RTOL, atol=0)


def _fake_checkpoint(folder: Path, step: int, settings: dict | None = None, complete: bool = True) -> Path:
    ckpt = folder / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(b"x" * 100)
    if complete:
        marker = {"step": step, "files": {"adapter_model.safetensors": 100}, "settings": settings or {}}
        (ckpt / MARKER).write_text(json.dumps(marker))
    return ckpt


def test_latest_checkpoint_skips_half_written_and_damaged_ones(tmp_path):
    from sftlib.training.checkpoints import run_settings

    cfg = RunConfig.from_dict({"train.output_dir": str(tmp_path)})
    settings = run_settings(cfg)
    _fake_checkpoint(tmp_path, 5, settings)
    ten = _fake_checkpoint(tmp_path, 10, settings)
    _fake_checkpoint(tmp_path, 15, complete=False)                         # killed while saving
    twenty = _fake_checkpoint(tmp_path, 20, settings)
    (twenty / "adapter_model.safetensors").write_bytes(b"x" * 40)           # cut short after the marker
    (tmp_path / "checkpoint-25").write_text("a file, not a folder")
    with pytest.warns(UserWarning) as caught:
        assert latest_checkpoint(tmp_path) == ten
    text = " ".join(str(w.message) for w in caught)
    assert "checkpoint-20" in text and "40 bytes, not the 100" in text
    assert "checkpoint-15" in text and "stopped while saving" in text
    with pytest.warns(UserWarning):
        assert resolve_resume(cfg) == ten
    with pytest.warns(UserWarning, match="`train.resume: never`: starting over"):
        assert resolve_resume(cfg.with_overrides({"train.resume": "never"}), None) is None
    with pytest.warns(UserWarning):
        assert resolve_resume(cfg, False) is None and resolve_resume(cfg, True) == ten
    # only the settings that do not change the computation may differ
    with pytest.warns(UserWarning):
        assert resolve_resume(cfg.with_overrides({"train.save_steps": 7, "train.logging_steps": 3})) == ten
    changed = r"`train.learning_rate`: 0.0003 then, 0.001 now"
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match=changed):
        resolve_resume(cfg.with_overrides({"train.learning_rate": 1e-3}))
    with pytest.raises(CheckpointError, match="checkpoint-15.*stopped while saving"):
        resolve_resume(cfg.with_overrides({"train.resume": str(tmp_path / "checkpoint-15")}))
    assert latest_checkpoint(tmp_path / "nothing-here") is None


# ---- atomic outputs ----------------------------------------------------------------------------------

CRASHING_SAVE = '''
import os, sys, time
from pathlib import Path
from sftlib.files import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "adapter_model.safetensors").write_bytes(b"partial")
    Path(sys.argv[2]).write_text("writing")
    time.sleep(60)
'''


def test_rerunning_an_export_after_a_crash(tiny, tmp_path):
    """A save killed mid-write leaves no folder that looks complete, and the next save works and cleans up."""
    model, tokenizer = tiny
    target = tmp_path / "model" / "lora"
    ready = tmp_path / "ready"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_SAVE, str(target), str(ready)], env=env)
    deadline = time.time() + 60
    while not ready.exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    leftovers = list(target.parent.glob(".lora.tmp-*"))
    assert len(leftovers) == 1

    save_adapters(model, tokenizer, target)
    assert (target / "model.safetensors").exists() or (target / "adapter_model.safetensors").exists()
    assert list(target.parent.iterdir()) == [target], "the killed save's temporary folder is removed"

    # Killed between moving the old folder aside and renaming the new one in: the old one comes back.
    old = target.with_name(".lora.old-999999999")
    target.rename(old)
    with atomic_dir(target.with_name("other")):
        pass  # a save of another folder leaves it alone
    assert old.exists() and not target.exists()
    with pytest.raises(RuntimeError):
        with atomic_dir(target):
            raise RuntimeError("crash while writing the new version")
    assert (target / "tokenizer_config.json").exists(), "the previous complete folder was put back"
    assert sorted(p.name for p in target.parent.iterdir()) == ["lora", "other"]


def test_a_full_disk_fails_before_writing_with_the_sizes(tiny_model_dir, tiny, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    real = shutil.disk_usage

    def nearly_full(path):  # what a disk with 10 MB left reports
        return real(path)._replace(free=10_000_000)

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    with pytest.raises(DiskSpaceError, match=r"needs about 6\d\.\d\d MB, and only 10\.00 MB is free") as err:
        save_adapters(model, tokenizer, tmp_path / "lora")
    assert "`export.output_dir`" in str(err.value) and str(tmp_path / "lora") in str(err.value)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DiskSpaceError, match=r"needs about 3\.\d\d GB"):
        check_free_space(tmp_path / "not" / "made" / "yet", 3_500_000_000, "the merged model")
    monkeypatch.setattr(shutil, "disk_usage", real)

    save_adapters(model, tokenizer, tmp_path / "lora")  # with room, the same call works
    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    with pytest.raises(DiskSpaceError, match="the merged bfloat16 model"):
        save_merged(str(tiny_model_dir), tmp_path / "lora", tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged*"))
