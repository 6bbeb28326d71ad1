# Quick start: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv with the standard library's venv on first use and
# install the project (editable) with the extras they need.
#
# make test      lint, types, the main suite, the package checks and the
#                docs, all in the one environment .venv: the README's command,
#                meant to take at most 10 minutes on 2 CPUs from a fresh
#                clone, installs included.
# make test-all  make test, then the core suites on Python 3.12 and 3.13 and
#                on the oldest dependencies allowed, each in a venv of its own
#                (.ci/other-pythons): what CI runs (.ci/run).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# $(call install,WHAT): pip install WHAT, its log shown only if it fails
install = $(PIP) $(1) >$(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }

# The suites that make test-all also runs on Python 3.12 and 3.13 and on
# the oldest numba allowed (see .ci/other-pythons): the engine's contract
# and lifecycle, and the batch tests that touch the standard library most
# (output forwarding: dup2, poll, logging).
CORE := tests/test_engine.py tests/test_first_run.py tests/test_lifecycle.py \
        tests/test_descriptors.py tests/test_blocks.py tests/test_async.py \
        tests/test_batch.py::test_prints_and_logging_reach_the_caller_tagged \
        tests/test_batch.py::test_a_print_right_before_a_segfault_is_not_lost

# The parts of `make test`, and those `make test-all` adds.  Every part
# runs, whatever an earlier one did; the run fails at the end, naming the
# parts that failed.
# The package and docs checks stay in `make test`: they need no venv of
# their own and catch what a change breaks easily (a file left out of the
# sdist, a docstring or a page the strict site build refuses).  The other
# interpreters and the oldest dependencies each need a venv and a full
# install of their own (most of the old make test's time and disk), so
# they wait for test-all.
TEST_PARTS := test-lint test-types test-main test-package test-docs
TEST_ALL_PARTS := $(TEST_PARTS) test-others

# The suites run in TEST_JOBS pytest processes (pytest-xdist): most tests
# wait on child interpreters starting.  Each process judges leaks by its own
# pids only, so they cannot see each other's blocks.  TEST_JOBS=0: one process.
# Three on two CPUs keep both busy while a test waits (the main suite:
# 444 s with 3, 503 s with 2, on the 2-vCPU AMD EPYC VM).
TEST_JOBS ?= 3
export TEST_JOBS

# The other interpreters run the core suites at 2 workers; the 3- and
# 5-worker runs of the same suites are the main suite's.  A missing
# interpreter is skipped with a line that says so, and fails the run under
# CI=true (.ci/other-pythons).
OTHERS_K := not 3w and not 5w

# make stress: the seeded chaos run (tests/chaos.py) for DURATION seconds,
# or one episode again with SEED=... (WORKERS=... to fix the worker count,
# STORAGE=shm|memfd|dir the storage; by default each seed picks both).
DURATION ?= 1800

.PHONY: demo test test-all $(TEST_ALL_PARTS) stress bench docs screenshots gallery clean

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

# $(call run_parts,NAME,PARTS): make each part of PARTS, then say which failed.
define run_parts
@failed=""; \
for part in $(2); do \
    echo "== make $$part"; \
    $(MAKE) --no-print-directory $$part || failed="$$failed $$part"; \
done; \
if [ -n "$$failed" ]; then \
    echo "== make $(1) FAILED: these parts failed:$$failed"; exit 1; \
fi; \
echo "== make $(1): every part passed"
endef

test: $(VENV)/.installed-test
	+$(call run_parts,test,$(TEST_PARTS))

test-all: $(VENV)/.installed-test
	+$(call run_parts,test-all,$(TEST_ALL_PARTS))

# --durations: the slowest tests, so a slow one is seen when it lands.
test-main: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n $(TEST_JOBS) --durations=20

stress: $(VENV)/.installed-test
	$(BIN)/python tests/chaos.py $(if $(SEED),--seed $(SEED),--seconds $(DURATION)) \
	    $(if $(WORKERS),--workers $(WORKERS)) $(if $(STORAGE),--storage $(STORAGE))

test-others:
	CORE_K="$(OTHERS_K)" .ci/other-pythons $(CORE)

test-lint: $(VENV)/.installed-test
	$(BIN)/ruff check shmarray kernels bench tests docs/_ext
	$(BIN)/ruff format --check shmarray kernels bench tests docs/_ext

test-types: $(VENV)/.installed-test
	$(BIN)/mypy

# A wheel and an sdist that twine accepts, and an sdist the tests can run from.
test-package: $(VENV)/.installed-test
	rm -rf build/dist && mkdir -p build/dist
	$(BIN)/python -m build --outdir build/dist . >build/dist.log 2>&1 || { cat build/dist.log; exit 1; }
	$(BIN)/twine check --strict build/dist/*
	$(BIN)/python .ci/check-sdist build/dist/*.tar.gz

# The site, warnings as errors, into site/ (open site/index.html).  The
# gallery shows the notebooks as `make gallery` executed them (docs/showcase/).
# Not --quiet: mkdocs 1.6 then drops the warnings that --strict counts.
# Then each page type's layout at 1280 px and on a phone, in headless
# Chromium where it is installed (apt install chromium).
docs test-docs: $(VENV)/.installed-test
	mkdir -p build
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict >build/mkdocs.log 2>&1 \
	    || { grep -v '^INFO' build/mkdocs.log; exit 1; }
	$(BIN)/python docs/_ext/site_check.py site
	@echo "the site is in site/: open site/index.html"

# One screenshot per page type, at 1280 px and on a phone, into
# docs/screenshots/ (committed: what the site looked like at that commit).
screenshots: docs
	$(BIN)/python docs/_ext/site_check.py site --shots docs/screenshots

# The showcase: the demo's printout and the executed notebooks the README
# and the site show, from one run on a quiet machine, recorded
# (docs/_ext/gallery.py).  It refuses a busy machine; FORCE=1 runs anyway
# and says so in the record.  Commit docs/showcase/, README.md and
# docs/getting-started.md afterwards.
gallery: $(VENV)/.installed-test
	$(BIN)/python docs/_ext/gallery.py $(if $(FORCE),--force)

bench: $(VENV)/.installed-test
	$(BIN)/python -m pytest bench --benchmark-only --benchmark-autosave

clean:
	rm -rf $(VENV) .venv-* .benchmarks .hypothesis build site
