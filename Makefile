# SmartRelay developer entry points. `make run` and `make check` are all a newcomer needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= etc/smartrelay.toml
# Twisted finds plugins by scanning sys.path for twisted/plugins/ folders, which an editable
# install's import hook does not provide; a .pth file puts the checkout itself on sys.path so
# `twistd smartrelay` runs this checkout's code from any working directory.
PIP_INSTALL := $(BIN)/pip install --quiet --disable-pip-version-check

.PHONY: run check lint typecheck test venv clean bench bench-queue

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "error: Python 3.11 or newer is needed as '$(PYTHON)'" >&2; exit 1; }
	@$(PYTHON) -m venv $(VENV) || \
	  { echo "error: could not create $(VENV); on Debian run: apt-get install python3-venv" >&2; exit 1; }
	$(PIP_INSTALL) --upgrade pip setuptools wheel

$(VENV)/.run-installed: $(BIN)/python setup.cfg pyproject.toml
	$(PIP_INSTALL) -e .
	$(BIN)/python -c 'import os, site; open(os.path.join(site.getsitepackages()[0], \
	  "smartrelay-checkout.pth"), "w").write(os.getcwd() + "\n")'
	@touch $@

$(VENV)/.test-installed: $(VENV)/.run-installed
	$(PIP_INSTALL) -e '.[test]'
	@touch $@

venv: $(VENV)/.run-installed

run: $(VENV)/.run-installed
	@mkdir -p var
	$(BIN)/twistd --nodaemon --pidfile= smartrelay --config $(CONFIG)

lint: $(VENV)/.test-installed
	$(BIN)/ruff check
	$(BIN)/ruff format --check

typecheck: $(VENV)/.test-installed
	$(BIN)/mypy

test: $(VENV)/.test-installed
	$(BIN)/pytest $(PYTEST_ARGS)

check: lint typecheck test

# Postfix vs SmartRelay (SQLite, PostgreSQL) on loopback, as root (a private Postfix instance);
# BENCH_ARGS=--quick for a smoke run. bench-queue: SmartRelay's memory with 100,000 queued
# messages (about 6 minutes).
bench: $(VENV)/.run-installed
	$(BIN)/python bench/relay.py $(BENCH_ARGS)

bench-queue: $(VENV)/.run-installed
	$(BIN)/python bench/relay.py --systems none --queue-run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
