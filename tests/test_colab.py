"""Colab's install step (keep the preinstalled torch) and the Google Drive folder.

    pytest tests/test_colab.py -q                 # the constraints and Drive, in seconds
    pytest tests/test_colab.py -q -m slow         # pip's install plan in a fresh venv with a CPU torch (PyPI)
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from sftlib.notebook.colab import constraints, drive_folder

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "sftlib" / "notebook" / "colab.py"
TORCHVISION = {"2.13.0": "0.28.0", "2.14.0": "0.29.0", "2.14.1": "0.29.1"}  # torch -> its torchvision release


def test_constraints_pin_the_installed_torch_family_and_nothing_else():
    pins = dict(line.split("==") for line in constraints().splitlines())
    assert pins["torch"] == importlib.metadata.version("torch")
    assert all(name in ("torch", "torchvision", "torchaudio", "triton") or name.startswith("nvidia-")
               for name in pins), pins
    assert "transformers" not in pins and "unsloth" not in pins


def test_the_script_runs_before_sftlib_is_importable(tmp_path):
    """The install cell runs the file from the fresh clone: it must need nothing but the standard library."""
    out = subprocess.run([sys.executable, "-I", str(SCRIPT), "constraints", str(tmp_path / "c.txt")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    text = (tmp_path / "c.txt").read_text()
    assert f"torch=={importlib.metadata.version('torch')}\n" in text
    bad = subprocess.run([sys.executable, "-I", str(SCRIPT), "nonsense"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_drive_folder_outside_colab_keeps_the_folder_and_says_why(capsys):
    assert "google.colab" not in sys.modules
    assert drive_folder("", "outputs/x") == "outputs/x"
    assert capsys.readouterr().out == ""
    assert drive_folder("sftlib/run1", "outputs/x") == "outputs/x"
    assert "DRIVE_FOLDER is for Colab" in capsys.readouterr().out
    assert drive_folder("sftlib/run1") is None  # None: the preset's folder


def test_the_install_cell_uses_the_constraints():
    shared = (REPO / "notebooks" / "src" / "_shared.py").read_text()
    assert '"sftlib/sftlib/notebook/colab.py", "install", "sftlib"' in shared
    assert "-r\", \"sftlib/requirements.txt\"" not in shared  # no install that could replace torch


@pytest.mark.slow
def test_pip_keeps_a_preinstalled_torch(tmp_path):
    """A fresh venv with the torch family preinstalled (torch, torchvision and triton, as Colab has its own),
    then pip's plan for requirements.txt under the constraints: no torch, torchvision, torchaudio, triton or
    nvidia-* wheel is to be installed. (Without the constraints pip plans torch 2.14 and 15 nvidia-* wheels.)"""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    torch_version = importlib.metadata.version("torch").split("+")[0]
    subprocess.run([python, "-m", "pip", "install", "-q", f"torch=={torch_version}"], check=True, timeout=900)
    # the torchvision built for this torch (--no-deps: it must not pull another torch), and a triton
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", f"torchvision=={TORCHVISION[torch_version]}",
                    "triton"], check=True, timeout=900)
    constraints_file = tmp_path / "constraints.txt"
    subprocess.run([python, str(SCRIPT), "constraints", str(constraints_file)], check=True, timeout=60)
    assert "torch==" in constraints_file.read_text()
    report = tmp_path / "report.json"
    out = subprocess.run([python, "-m", "pip", "install", "--dry-run", "-q", "--report", str(report),
                          "-c", str(constraints_file), "-r", str(REPO / "requirements.txt")],
                         capture_output=True, text=True, timeout=1500, env={**os.environ, "PIP_NO_INPUT": "1"})
    assert out.returncode == 0, f"pip could not plan the install:\n{out.stderr[-3000:]}"
    planned = {item["metadata"]["name"].lower(): item["metadata"]["version"]
               for item in json.loads(report.read_text())["install"]}
    replaced = sorted(n for n in planned if n in ("torch", "torchvision", "torchaudio", "triton")
                      or n.startswith("nvidia-"))
    assert replaced == [], f"pip would install {[f'{n} {planned[n]}' for n in replaced]}"
    assert "unsloth" in planned  # the plan is the real one
