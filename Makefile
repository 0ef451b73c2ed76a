# Every target installs what it needs into $(VENV) first, so each works on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
# An existing torch (CPU or CUDA, in the venv or the system site) is kept; otherwise this one is installed.
# On a machine with the CPU wheel in pip's find-links it takes that; elsewhere PyPI's build for the platform.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test bench lint clean

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The demo starts over each time: its run folder is replaced, never resumed.
demo: install
	rm -rf runs/tiny-sst2
	$(VENV)/bin/lorafit train --recipe recipes/tiny-sst2.toml

test: install
	$(PY) -m pytest -n 2 --dist loadgroup -q --durations=10

bench: install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/run.py

lint: install
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check lorafit tests bench

clean:
	rm -rf $(VENV) build *.egg-info
