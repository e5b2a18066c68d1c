# Everyday commands. `make demo` and `make test` each do all the set-up on a fresh machine first:
# a virtual environment in .venv with the CPU build of torch and patchdb installed in editable mode.

PYTHON ?= python3
VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
# Written when the set-up has finished; it is redone when the package's metadata or its C kernels change
# (pip compiles patchdb/_windows.c and patchdb/_clusters.c with the system's C compiler).
STAMP := $(VENV)/.patchdb-installed

# Sixteen samples, a class each (so each sees only its class's 100 training images): bbELS, exact (its time:
# benchmarks/RESULTS.md, "make demo").
DEMO_OPTIONS := --num 16 --conditional --seed 0
DEMO_OUT := out/demo

.PHONY: setup demo test

setup: $(STAMP)

# torch is pinned and installed before the package so that pip takes the CPU build on this project's machines' disk;
# an unpinned torch would pull a multi-GB CUDA build. Elsewhere PyPI's torch for Linux x86_64 is a CUDA build
# (what a GPU needs); for the CPU build there: make setup TORCH_PIP_OPTIONS='--index-url https://download.pytorch.org/whl/cpu'
TORCH_PIP_OPTIONS ?=

$(STAMP): setup.cfg setup.py pyproject.toml patchdb/_buffers.h patchdb/_exp2.h patchdb/_clusters.c patchdb/_clusters_kernel.h patchdb/_windows.c patchdb/_windows_isa.h patchdb/_windows_kernel.h
	test -x $(VENV_PYTHON) || $(PYTHON) -m venv $(VENV)
	$(VENV_PYTHON) -m pip install $(TORCH_PIP_OPTIONS) torch==2.13.0
	$(VENV_PYTHON) -m pip install -e '.[test]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/patchdb sample $(DEMO_OPTIONS) --out $(DEMO_OUT)

test: $(STAMP)
	$(VENV_PYTHON) -m pytest -q
