# Every target installs what it needs into $(VENV) first, so each works on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
# An existing torch (CPU or CUDA, in the venv or the system site) is kept; otherwise this one is installed.
# On a machine with the CPU wheel in pip's find-links it takes that; elsewhere PyPI's build for the platform.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test bench lint clean gpu-wheels gpu-check

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

# A GPU machine's own python3 and CUDA torch, as they are: no venv, no registry. What its image lacks comes
# from .whl/, which `make gpu-wheels` fills beforehand on a machine that reaches PyPI (for the GPU's python).
gpu-check:
	python3 bench/gpu_check.py

# datasets 5 needs pyarrow >= 24 (gpu_check upgrades an older one; the wheel is ~47 MB of the device's 64 MiB per
# call); torchao is QLoRA's quantizer, for the gpu test of NF4 weights quantized on the device.
GPU_PYTHON ?= 3.12
GPU_WHEELS := datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.13.4 pydantic-core==2.46.4 \
	annotated-types==0.7.0 typing-inspection==0.4.2 tomli-w==1.2.0 pyarrow==24.0.0 torchao==0.18.0
gpu-wheels:
	rm -rf .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

lint: install
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check lorafit tests bench

clean:
	rm -rf $(VENV) build *.egg-info
