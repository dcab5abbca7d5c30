"""course_utils.claims: the exact printed line, rounding, the return value, claims_made()."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from course_utils import claims
from course_utils.claims import claim, claims_made


@pytest.fixture(autouse=True)
def _fresh() -> None:
    claims.forget_claims()


def test_line_format_and_return_value(capsys: pytest.CaptureFixture) -> None:
    accuracy = 0.10349
    held = claim("erasure removes the signal", accuracy < 0.15, accuracy=accuracy, chance=0.1)
    assert held is True
    assert claim("the probe fails", False, n=5000, exact=True) is False
    assert claim("no figures", 1) is True
    assert capsys.readouterr().out == (
        "claim: erasure removes the signal: True (accuracy=0.103, chance=0.1)\n"
        "claim: the probe fails: False (n=5000, exact=True)\n"
        "claim: no figures: True\n"
    )


@pytest.mark.parametrize("value, shown", [
    (3.14159, "3.14"), (2.0, "2"), (0.000123456, "0.000123"), (123456.7, "1.23e+05"),
    (-0.98765, "-0.988"), (float("nan"), "nan"), (7, "7"), (True, "True"),
    (torch.tensor(0.123456), "0.123"), (torch.tensor(5), "5"), (np.float32(0.5), "0.5"),
    (np.int64(12), "12"), ("text", "text"),
])
def test_rounding_to_three_significant_digits(value, shown: str) -> None:
    assert claims.format_value(value) == shown


def test_tensor_and_numpy_truth_values_become_bools(capsys: pytest.CaptureFixture) -> None:
    assert claim("tensor truth", torch.tensor(True)) is True
    assert claim("numpy truth", np.bool_(False)) is False
    assert capsys.readouterr().out.splitlines() == ["claim: tensor truth: True",
                                                    "claim: numpy truth: False"]


def test_claims_made_keeps_every_claim_in_order() -> None:
    claim("first", True, x=1.23456)
    claim("second", False)
    made = claims_made()
    assert [(c.statement, c.holds) for c in made] == [("first", True), ("second", False)]
    assert made[0].figures == {"x": 1.23456} and made[0].line == "claim: first: True (x=1.23)"
    assert [c.statement for c in made if not c.holds] == ["second"]
    made.clear()  # a copy: the record is untouched
    assert len(claims_made()) == 2


def test_a_claim_known_not_to_reproduce_in_this_tier_says_so(capsys, monkeypatch):
    from course_utils import claims
    from course_utils.config import Config

    monkeypatch.setattr(claims, "CFG", Config(requested_mode="laptop"))
    assert claims.claim("it falls", False, not_reproduced_in=("laptop",), step=64) is False
    assert claims.claim("it rises", True, not_reproduced_in=("laptop",)) is True
    assert claims.claim("it holds", False, not_reproduced_in=("ci",)) is False
    out = capsys.readouterr().out.splitlines()
    assert out == ["claim (not reproduced in the laptop tier, see the text): it falls: False (step=64)",
                   "claim: it rises: True", "claim: it holds: False"]
