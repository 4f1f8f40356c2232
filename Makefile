# Everything a fresh machine needs: `make demo`, `make test` (BACKEND=jax|tensorflow|torch).
# `make examples` runs examples/*.yaml; `make test-fresh` follows README.md in a fresh venv.
PYTHON ?= python3
VENV := .venv
BACKEND ?= jax
PYTEST_ARGS ?=
# Test processes (pytest-xdist): the machines we test on have 2 cores; 0 runs in this process.
TEST_WORKERS ?= 2
BIN := $(VENV)/bin

.PHONY: demo examples test test-fresh test-all test-oldest bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# One stamp per backend: the venv gains a backend the first time it is asked for.
$(VENV)/.ready-%: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[dev,$*]"
	touch $@

# The demo writes its models where examples/*.yaml read them.
DEMO_DIR := examples/models

demo: $(VENV)/.ready-jax
	KERAS_BACKEND=jax $(BIN)/kmerge demo --out $(DEMO_DIR)

$(DEMO_DIR)/model_a.h5: | $(VENV)/.ready-jax
	KERAS_BACKEND=jax $(BIN)/kmerge demo --out $(DEMO_DIR)

# Every example recipe, on the demo's models (made first if missing); outputs in examples/out/.
# Then the example scripts (they train their own models).
examples: $(VENV)/.ready-jax $(DEMO_DIR)/model_a.h5
	for r in examples/*.yaml; do echo "=== kmerge run $$r"; \
	  KERAS_BACKEND=jax $(BIN)/kmerge run $$r || exit 1; done
	for s in examples/*.py; do echo "=== python $$s"; \
	  KERAS_BACKEND=jax $(BIN)/python $$s || exit 1; done

test: $(VENV)/.ready-$(BACKEND)
	KERAS_BACKEND=$(BACKEND) OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# README.md's Quickstart and "Using kmerge", command by command, in a copy of this tree with a
# fresh venv and a fresh HOME (minutes; needs the package index). FRESH=full also runs
# `make test`'s whole suite there (by default it runs tests/test_recipe.py).
FRESH ?= 1
test-fresh: $(VENV)/.ready-jax
	KMERGE_FRESH_VENV=$(FRESH) OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_fresh_venv.py

# The oldest Keras pyproject.toml admits ("keras>=X"), on jax, in a venv of its own.
KERAS_OLDEST := $(shell sed -n 's/.*"keras>=\([0-9.]*\)".*/\1/p' pyproject.toml)
OLDEST := .venv-oldest

$(OLDEST)/.ready: pyproject.toml
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install -q --upgrade pip
	$(OLDEST)/bin/pip install -q -e ".[dev,jax]" "keras==$(KERAS_OLDEST)"
	touch $@

test-oldest: $(OLDEST)/.ready
	KERAS_BACKEND=jax OMP_NUM_THREADS=1 $(OLDEST)/bin/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test-all:
	$(MAKE) test BACKEND=jax
	$(MAKE) test BACKEND=tensorflow
	$(MAKE) test BACKEND=torch
	$(MAKE) test-oldest

bench: $(VENV)/.ready-jax $(VENV)/.ready-bench
	for b in bench/bench_*.py; do KERAS_BACKEND=jax $(BIN)/python $$b || exit 1; done

lint: $(VENV)/.ready-jax
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) $(OLDEST) build *.egg-info src/*.egg-info
