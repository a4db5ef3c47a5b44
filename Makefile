# Two commands on a fresh machine with Python 3.11 and pip:
#   make demo   - create .venv, install the CPU set, fine-tune the embedded tiny model offline
#   make test   - the same environment, then the test suite
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-cpu
GGUF_STAMP := $(VENV)/.installed-gguf

.PHONY: demo test install gguf-deps clean notebooks browser-test chromium

install: $(STAMP)

$(STAMP): requirements-cpu.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements-cpu.txt
	$(VENV)/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m sftlib demo

# GGUF export needs llama.cpp's converter and library, built from the llama-cpp-python source archive on
# PyPI: compiled once per machine (about 8 minutes on 2 cores) into ~/.cache/sftlib/llama-cpp, then
# reinstalled from that cached wheel in seconds. The GGUF tests fail without it, so `test` installs it.
gguf-deps: $(GGUF_STAMP)

$(GGUF_STAMP): $(STAMP) sftlib/exports/gguf/setup.py
	$(VENV)/bin/python -m sftlib gguf-setup
	touch $(GGUF_STAMP)

test: $(STAMP) $(GGUF_STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q

# The notebooks in JupyterLab in a real browser (tests/test_browser.py, a few minutes): Debian's chromium,
# installed when missing (as root, as CI runs); the test fails, saying why, when there is none.
chromium:
	command -v chromium >/dev/null 2>&1 || apt-get install -y chromium || (apt-get update && apt-get install -y chromium)

browser-test: $(STAMP) chromium
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q -m browser tests/test_browser.py

# Rewrite notebooks/*.ipynb, colab_badges.md and the README's notebook list from scripts/make_notebooks.py
# (this also strips any outputs a notebook was saved with).
notebooks: $(STAMP)
	$(VENV)/bin/python scripts/make_notebooks.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
