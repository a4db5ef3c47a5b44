"""The Hugging Face token and uploads: the token is found, used, and never written or shown.

    from sftlib.hub import get_token, push_folder, push_plan, redact, upload_plan
    plan = upload_plan("model", "me/llama-3.1-8b-chat")   # no token, no network: what would be uploaded
    print(plan.table())                                  # repo, branch, visibility, each file, what is left out
    push_plan(plan)                                      # the upload itself: exactly those files, private by default
    push_folder("model", "me/llama-3.1-8b-chat", dry_run=True)   # both in one call; dry_run=True returns the plan
    print(redact(f"anything that might hold a token: {text}"))   # -> "... hf_*** ..."

What is never uploaded: temporary files of unfinished writes (names starting with "." or holding
".partial-" or ".tmp-"), GGUF files that failed verification (`*.gguf.failed`), hidden folders and
`__pycache__`. A plan whose files contain a Hugging Face token is refused.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
COLAB_SECRET = "HF_TOKEN"
MASK = "hf_***"
TOKEN_PATTERN = re.compile(r"\bhf_[A-Za-z0-9]{30,}")  # the shape of Hugging Face access tokens
_SCAN_LIMIT = 64 * 1024 ** 2  # larger files (weights) are binary; tokens live in small text files
_known: set[str] = set()  # every token this process has handled, for redact()


class HubError(ValueError):
    """The Hub cannot be used as asked: no token, a bad repository name, or a failed upload."""


def _remember(token: str | None) -> str | None:
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
            return _remember(os.environ[name])
    token = _colab_secret()
    if token:
        return _remember(token)
    try:
        from huggingface_hub import get_token as stored_token
    except ImportError:
        stored_token = None
    token = stored_token() if stored_token is not None else None
    if token:
        return _remember(token)
    if interactive is None:
        interactive = sys.stdin is not None and sys.stdin.isatty()
    if interactive:
        return _remember(getpass.getpass("Hugging Face token (input hidden; make one at hf.co/settings/tokens): "))
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


def _scan(paths, secrets) -> list[Path]:
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
    return _scan(sorted(Path(folder).rglob("*")), [token])


# ---- the upload plan: computed offline, shown, then uploaded as shown ------------------------------------

_REPO_PART = re.compile(r"[A-Za-z0-9._-]{1,96}")
_BRANCH_BAD = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")  # what git refuses in a branch name (spaces included)


def repo_problems(repo, name: str = "repo") -> list[str]:
    """What is wrong with `repo` as a Hub model repository id, in the words of the field `name`; [] if nothing."""
    rule = ("each part letters, digits, `-`, `_` or `.`, at most 96 characters, not starting or ending with `-` or "
            "`.`, without `--` or `..`, no `.git` ending; e.g. `me/llama-3.1-8b-chat`")
    if not isinstance(repo, str) or repo.count("/") != 1 or "" in repo.split("/"):
        return [f"`{name}` must look like `owner/name` ({rule}), got {redact(repr(repo))}"]
    if repo.endswith(".git") or any(not _REPO_PART.fullmatch(part) or part[0] in "-." or part[-1] in "-."
                                    or "--" in part or ".." in part for part in repo.split("/")):
        return [f"`{name}` is not a valid Hub repository id: {redact(repr(repo))} ({rule})"]
    return []


def revision_problems(revision, name: str = "revision") -> list[str]:
    """What is wrong with `revision` as a branch name to upload to; [] if nothing."""
    if not isinstance(revision, str) or not revision:
        return [f"`{name}` must be a branch name such as `main`, got {redact(repr(revision))}"]
    if (_BRANCH_BAD.search(revision) or ".." in revision or "//" in revision or "@{" in revision
            or revision[0] in "-/." or revision[-1] in "/." or revision.endswith(".lock")):
        return [f"`{name}` must be a branch name (no spaces, `..`, `~^:?*[\\`, no leading `-`, `/` or `.`), "
                f"e.g. `main` or `v1`; got {redact(repr(revision))}"]
    return []


def skip_reason(relative: Path) -> str | None:
    """Why the file at `relative` (inside an export folder) must not be uploaded, or None when it may be."""
    for part in relative.parts[:-1]:
        if part == "__pycache__":
            return "Python cache"
        if part.startswith("."):
            return f"inside the hidden folder `{part}`"
    name = relative.name
    if ".partial-" in name or ".tmp-" in name:
        return "temporary file of an unfinished write"
    if name.endswith(".gguf.failed"):
        return "GGUF that failed verification (see gguf_report.json)"
    if name.startswith("."):
        return "hidden file"
    return None


class PlannedFile(NamedTuple):
    path_in_repo: str
    local_path: str
    bytes: int


@dataclass
class UploadPlan:
    """What `push_plan` uploads, computed by `upload_plan` without a token or the network."""

    folder: str
    repo: str
    revision: str = "main"
    private: bool = True  # applies when the repository is created; an existing one keeps its visibility
    repo_type: str = "model"
    files: list[PlannedFile] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path in the folder, why it stays here)

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    def table(self) -> str:
        visibility = "private" if self.private else "public"
        rows = [f"repo:       {self.repo}  (https://huggingface.co/{self.repo})",
                f"revision:   {self.revision}"
                + ("" if self.revision == "main" else "  (a branch, created from main when missing)"),
                f"visibility: {visibility} when created now; an existing repository keeps its own",
                f"files from {self.folder}:"]
        width = max([len(f.path_in_repo) for f in self.files] + [5])
        rows += [f"  {f.path_in_repo:<{width}} {_size(f.bytes):>10}" for f in self.files]
        rows.append(f"  {'total':<{width}} {_size(self.total_bytes):>10}  ({len(self.files)} files)")
        if self.skipped:
            rows.append(f"left out ({len(self.skipped)}):")
            rows += [f"  {path}: {why}" for path, why in self.skipped]
        return "\n".join(rows)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _refuse_leaks(plan: UploadPlan, secrets) -> None:
    leaks = _scan([Path(f.local_path) for f in plan.files], secrets)
    if leaks:
        shown = ", ".join(str(p.relative_to(plan.folder)) for p in leaks[:5])
        raise HubError(f"not uploading `{plan.folder}`: {shown} contain(s) a Hugging Face token; remove it first")


def upload_plan(folder: str | Path, repo: str, *, revision: str = "main", private: bool = True) -> UploadPlan:
    """The files of `folder` that an upload to `repo` at branch `revision` would send, and those it leaves out.
    Needs neither a token nor the network. Raises HubError for a bad repo or branch name, a folder with
    nothing to upload, or files that contain a Hugging Face token (the one known to this process, the
    environment's, or anything shaped like one)."""
    folder = Path(folder)
    problems = repo_problems(repo) + revision_problems(revision)
    if not folder.is_dir() or not any(folder.iterdir()):
        problems.append(f"`{folder}` is not a folder with files to upload; export the model first")
    if problems:
        raise HubError("; ".join(problems))
    plan = UploadPlan(folder=str(folder), repo=repo, revision=revision, private=bool(private))
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            continue
        relative = path.relative_to(folder)
        why = skip_reason(relative)
        if why:
            plan.skipped.append((relative.as_posix(), why))
        else:
            plan.files.append(PlannedFile(relative.as_posix(), str(path), path.stat().st_size))
    if not plan.files:
        raise HubError(f"nothing to upload in `{folder}`: every file is left out ("
                       + "; ".join(f"{p}: {why}" for p, why in plan.skipped[:5]) + ")")
    _refuse_leaks(plan, [*_known, *(os.environ.get(n, "") for n in TOKEN_ENV)])
    return plan


def push_plan(plan: UploadPlan, *, token: str | None = None, commit_message: str = "Upload from sftlib",
              interactive: bool | None = None) -> str:
    """Upload exactly `plan.files` in one commit to `plan.repo` at `plan.revision`, creating the repository
    (and the branch) when missing. Returns the URL of the branch. Raises HubError with the reason (never
    the token)."""
    changed = [f.path_in_repo for f in plan.files
               if not Path(f.local_path).is_file() or Path(f.local_path).stat().st_size != f.bytes]
    if changed:
        raise HubError(f"not uploading `{plan.folder}`: {', '.join(changed[:5])} changed or vanished since the "
                       "plan was made; make the plan again")
    token = _remember(token) or require_token(interactive=interactive)
    _refuse_leaks(plan, [token])  # the token may come from a stored login the plan's scan did not know
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    try:
        url = str(api.create_repo(plan.repo, private=plan.private, repo_type=plan.repo_type, exist_ok=True))
        if plan.revision != "main":
            api.create_branch(plan.repo, branch=plan.revision, repo_type=plan.repo_type, exist_ok=True)
        api.create_commit(plan.repo, [CommitOperationAdd(f.path_in_repo, f.local_path) for f in plan.files],
                          commit_message=commit_message, repo_type=plan.repo_type, revision=plan.revision)
    except Exception as exc:  # every failure reaches the user: as a HubError, its text redacted
        offline = type(exc).__name__ == "OfflineModeIsEnabled" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = ("offline mode is on (HF_HUB_OFFLINE=1); unset it to upload" if offline
                else "check the token has write access and the network is reachable")
        raise HubError(redact(f"could not upload `{plan.folder}` to `{plan.repo}`: {type(exc).__name__}: {exc}; "
                              f"{hint}", token)) from None
    return url if plan.revision == "main" else f"{url}/tree/{plan.revision}"


def push_folder(folder: str | Path, repo: str, *, revision: str = "main", token: str | None = None,
                private: bool = True, commit_message: str = "Upload from sftlib", interactive: bool | None = None,
                dry_run: bool = False):
    """Upload `folder` to the model repository `repo` ("owner/name") at branch `revision`, creating it (private
    by default) if needed: `upload_plan`, then `push_plan`. Returns the URL; with `dry_run=True`, returns the
    UploadPlan and uses neither the token nor the network. Raises HubError with the reason (never the token)."""
    plan = upload_plan(folder, repo, revision=revision, private=private)
    if dry_run:
        return plan
    return push_plan(plan, token=token, commit_message=commit_message, interactive=interactive)
