# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create the environment first; torch is installed pinned and alone so pip never pulls a CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0

.PHONY: env demo test bench bench-quick clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

.cache/.assets: $(VENV)/.installed scripts/fetch_assets.py
	$(PY) scripts/fetch_assets.py
	touch $@

env: .cache/.assets

demo: env
	$(PY) scripts/main.py

test: env
	$(PY) -m pytest -n 2 -q tests

bench: env
	$(PY) bench/run.py

bench-quick: env
	$(PY) bench/run.py --quick

clean:
	rm -rf $(VENV) .cache outputs
