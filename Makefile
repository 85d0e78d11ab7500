# Everything installs into ./.venv; each target sets up what it needs on a machine that has only Python.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= What is the capital of France?

.PHONY: install install-dev serve chat pull test bench clean
HOST ?= 127.0.0.1
PORT ?= 8000

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Runtime only (no torch/transformers).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

# Runtime + test/reference tools (torch 2.13.0 CPU, transformers, pytest, hypothesis).
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

pull: install
	$(BIN)/flaxchat pull

# The OpenAI-compatible server with the default model (pulled on first use).
serve: install
	$(BIN)/flaxchat serve --host $(HOST) --port $(PORT)

# One answer from the default model on the command line.
chat: pull
	$(BIN)/flaxchat generate --prompt "$(PROMPT)"

test: install-dev
	$(BIN)/python -m pytest -q -rs --durations=10 -n auto --maxprocesses=2 --dist loadfile

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
