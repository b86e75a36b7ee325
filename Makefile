# Two entry points, both doing their own set-up in .venv (idempotent: a second run skips what is installed).
#   make demo   - the main job
#   make test   - the whole test suite (what CI runs), on two pytest-xdist workers
#   make gpu-check - on a GPU machine, what only a GPU can settle (report in fastalign-gpu-check/)
# The venv sees the system site-packages, so an existing torch (e.g. a CUDA build) is kept; only when no torch is
# importable is torch==2.13.0 installed (the CPU build on this kind of machine).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: demo test bench gpu-check setup
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[hf,dev]"
	touch $@

demo: setup
	$(VENV)/bin/fastalign demo

bench: setup
	$(VENV)/bin/fastalign bench --op all
	$(VENV)/bin/fastalign bench --op dpo-long-pair

# On a CUDA machine: numerics, registers and speed in at most 8 minutes; ARGS=--dry-run runs it on CPU.
gpu-check: setup
	$(VENV)/bin/fastalign gpu-check $(ARGS)

test: setup
	$(PY) -m pytest -n 2
