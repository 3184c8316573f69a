# lpld developer commands. `make install` then `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test test-slow test-gpu lint format bench bench-gpu demo clean

install:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c .ci/constraints.txt -e ".[dev]"

test:
	$(BIN)/python -m pytest -m "not slow and not gpu" -x

test-slow:
	$(BIN)/python -m pytest -m "slow"

test-gpu:
	$(BIN)/python -m pytest -m gpu

lint:
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format:
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

bench:
	$(BIN)/python -m lpld.bench

bench-gpu:
	$(BIN)/python -m lpld.bench --device cuda

demo:
	$(BIN)/python run.py

clean:
	rm -rf outputs multirun artifacts bench/results.json bench/results-cuda.json
