# tuneloop: `make demo` and `make test` do all the set-up they need on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench load clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned, so nothing can pull a CUDA build in its place.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	TUNELOOP_HOME=$${TUNELOOP_HOME:-$(CURDIR)/.tuneloop} $(BIN)/tuneloop demo

test: $(STAMP)
	$(BIN)/python -m pytest

# Side-by-side speed figures; a table on stdout, the JSON in bench-results/speed.json.
bench: $(STAMP)
	$(BIN)/python -m tests.bench.bench_speed

# Mixed submissions, status reads and predictions for a minute; bench-results/load.json.
load: $(STAMP)
	$(BIN)/python -m tests.bench.load

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy jobs monitoring server

clean:
	rm -rf $(VENV) .tuneloop .pytest_cache .mypy_cache .ruff_cache
