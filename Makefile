# The two commands of the README: `make bench` (the main job) and `make test`. Each sets up everything first:
# a venv with the pinned requirements, then the package and its C++/CUDA extension built against that torch.
VENV ?= .venv
PY := $(VENV)/bin/python
# The nvcc on PATH may be a wrapper script from which torch guesses CUDA_HOME wrong: use the toolkit root.
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda-13.0 /usr/local/cuda))
export CUDA_HOME
MAX_JOBS ?= $(shell nproc)
export MAX_JOBS
BENCH_ARGS ?=
# CUTLASS's C++ headers for the extension's Hopper engine (the wheel's Python dependencies are not needed for them).
CUTLASS_WHEEL := nvidia-cutlass==4.2.0.0

.PHONY: setup test bench

$(VENV)/.installed: requirements-test.txt setup.py $(shell find csrc -type f)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps $(CUTLASS_WHEEL)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest tests benchmarks --benchmark-disable -q

bench: setup
	$(PY) -m fused_resnet.check --save bench-out/parity.md
	$(PY) -m fused_resnet.bench $(BENCH_ARGS)
