"""Uploads to the Hub, up to where the network starts: the plan (which files go, which stay and why, to which
repository and branch) is computed and shown without a token or the network, and the upload sends exactly it.

    pytest tests/test_hub.py -q

The Hub cannot be reached here. The real upload is run with HF_HUB_OFFLINE=1 and must fail as a HubError
that names the reason and never the token.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sftlib import tokens as hub
from sftlib.config import ConfigError, RunConfig
from sftlib.exports.hub import PlannedFile, UploadPlan, push_folder, push_plan, upload_plan
from sftlib.tokens import HubError

REPO = Path(__file__).resolve().parents[1]
DUMMY = "hf_" + "Hq4dummyTokenForSftlibHubTests987654321"  # shaped like a real token, valid nowhere

# An export as `python -m sftlib train` / `export` leave it, with the leftovers an interrupted or failed export
# and a Jupyter session add. Sizes differ so that a file's size in the plan is checked against its own.
UPLOADED = {
    "README.md": 1200,                                   # the model card
    "lora/adapter_config.json": 700,
    "lora/adapter_model.safetensors": 40_000,
    "lora/tokenizer.json": 9_000,
    "lora/tokenizer_config.json": 1_500,
    "merged_16bit/config.json": 650,
    "merged_16bit/generation_config.json": 180,
    "merged_16bit/model.safetensors": 120_000,
    "gguf/sftlib-demo-sft.F16.gguf": 90_000,
    "gguf/sftlib-demo-sft.Q4_K_M.gguf": 30_000,
    "gguf/Modelfile": 420,
    "gguf/gguf_report.json": 2_300,
}
LEFT_OUT = {
    "gguf/sftlib-demo-sft.Q2_K.gguf.failed": ("GGUF that failed verification", 20_000),
    "gguf/.sftlib-demo-sft.Q8_0.gguf.partial-4242": ("temporary file of an unfinished write", 5_000),
    ".README.md.tmp-77": ("temporary file of an unfinished write", 300),
    "merged_16bit/.model.safetensors.tmp-99": ("temporary file of an unfinished write", 800),
    ".ipynb_checkpoints/README-checkpoint.md": ("inside the hidden folder `.ipynb_checkpoints`", 100),
    "lora/__pycache__/hook.cpython-311.pyc": ("Python cache", 50),
    ".DS_Store": ("hidden file", 10),
}


def _export(root: Path) -> Path:
    folder = root / "model"
    for rel, size in {**UPLOADED, **{k: v[1] for k, v in LEFT_OUT.items()}}.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(i % 251 for i in range(size)))  # no token-shaped text in it
    return folder


@pytest.fixture()
def no_network(monkeypatch):
    """Offline mode on, and any socket connection fails the test: nothing may reach out."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read once at import; set it here too

    def refuse(self, address):
        raise AssertionError(f"a network connection was attempted to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def _cli(*args, env_extra=None, cwd=None):
    env = {k: v for k, v in os.environ.items() if k not in hub.TOKEN_ENV}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "sftlib", "push", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_plan_sends_the_export_and_leaves_out_leftovers(tmp_path, no_token):
    folder = _export(tmp_path)
    plan = upload_plan(folder, "me/tiny-chat")
    assert (plan.repo, plan.revision, plan.private, plan.repo_type) == ("me/tiny-chat", "main", True, "model")
    assert {f.path_in_repo: f.bytes for f in plan.files} == UPLOADED
    assert all(Path(f.local_path) == folder / f.path_in_repo for f in plan.files)
    assert plan.total_bytes == sum(UPLOADED.values())
    skipped = dict(plan.skipped)
    assert skipped.keys() == LEFT_OUT.keys()
    for rel, (why, _) in LEFT_OUT.items():
        assert skipped[rel].startswith(why), (rel, skipped[rel])

    lines = plan.table().splitlines()
    assert lines[0].startswith("repo:       me/tiny-chat")
    assert lines[1] == "revision:   main" and lines[2].startswith("visibility: private")
    assert any(line.split() == ["merged_16bit/model.safetensors", "120.00", "kB"] for line in lines)
    assert any(line.split() == ["gguf/Modelfile", "420", "B"] for line in lines)
    assert any(line.split()[:3] == ["total", "295.95", "kB"] and "(12 files)" in line for line in lines)
    assert "left out (7):" in lines
    assert "  gguf/sftlib-demo-sft.Q2_K.gguf.failed: GGUF that failed verification (see gguf_report.json)" in lines

    public = upload_plan(folder, "me/tiny-chat", revision="exp-1", private=False)
    assert public.revision == "exp-1" and not public.private and public.files == plan.files
    assert "visibility: public" in public.table() and "revision:   exp-1  (a branch" in public.table()


def test_links_are_never_followed_out_of_the_folder(tmp_path, no_token):
    """A link to a private key beside the export, a dangling link, a loop, a link to an outside folder, a pipe:
    listed as left out with the reason; a link to a file inside the folder is sent like the file."""
    outside = tmp_path / "home"
    (outside / ".ssh").mkdir(parents=True)
    key = outside / ".ssh" / "id_ed25519"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    folder = tmp_path / "model"
    (folder / "lora").mkdir(parents=True)
    (folder / "lora" / "adapter_model.safetensors").write_bytes(b"x" * 100)
    (folder / "README.md").write_text("card")
    (folder / "id_ed25519").symlink_to(key)
    (folder / "ssh").symlink_to(outside / ".ssh")
    (folder / "gone.bin").symlink_to(tmp_path / "deleted.bin")
    (folder / "loop").symlink_to(folder / "loop")
    (folder / "lora" / "card.md").symlink_to(folder / "README.md")
    os.mkfifo(folder / "pipe")
    plan = upload_plan(folder, "me/model")
    assert {f.path_in_repo: f.bytes for f in plan.files} == {"README.md": 4, "lora/adapter_model.safetensors": 100,
                                                             "lora/card.md": 4}
    skipped = dict(plan.skipped)
    assert skipped == {"gone.bin": "a symbolic link to nothing (or to itself)",
                       "id_ed25519": "a symbolic link to outside the folder: links are never followed out",
                       "loop": "a symbolic link to nothing (or to itself)",
                       "pipe": "not a regular file (a pipe, socket or device)",
                       "ssh": "a symbolic link to outside the folder: links are never followed out"}
    assert str(key) not in plan.table() and "OPENSSH" not in plan.table()


def test_a_folder_with_only_leftovers_has_nothing_to_upload(tmp_path, no_token):
    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / "m.Q4_K_M.gguf.failed").write_bytes(b"GGUF")
    (folder / ".m.F16.gguf.partial-1").write_bytes(b"GGUF")
    with pytest.raises(HubError, match=r"nothing to upload in `.*gguf`: every file is left out \(.*failed verif"):
        upload_plan(folder, "me/model")
    with pytest.raises(HubError, match="not a folder with files to upload"):
        upload_plan(tmp_path / "missing", "me/model")


def test_a_file_holding_a_token_stops_the_plan(tmp_path, no_token, monkeypatch):
    folder = _export(tmp_path)
    (folder / "gguf" / "Modelfile").write_text(f'FROM ./m.gguf\nSYSTEM "token {DUMMY}"\n')
    with pytest.raises(HubError, match=r"gguf/Modelfile contain\(s\) a Hugging Face token") as err:
        upload_plan(folder, "me/model")
    assert DUMMY not in str(err.value)

    # A token that is not token-shaped is found because it is the environment's.
    (folder / "gguf" / "Modelfile").write_text("FROM ./m.gguf\n")
    (folder / "README.md").write_text("trained by my-own-secret-value-42\n")
    assert upload_plan(folder, "me/model").files  # not known yet: nothing to find
    monkeypatch.setenv("HF_TOKEN", "my-own-secret-value-42")
    with pytest.raises(HubError, match=r"README\.md contain\(s\) a Hugging Face token"):
        upload_plan(folder, "me/model")
    monkeypatch.delenv("HF_TOKEN")

    # The token given to the upload itself (e.g. from a stored login) is looked for again before anything is sent.
    plan = upload_plan(folder, "me/model")
    with pytest.raises(HubError, match=r"README\.md contain\(s\) a Hugging Face token") as err:
        push_plan(plan, token="my-own-secret-value-42")
    assert "my-own-secret-value-42" not in str(err.value)

    # A token only in a file that is left out is not uploaded, so it does not stop the plan.
    (folder / "README.md").write_text("clean\n")
    (folder / f".README.md.tmp-{os.getpid()}").write_text(DUMMY)
    assert any(p.startswith(".README.md.tmp-") for p, _ in upload_plan(folder, "me/model").skipped)


@pytest.mark.parametrize("repo", ["no-owner", "a/b/c", "/name", "me/", "me/my model", "me/-x", "me/x.", "me/a--b",
                                  "me/a..b", "me/x.git", "me/" + "x" * 97, "mé/x", "", None])
def test_bad_repository_ids_are_refused(tmp_path, no_token, repo):
    folder = _export(tmp_path)
    with pytest.raises(HubError, match=r"`repo` (must look like `owner/name`|is not a valid Hub repository id)"):
        upload_plan(folder, repo)


@pytest.mark.parametrize("revision", ["", "my branch", "a..b", "-x", "x/", "/x", ".x", "x.lock", "a:b", "a~1",
                                      "a^", "a?", "a*", "a[b", "a\\b", "a@{1}", "a//b", "tab\there", None])
def test_bad_branch_names_are_refused(tmp_path, no_token, revision):
    folder = _export(tmp_path)
    with pytest.raises(HubError, match=r"`revision` must be a branch name"):
        upload_plan(folder, "me/model", revision=revision)


def test_good_names_pass_and_every_problem_is_told_at_once(tmp_path, no_token):
    folder = _export(tmp_path)
    for repo in ("me/llama-3.1-8b-chat", "Org_1/" + "x" * 96, "a/b"):
        for revision in ("main", "v1", "exp/lr-3e-4", "release_2.0"):
            assert upload_plan(folder, repo, revision=revision).repo == repo
    with pytest.raises(HubError) as err:
        upload_plan(tmp_path / "missing", "me/my model", revision="a b")
    text = str(err.value)
    assert "`repo` is not a valid" in text and "`revision` must be a branch name" in text and "`" + str(
        tmp_path / "missing") + "` is not a folder" in text


def test_config_hub_revision(tmp_path):
    assert RunConfig().export.hub_revision == "main"
    cfg = RunConfig.from_dict({"export.hub_repo": "me/model", "export.hub_revision": "exp-2"})
    assert cfg.export.hub_revision == "exp-2"
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"export.hub_repo": "me/my model", "export.hub_revision": "my branch"})
    assert "`export.hub_repo` is not a valid Hub repository id" in str(err.value)
    assert "`export.hub_revision` must be a branch name" in str(err.value)


def test_a_dry_run_needs_no_token_and_no_network(tmp_path, no_token, no_network, monkeypatch):
    def no(*args, **kwargs):
        raise AssertionError("the dry run asked for the token")

    monkeypatch.setattr(hub, "get_token", no)
    monkeypatch.setattr("getpass.getpass", no)
    folder = _export(tmp_path)
    plan = push_folder(folder, "me/tiny-chat", revision="exp-1", dry_run=True)
    assert isinstance(plan, UploadPlan)
    assert plan == upload_plan(folder, "me/tiny-chat", revision="exp-1")
    assert PlannedFile("gguf/Modelfile", str(folder / "gguf" / "Modelfile"), 420) in plan.files


def test_the_upload_sends_only_the_plan_and_refuses_a_changed_folder(tmp_path, no_token):
    folder = _export(tmp_path)
    plan = upload_plan(folder, "me/model")
    (folder / "gguf" / "Modelfile").write_text("FROM ./other.gguf\n")  # changed after the plan was shown
    (folder / "lora" / "tokenizer.json").unlink()
    with pytest.raises(HubError, match=r"gguf/Modelfile, lora/tokenizer\.json changed or vanished since the plan"):
        push_plan(plan, token=DUMMY)


def test_a_real_upload_offline_fails_cleanly_without_the_token(tmp_path, no_token, no_network):
    folder = _export(tmp_path)
    with pytest.raises(HubError) as err:
        push_folder(folder, "me/model", revision="exp-1", token=DUMMY)
    text = str(err.value)
    assert text.startswith(f"could not upload `{folder}` to `me/model`: OfflineModeIsEnabled")
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in text and DUMMY not in text


def test_cli_push_dry_run_prints_the_plan(tmp_path):
    folder = _export(tmp_path)
    proc = _cli("--folder", "model", "--repo", "me/tiny-chat", "--revision", "v1", "--public", "--dry-run",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:3] == ["repo:       me/tiny-chat  (https://huggingface.co/me/tiny-chat)",
                         "revision:   v1  (a branch, created from main when missing)",
                         "visibility: public when created now; an existing repository keeps its own"]
    assert sum(1 for line in lines if line.startswith("  ") and line.split()[0] in UPLOADED) == len(UPLOADED)
    assert "  gguf/.sftlib-demo-sft.Q8_0.gguf.partial-4242: temporary file of an unfinished write" in lines
    assert lines[-1] == "dry run: nothing was uploaded"
    assert folder.is_dir() and proc.stderr == ""


def test_cli_push_errors_are_one_line_and_exit_2(tmp_path):
    _export(tmp_path)
    proc = _cli("--folder", "model", "--repo", "no-owner", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: `repo` must look like `owner/name`") and proc.stderr.count("\n") == 1

    # A real upload: the plan is shown, then the offline upload fails; the token is in no byte printed.
    proc = _cli("--folder", "model", "--repo", "me/tiny-chat", "--revision", "v1", cwd=tmp_path,
                env_extra={"HF_TOKEN": DUMMY})
    assert proc.returncode == 2
    assert proc.stdout.startswith("repo:       me/tiny-chat") and "lora/adapter_model.safetensors" in proc.stdout
    assert proc.stderr.startswith("error: could not upload `model` to `me/tiny-chat`: OfflineModeIsEnabled")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert DUMMY not in proc.stdout + proc.stderr
