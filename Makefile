# `make train` and `make test` each set up .venv (CPU torch from the pinned wheel) and run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup train test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# glibc (Linux) allocator: keep freed large blocks in the heap instead of unmapping them and page-faulting
# them back on the next call (ignored elsewhere); README "Performance" has the measurements
ALLOC_ENV := MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824

train: setup
	$(ALLOC_ENV) $(BIN)/python train.py

test: setup
	$(BIN)/pytest -q
