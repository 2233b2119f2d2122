"""An epoch-based, distributed repeat-factor sampler with 2DRCL's dynamic rebalancing.

In the style of detectron2's ``RepeatFactorTrainingSampler``: a plain
:class:`torch.utils.data.Sampler` with an explicit seed, rank and world size; the factors
come from the pure functions in :mod:`drcl.sampling.repeat_factors`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

from drcl.data.annotations import distinct_pairs

from .repeat_factors import (
    MODES,
    Mode,
    _check_annotations,
    category_frequencies,
    category_repeat_factors,
    image_repeat_factors,
)
from .schedules import AlphaSchedule

__all__ = ["RepeatFactorSampler"]


@dataclass(frozen=True)
class _Epoch:
    epoch: int
    alpha: float | None
    category_factors: np.ndarray
    image_factors: np.ndarray
    epoch_size: int  # draws of the epoch over all ranks, before padding
    indices: np.ndarray  # this rank's share, padded


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


class RepeatFactorSampler(Sampler[int]):
    """Draw each image ``floor(r) + Bernoulli(frac(r))`` times per epoch, shuffle, shard.

    Every epoch ``e``:

    1. factors: the category factors of ``mode`` (see
       :func:`~drcl.sampling.category_repeat_factors`) and the image factors
       ``r(I) = max_{c in I} r(c)``; for ``mode="dynamic"`` with a schedule, at
       ``alpha = schedule(progress(e))`` with ``progress(e) = e / max(1, total_epochs - 1)``
       (clamped to 1), so the first epoch uses alpha = ``schedule.start`` and the last
       epoch (``total_epochs - 1``) ``schedule.end``;
    2. stochastic rounding: image I appears ``floor(r(I)) + Bernoulli(frac(r(I)))`` times,
       so ``E[#draws of I] = r(I)``;
    3. shuffle (unless ``shuffle=False``: indices in increasing order);
    4. shard: the list is padded by wrapping around to a multiple of ``world_size`` (its
       first ``pad < world_size`` entries are appended again, like
       ``torch.utils.data.DistributedSampler`` with ``drop_last=False``) and rank ``k``
       takes entries ``k, k + world_size, ...``. Every rank gets the same number of
       indices, ``ceil(epoch_size / world_size)``, and the ranks together cover every draw
       of the epoch (plus the padding).

    Steps 2 and 3 use a NumPy generator seeded with ``SeedSequence((seed, epoch))``, the
    same on every rank, so all ranks agree on the epoch's list. Same seed, same order.

    The epoch's list is computed once and cached; ``len(sampler)`` is the number of indices
    the next ``iter(sampler)`` yields: ``num_samples``, less the resume position after
    :meth:`load_state_dict`.

    Args:
        image_index, category_index: int arrays (M,): the image and category of each
            annotation (see :mod:`drcl.sampling.repeat_factors`).
        num_images: N, including images without annotations (they get factor 1).
        num_categories: C.
        mode: ``"random" | "rfs" | "irfs" | "dynamic"``.
        threshold: repeat threshold ``t > 0`` (1e-3 on LVIS).
        sqrt: ``r = max(1, sqrt(t / s))`` (default) or ``max(1, t / s)``.
        alpha: a fixed alpha for ``mode="dynamic"`` (then no schedule).
        schedule: the alpha schedule for ``mode="dynamic"``: an :class:`AlphaSchedule` or
            a kind name (``"linear" | "cosine" | "step"``, from 1 to 0). When neither
            ``alpha`` nor ``schedule`` is given, dynamic mode uses ``AlphaSchedule()``
            (linear, 1 -> 0). Other modes take neither.
        total_epochs: number of epochs of the run; required with a schedule.
        seed: non-negative int, the same on every rank.
        rank, world_size: this process's rank and the number of ranks; by default taken
            from ``torch.distributed`` when it is initialised, else 0 and 1.
        shuffle: shuffle the epoch's list (default) or keep it in index order.
    """

    def __init__(
        self,
        image_index,
        category_index,
        num_images: int,
        num_categories: int,
        *,
        mode: Mode = "dynamic",
        threshold: float = 1e-3,
        sqrt: bool = True,
        alpha: float | None = None,
        schedule: AlphaSchedule | str | None = None,
        total_epochs: int | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = True,
    ) -> None:
        image_index, category_index = _check_annotations(
            image_index, category_index, num_images, num_categories
        )
        if num_images < 1:
            raise ValueError("RepeatFactorSampler needs at least one image (num_images >= 1)")
        if mode not in MODES:
            raise ValueError(f"unknown repeat-factor mode {mode!r}; expected one of {MODES}")
        if mode != "dynamic" and (alpha is not None or schedule is not None):
            raise ValueError(f"alpha and schedule apply to mode='dynamic' only, not {mode!r}")
        if alpha is not None and schedule is not None:
            raise ValueError("give a fixed alpha or an alpha schedule, not both")
        if mode == "dynamic" and alpha is None:
            schedule = AlphaSchedule() if schedule is None else schedule
            if isinstance(schedule, str):
                schedule = AlphaSchedule(schedule)
            if not isinstance(schedule, AlphaSchedule):
                raise ValueError(
                    f"schedule must be an AlphaSchedule or a kind name, got {schedule!r}"
                )
            if total_epochs is None:
                raise ValueError("an alpha schedule needs total_epochs")
        if total_epochs is not None and (int(total_epochs) != total_epochs or total_epochs < 1):
            raise ValueError(f"total_epochs must be an integer >= 1, got {total_epochs!r}")
        if isinstance(seed, bool) or int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")

        distributed = dist.is_available() and dist.is_initialized()
        if world_size is None:
            world_size = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        if int(world_size) != world_size or world_size < 1:
            raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
        if int(rank) != rank or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")

        # Validate threshold / alpha once, up front, with the factor function's messages.
        f_img, f_ins = category_frequencies(
            image_index, category_index, num_images, num_categories
        )
        category_repeat_factors(
            f_img, f_ins, mode, threshold, 1.0 if alpha is None else alpha, sqrt
        )

        self.mode: str = mode
        self.threshold = float(threshold)
        self.sqrt = bool(sqrt)
        self.fixed_alpha = None if alpha is None else float(alpha)
        self.schedule: AlphaSchedule | None = schedule if self.fixed_alpha is None else None
        self.total_epochs = None if total_epochs is None else int(total_epochs)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = bool(shuffle)
        self.num_images = int(num_images)
        self.num_categories = int(num_categories)
        self.f_img = _frozen(f_img)
        self.f_ins = _frozen(f_ins)
        # Only the distinct (image, category) pairs matter for image factors.
        self._pair_images, self._pair_categories = distinct_pairs(
            image_index, category_index, num_categories
        )

        self._epoch = 0
        self._position = 0  # indices of the current epoch handed out (or resumed from)
        self._resume_from = 0  # where the next __iter__ starts
        self._cache: _Epoch | None = None

    # ------------------------------------------------------------------ epoch bookkeeping
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next ``iter()`` draws.

        Moving to another epoch drops a pending resume position; setting the epoch that
        :meth:`load_state_dict` restored keeps it, so the usual
        ``for e in range(start, E): sampler.set_epoch(e); ...`` loop resumes correctly.
        """
        if isinstance(epoch, bool) or int(epoch) != epoch or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        epoch = int(epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._position = 0
            self._resume_from = 0

    @property
    def epoch(self) -> int:
        return self._epoch

    def progress_at(self, epoch: int) -> float:
        """``epoch / max(1, total_epochs - 1)``, clamped to ``[0, 1]`` (0 without a schedule)."""
        if self.total_epochs is None:
            return 0.0
        return min(1.0, epoch / max(1, self.total_epochs - 1))

    def alpha_at(self, epoch: int) -> float | None:
        """The alpha used at ``epoch`` (``None`` for modes other than ``"dynamic"``)."""
        if self.mode != "dynamic":
            return None
        if self.fixed_alpha is not None:
            return self.fixed_alpha
        return self.schedule(self.progress_at(epoch))

    @property
    def progress(self) -> float:
        return self.progress_at(self._epoch)

    @property
    def alpha(self) -> float | None:
        """Alpha of the current epoch, for logging."""
        return self.alpha_at(self._epoch)

    @property
    def category_factors(self) -> np.ndarray:
        """Category repeat factors (C,) of the current epoch (read-only)."""
        return self._current().category_factors

    @property
    def image_factors(self) -> np.ndarray:
        """Image repeat factors (N,) of the current epoch (read-only)."""
        return self._current().image_factors

    @property
    def epoch_size(self) -> int:
        """Draws in the current epoch over all ranks, before padding."""
        return self._current().epoch_size

    @property
    def num_samples(self) -> int:
        """Indices per rank in the current epoch: ``ceil(epoch_size / world_size)``."""
        return int(self._current().indices.size)

    @property
    def indices(self) -> np.ndarray:
        """This rank's whole list for the current epoch (read-only), ignoring any resume."""
        return self._current().indices

    def __len__(self) -> int:
        return self.num_samples - self._resume_from

    def __iter__(self) -> Iterator[int]:
        state = self._current()
        start = self._resume_from
        self._resume_from = 0
        self._position = start
        for index in state.indices[start:].tolist():
            self._position += 1
            yield index

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """Epoch and position in the epoch, for exact mid-epoch resumption.

        Args:
            consumed: indices of the current epoch this rank's training loop has used. Pass
                it when a ``DataLoader`` with workers prefetches ahead of the loop (e.g.
                ``batches_done * batch_size``); by default the sampler's own count of the
                indices it has handed out is used.
        """
        position = self._position if consumed is None else consumed
        if int(position) != position or not 0 <= position <= self.num_samples:
            raise ValueError(f"consumed must be in [0, {self.num_samples}], got {position!r}")
        return {
            "epoch": self._epoch,
            "position": int(position),
            "seed": self.seed,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the next ``iter()`` starts at the saved position."""
        for key in ("seed", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]}, this sampler has "
                    f"{key}={getattr(self, key)}; its position would not resume the same order"
                )
        self.set_epoch(state["epoch"])
        position = state["position"]
        if int(position) != position or not 0 <= position <= self.num_samples:
            raise ValueError(
                f"sampler state position {position!r} is outside epoch {self._epoch}'s "
                f"[0, {self.num_samples}]"
            )
        self._position = self._resume_from = int(position)

    # ------------------------------------------------------------------ the epoch's list
    def _current(self) -> _Epoch:
        if self._cache is None or self._cache.epoch != self._epoch:
            self._cache = self._build(self._epoch)
        return self._cache

    def _factors(self, alpha: float | None) -> tuple[np.ndarray, np.ndarray]:
        previous = self._cache
        if previous is not None and previous.alpha == alpha:
            return previous.category_factors, previous.image_factors
        category = category_repeat_factors(
            self.f_img,
            self.f_ins,
            self.mode,
            self.threshold,
            1.0 if alpha is None else alpha,
            self.sqrt,
        )
        image = image_repeat_factors(
            category, self._pair_images, self._pair_categories, self.num_images
        )
        return _frozen(category), _frozen(image)

    def _build(self, epoch: int) -> _Epoch:
        alpha = self.alpha_at(epoch)
        category, image = self._factors(alpha)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence((self.seed, epoch))))
        whole = np.floor(image)
        counts = whole.astype(np.int64) + (rng.random(image.size) < image - whole)
        draws = np.repeat(np.arange(image.size, dtype=np.int64), counts)
        if self.shuffle:
            rng.shuffle(draws)
        epoch_size = int(draws.size)
        per_rank = math.ceil(epoch_size / self.world_size)
        pad = per_rank * self.world_size - epoch_size
        if pad:
            draws = np.concatenate([draws, np.resize(draws, pad)])
        mine = np.ascontiguousarray(draws[self.rank :: self.world_size])
        return _Epoch(epoch, alpha, category, image, epoch_size, _frozen(mine))
