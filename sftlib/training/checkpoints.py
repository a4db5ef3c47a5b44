"""Checkpoints that can be trusted: a marker written last, matching settings, and exact resume.

    from sftlib.training.checkpoints import latest_checkpoint, resolve_resume
    cfg.train.output_dir = "/content/drive/MyDrive/run1"   # checkpoints outlive the session there
    cfg.train.save_steps = 50                              # a checkpoint-N folder every 50 steps
    cfg.train.resume = "auto"                              # the default; or "never", or a checkpoint path
    resolve_resume(cfg)                                    # the checkpoint `train` continues from, or None

A checkpoint counts only once `sftlib_checkpoint.json` is in it, written after every other file of
it and listing their sizes; a folder without it (the run was killed while saving) or whose files no
longer match is skipped with a warning. `auto` continues from the newest complete checkpoint whose
settings match this run (the marker records them; a changed learning rate or dataset is an error
rather than a silent mix of two runs), restoring adapters, optimizer, schedule, RNG state and the
position in the data, so the run ends where an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

from sftlib.errors import SftlibError
from sftlib.paths import path_problem

MARKER = "sftlib_checkpoint.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Settings that do not change what training computes: a checkpoint stays valid when only these differ.
_NEUTRAL_KEYS = ("train.output_dir", "train.resume", "train.save_steps", "train.logging_steps", "train.report_to",
                 "train.preflight")


class CheckpointError(SftlibError):
    """A checkpoint cannot be resumed from; the message names the folder and the way out."""


def run_settings(cfg) -> dict:
    """The dotted config values that decide what training computes (recorded in each checkpoint)."""
    flat = {}
    for section, values in cfg.to_dict().items():
        if section == "export":
            continue
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            flat[section] = values
    return {k: v for k, v in flat.items() if k not in _NEUTRAL_KEYS}


def is_checkpoint_folder(folder: str | Path) -> bool:
    """Whether `folder` is named like one the trainer saves (`checkpoint-N`)."""
    return bool(_CHECKPOINT.match(Path(folder).name))


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why `folder` is not a complete sftlib checkpoint, or None when it is."""
    folder = Path(folder)
    if not folder.is_dir():
        return path_problem(folder, want="folder") or "it is not a folder"
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"it has no `{MARKER}`, so its saving never finished (the run was probably stopped while saving)"
    except (OSError, ValueError) as exc:
        return f"its `{MARKER}` cannot be read ({exc})"
    for name, size in marker.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"its file `{name}` is missing"
        if path.stat().st_size != size:
            return f"its file `{name}` has {path.stat().st_size} bytes, not the {size} it was saved with"
    return None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Every `checkpoint-N` folder in `output_dir`, complete or not, oldest step first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path, *, warn: bool = True) -> Path | None:
    """The newest complete checkpoint in `output_dir` (None if there is none); newer incomplete ones are
    skipped, with a warning each when `warn`."""
    for folder in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        if warn:
            warnings.warn(f"skipping checkpoint `{folder}`: {problem}", stacklevel=2)
    return None


def _diff(saved: dict, now: dict) -> list[str]:
    keys = sorted(set(saved) | set(now))
    return [f"`{k}`: {saved.get(k)!r} then, {now.get(k)!r} now" for k in keys if saved.get(k) != now.get(k)]


def explicit_resume_problem(cfg) -> CheckpointError | None:
    """The error `resolve_resume` would raise for a `train.resume` path, found before anything is loaded."""
    mode = getattr(cfg.train, "resume", "auto")
    if not isinstance(mode, str) or mode in ("auto", "never"):
        return None
    return _resume_path_problem(mode)


def _resume_path_problem(mode: str) -> CheckpointError | None:
    problem = checkpoint_problem(Path(mode).expanduser())
    if problem is None:
        return None
    return CheckpointError(f"`train.resume` = `{mode}` cannot be resumed from: {problem}; give a complete "
                           "checkpoint folder, `auto` (the newest complete one in `train.output_dir`) or `never`")


def resolve_resume(cfg, explicit: str | bool | None = None) -> Path | None:
    """The checkpoint to continue from, per `explicit` (an argument of `train`) or else `train.resume`."""
    mode = getattr(cfg.train, "resume", "auto") if explicit is None else explicit
    mode = {True: "auto", False: "never"}.get(mode, mode) if isinstance(mode, bool) else str(mode)
    out = Path(cfg.train.output_dir)
    if mode == "never":
        if list_checkpoints(out):
            warnings.warn(f"`train.resume: never`: starting over; the checkpoints in `{out}` are replaced as "
                          "training reaches their steps", stacklevel=3)
        return None
    if mode == "auto":
        chosen = latest_checkpoint(out)
        if chosen is None:
            return None
    else:
        chosen = Path(mode).expanduser()
        error = _resume_path_problem(mode)
        if error is not None:
            raise error
    saved = json.loads((chosen / MARKER).read_text(encoding="utf-8")).get("settings", {})
    changed = _diff(saved, run_settings(cfg))
    if changed and mode == "auto":
        raise CheckpointError(
            f"`train.output_dir` (`{out}`) holds checkpoints of a run with other settings ({'; '.join(changed)}); "
            "resuming would mix two runs. Use a new `train.output_dir`, set `train.resume: never` to start over, "
            f"or set `train.resume` to `{chosen}` to continue from it anyway"
        )
    if changed:
        warnings.warn(f"resuming from `{chosen}`, saved with other settings: {'; '.join(changed)}", stacklevel=3)
    return chosen


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some network file systems cannot; the marker still comes after the files
        pass
    finally:
        os.close(fd)


def checkpoint_callback(settings: dict):
    from transformers import TrainerCallback

    class MarkCompleteCheckpoints(TrainerCallback):
        """Write the completion marker once a checkpoint's files are all saved; remove a stale one first."""

        def on_step_end(self, args, state, control, **kwargs):
            # Runs before the trainer saves: a folder being rewritten must not keep an old run's marker.
            if control.should_save and state.is_world_process_zero:
                (Path(args.output_dir) / f"checkpoint-{state.global_step}" / MARKER).unlink(missing_ok=True)

        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            files = {}
            for path in sorted(folder.rglob("*")):
                if path.is_file() and path.name != MARKER:
                    _fsync(path)
                    files[path.relative_to(folder).as_posix()] = path.stat().st_size
            tmp = folder / f".{MARKER}.tmp"
            tmp.write_text(json.dumps({"step": state.global_step, "files": files, "settings": settings}, indent=1))
            _fsync(tmp)
            os.replace(tmp, folder / MARKER)

    return MarkCompleteCheckpoints()



LOSS_CARRY = "sftlib_loss_since_log.json"


def loss_carry_callback(resume: Path | None):
    """Keep the logged loss of a resumed run equal to the uninterrupted run's.

    The trainer logs the mean loss of the steps since its last log, summed on the device between logs. A
    checkpoint saved between two logs (`train.save_steps` not a multiple of `train.logging_steps`) does not
    hold that sum, so a resumed run's first log averaged only the steps after the checkpoint. Saved in
    LOSS_CARRY (listed in the completion marker like every other file) and put back when training starts,
    the first log covers the same steps with the same sum; so does the final `train_loss`. The sums are the
    trainer's own (`_tr_loss`, `_total_loss_scalar`, `_globalstep_last_logged` in transformers >= 4.57):
    where the trainer lacks them nothing is carried and the first log after a resume averages fewer steps.
    Set `.trainer` once the trainer exists; put this callback before `checkpoint_callback`."""
    from transformers import TrainerCallback

    class CarryLossBetweenLogs(TrainerCallback):
        trainer = None

        def _sums(self):
            t = self.trainer
            ok = t is not None and all(hasattr(t, a) for a in ("_tr_loss", "_total_loss_scalar",
                                                              "_globalstep_last_logged"))
            return t if ok else None

        def on_train_begin(self, args, state, control, **kwargs):
            t = self._sums()
            if t is None or resume is None:
                return
            try:
                carry = json.loads((Path(resume) / LOSS_CARRY).read_text(encoding="utf-8"))
            except (OSError, ValueError):  # a checkpoint from before this file existed
                return
            if carry.get("step") != state.global_step:
                return
            t._tr_loss += float(carry["loss_since_log"])
            t._globalstep_last_logged = state.global_step - int(carry["steps_since_log"])
            t._total_loss_scalar = float(carry["total_loss"])

        def on_save(self, args, state, control, **kwargs):
            t = self._sums()
            if t is None:
                return
            from transformers.trainer_pt_utils import nested_gather

            # the mean over processes, as the trainer's log takes it (a collective call: every process runs it)
            loss = nested_gather(t._tr_loss.detach().clone(), args.parallel_mode).mean().item()
            if not state.is_world_process_zero:
                return
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            carry = {"step": state.global_step, "loss_since_log": loss,
                     "steps_since_log": state.global_step - t._globalstep_last_logged,
                     "total_loss": t._total_loss_scalar}
            tmp = folder / f".{LOSS_CARRY}.tmp"
            tmp.write_text(json.dumps(carry), encoding="utf-8")
            os.replace(tmp, folder / LOSS_CARRY)

    return CarryLossBetweenLogs()
