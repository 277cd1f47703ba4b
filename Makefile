# nanoseek: the two commands a newcomer needs are `make speedrun` and `make test`.
# Both create .venv on first use (pinned CPU torch first, then the package with its dev extra).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup speedrun test clean

setup: $(STAMP)

# constraints.txt pins every package to the versions the tests were run with (see the README's
# "Updating the pins"); the CPU torch wheel goes first, since a bare `torch` would pull a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

speedrun: $(STAMP)
	$(BIN)/nanoseek speedrun

# the layer contracts (import-linter, pyproject.toml), then the whole suite
test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
