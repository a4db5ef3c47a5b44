"""Nothing trained is lost and no two runs share a folder: output folders checked before any loading, the
adapters kept when the export fails after training, one run per `train.output_dir` with stale locks taken over.

    pytest tests/test_reliability.py -q      (about a minute: a few 2-step trainings of the tiny model)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sftlib import cli
from sftlib.files import LOCK_NAME, FolderInUseError, folder_lock

REPO = Path(__file__).resolve().parents[1]


def _args(tiny_model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "cpu-demo", "--set", f"model.name={tiny_model_dir}", "--set", "train.max_steps=2",
            "--set", "train.save_steps=0", "--set", f"train.output_dir={out / 'train'}",
            "--set", f"export.output_dir={out / 'model'}", "--set", "export.formats=[lora]", *extra]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("which", ["train.output_dir", "export.output_dir"])
def test_an_output_folder_that_is_a_file_stops_before_loading(which, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = _args(tiny_model_dir, out)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args[args.index(f"{which}={out / ('train' if which == 'train.output_dir' else 'model')}")] = f"{which}={blocker}"
    assert cli.main(args) == 2
    err = _one_line_error(capsys)  # the error comes first: no progress bar of loading data or weights before it
    assert f"`{which}` = `{blocker}` is a file, not a folder" in err
    assert not out.exists()


def test_an_output_folder_that_cannot_be_written_stops_before_loading(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = _args(tiny_model_dir, out, "--set", "export.output_dir=/proc/sftlib-cannot-write/model")
    assert cli.main(args) == 2
    err = _one_line_error(capsys)
    assert "`export.output_dir` = `/proc/sftlib-cannot-write/model`: cannot write in `/proc`" in err
    assert not (out / "train").exists()


def test_adapters_are_kept_when_the_export_fails_after_training(tiny_model_dir, tmp_path):
    """The export folder turns into a file while training runs (a full disk or a lost mount is the same
    kind of fault): the run fails with the reason, and says where the trained adapters are."""
    from transformers import TrainerCallback

    import sftlib

    out = tmp_path / "out"

    class ExportFolderGoesAway(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            (out / "model").write_text("in the way")

    cfg = sftlib.RunConfig.preset("cpu-demo", {"model.name": str(tiny_model_dir), "train.max_steps": 2,
                                               "train.save_steps": 0, "train.output_dir": str(out / "train"),
                                               "export.output_dir": str(out / "model"), "export.formats": ["lora"]})
    with pytest.raises(sftlib.SftlibError, match=r"the trained adapters are safe in `.*adapters-kept-") as err:
        sftlib.run(cfg, callbacks=[ExportFolderGoesAway()], log=lambda _: None)
    kept = Path(str(err.value).rsplit("`", 2)[1])
    assert kept.parent == out / "train"
    assert (kept / "adapter_config.json").is_file() and (kept / "adapter_model.safetensors").is_file()
    assert (kept / "tokenizer.json").is_file()  # with the tokenizer the template fitted: usable as it is


def _hold(folder: Path) -> subprocess.Popen:
    """Another process holding `folder` as a run would; returns once it holds it."""
    code = ("import sys, time\nfrom sftlib.files import folder_lock\nwith folder_lock(sys.argv[1]):\n"
            "    print('held', flush=True)\n    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_the_same_folder_stops_naming_the_first(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    holder = _hold(out / "train")
    try:
        assert cli.main(_args(tiny_model_dir, out)) == 2
        err = _one_line_error(capsys)
        assert f"is in use by another run: pid {holder.pid} on " in err and "started 20" in err
        assert not list((out / "train").glob("checkpoint-*")) and not (out / "model").exists()
        with pytest.raises(FolderInUseError, match=f"pid {holder.pid}"):  # the trainer's own lock, not only the check
            with folder_lock(out / "train"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with folder_lock(out / "train"):  # the kernel dropped the killed holder's lock: free again
        pass


def test_a_lock_left_by_a_killed_run_is_taken_over(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    holder = _hold(out / "train")
    holder.kill()  # kill -9: the lock file stays, naming a process that is gone
    holder.wait()
    assert json.loads((out / "train" / LOCK_NAME).read_text())["pid"] == holder.pid
    assert cli.main(_args(tiny_model_dir, out)) == 0
    printed = capsys.readouterr().out
    assert f"the run that held it (pid {holder.pid} on" in printed and "taking it over" in printed
    assert (out / "model" / "lora" / "adapter_model.safetensors").is_file()


def test_nested_locks_in_one_process_share_the_folder(tmp_path):
    with folder_lock(tmp_path / "run"):
        with folder_lock(tmp_path / "run"):
            pass
        with folder_lock(tmp_path / "run"):  # still held by the outer block
            pass
    assert (tmp_path / "run" / LOCK_NAME).read_text() == ""  # released: an empty file names nobody


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's bookkeeping is left


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.02)
    return not _alive(pid)


def test_a_child_dies_with_its_parent_even_by_kill_9(tmp_path):
    code = ("import sys\nfrom sftlib.child import run_child\n"
            "run_child([sys.executable, '-c', 'import os, time; print(os.getpid(), flush=True); time.sleep(60)'])\n")
    parent = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        deadline = time.monotonic() + 30
        while not _children(parent.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        (child,) = _children(parent.pid)
        parent.kill()
        parent.wait()
        assert _gone_within(child, 2.0), "the child outlived its parent"
    finally:
        parent.kill()


def test_the_gguf_converter_dies_with_a_killed_export(tiny_model_dir, tmp_path):
    """kill -9 of `python -m sftlib export` while llama.cpp's converter runs: the converter goes too."""
    from sftlib.exports.gguf.setup import find_toolchain

    find_toolchain()  # `make test` builds it; without it this test cannot say anything
    cmd = [sys.executable, "-m", "sftlib", "export", "--model", str(tiny_model_dir), "--formats", "gguf:f16",
           "--template", "chatml", "--pre-tokenizer", "auto", "--out", str(tmp_path / "out")]
    export = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        converter = None
        deadline = time.monotonic() + 300
        while converter is None and export.poll() is None and time.monotonic() < deadline:
            for pid in _children(export.pid):
                try:
                    if "convert_hf_to_gguf" in Path(f"/proc/{pid}/cmdline").read_text():
                        converter = pid
                except FileNotFoundError:
                    pass
            time.sleep(0.01)
        assert converter is not None, f"the converter never started (export exit {export.poll()})"
        export.kill()
        export.wait()
        # The converter imports torch and gguf first (seconds): alive a second later means it was orphaned.
        assert _gone_within(converter, 1.0), "llama.cpp's converter outlived the killed export"
    finally:
        export.kill()


def test_export_of_adapters_cut_short_is_one_line(tiny_model_dir, tmp_path, capsys):
    """Adapters copied only in part (not a checkpoint, so no completeness marker to check): one line naming the
    folder, exit 2, nothing written."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlib.exports.merged import save_adapters

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    folder = save_adapters(model, AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path / "lora")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    out = tmp_path / "out"
    assert cli.main(["export", "--model", str(folder), "--formats", "lora", "--template", "chatml",
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    err = err[err.find("error: "):]  # after the loading progress bars
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert f"`{folder}` holds a damaged file" in err and "save or copy the adapters again" in err
    assert not out.exists()
