# Two entry points (see README.md): `make lab` opens the course, `make test` runs the whole test suite.
# Both create .venv inside the checkout and install the course into it from the lock
# (requirements.lock: every package pinned, with hashes); a second run reinstalls nothing unless
# pyproject.toml or the lock changed.
PYTHON    ?= python3
VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
LOCK      := requirements.lock
# uv (bootstrapped with pip into .venv) installs the lock in a fraction of pip's time; INSTALLER=pip
# installs the same lock with pip. Both use pip's own index settings (tools/uv_pip.py passes them to uv).
INSTALLER ?= uv
UV        := $(PY) tools/uv_pip.py
PYTEST_ARGS ?=

.PHONY: lab test lint setup update-lock check-lock test-pythons notebooks check-notebooks solutions \
	grade-example clean

lab: $(STAMP)
	$(if $(MODE),COURSE_MODE=$(MODE) )$(VENV)/bin/jupyter lab --ServerApp.ip=127.0.0.1 --ServerApp.root_dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

test: $(STAMP) lint
	COURSE_FAST=1 $(PY) -m pytest -n 2 --dist loadscope $(PYTEST_ARGS)

# The rules a tool enforces: ruff (lint, import order) and pyright (basic mode) over course_utils/.
lint: $(STAMP)
	$(VENV)/bin/ruff check course_utils benchmarks tests tools
	$(VENV)/bin/pyright

setup: $(STAMP)

$(PY):
	@$(PYTHON) tools/check_python.py
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml $(LOCK) | $(PY)
ifeq ($(INSTALLER),pip)
	$(PY) -m pip install --require-hashes -r $(LOCK)
	$(PY) -m pip install --no-deps -e .
else
	$(UV) pip install --python $(PY) --require-hashes -r $(LOCK)
	$(UV) pip install --python $(PY) --no-deps -e .
endif
	touch $(STAMP)

# Maintainers: re-resolve the lock from pyproject.toml (newest versions that fit; the Python range is
# pyproject's requires-python, one set of pins per interpreter where a package needs it). Hashes come from
# the primary index only: a local mirror added with extra-index-url may hold only some of a release's files.
LOCK_ARGS = pip compile pyproject.toml --extra test --universal --generate-hashes --no-annotate \
	--python-version $(shell $(PYTHON) tools/check_python.py --lowest) \
	--custom-compile-command "make update-lock" --quiet
update-lock: | $(PY)
	UV_EXTRA_INDEX_URL= UV_FIND_LINKS= $(UV) $(LOCK_ARGS) --upgrade -o $(LOCK)
	$(PY) tools/lock.py stamp $(LOCK)

# CI: the lock still resolves pyproject.toml (uv keeps every pin it can; a difference means a
# dependency was added, removed or re-ranged without `make update-lock`).
check-lock: | $(PY)
	$(PY) tools/lock.py check $(LOCK)
	cp $(LOCK) $(VENV)/lock-check.txt
	UV_EXTRA_INDEX_URL= UV_FIND_LINKS= $(UV) $(LOCK_ARGS) -o $(VENV)/lock-check.txt
	$(PY) tools/lock.py stamp $(VENV)/lock-check.txt
	@diff -u $(LOCK) $(VENV)/lock-check.txt || { echo "requirements.lock does not match pyproject.toml: run make update-lock"; exit 1; }

# The lowest and highest Python that pyproject.toml supports, each in its own venv (.venv/pythons/),
# installed from the lock, running the suite without the notebook runs (00_orientation's ci tier included).
test-pythons: $(STAMP)
	$(PY) tools/test_pythons.py $(PYTEST_ARGS)

# Maintainers: regenerate notebooks/ from solutions/, or re-run the solutions to refresh their outputs.
notebooks: $(STAMP)
	$(PY) -m course_utils.build

check-notebooks: $(STAMP)
	$(PY) -m course_utils.build --check

solutions: $(STAMP)
	$(PY) -m course_utils.build --execute

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
