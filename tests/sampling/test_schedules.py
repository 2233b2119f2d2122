"""Alpha schedules: endpoints, monotonicity, formulas."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drcl.sampling import SCHEDULES, AlphaSchedule, alpha_schedule

unit = st.floats(min_value=0.0, max_value=1.0)


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("start, end", [(1.0, 0.0), (0.7, 0.1), (0.9, 0.3), (0.2, 0.8), (0.5, 0.5)])
def test_endpoints_exact_and_clamped(kind, start, end):
    assert alpha_schedule(0.0, kind, start, end) == start
    assert alpha_schedule(1.0, kind, start, end) == end
    assert alpha_schedule(-3.0, kind, start, end) == start
    assert alpha_schedule(7.5, kind, start, end) == end
    for i in range(101):
        assert min(start, end) <= alpha_schedule(i / 100, kind, start, end) <= max(start, end)


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(SCHEDULES),
    p=unit,
    q=unit,
    ends=st.tuples(unit, unit),
    steps=st.integers(2, 10),
)
def test_monotone_non_increasing(kind, p, q, ends, steps):
    start, end = max(ends), min(ends)
    lo, hi = min(p, q), max(p, q)
    earlier = alpha_schedule(lo, kind, start, end, steps)
    assert earlier >= alpha_schedule(hi, kind, start, end, steps)


def test_stays_between_start_and_end_despite_rounding():
    # end + (start - end) * (1 + cos(pi * p)) / 2 rounds to 0.09999999999999998 < start here;
    # the schedule must still never leave [start, end] (it feeds the alpha validation).
    p = 2.0**-28
    assert 0.1 <= alpha_schedule(p, "cosine", 0.1, 0.7) <= 0.7
    assert alpha_schedule(p, "cosine", 0.1, 0.7) == 0.1


def test_linear_values():
    assert alpha_schedule(0.25) == 0.75
    assert alpha_schedule(0.5, "linear", 0.8, 0.2) == pytest.approx(0.5)


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.75, 0.9])
def test_cosine_formula(p):
    start, end = 0.9, 0.2
    expected = end + (start - end) * (1 + math.cos(math.pi * p)) / 2
    assert alpha_schedule(p, "cosine", start, end) == pytest.approx(expected, abs=1e-15)
    assert alpha_schedule(0.5, "cosine") == pytest.approx(0.5)


def test_step_values():
    values = {0.0: 1.0, 0.2: 1.0, 0.25: 2 / 3, 0.49: 2 / 3, 0.5: 1 / 3, 0.74: 1 / 3, 0.75: 0.0}
    for p, expected in values.items():
        assert alpha_schedule(p, "step", steps=4) == pytest.approx(expected, abs=1e-15), p
    two = [alpha_schedule(p, "step", steps=2) for p in (0.0, 0.49, 0.5, 1.0)]
    assert two == [1.0, 1.0, 0.0, 0.0]
    assert alpha_schedule(0.9, "step", 0.7, 0.1, steps=5) == 0.1  # last piece is end, exactly


def test_alpha_schedule_object():
    schedule = AlphaSchedule("cosine", 0.9, 0.1)
    for p in (0.0, 0.3, 1.0):
        assert schedule(p) == alpha_schedule(p, "cosine", 0.9, 0.1)
    assert AlphaSchedule()(0.25) == 0.75
    assert AlphaSchedule(**{"kind": "step", "steps": 3})(0.5) == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.kind = "linear"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "exp"}, "schedule"),
        ({"steps": 1}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"start": 1.5}, "start"),
        ({"end": -0.1}, "end"),
        ({"end": float("nan")}, "end"),
    ],
)
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        alpha_schedule(0.5, **kwargs)
    with pytest.raises(ValueError, match=match):
        AlphaSchedule(**kwargs)


def test_nan_progress():
    with pytest.raises(ValueError, match="progress"):
        alpha_schedule(float("nan"))
