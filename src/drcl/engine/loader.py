"""Reproducible data loading: every sample's augmentation is seeded from its place in the run.

The repeat-factor sampler decides which images an epoch draws and in what order; the views
are random too. DataLoader workers seed themselves from the main process's RNG when an
iterator starts, so a run resumed mid-epoch would augment differently from an uninterrupted
one. Instead :class:`SeededSampler` hands out ``(index, seed)`` pairs whose seed is a pure
function of (run seed, epoch, rank, position in the epoch) and :class:`SeededDataset` applies
the transforms under that seed, so a sample looks the same whoever loads it, whenever.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def sample_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    return int(np.random.SeedSequence((seed, epoch, rank, position)).generate_state(1)[0])


class SeededSampler(Sampler):
    """Wraps a sampler with ``epoch``, ``rank`` and a resumable position (such as
    :class:`~drcl.sampling.RepeatFactorSampler`) and yields ``(index, seed)``."""

    def __init__(self, sampler, seed: int):
        self.sampler = sampler
        self.seed = seed

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        start = self.sampler.num_samples - len(self.sampler)  # > 0 when resuming mid-epoch
        epoch, rank = self.sampler.epoch, self.sampler.rank
        for offset, index in enumerate(self.sampler):
            yield index, sample_seed(self.seed, epoch, rank, start + offset)


class SeededDataset(Dataset):
    """``dataset[index]`` with torch's RNG seeded by the pair's seed (restored afterwards)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only (the transforms' RNG): torch.manual_seed also queues the
            # seed of every CUDA device with a stack trace, 8 ms a call on our CPU machines
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]
