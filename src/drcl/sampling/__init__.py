"""Dynamic rebalancing (docs/method.md, DRB): repeat factors, alpha schedules, the sampler.

The functions take a dataset as two int arrays over its annotations, ``image_index`` and
``category_index``, plus the numbers of images and categories; they are pure and
vectorised. :class:`RepeatFactorSampler` turns them into per-epoch, per-rank index lists.
"""

from .repeat_factors import (
    MODES,
    SHARE_SETTINGS,
    Mode,
    box_weights,
    category_frequencies,
    category_repeat_factors,
    choose_boxes,
    expected_sampling_share,
    image_repeat_factors,
    repeat_factors_for,
    sampling_shares,
)
from .sampler import RepeatFactorSampler
from .schedules import SCHEDULES, AlphaSchedule, ScheduleKind, alpha_schedule

__all__ = [
    "MODES",
    "SCHEDULES",
    "SHARE_SETTINGS",
    "AlphaSchedule",
    "Mode",
    "RepeatFactorSampler",
    "ScheduleKind",
    "alpha_schedule",
    "box_weights",
    "category_frequencies",
    "category_repeat_factors",
    "choose_boxes",
    "expected_sampling_share",
    "image_repeat_factors",
    "repeat_factors_for",
    "sampling_shares",
]
