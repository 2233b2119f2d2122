import numpy as np
import torch

from drcl.engine.loader import SeededDataset, SeededSampler, sample_seed
from drcl.sampling import RepeatFactorSampler


class RandomItem(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return i, float(torch.rand(()))  # "augmentation" drawn from torch's global RNG


def _sampler():
    image_index = np.arange(10)
    category_index = np.array([0] * 8 + [1, 1])
    return RepeatFactorSampler(image_index, category_index, 10, 2, mode="rfs", threshold=0.5, seed=3)


def test_a_sample_is_the_same_when_resumed_mid_epoch():
    ds = SeededDataset(RandomItem())
    s = _sampler()
    s.set_epoch(1)
    full = [ds[item] for item in SeededSampler(s, seed=3)]
    resumed = _sampler()
    resumed.load_state_dict({"epoch": 1, "position": 4, "seed": 3, "world_size": 1})
    tail = [ds[item] for item in SeededSampler(resumed, seed=3)]
    assert tail == full[4:]


def test_seeds_differ_by_position_epoch_and_rank_and_leave_the_global_rng_alone():
    seeds = {sample_seed(0, e, r, p) for e in range(3) for r in range(2) for p in range(5)}
    assert len(seeds) == 30
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    SeededDataset(RandomItem())[(1, 123)]
    assert torch.equal(torch.rand(3), expected)
