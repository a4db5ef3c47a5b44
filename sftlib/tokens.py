"""The Hugging Face token: found, used, and never written or shown.

    from sftlib.tokens import get_token, redact, redact_logging
    token = get_token()                                          # or None; see the order below
    print(redact(f"anything that might hold a token: {text}"))   # -> "... hf_*** ..."
    redact_logging()                                             # the same for every log handler

Where the token comes from, first found wins:

1. the `HF_TOKEN` environment variable (or the older `HUGGING_FACE_HUB_TOKEN`);
2. in Colab, the notebook secret `HF_TOKEN` (the key icon in the left bar; grant the notebook access);
3. the token stored by `hf auth login` on this machine;
4. when someone is at the keyboard (a terminal, or a notebook with `interactive=True`), a hidden
   prompt (`getpass`): nothing is echoed and nothing is kept after the process ends.

A token is never an argument of the run config (validation rejects one found in any value), never
printed or logged (`redact`, and `redact_logging()` for the logging handlers, replace it with
`hf_***`), and never uploaded: a plan with a file that contains it (or anything shaped like a token)
is refused, and `push_plan` scans again for the token it was given.
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import sys
from pathlib import Path

from sftlib.errors import SftlibError

TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
COLAB_SECRET = "HF_TOKEN"
MASK = "hf_***"
TOKEN_PATTERN = re.compile(r"\bhf_[A-Za-z0-9]{30,}")  # the shape of Hugging Face access tokens
_SCAN_LIMIT = 64 * 1024 ** 2  # larger files (weights) are binary; tokens live in small text files
_known: set[str] = set()  # every token this process has handled, for redact()


def known_tokens() -> list[str]:
    """Every token this process has handled or can see in its environment."""
    return [*_known, *(os.environ.get(n, "") for n in TOKEN_ENV)]


class HubError(SftlibError):
    """The Hub cannot be used as asked: no token, a bad repository name, or a failed upload."""


def remember(token: str | None) -> str | None:
    if token:
        token = token.strip()
        _known.add(token)
    return token or None


def _colab_secret() -> str | None:
    try:
        from google.colab import userdata  # only inside Colab
    except ImportError:
        return None
    try:
        return userdata.get(COLAB_SECRET)
    except Exception:  # secret missing, or the notebook was not granted access: fall through to the next source
        return None


def get_token(*, interactive: bool | None = None) -> str | None:
    """The token from the first source that has one (see the module docstring), or None.

    `interactive`: may we prompt? None = only when stdin is a terminal.
    """
    for name in TOKEN_ENV:
        if os.environ.get(name, "").strip():
            return remember(os.environ[name])
    token = _colab_secret()
    if token:
        return remember(token)
    try:
        from huggingface_hub import get_token as stored_token
    except ImportError:
        stored_token = None
    token = stored_token() if stored_token is not None else None
    if token:
        return remember(token)
    if interactive is None:
        interactive = sys.stdin is not None and sys.stdin.isatty()
    if interactive:
        return remember(getpass.getpass("Hugging Face token (input hidden; make one at hf.co/settings/tokens): "))
    return None


def require_token(*, interactive: bool | None = None) -> str:
    token = get_token(interactive=interactive)
    if not token:
        raise HubError(
            "no Hugging Face token found: set the HF_TOKEN environment variable, add a Colab secret named "
            f"{COLAB_SECRET} (key icon in the left bar) and allow this notebook to read it, or run `hf auth login`; "
            "make a token with write access at https://huggingface.co/settings/tokens"
        )
    return token


def redact(text: str, *secrets: str) -> str:
    """`text` with every token sftlib has seen, every token in the environment, `secrets`, and anything shaped
    like a Hugging Face token replaced by `hf_***`."""
    text = str(text)
    values = {*_known, *secrets, *(os.environ.get(n, "") for n in TOKEN_ENV)}
    for value in sorted((v.strip() for v in values if v and len(v.strip()) >= 8), key=len, reverse=True):
        text = text.replace(value, MASK)
    return TOKEN_PATTERN.sub(MASK, text)


class RedactingFilter(logging.Filter):
    """A logging filter that rewrites each record's message through `redact` (attach it to handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


def redact_logging(*names: str) -> None:
    """Put a RedactingFilter on every handler of the root logger and of the named loggers (by default those of
    transformers, huggingface_hub, datasets and sftlib), so no log line shows a token."""
    for name in (None, *(names or ("transformers", "huggingface_hub", "datasets", "sftlib"))):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())


def scan(paths, secrets) -> list[Path]:
    """The `paths` whose bytes contain one of `secrets` or anything shaped like a Hugging Face token."""
    needles = [v.encode() for v in {v.strip() for v in secrets if v} if len(v) >= 8]
    hits = []
    for path in paths:
        if not path.is_file() or path.stat().st_size > _SCAN_LIMIT:
            continue
        data = path.read_bytes()
        if any(n in data for n in needles) or TOKEN_PATTERN.search(data.decode("latin-1")):
            hits.append(path)
    return hits


def files_containing(folder: str | Path, token: str) -> list[Path]:
    """Files under `folder` whose bytes contain `token` or anything shaped like a Hugging Face token."""
    return scan(sorted(Path(folder).rglob("*")), [token])
