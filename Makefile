# SmartRelay developer entry points. `make run` and `make check` are all a newcomer needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= etc/smartrelay.toml
# Editable install in "compat" mode puts the checkout on sys.path, so Twisted finds
# twisted/plugins/smartrelay_plugin.py and `twistd smartrelay` works from the checkout.
PIP_INSTALL := $(BIN)/pip install --quiet --disable-pip-version-check

.PHONY: run check lint typecheck test venv clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "error: Python 3.11 or newer is needed as '$(PYTHON)'" >&2; exit 1; }
	@$(PYTHON) -m venv $(VENV) || \
	  { echo "error: could not create $(VENV); on Debian run: apt-get install python3-venv" >&2; exit 1; }
	$(PIP_INSTALL) --upgrade pip setuptools wheel

$(VENV)/.run-installed: $(BIN)/python setup.cfg pyproject.toml
	$(PIP_INSTALL) -e . --config-settings editable_mode=compat
	@touch $@

$(VENV)/.test-installed: $(VENV)/.run-installed
	$(PIP_INSTALL) -e '.[test]' --config-settings editable_mode=compat
	@touch $@

venv: $(VENV)/.run-installed

run: $(VENV)/.run-installed
	@mkdir -p var
	$(BIN)/twistd --nodaemon --pidfile= smartrelay --config $(CONFIG)

lint: $(VENV)/.test-installed
	$(BIN)/ruff check smartrelay tests twisted bench
	$(BIN)/ruff format --check smartrelay tests twisted bench

typecheck: $(VENV)/.test-installed
	$(BIN)/mypy

test: $(VENV)/.test-installed
	$(BIN)/pytest $(PYTEST_ARGS)

check: lint typecheck test

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
