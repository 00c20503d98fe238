# Set-up and checks. `make test` and `make bench` create .venv on a fresh machine:
# torch (the CPU wheel unless TORCH_SPEC says otherwise) and msd with its [dev] extra,
# kernels compiled ahead of time against that torch, and the newest transformers pip finds.
# `make test-oldest` runs the same suite in .venv-oldest, on the oldest transformers that
# pyproject.toml allows (its lower bound, read from there).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OLDEST_VENV ?= .venv-oldest
TORCH_SPEC ?= torch==2.13.0
TRANSFORMERS_OLDEST := $(shell sed -n 's/.*"transformers>=\([0-9.]*\).*/\1/p' pyproject.toml)
PYTEST_ARGS ?=

SOURCES := setup.py pyproject.toml $(shell find csrc msd_kernels -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' -o -name '_sources.py' \) 2>/dev/null)

.PHONY: setup test test-oldest bench demo cuda-check wheel-check lint clean

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=70" wheel ninja
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

$(OLDEST_VENV)/.installed: $(SOURCES)
	test -n "$(TRANSFORMERS_OLDEST)" || { echo "no transformers>= bound in pyproject.toml"; exit 1; }
	test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q --upgrade pip "setuptools>=70" wheel ninja
	$(OLDEST_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(OLDEST_VENV)/bin/python -m pip install -q --no-build-isolation -e ".[dev]" "transformers==$(TRANSFORMERS_OLDEST)"
	touch $@

test-oldest: $(OLDEST_VENV)/.installed
	$(OLDEST_VENV)/bin/python -m pytest tests $(PYTEST_ARGS)

bench: setup
	$(PY) -m pytest benchmarks --benchmark-enable --benchmark-only --benchmark-columns=min,median,mean,rounds $(PYTEST_ARGS)

# The embedded demo: the first run trains its models (minutes) and caches them; later runs
# start in seconds. DEMO_ARGS passes options, e.g. DEMO_ARGS="--seed 3 --question 'What is on the left?'".
demo: setup
	$(VENV)/bin/msd demo $(DEMO_ARGS)

cuda-check: setup
	PYTHON=$(PY) bash tools/cuda_check.sh

# The build-isolation path: a wheel without torch at build time ships the sources and
# compiles them on first import.
wheel-check: setup
	bash tools/wheel_check.sh $(PY)

lint: setup
	$(VENV)/bin/ruff check msd_kernels python tests benchmarks

clean:
	rm -rf build dist *.egg-info msd_kernels/_C*.so $(VENV) $(OLDEST_VENV)
