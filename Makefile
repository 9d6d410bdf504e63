# Two commands do all set-up on a fresh machine:
#   make serve   create .venv, install rtcsignal, run the server (ARGS="--port 9000" to pass flags)
#   make test    install test dependencies (and, as root, Debian packages), run the whole suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: serve test lint fuzz bench conformance system-deps

serve: $(VENV)/.installed
	$(BIN)/rtcsignal serve $(ARGS)

# The suite runs on the compiled hot path (it must have been built), then the unit tests
# and the servers' core and abuse tests (the transport glue) again on the pure-Python
# modules alone (RTCSIGNAL_PURE=1).
test: system-deps $(VENV)/.test-installed
	$(BIN)/ruff check rtcsignal tests bench
	RTCSIGNAL_REQUIRE_COMPILED=1 $(BIN)/pytest $(PYTEST_ARGS)
	RTCSIGNAL_PURE=1 RTCSIGNAL_REQUIRE_COMPILED=1 $(BIN)/pytest tests/unit tests/test_core.py \
		tests/test_security_battery.py \
		-k "not test_speedups or test_compiled_path_in_use_when_required"

lint: $(VENV)/.test-installed
	$(BIN)/ruff check rtcsignal tests bench

fuzz: $(VENV)/.test-installed
	$(BIN)/python -m tests.fuzz_core --seconds $${FUZZ_SECONDS:-300}

bench: $(VENV)/.test-installed
	$(BIN)/python bench/run.py $(ARGS)

# Autobahn TestSuite cases 1-10 against the engine's echo harness (docs/conformance.md).
conformance: $(VENV)/.test-installed
	sh scripts/install-autobahn.sh && $(BIN)/python -m tests.conformance.run

system-deps:
	sh scripts/install-system-deps.sh

# setup.py and the .pyx sources: the compiled hot path is rebuilt when they change
$(VENV)/.installed: pyproject.toml setup.py rtcsignal/protocol/_speedups.pyx rtcsignal/core/_speedups.pyx rtcsignal/server/_speedups.pyx rtcsignal/_slots.pxd
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $@
