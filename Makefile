# Quick start: `make demo`, `make test`. Everything installs into .venv from this repository's own files.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export RUGPT_DATA ?= $(abspath ../shared/data)
export DS_ACCELERATOR ?= cpu
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: setup test test-fast demo lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,clients]"
	touch $(STAMP)

# Two pytest workers (xdist), one per core: the Ray tests keep both cores busy, and a third worker (a third Ray)
# made the suite 20% more CPU work (1876-1919 against 1542 CPU-seconds here).
# Tests that share a module's server or cache carry the same xdist_group; long tests, then slow ones, go first.
# The package's bytecode is compiled first: with PYTHONDONTWRITEBYTECODE set (as on this machine), every Ray worker
# would compile it again at import.
test: setup
	$(VENV)/bin/ruff check rugpt_ray tests benchmarks jobs
	$(PY) -m compileall -q rugpt_ray
	$(PY) -m pytest -q -n 2 --dist loadgroup

# The developer loop: every test that starts no Ray, DeepSpeed or server (a few minutes on 2 cores).
test-fast: setup
	$(VENV)/bin/ruff check rugpt_ray tests benchmarks jobs
	$(PY) -m compileall -q rugpt_ray
	$(PY) -m pytest -q -n 2 -m "not slow"

demo: setup
	$(PY) -m rugpt_ray.demo

bench: setup
	$(PY) benchmarks/model_cpu.py

clean:
	rm -rf $(VENV) .pytest_cache
