# Two commands do everything from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format bench clean

$(STAMP): pyproject.toml setup.py requirements/constraints.txt torchwatch/kernels/_cstats.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: anything unpinned would fetch a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt torch
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/torchwatch demo --logdir runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e '.[bench]'
	$(BIN)/python benchmarks/overhead.py --json benchmarks/last-run.json

clean:
	rm -rf $(VENV) build *.egg-info torchwatch/kernels/*.so
