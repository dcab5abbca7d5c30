"""Claims: one printed line per statement a notebook makes about its own results.

    >>> from course_utils.claims import claim
    >>> ok = claim("erasure removes the linear signal", acc < 0.15, accuracy=acc, chance=0.1)
    claim: erasure removes the linear signal: True (accuracy=0.103, chance=0.1)

Floats are printed to 3 significant digits, so the line is stable for nbval's comparison of
stored outputs. Every claim made in this process is kept (`claims_made()`), so a test can check
that none of them is False.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from course_utils.config import CFG

__all__ = ["Claim", "claim", "claims_made", "forget_claims", "format_value"]


@dataclass(frozen=True)
class Claim:
    """A statement, whether it held, the figures shown with it and the printed line."""

    statement: str
    holds: bool
    figures: dict[str, Any] = field(default_factory=dict)
    line: str = ""


_CLAIMS: list[Claim] = []


def format_value(value: Any) -> str:
    """How a figure is printed: floats (also 0-d tensors and numpy scalars) to 3 significant
    digits, ints and bools as they are, anything else with `str`."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()  # a 0-d tensor or numpy scalar
    if isinstance(value, (bool, numbers.Integral)):
        return str(value)
    if isinstance(value, numbers.Real):
        return f"{float(value):.3g}"
    return str(value)


def claim(statement: str, holds: Any, *, not_reproduced_in: Sequence[str] = (), **figures: Any) -> bool:
    """Print `claim: <statement>: True (name=value, ...)` (or False) and return `holds` as a bool.

        >>> claim("the edit keeps the image close", 31.4159 > 30, psnr=31.4159)
        claim: the edit keeps the image close: True (psnr=31.4)
        True

    `not_reproduced_in`: tiers ("ci", "laptop", "full") in which the course's own measured run did
    NOT reproduce the claim, as the notebook's prose says. There a False claim prints as
    `claim (not reproduced in the laptop tier, see the text): ...: False (...)`, so that it is not
    dropped quietly, yet a test that fails on unexpected `claim: ...: False` lines accepts it.
    """
    holds = bool(holds)
    shown = ", ".join(f"{k}={format_value(v)}" for k, v in figures.items())
    tier = CFG.mode
    head = (f"claim (not reproduced in the {tier} tier, see the text)" if not holds and tier in not_reproduced_in
            else "claim")
    line = f"{head}: {statement}: {holds}" + (f" ({shown})" if shown else "")
    print(line)
    _CLAIMS.append(Claim(statement, holds, dict(figures), line))
    return holds


def claims_made() -> list[Claim]:
    """Every claim made in this process so far, in order (a copy)."""
    return list(_CLAIMS)


def forget_claims() -> None:
    """Empty the list of claims made (for tests)."""
    _CLAIMS.clear()
