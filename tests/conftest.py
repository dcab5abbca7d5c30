"""Shared test set-up: the ci tier always (root conftest.py), and a skip-with-reason for tests that
need offline assets."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def asset_or_skip(key: str) -> Path:
    """The offline asset `key` under COURSE_DATA_DIR, or skip the test saying how to provide it."""
    data = os.environ.get("COURSE_DATA_DIR")
    if not data:
        pytest.skip(f"needs the offline asset {key}: set COURSE_DATA_DIR (CI points it at ../shared/assets)")
    path = Path(data) / key
    if not path.exists():
        pytest.skip(f"needs the offline asset {path}; run `python -m course_utils.assets fetch`")
    return path


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT



# Fixtures that grade whole notebooks: every test that uses one is a notebook run, marked `slow` like the
# other notebook runs (so `make test-pythons`, which runs `-m "not slow"`, leaves them to `make test`).
NOTEBOOK_FIXTURES = frozenset({"graded", "hostile"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if NOTEBOOK_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
