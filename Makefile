# Set-up and checks. `make test` and `make bench` create .venv on a fresh machine:
# torch (the CPU wheel unless TORCH_SPEC says otherwise) and msd with its [dev] extra,
# kernels compiled ahead of time against that torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

SOURCES := setup.py pyproject.toml $(shell find csrc msd_kernels -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' -o -name '_sources.py' \) 2>/dev/null)

.PHONY: setup test bench demo cuda-check wheel-check lint clean

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=70" wheel ninja
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

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
	rm -rf build dist *.egg-info msd_kernels/_C*.so $(VENV)
