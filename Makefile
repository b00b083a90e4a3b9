# The two commands a new user needs: `make demo` and `make test`. Each installs what it needs.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The offline switches (no telemetry, no hub downloads) are set by the `imagen` command itself
# (imagen.cli.OFFLINE_ENV) and by tests/conftest.py.
# dvc.yaml's stage commands (`imagen ...`) and `dvc` itself come from the venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
UI_PORT ?= 5000
PREFECT_PORT ?= 4200

.PHONY: install test test-all lint format demo ui prefect bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# the test oracle: nemo_toolkit 2.4.0, the last release with Imagen (tests/nemo_oracle)
	$(BIN)/pip install -q --no-deps nemo_toolkit==2.4.0 einops
	touch $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Every test, slow and integration ones included (a tiny end-to-end `dvc repro`, a real
# Prefect server + deployment run); the slowest are listed at the end. TEST_WORKERS pytest-xdist
# workers share the cores, a test file each at a time (its module fixtures are built once).
TEST_WORKERS ?= 2
test: install lint
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

# Set-up + `dvc repro` of the whole cascade on the embedded default, under one MLflow parent
# run, with a per-stage timing summary. A second `make demo` with nothing changed takes seconds.
demo: install
	$(BIN)/imagen pipeline repro

# The MLflow UI (SQLite store mlflow.db, artifacts in mlartifacts/) on 127.0.0.1.
ui: install
	$(BIN)/imagen pipeline ui --port $(UI_PORT)

# A local Prefect server (SQLite under .prefect/, 127.0.0.1) serving the deployment
# imagen/cascade-train; run it from another shell:
#   PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/prefect deployment run imagen/cascade-train
prefect: install
	$(BIN)/python -m flows.serve --port $(PREFECT_PORT)

# Throughput benchmarks of this machine (each script prints what it measured).
bench: install
	@set -e; for f in bench/bench_*.py; do echo "== $$f"; $(BIN)/python $$f; done

clean:
	rm -rf data/shards data/encoded data/encoder models reports mlflow.db mlartifacts .imagen
