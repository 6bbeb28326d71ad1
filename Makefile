# Quick start: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv with the standard library's venv on first use and
# install the project (editable) with the extras they need.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check

# The suites that also run on Python 3.12 and 3.13 and on the oldest numba
# allowed (see .ci/other-pythons): the engine's contract and lifecycle, and
# the batch tests that touch the standard library most (output
# forwarding: dup2, poll, logging).
CORE := tests/test_engine.py tests/test_first_run.py tests/test_lifecycle.py \
        tests/test_descriptors.py tests/test_blocks.py tests/test_async.py \
        tests/test_batch.py::test_prints_and_logging_reach_the_caller_tagged \
        tests/test_batch.py::test_a_print_right_before_a_segfault_is_not_lost

# The parts of `make test`.  Every part runs, whatever an earlier one did;
# the run fails at the end, naming the parts that failed.
TEST_PARTS := test-main test-others

# make stress: the seeded chaos run (tests/chaos.py) for DURATION seconds,
# or one episode again with SEED=... (WORKERS=... to fix the worker count).
DURATION ?= 1800

.PHONY: demo test $(TEST_PARTS) stress bench clean

# One stamp per set of extras, so `make demo` installs only the core and
# `make test` adds what the tests need (peers, Dask, Jupyter).
$(VENV)/.installed-core: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[test]'
	@touch $@ $(VENV)/.installed-core

demo: $(VENV)/.installed-core
	$(BIN)/shmarray demo

test: $(VENV)/.installed-test
	@failed=""; \
	for part in $(TEST_PARTS); do \
	    echo "== make $$part"; \
	    $(MAKE) --no-print-directory $$part || failed="$$failed $$part"; \
	done; \
	if [ -n "$$failed" ]; then \
	    echo "== make test FAILED: these parts failed:$$failed"; exit 1; \
	fi; \
	echo "== make test: every part passed"

test-main: $(VENV)/.installed-test
	$(BIN)/python -m pytest --durations=20

stress: $(VENV)/.installed-test
	$(BIN)/python tests/chaos.py $(if $(SEED),--seed $(SEED),--seconds $(DURATION)) \
	    $(if $(WORKERS),--workers $(WORKERS))

test-others:
	.ci/other-pythons $(CORE)

bench: $(VENV)/.installed-test
	$(BIN)/python -m pytest bench --benchmark-only --benchmark-autosave

clean:
	rm -rf $(VENV) .venv-* .benchmarks .hypothesis
