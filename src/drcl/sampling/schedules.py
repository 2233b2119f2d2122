"""Schedules for the dynamic-rebalancing weight ``alpha``.

2DRCL moves ``alpha`` from 1 (image-level frequencies, i.e. RFS) at the start of
pre-training to 0 (instance-level frequencies) at the end. ``p`` is training progress in
``[0, 1]`` (values outside are clamped), ``a0 = start`` and ``a1 = end``:

* ``linear``: ``alpha(p) = a0 + (a1 - a0) * p``
* ``cosine``: ``alpha(p) = a1 + (a0 - a1) * (1 + cos(pi * p)) / 2``
* ``step``:   ``steps`` equal pieces of ``[0, 1]`` with evenly spaced constant values:
  ``alpha(p) = a0 + (a1 - a0) * i / (steps - 1)`` with ``i = min(floor(p * steps), steps - 1)``.
  E.g. ``steps=4`` from 1 to 0 gives 1 on ``[0, 1/4)``, 2/3 on ``[1/4, 1/2)``, 1/3 on
  ``[1/2, 3/4)`` and 0 on ``[3/4, 1]``.

Every kind returns exactly ``start`` at ``p <= 0`` and exactly ``end`` at ``p >= 1``, and is
monotone in ``p`` (non-increasing when ``start >= end``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["SCHEDULES", "AlphaSchedule", "ScheduleKind", "alpha_schedule"]

ScheduleKind = Literal["linear", "cosine", "step"]
SCHEDULES: tuple[str, ...] = ("linear", "cosine", "step")


def _check(kind: str, start: float, end: float, steps: int) -> None:
    if kind not in SCHEDULES:
        raise ValueError(f"unknown alpha schedule {kind!r}; expected one of {SCHEDULES}")
    for name, value in (("start", start), ("end", end)):
        if not 0.0 <= value <= 1.0:  # also rejects NaN
            raise ValueError(f"alpha schedule {name} must be in [0, 1], got {value!r}")
    if isinstance(steps, bool) or int(steps) != steps or steps < 2:
        raise ValueError(f"alpha schedule steps must be an integer >= 2, got {steps!r}")


def alpha_schedule(
    progress: float,
    kind: ScheduleKind = "linear",
    start: float = 1.0,
    end: float = 0.0,
    steps: int = 4,
) -> float:
    """``alpha`` at training progress ``progress`` (clamped to ``[0, 1]``).

    Args:
        progress: fraction of pre-training done; values outside ``[0, 1]`` are clamped.
        kind: ``"linear" | "cosine" | "step"`` (formulas in the module docstring).
        start: alpha at progress 0, in ``[0, 1]``.
        end: alpha at progress 1, in ``[0, 1]``.
        steps: number of constant pieces for ``"step"`` (>= 2); ignored otherwise but
            validated.

    Returns:
        alpha as a Python float.
    """
    start, end, progress = float(start), float(end), float(progress)
    _check(kind, start, end, steps)
    if math.isnan(progress):
        raise ValueError("progress must be a number, got nan")
    if progress <= 0.0:
        return start
    if progress >= 1.0:
        return end
    if kind == "linear":
        value = start + (end - start) * progress
    elif kind == "cosine":
        value = end + (start - end) * (1.0 + math.cos(math.pi * progress)) / 2.0
    else:
        piece = min(int(math.floor(progress * steps)), int(steps) - 1)
        if piece == int(steps) - 1:
            return end
        value = start + (end - start) * piece / (int(steps) - 1)
    # Rounding can overshoot an endpoint by an ulp (0.7 + (0.1 - 0.7) < 0.1); clamping keeps
    # the value between start and end and the schedule monotone.
    return min(max(value, min(start, end)), max(start, end))


@dataclass(frozen=True)
class AlphaSchedule:
    """A configured :func:`alpha_schedule`; call it with the progress.

    ``AlphaSchedule("cosine")(0.5) == 0.5``. Build one from a config mapping with
    ``AlphaSchedule(**cfg)``.
    """

    kind: ScheduleKind = "linear"
    start: float = 1.0
    end: float = 0.0
    steps: int = 4

    def __post_init__(self) -> None:
        _check(self.kind, float(self.start), float(self.end), self.steps)

    def __call__(self, progress: float) -> float:
        return alpha_schedule(progress, self.kind, self.start, self.end, self.steps)
