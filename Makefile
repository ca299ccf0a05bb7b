# `make demo` and `make test` each set up their own virtual environment (.venv) on first use.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

$(VENV)/.installed: pyproject.toml setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0  # the CPU build; an unpinned torch pulls a CUDA build
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

.PHONY: install demo test lint
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/specmd demo

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest
