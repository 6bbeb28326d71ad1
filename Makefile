# Quick start: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv with the standard library's venv on first use and
# install the project (editable) with the extras they need.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: demo test bench clean

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
	$(BIN)/python -m pytest

bench: $(VENV)/.installed-test
	$(BIN)/python -m pytest bench --benchmark-only --benchmark-autosave

clean:
	rm -rf $(VENV) .benchmarks .hypothesis
