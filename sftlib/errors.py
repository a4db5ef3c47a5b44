"""One base for every error sftlib raises on purpose.

    from sftlib.errors import SftlibError
    try:
        sftlib.run(cfg)
    except SftlibError as exc:      # a setting, file, folder or model that cannot be used as given
        print(exc)                  # says what is wrong and what to do; no traceback needed

Each stage has its own subclass (`ConfigError`, `DataError`, `ModelLoadError`, `ExportError`, ...),
all of them `SftlibError`, which is a `ValueError`: code that caught ValueError keeps working. The
command line prints a `SftlibError` as one line and exits with status 2 (see sftlib.cli). Anything
else that escapes is a defect of sftlib or of a dependency and keeps its traceback.
"""

from __future__ import annotations


class SftlibError(ValueError):
    """A problem with what the user gave, found by sftlib; the message names the thing and the fix."""
