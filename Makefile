# Two commands on a fresh machine with Python 3.11 and pip:
#   make demo   - create .venv, install the CPU set, fine-tune the embedded tiny model offline
#   make test   - the same environment, then the test suite
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-cpu

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): requirements-cpu.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements-cpu.txt
	$(VENV)/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m sftlib demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) outputs .pytest_cache
