"""One switch for the whole course: fast mode (tests, CI) or full mode (learners).

Every notebook and every `course_utils` helper reads its sizes from `CFG`, never from
`os.environ` directly, so that `COURSE_FAST=1` shrinks data and training in one place.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _default_device() -> str:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Config:
    """Course-wide settings, read once from the environment.

    - `fast`: `COURSE_FAST=1` (the test suite and CI set it): small data, short training.
    - `seed`: `COURSE_SEED`, default 0. Every notebook seeds from it.
    - `device`: `COURSE_DEVICE`, default `"cuda"` when a GPU is present, else `"cpu"`.
    """

    fast: bool = False
    seed: int = 0
    requested_device: str | None = None

    @classmethod
    def from_env(cls) -> "Config":
        return cls(
            fast=_truthy(os.environ.get("COURSE_FAST")),
            seed=int(os.environ.get("COURSE_SEED", "0")),
            requested_device=os.environ.get("COURSE_DEVICE") or None,
        )

    @property
    def device(self) -> str:
        """`COURSE_DEVICE` if set, else "cuda" when a GPU is present, else "cpu" (torch is imported lazily)."""
        return self.requested_device or _default_device()

    def pick(self, fast: T, full: T) -> T:
        """`fast` in fast mode, else `full`: `n = CFG.pick(fast=2_000, full=50_000)`."""
        return fast if self.fast else full

    def describe(self) -> str:
        mode = "FAST (small data, short training)" if self.fast else "FULL"
        return f"course mode: {mode} · device: {self.device} · seed: {self.seed}"


CFG = Config.from_env()


def seed_everything(seed: int | None = None) -> int:
    """Seed python, numpy and torch; make torch deterministic where it allows. Returns the seed.

    In fast mode torch also runs on one thread (or `COURSE_THREADS`), because float sums, and so
    training runs, are only reproducible bit for bit for a fixed number of threads.
    """
    import random

    import numpy as np
    import torch

    seed = CFG.seed if seed is None else seed
    threads = os.environ.get("COURSE_THREADS")
    if threads or CFG.fast:
        # Training is bitwise reproducible only for a fixed thread count, so fast mode (tests, CI,
        # the stored solution outputs) always uses one; COURSE_THREADS overrides it.
        torch.set_num_threads(int(threads) if threads else 1)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False
    return seed
