# gims — developer entry points. Every target works on a fresh Debian 12 machine as root.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.deps-stamp

.PHONY: deps build check test unit demo sandbox sandbox-down bench clean

# Install the Debian packages and the venv the project needs (idempotent).
deps: $(STAMP)
$(STAMP): .ci/apt-packages.txt requirements-test.txt pyproject.toml
	tools/install-deps.sh $(VENV)
	touch $@

# The C accelerators of the capture path (capture_daemon/_accel_*.c), built in place so the
# repository's code (tests, sandbox, demo) runs with them.
build: deps
	$(PY) setup.py -q build_ext --inplace

# The test suite, integration tests included (they need root: namespaces, systemd sandbox).
check: build
	$(PY) -m pytest -p no:cacheprovider tests

test: check

# Unit tests only (no root needed for most).
unit: build
	$(PY) -m pytest -p no:cacheprovider tests -m "not integration"

# The main job end to end.
demo: build
	tools/demo.sh

# A throwaway capture node: systemd in a PID+mount namespace, units, polkit, traffic, gimsd on :8001.
sandbox: build
	sandbox/up.sh

sandbox-down:
	sandbox/down.sh

bench: build
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info capture_daemon/_accel_*.so
