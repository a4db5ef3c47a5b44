"""Child processes that die with sftlib: a killed export must not leave llama.cpp's converter running.

    from sftlib.child import run_child
    proc = run_child([sys.executable, "convert.py", ...], env=env)   # subprocess.run(capture_output, text)

On Linux each child asks the kernel (prctl PR_SET_PDEATHSIG) for SIGKILL when its parent dies, even by
kill -9, which no handler in the parent could catch; a parent that died before the child got that
far is noticed at once. An exception in the parent (Ctrl-C, a timeout) kills the child as
subprocess.run does. Elsewhere children are started in their own process group, killed on error.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def _die_with(parent: int):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: only the call runs in the child

    def in_child() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return in_child


def run_child(cmd: list[str], *, env: dict | None = None, timeout: float | None = None,
              cwd: str | None = None) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True) whose child cannot outlive this process."""
    linux = sys.platform.startswith("linux")
    with subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          preexec_fn=_die_with(os.getpid()) if linux else None,
                          start_new_session=not linux) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
