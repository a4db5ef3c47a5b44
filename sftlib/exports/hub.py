"""Uploads to the Hugging Face Hub: the plan is computed offline and shown, then exactly it is uploaded.

    from sftlib.exports.hub import push_folder, push_plan, upload_plan
    plan = upload_plan("model", "me/llama-3.1-8b-chat")   # no token, no network: what would be uploaded
    print(plan.table())                                  # repo, branch, visibility, each file, what is left out
    push_plan(plan)                                      # the upload itself: exactly those files, private by default
    push_folder("model", "me/llama-3.1-8b-chat", dry_run=True)   # both in one call; dry_run=True returns the plan

What is never uploaded: temporary files of unfinished writes (names starting with "." or holding
".partial-" or ".tmp-"), GGUF files that failed verification (`*.gguf.failed`), hidden folders and
`__pycache__`. A plan whose files contain a Hugging Face token is refused, and `push_plan` scans again
for the token it was given (sftlib.tokens finds the token and keeps it out of every output).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from sftlib.config import repo_problems, revision_problems
from sftlib.files import human_size
from sftlib.tokens import HubError, known_tokens, redact, remember, require_token, scan

# ---- the upload plan: computed offline, shown, then uploaded as shown ------------------------------------

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


def _entries(folder: Path) -> list[Path]:
    """Every file and link under `folder`, sorted, without following links to folders (no loops, nothing outside)."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        found += [Path(root) / name for name in files]
        found += [Path(root) / name for name in dirs if (Path(root) / name).is_symlink()]  # listed, never entered
    return sorted(found)


def _link_or_kind_problem(path: Path, folder: Path) -> str | None:
    """Why a link or a special file stays here: an upload sends only regular files that live in the folder."""
    if path.is_symlink():
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):  # dangling, or a loop
            return "a symbolic link to nothing (or to itself)"
        if not target.is_relative_to(folder.resolve()):
            return "a symbolic link to outside the folder: links are never followed out"
        if target.is_dir():
            return "a symbolic link to a folder: upload the folder itself"
    if not path.is_file():
        return "not a regular file (a pipe, socket or device)"
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
        rows += [f"  {f.path_in_repo:<{width}} {human_size(f.bytes):>10}" for f in self.files]
        rows.append(f"  {'total':<{width}} {human_size(self.total_bytes):>10}  ({len(self.files)} files)")
        if self.skipped:
            rows.append(f"left out ({len(self.skipped)}):")
            rows += [f"  {path}: {why}" for path, why in self.skipped]
        return "\n".join(rows)


def _refuse_leaks(plan: UploadPlan, secrets) -> None:
    leaks = scan([Path(f.local_path) for f in plan.files], secrets)
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
        raise HubError(redact("; ".join(map(str, problems))))
    plan = UploadPlan(folder=str(folder), repo=repo, revision=revision, private=bool(private))
    for path in _entries(folder):
        relative = path.relative_to(folder)
        why = skip_reason(relative) or _link_or_kind_problem(path, folder)
        if why:
            plan.skipped.append((relative.as_posix(), why))
        else:
            plan.files.append(PlannedFile(relative.as_posix(), str(path), path.stat().st_size))
    if not plan.files:
        raise HubError(f"nothing to upload in `{folder}`: every file is left out ("
                       + "; ".join(f"{p}: {why}" for p, why in plan.skipped[:5]) + ")")
    _refuse_leaks(plan, known_tokens())
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
    token = remember(token) or require_token(interactive=interactive)
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
