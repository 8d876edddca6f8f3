# Set-up in two commands: `make demo` and `make test` (each creates .venv and installs on first use);
# `make test-fast` is the fast tier (pytest -m "not slow"), `make lint` runs ruff (lint and format check).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-fast lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m cat_jax.demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --durations=25 tests

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf runs/demo
