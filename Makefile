# Quick start: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv with the standard library's venv on first use and
# install the project (editable) with the extras they need.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-test

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

demo: $(STAMP)
	$(BIN)/shmarray demo

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m pytest bench --benchmark-only --benchmark-autosave

clean:
	rm -rf $(VENV) .benchmarks .hypothesis
