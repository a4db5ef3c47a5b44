"""What is wrong with a path the user gave, found before anything opens it for reading.

    from sftlib.paths import path_problem
    problem = path_problem("data/chats.jsonl", want="file")   # None, or why it cannot be used and the fix
    if problem:
        raise DataError(f"`data.source`: {problem}")

One check for every input path (a data file or folder, a config, a model or adapter folder), so each
says the same thing the same way: a path that does not exist, a symbolic link to nothing or to itself,
a folder where a file is needed (or the other way round), something that is not a regular file (a
named pipe waits forever for a writer, `/dev/zero` never ends: neither is ever opened for reading),
and a file or folder this process may not read (checked by opening without reading, so it holds for
root too, where permission bits do not).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_NOT_REGULAR = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def path_problem(path: str | os.PathLike, *, want: str = "any") -> str | None:
    """Why `path` cannot be read as `want` ("file", "folder" or "any"), naming it and the fix; None if it can."""
    path = Path(path).expanduser()
    try:
        info = os.stat(path)
    except OSError as e:
        return _stat_problem(path, e)
    if stat.S_ISDIR(info.st_mode):
        if want == "file":
            return f"`{path}` is a folder, not a file; give a file inside it"
        try:
            os.listdir(path)
        except OSError as e:
            return f"folder `{path}` cannot be read ({e.strerror or e}); check its permissions"
        return None
    kind = next((name for test, name in _NOT_REGULAR if test(info.st_mode)), None)
    if kind is not None:
        return (f"`{path}` is {kind}, not a regular file; sftlib reads only files saved on disk (reading a pipe or "
                "a device could wait or never end): save the contents to a file and give that")
    if want == "folder":
        return f"`{path}` is a file, not a folder; give the folder that holds it"
    try:  # open without reading: permission bits do not stop root, but some files refuse anyone
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    except OSError as e:
        return f"`{path}` cannot be read ({e.strerror or e}); check its permissions, or copy it somewhere readable"
    return None


def _stat_problem(path: Path, e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return f"`{path}` is a symbolic link that leads back to itself (a loop); fix or remove the link"
    if e.errno == errno.ENOENT and path.is_symlink():
        return (f"`{path}` is a symbolic link to `{os.readlink(path)}`, which does not exist; fix the link or give "
                "the real path")
    if e.errno == errno.ENOENT:
        return (f"`{path}` does not exist (looked for {path.absolute()}); check the path, which is relative to the "
                "working directory")
    if e.errno == errno.ENOTDIR:
        return f"`{path}`: a part of the path is a file, not a folder; check the path"
    if e.errno == errno.EACCES:
        return f"`{path}` cannot be reached (permission denied on a folder above it); check the permissions"
    return f"`{path}` cannot be used ({e.strerror or e}); check the path"
