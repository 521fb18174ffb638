# The README's two commands: `make demo` and `make test`. Each sets itself up on a fresh machine
# that has only Python (3.10+): it creates .venv and installs the pinned versions first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# requirements/lock.txt pins every package (torch first: an unpinned torch pulls a CUDA build).
PIP_INSTALL := $(BIN)/python -m pip install --quiet --constraint requirements/lock.txt

.PHONY: install test lint demo lock clean

install: $(STAMP)

# laplace-torch (the LAP baseline) goes in by itself with --no-deps: its declared torchvision is a
# CUDA build on PyPI that breaks `import transformers` beside the CPU torch (requirements/laplace.txt).
$(STAMP): pyproject.toml requirements/lock.txt requirements/laplace.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) torch
	$(PIP_INSTALL) -e ".[test]"
	$(PIP_INSTALL) --no-deps -r requirements/laplace.txt
	touch $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports  # the layers in pyproject.toml [tool.importlinter]

test: lint
	$(BIN)/python -m pytest

demo: install
	$(BIN)/python jobs/sweep.py

# Rewrite the lock from the current environment (torch without its local +cpu label).
lock: install
	{ head -n 2 requirements/lock.txt; $(BIN)/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > requirements/lock.tmp
	mv requirements/lock.tmp requirements/lock.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
