"""Colab's install step and Google Drive, with nothing but the standard library.

The notebooks' first cell runs this file as a script from the fresh clone, before sftlib is importable:

    python sftlib/sftlib/notebook/colab.py install sftlib     # pip install, keeping Colab's torch
    python sftlib/sftlib/notebook/colab.py constraints c.txt  # only write the constraints file

and, once sftlib imports, a notebook puts its checkpoints on Drive with

    from sftlib.notebook import drive_folder
    OUTPUT_DIR = drive_folder(DRIVE_FOLDER, OUTPUT_DIR)   # "/content/drive/MyDrive/..." in Colab

Why constraints: Colab ships a CUDA torch with the torchvision, torchaudio, triton and nvidia-* wheels
built for it. requirements.txt allows torch < 2.15, but unsloth leaves torchvision and xformers
unpinned and a newer xformers needs a newer torch, so a plain `pip install -r requirements.txt`
replaces Colab's torch (about 2.5 GB of CUDA wheels, and a restart). Pinning every installed package
of that family with `-c` makes pip keep them and pick the releases that fit them instead.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys

# The packages that come with a CUDA torch build and must move together with it.
PINNED = ("torch", "torchvision", "torchaudio", "triton")
PINNED_PREFIXES = ("nvidia-",)
DRIVE_ROOT = "/content/drive"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> str:
    """pip constraints (`name==version`, one a line) for the installed torch family; "" when none is."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = _normalise(dist.metadata["Name"] or "")
        if name in PINNED or name.startswith(PINNED_PREFIXES):
            found[name] = dist.version
    return "".join(f"{name}=={version}\n" for name, version in sorted(found.items()))


def write_constraints(path: str) -> str:
    """Write `constraints()` to `path` (with a header saying why) and return the pins."""
    pins = constraints()
    with open(path, "w", encoding="utf-8") as f:
        f.write("# Written by sftlib's install step: keep the preinstalled torch and the packages built for it.\n")
        f.write(pins)
    return pins


def install(checkout: str = "sftlib") -> None:
    """pip install the checkout's requirements.txt without replacing the installed torch, then the checkout."""
    path = os.path.join(checkout, "constraints-installed.txt")
    pins = write_constraints(path)
    kept = ", ".join(line.split("==")[0] + " " + line.split("==")[1] for line in pins.splitlines()
                     if not line.startswith("nvidia-"))
    print(f"keeping the installed {kept or 'packages (no torch found: pip installs one)'}")
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "-c", path, "-r", os.path.join(checkout, "requirements.txt")], check=True)
    subprocess.run([*pip, "--no-deps", "-e", checkout], check=True)


def in_colab() -> bool:
    return "google.colab" in sys.modules


def drive_folder(folder: str, default: str | None = None) -> str | None:
    """`folder` on Google Drive (mounted first) when set and running in Colab; else `default`, saying why.

    A relative `folder` lies under MyDrive: "sftlib/run1" -> "/content/drive/MyDrive/sftlib/run1". Checkpoints
    there survive a disconnect, so running the notebook again resumes from them.
    """
    if not folder:
        return default
    if not in_colab():
        print(f"DRIVE_FOLDER is for Colab, where Google Drive can be mounted; here it is ignored and "
              f"checkpoints go to {default or 'the preset folder'} (set OUTPUT_DIR to choose a folder)")
        return default
    from google.colab import drive  # only in Colab

    if not os.path.isdir(os.path.join(DRIVE_ROOT, "MyDrive")):
        drive.mount(DRIVE_ROOT)
    path = folder if folder.startswith(DRIVE_ROOT) else os.path.join(DRIVE_ROOT, "MyDrive", folder.strip("/"))
    os.makedirs(path, exist_ok=True)
    print(f"checkpoints go to {path} on Google Drive: after a disconnect, run the notebook again to resume")
    return path


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "install":
        install(argv[1])
        return 0
    if argv and argv[0] == "constraints" and len(argv) <= 2:
        if len(argv) == 2:
            write_constraints(argv[1])
        else:
            sys.stdout.write(constraints())
        return 0
    print("usage: python colab.py install CHECKOUT | constraints [FILE]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
