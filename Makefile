# `make run` starts a whole pool here; `make test` runs every check CI runs.
# Both create .venv and install what they need on first use (llama-cpp-python builds
# from source once, a few minutes; pip caches the wheel).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint typecheck pytest size clean

run: $(VENV)/.run-deps
	$(BIN)/gputorrent up

test: $(VENV)/.dev-deps lint typecheck pytest

lint: $(VENV)/.dev-deps
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(VENV)/.dev-deps
	$(BIN)/mypy

pytest: $(VENV)/.dev-deps
	$(BIN)/pytest

size:
	@find src -name '*.py' | xargs wc -l | sort -n

$(VENV)/.python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "GPU Torrent needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@touch $@

$(VENV)/.run-deps: $(VENV)/.python pyproject.toml
	$(BIN)/pip install --quiet -e '.[llamacpp]'
	@touch $@

$(VENV)/.dev-deps: $(VENV)/.python pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@ $(VENV)/.run-deps

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
