"""Maintainer benchmarks of `course_utils`: `python -m benchmarks.bench` (see `bench.py`)."""
