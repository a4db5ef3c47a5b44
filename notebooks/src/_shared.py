# Cells every notebook shares, written once: a notebook source names one with a cell of its own
# whose header says `include="NAME"` (and whose body is empty); scripts/make_notebooks.py puts it in.

# %% name="install"
# Colab: fetch sftlib and install requirements.txt around Colab's own torch: the installed torch,
# torchvision, torchaudio, triton and nvidia-* versions are written to a pip constraints file, so pip
# keeps them (no 2.5 GB of CUDA wheels, no restart). Elsewhere this cell changes nothing: use the
# environment Jupyter runs in (`make install`, or `pip install -r requirements-cpu.txt` and `pip install -e .`).
import importlib.util
import os
import subprocess
import sys

if "google.colab" in sys.modules and importlib.util.find_spec("sftlib") is None:
    if not os.path.isdir("sftlib"):
        subprocess.run(["git", "clone", "--depth", "1", "https://github.com/{REPO}", "sftlib"], check=True)
    subprocess.run([sys.executable, "sftlib/sftlib/notebook/colab.py", "install", "sftlib"], check=True)
    sys.path.insert(0, os.path.abspath("sftlib"))
elif importlib.util.find_spec("sftlib") is None and os.path.isdir("../sftlib"):
    sys.path.insert(0, os.path.abspath(".."))  # opened from the notebooks/ folder of a checkout

# %% [markdown] name="parameters_note"
# ## Parameters
#
# Literals only, one per line, each with its range; papermill replaces this cell
# (`-p NAME VALUE`). `None` keeps the preset's value. Values derived from these come after the form.

# %% [markdown] name="form_note"
# ## Settings
#
# The form starts from the parameters above and the preset fills the rest; the parameters win over
# the preset, and your edits win over both. Hover a field for its help. Problems show in red before
# anything runs, and the last tab holds the resolved config as YAML, which
# `python -m sftlib train --config` takes as it is. Run without a browser, the form holds exactly
# the parameters.

# %% [markdown] name="results_note"
# ## Results
#
# The figures of this run as JSON, for papermill runs and the tests: written to `RESULTS_PATH`
# when it is set.
