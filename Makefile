# moelab: `make demo` trains the tiny MoE and writes its report; `make test` runs the tests.
# Both set up .venv on a fresh clone. torch is installed first and pinned: an unpinned torch
# would pull a multi-GB CUDA build; torch==2.13.0 is a CPU build available locally.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e ".[dev,harness]"
	touch $@

setup: $(VENV)/.installed

# lint-imports: the layering contract in pyproject.toml (docs/architecture.md)
test: $(VENV)/.installed-test
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(PY) -m moelab.cli.demo

# moelab against transformers and AoE against MoE, side by side; rewrites BENCHMARKS.md
bench: setup
	$(VENV)/bin/moelab bench all --compile --markdown BENCHMARKS.md --out runs/bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
