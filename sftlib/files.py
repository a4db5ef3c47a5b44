"""Writing files so that a crash never leaves one that looks complete, and saying how big they are.

    from sftlib.files import atomic_dir, atomic_write_text, check_free_space, disk_bytes, human_size
    check_free_space("model", 16e9, "the merged model")     # DiskSpaceError now, not halfway through
    with atomic_dir("model/merged_16bit") as tmp:           # written in a hidden temporary folder,
        model.save_pretrained(tmp)                          # renamed in one step when complete
    atomic_write_text("model/README.md", text)              # the same for one file
    human_size(disk_bytes("model"))                         # "16.06 GB"

A killed write leaves only hidden `.NAME.tmp-PID` (or `.NAME.old-PID`) entries, which the next write
of the same target clears (putting back the previous complete folder if the kill came between the two
renames); entries of a process that is still running are left alone. The Hub upload plan
(sftlib.exports.hub) leaves such entries behind for the same reason.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from sftlib.errors import SftlibError

MARGIN_BYTES = 64 * 1024 ** 2  # tokenizer files, configs, and the file system's own rounding


class DiskSpaceError(SftlibError):
    """Not enough free disk space for a write; the message gives both sizes and the folder."""


def human_size(n: float) -> str:
    """Bytes in the unit a person reads at a glance: `812 B`, `3.40 kB`, `1.98 MB`, `16.06 GB` (powers of 1000)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def check_free_space(folder: str | Path, needed_bytes: float, what: str, setting: str = "export.output_dir") -> None:
    """Raise DiskSpaceError unless the disk holding `folder` has `needed_bytes` (+ a margin) free."""
    probe = Path(folder).absolute()
    while not probe.exists():  # the folder may not exist yet: ask about the disk it will be made on
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    needed = int(needed_bytes) + MARGIN_BYTES
    if free < needed:
        raise DiskSpaceError(
            f"not enough disk space for {what} in `{folder}`: it needs about {human_size(needed)}, and only "
            f"{human_size(free)} is free there; free some space or point `{setting}` at a bigger disk (in Colab, a "
            "Google Drive folder)"
        )


def disk_bytes(path: str | Path) -> int:
    """Bytes a file, or every file under a folder, takes on disk."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a hidden temporary file in the same folder and one rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _clear_leftovers(target: Path) -> None:
    """Remove what a killed write of `target` left: its temporary folder, and restore the previous
    complete folder when the kill came after moving it aside and before the new one took its place."""
    for kind in ("tmp", "old"):
        for stale in sorted(target.parent.glob(f".{glob.escape(target.name)}.{kind}-*")):
            pid = stale.name.rpartition("-")[2]
            if not pid.isdigit() or (int(pid) != os.getpid() and pid_alive(int(pid))):
                continue  # another live process is writing it
            if kind == "old" and not target.exists():
                stale.rename(target)
            elif stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path):
    """Yield a temporary folder beside `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


# ---- one run per folder ------------------------------------------------------------------------------

LOCK_NAME = ".sftlib-run.lock"
_held: dict[str, int] = {}  # folders this process holds -> how many `folder_lock` blocks hold each


class FolderInUseError(SftlibError):
    """Another live run writes to the same folder; the message names its PID, host and start time."""


def _lock_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def _in_use(folder: Path, holder: dict, setting: str) -> FolderInUseError:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return FolderInUseError(
        f"`{folder}` (`{setting}`) is in use by another run: pid {holder.get('pid', '?')} on "
        f"{holder.get('host', '?')}, started {since}; wait for it to end, or give this run another `{setting}`")


@contextlib.contextmanager
def folder_lock(folder: str | Path, *, setting: str = "train.output_dir", log=None):
    """Hold `folder` for this run: a second run that asks for it stops with FolderInUseError naming the first.

    The lock is an flock on `folder/.sftlib-run.lock`, which the kernel drops when the holder dies, so a
    lock left by a killed run is taken over (and said so through `log`). Where the file system has no
    flock (some network mounts), the PID in the file decides: a live process on this host holds it.
    Nested blocks in one process share the lock."""
    import fcntl
    import socket

    folder = Path(folder)
    key = str(folder.resolve())
    if int(os.environ.get("RANK", "0")) != 0:  # the other ranks of one launch write beside rank 0, under its lock
        yield
        return
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    host = socket.gethostname()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _in_use(folder, _lock_holder(path), setting) from None
    except OSError:  # no flock here: fall back to the PID the file names
        holder = _lock_holder(path)
        if holder.get("host") == host and holder.get("pid") != os.getpid() and pid_alive(int(holder.get("pid", 0))):
            os.close(fd)
            raise _in_use(folder, holder, setting) from None
    previous = _lock_holder(path)
    if previous.get("pid") and log is not None:
        log(f"`{folder}`: the run that held it (pid {previous['pid']} on {previous.get('host', '?')}) is gone; "
            "taking it over")
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": host, "started": time.time()}).encode())
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # an empty lock file: nobody holds it
        os.close(fd)  # releases the flock


def folder_in_use(folder: str | Path, *, setting: str = "train.output_dir") -> FolderInUseError | None:
    """The error `folder_lock` would raise now, without taking the lock (to stop before loading a model)."""
    import fcntl

    path = Path(folder) / LOCK_NAME
    if not path.is_file() or str(Path(folder).resolve()) in _held:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _in_use(Path(folder), _lock_holder(path), setting)
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


def writable_folder_problem(folder: str | Path, setting: str) -> str | None:
    """Why a run could not write into `folder` (making it if needed), found before anything is loaded."""
    from sftlib.paths import path_problem

    folder = Path(folder)
    if folder.is_file():
        return f"`{setting}` = `{folder}` is a file, not a folder; give a folder (it is made if missing)"
    if os.path.lexists(folder):  # a link loop, a pipe, a folder that cannot be read: the shared path check says
        problem = path_problem(folder, want="folder")
        if problem:
            return f"`{setting}`: {problem}"
    probe = folder
    while not probe.exists():
        if probe.is_symlink():
            return f"`{setting}` = `{folder}`: `{probe}` is a symbolic link to nothing"
        probe = probe.parent
    if not probe.is_dir():
        return f"`{setting}` = `{folder}`: `{probe}` is a file, so the folder cannot be made"
    try:  # asked of the file system itself: permissions, a read-only mount, quotas
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as e:
        return (f"`{setting}` = `{folder}`: cannot write in `{probe}` ({e.strerror or e}); choose a folder you "
                "can write to")
    return None
