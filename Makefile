# Quick start: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv with the standard library's venv on first use and
# install the project (editable) with the extras they need.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# $(call install,WHAT): pip install WHAT, its log shown only if it fails
install = $(PIP) $(1) >$(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }

# The suites that also run on Python 3.12 and 3.13 and on the oldest numba
# allowed (see .ci/other-pythons): the engine's contract and lifecycle, and
# the batch tests that touch the standard library most (output
# forwarding: dup2, poll, logging).
CORE := tests/test_engine.py tests/test_first_run.py tests/test_lifecycle.py \
        tests/test_descriptors.py tests/test_blocks.py tests/test_async.py \
        tests/test_batch.py::test_prints_and_logging_reach_the_caller_tagged \
        tests/test_batch.py::test_a_print_right_before_a_segfault_is_not_lost

# The parts of `make test`.  Every part runs, whatever an earlier one did;
# the run fails at the end, naming the parts that failed.  test-docs comes
# after test-main, whose notebook tests leave the executed notebooks that
# the gallery shows (build/executed/).
TEST_PARTS := test-lint test-types test-main test-others test-package test-docs

# The suites run in TEST_JOBS pytest processes (pytest-xdist): most tests
# wait on child interpreters starting.  Each process judges leaks by its own
# pids only, so they cannot see each other's blocks.  TEST_JOBS=0: one process.
TEST_JOBS ?= 2
export TEST_JOBS

# The other interpreters run the core suites at 2 workers; the 3- and
# 5-worker runs of the same suites are the main suite's.
OTHERS_K := not 3w and not 5w

# make stress: the seeded chaos run (tests/chaos.py) for DURATION seconds,
# or one episode again with SEED=... (WORKERS=... to fix the worker count).
DURATION ?= 1800

.PHONY: demo test $(TEST_PARTS) stress bench docs clean

# pip's log is shown only when it fails (a machine's own pip configuration
# may name indexes that warn on every install).
# One stamp per set of extras, so `make demo` installs only the core and
# `make test` adds what the tests need (peers, Dask, Jupyter).
$(VENV)/.installed-core: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing shmarray into $(VENV) (pip's log: $(VENV)/pip.log)"
	$(call install,-e .)
	@touch $@

$(VENV)/.installed-test: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing shmarray and the test tools into $(VENV) (pip's log: $(VENV)/pip.log)"
	$(call install,-e '.[test]')
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
	$(BIN)/python -m pytest -n $(TEST_JOBS) --durations=20

stress: $(VENV)/.installed-test
	$(BIN)/python tests/chaos.py $(if $(SEED),--seed $(SEED),--seconds $(DURATION)) \
	    $(if $(WORKERS),--workers $(WORKERS))

test-others:
	CORE_K="$(OTHERS_K)" .ci/other-pythons $(CORE)

test-lint: $(VENV)/.installed-test
	$(BIN)/ruff check shmarray kernels bench tests docs/_ext
	$(BIN)/ruff format --check shmarray kernels bench tests docs/_ext

test-types: $(VENV)/.installed-test
	$(BIN)/mypy

# A wheel and an sdist that twine accepts, and an sdist the tests can run from.
test-package: $(VENV)/.installed-test
	rm -rf build/dist
	$(BIN)/python -m build --outdir build/dist . >build/dist.log 2>&1 || { cat build/dist.log; exit 1; }
	$(BIN)/twine check --strict build/dist/*
	$(BIN)/python .ci/check-sdist build/dist/*.tar.gz

# The site, warnings as errors, into site/ (open site/index.html).  The
# gallery shows the notebooks as the test suite executed them; any that are
# missing or older than their source are executed first.
EXECUTED := $(patsubst notebooks/%,build/executed/%,$(wildcard notebooks/*.ipynb))

build/executed/%.ipynb: notebooks/%.ipynb $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -o addopts= -p no:cacheprovider tests/test_notebooks.py -k "fresh_kernel and $*"

docs test-docs: $(VENV)/.installed-test $(EXECUTED)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	@echo "the site is in site/: open site/index.html"

bench: $(VENV)/.installed-test
	$(BIN)/python -m pytest bench --benchmark-only --benchmark-autosave

clean:
	rm -rf $(VENV) .venv-* .benchmarks .hypothesis build site
