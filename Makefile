# Two entry points (see README.md): `make lab` opens the course, `make test` runs the whole test suite.
# Both create .venv inside the checkout and install the course into it; a second run reinstalls
# nothing unless pyproject.toml changed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: lab test lint setup notebooks check-notebooks solutions grade-example clean

lab: $(STAMP)
	$(if $(MODE),COURSE_MODE=$(MODE) )$(VENV)/bin/jupyter lab --ServerApp.ip=127.0.0.1 --ServerApp.root_dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

test: $(STAMP) lint
	COURSE_FAST=1 $(PY) -m pytest -n 2 --dist loadscope $(PYTEST_ARGS)

# The rules a tool enforces: ruff (lint, import order) and pyright (basic mode) over course_utils/.
lint: $(STAMP)
	$(VENV)/bin/ruff check course_utils benchmarks tests
	$(VENV)/bin/pyright

setup: $(STAMP)

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python >= 3.10 is needed; set PYTHON=python3.11 or similar")'
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

# Maintainers: regenerate notebooks/ from solutions/, or re-run the solutions to refresh their outputs.
notebooks: $(STAMP)
	$(PY) -m course_utils.build

check-notebooks: $(STAMP)
	$(PY) -m course_utils.build --check

solutions: $(STAMP)
	$(PY) -m course_utils.build --execute

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
