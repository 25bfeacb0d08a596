# The README's two commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The CPU wheel of torch 2.13.0; an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test lint bench readme clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]" $(TORCH)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/remat demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q -n 2 --durations=10

bench: $(STAMP)
	$(PY) benchmarks/compare.py
	$(PY) benchmarks/peers.py

# Rewrites the command-line output blocks of README.md from the real commands (a test fails when one is stale).
readme: $(STAMP)
	$(PY) benchmarks/readme.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
