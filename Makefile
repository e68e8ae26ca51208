# SmartRelay developer entry points. `make run` and `make check` are all a newcomer needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= etc/smartrelay.toml
# Twisted finds plugins by scanning sys.path for twisted/plugins/ folders, which an editable
# install's import hook does not provide; a .pth file puts the checkout itself on sys.path so
# `twistd smartrelay` runs this checkout's code from any working directory.
PIP_INSTALL := $(BIN)/pip install --quiet --disable-pip-version-check

# Ports for `make run`, without editing the config: `make run SMTP_PORT=3525 WEB_PORT=8081`.
# When one differs from the shipped config's, `make run` runs a copy of $(CONFIG) with those
# ports put in, $(RUN_CONFIG) (`make run-config` writes it alone).
SMTP_PORT ?= 2525
INBOUND_PORT ?= 2526
WEB_PORT ?= 8080
SINK_PORT ?= 2600
RUN_CONFIG ?= var/run.toml
ifeq ($(SMTP_PORT):$(INBOUND_PORT):$(WEB_PORT):$(SINK_PORT),2525:2526:8080:2600)
RUN_WITH := $(CONFIG)
else
RUN_WITH := $(RUN_CONFIG)
endif

.PHONY: run run-config check lint typecheck test venv clean bench bench-queue deb deb-check

# Byte-compile the checkout: with PYTHONDONTWRITEBYTECODE set (as in some CI and container
# environments) Python would otherwise compile every module from source in every process it
# starts: each twistd, delivery process and smartrelay-ctl the tests run took 0.15 s more.
# compileall writes the .pyc files anyway and skips those already up to date. `make run`
# compiles the relay's code only; `make test` also what the tests start (tests/, bench/).
COMPILE := $(BIN)/python -m compileall -q -j 0 smartrelay twisted/plugins

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "error: Python 3.11 or newer is needed as '$(PYTHON)'" >&2; exit 1; }
	@$(PYTHON) -m venv $(VENV) || \
	  { echo "error: could not create $(VENV); on Debian run: apt-get install python3-venv" >&2; exit 1; }
	$(PIP_INSTALL) --upgrade pip setuptools wheel

# requirements.txt pins what the Debian package ships; the venv gets the same versions.
$(VENV)/.run-installed: $(BIN)/python setup.cfg pyproject.toml requirements.txt
	$(PIP_INSTALL) -c requirements.txt -e .
	$(BIN)/python -c 'import os, site; open(os.path.join(site.getsitepackages()[0], \
	  "smartrelay-checkout.pth"), "w").write(os.getcwd() + "\n")'
	@touch $@

$(VENV)/.test-installed: $(VENV)/.run-installed
	$(PIP_INSTALL) -c requirements.txt -e '.[test]'
	@touch $@

venv: $(VENV)/.run-installed

run: $(VENV)/.run-installed
	@mkdir -p var
	@if [ "$(RUN_WITH)" != "$(CONFIG)" ]; then $(MAKE) --no-print-directory run-config; fi
	@$(COMPILE)
	$(BIN)/twistd --nodaemon --pidfile= smartrelay --config $(RUN_WITH)

# Each port of the shipped config (tcp:2525:, tcp:2526:, tcp:8080: and base_url's
# 127.0.0.1:8080, the sink smtp://127.0.0.1:2600) must be found, or nothing is written.
run-config:
	@mkdir -p $(dir $(RUN_CONFIG))
	@for pattern in 'tcp:2525:' 'tcp:2526:' 'tcp:8080:' '127.0.0.1:8080"' 'smtp://127.0.0.1:2600'; do \
	  grep -qF "$$pattern" $(CONFIG) || \
	  { echo "error: $(CONFIG) has no $$pattern to replace; edit a copy and use CONFIG=" >&2; exit 1; }; \
	done
	sed -e 's/tcp:2525:/tcp:$(SMTP_PORT):/' -e 's/tcp:2526:/tcp:$(INBOUND_PORT):/' \
	  -e 's/tcp:8080:/tcp:$(WEB_PORT):/' -e 's/127\.0\.0\.1:8080"/127.0.0.1:$(WEB_PORT)"/' \
	  -e 's|smtp://127\.0\.0\.1:2600|smtp://127.0.0.1:$(SINK_PORT)|' $(CONFIG) > $(RUN_CONFIG)

lint: $(VENV)/.test-installed
	$(BIN)/ruff check
	$(BIN)/ruff format --check

typecheck: $(VENV)/.test-installed
	$(BIN)/mypy

# pytest-xdist: one worker per core and one more (each with its own reactor, throwaway
# PostgreSQL and temp dirs): many tests wait on real servers and relays, so a third worker on
# two cores took the suite from 9:21 to 7:03. Tests are handed out as workers free up
# (worksteal: the long ones do not pile up at the end). `make test PYTEST_WORKERS=0` runs the
# suite in one process.
PYTEST_WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))
test: $(VENV)/.test-installed
	@$(COMPILE) tests bench
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

check: lint typecheck test

# Postfix vs SmartRelay (SQLite, PostgreSQL) on loopback, as root (a private Postfix instance),
# with a personalized load (bench/load.py: every message different, the same for every system);
# BENCH_ARGS=--quick for a smoke run, BENCH_ARGS="--shape newsletter" for the newsletter load.
# bench-queue: SmartRelay's memory with 100,000 queued messages (about 6 minutes; on
# PostgreSQL: BENCH_ARGS="--queue-engine postgresql").
bench: $(VENV)/.run-installed
	$(BIN)/python bench/relay.py $(BENCH_ARGS)

bench-queue: $(VENV)/.run-installed
	$(BIN)/python bench/relay.py --systems none --queue-run $(BENCH_ARGS)

# The Debian package (docs/install.md): dist/smartrelay_VERSION_ARCH.deb, built with
# dpkg-buildpackage from a copy of this checkout's files (tracked and new ones, not ignored
# ones, so `var/` and `.venv/` stay out), then checked by lintian. Build dependencies:
# apt-get install dh-virtualenv build-essential debhelper devscripts help2man python3-venv lintian
DEB_BUILD := build/deb
deb:
	@command -v dpkg-buildpackage >/dev/null && dpkg -s dh-virtualenv >/dev/null 2>&1 || \
	  { echo "error: to build the package: apt-get install dh-virtualenv build-essential" \
	    "debhelper devscripts help2man python3-venv lintian" >&2; exit 1; }
	rm -rf $(DEB_BUILD) && mkdir -p $(DEB_BUILD)/smartrelay dist
	git ls-files -z --cached --others --exclude-standard | \
	  tar --null -T - --ignore-failed-read -cf - | tar -xf - -C $(DEB_BUILD)/smartrelay
	cd $(DEB_BUILD)/smartrelay && dpkg-buildpackage -us -uc -b
	rm -f dist/smartrelay_*.deb && cp $(DEB_BUILD)/smartrelay_*.deb dist/
	lintian --fail-on error dist/smartrelay_*.deb
	@ls -l dist/smartrelay_*.deb

# Installs dist/smartrelay_*.deb on THIS machine (as root), runs the service's exact command
# line, sends mail through it, then purges the package (.ci/run does this after `make check`).
deb-check: $(VENV)/.test-installed
	SMARTRELAY_DEB=$$(ls dist/smartrelay_*.deb) $(BIN)/pytest -p no:xdist tests/deb

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
