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

train: setup
	$(BIN)/python train.py

test: setup
	$(BIN)/pytest -q
