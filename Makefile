# Two commands from a fresh machine: `make demo` and `make test` (each installs first).
# TORCH_SPEC pins the torch build used for the project's own venv (CI and the demo);
# override it to use another build, e.g. `make test TORCH_SPEC="torch torchvision"`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install test lint demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(PY) -m ruff check src tests benchmarks configs

test: install lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(PY) -m nkd demo --out demo_out

bench: install
	$(PY) benchmarks/losses.py 2>/dev/null

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
