# Two commands from a fresh machine: `make demo` and `make test` (each installs first).
# TORCH_SPEC pins the torch build used for the project's own venv (CI and the demo);
# override it to use another build, e.g. `make test TORCH_SPEC="torch torchvision"`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

# Tests run in 2 workers (pytest-xdist) with one thread each: the multi-process tests wait on each
# other, and one thread per worker keeps 2 cores busy without oversubscribing them.
PYTEST_WORKERS ?= 2

.PHONY: install test test-fast lint demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(PY) -m ruff check src tests benchmarks configs

test: install lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-fast: install lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

demo: install
	$(PY) -m nkd demo --out demo_out

bench: install
	$(PY) benchmarks/losses.py 2>/dev/null

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
