"""RepeatFactorSampler: determinism, sharding, stochastic rounding, schedules, resumption."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from torch.utils.data import DataLoader

from drcl.sampling import (
    AlphaSchedule,
    RepeatFactorSampler,
    category_frequencies,
    category_repeat_factors,
    image_repeat_factors,
)

N_IMAGES, N_CATEGORIES, THRESHOLD = 200, 30, 0.1


@pytest.fixture(scope="module")
def data():
    """Long-tailed toy data: Zipf categories, a few images without annotations."""
    rng = np.random.default_rng(123)
    popularity = 1.0 / np.arange(1, N_CATEGORIES + 1) ** 1.5
    category_index = rng.choice(N_CATEGORIES, size=900, p=popularity / popularity.sum())
    image_index = rng.integers(0, N_IMAGES - 10, size=900)
    return image_index, category_index


def make(data, **kwargs):
    kwargs = {"threshold": THRESHOLD, "seed": 7, **kwargs}
    if kwargs.get("mode", "dynamic") == "dynamic" and "alpha" not in kwargs:
        kwargs.setdefault("total_epochs", 5)
    return RepeatFactorSampler(*data, N_IMAGES, N_CATEGORIES, **kwargs)


def factors(data, mode, alpha=1.0):
    f_img, f_ins = category_frequencies(*data, N_IMAGES, N_CATEGORIES)
    category = category_repeat_factors(f_img, f_ins, mode, THRESHOLD, alpha)
    return category, image_repeat_factors(category, *data, N_IMAGES)


def epoch_list(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


# ----------------------------------------------------------------------------- determinism
def test_same_seed_same_order(data):
    a, b = make(data), make(data)
    for epoch in range(3):
        assert epoch_list(a, epoch) == epoch_list(b, epoch)
    assert epoch_list(make(data, seed=8), 0) != epoch_list(a, 0)


def test_different_epoch_different_order(data):
    s = make(data, mode="rfs")
    lists = [epoch_list(s, e) for e in range(4)]
    assert all(lists[i] != lists[j] for i in range(4) for j in range(i + 1, 4))
    assert epoch_list(s, 1) == lists[1]  # revisiting an epoch reproduces it


def test_shuffle_false_is_sorted(data):
    s = make(data, mode="rfs", shuffle=False)
    got = epoch_list(s, 0)
    assert got == sorted(got)
    assert set(got) == set(range(N_IMAGES))


def test_len_matches_iter(data):
    """Each epoch's length is the sum of its draws floor(r(I)) + Bernoulli(frac r(I)) at the
    image factors of the schedule's alpha for that epoch (linear 1 -> 0 over 5 epochs), with
    the documented generator: PCG64(SeedSequence((seed, epoch))), one uniform per image."""
    s = make(data)
    schedule = AlphaSchedule()
    sizes = set()
    for epoch in range(5):
        s.set_epoch(epoch)
        n = len(s)
        assert n == len(list(s)) == s.num_samples
        _, image = factors(data, "dynamic", alpha=schedule(epoch / 4))
        np.testing.assert_allclose(s.image_factors, image, rtol=1e-12)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence((7, epoch))))
        whole = np.floor(image)
        assert n == int(whole.sum() + (rng.random(N_IMAGES) < image - whole).sum()), epoch
        assert whole.sum() <= n <= np.ceil(image).sum()
        sizes.add(n)
    assert len(sizes) > 1  # the epoch length follows the factors


# ----------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("mode", ["rfs", "dynamic"])
def test_ranks_equal_length_and_cover_epoch(data, world_size, mode):
    for epoch in (0, 3):
        whole = epoch_list(make(data, mode=mode), epoch)  # world_size 1: the epoch's list
        shards = [
            epoch_list(make(data, mode=mode, rank=r, world_size=world_size), epoch)
            for r in range(world_size)
        ]
        per_rank = math.ceil(len(whole) / world_size)
        assert all(len(shard) == per_rank for shard in shards)
        pad = per_rank * world_size - len(whole)
        assert pad < world_size
        union = Counter(i for shard in shards for i in shard)
        assert union == Counter(whole) + Counter(whole[:pad])  # wrap-around padding
        padded = whole + whole[:pad]
        assert all(shards[r] == padded[r::world_size] for r in range(world_size))


def test_rank_defaults_without_distributed(data):
    s = make(data)
    assert (s.rank, s.world_size) == (0, 1)


# ----------------------------------------------------------------------------- rounding
def test_expected_draws_equal_factors(data):
    s = make(data, mode="rfs", shuffle=False)
    _, expected = factors(data, "rfs")
    assert np.array_equal(s.image_factors, expected)
    assert expected.max() > 2.5 and (expected == 1).sum() > 50
    epochs = 600
    counts = np.zeros(N_IMAGES)
    for epoch in range(epochs):
        s.set_epoch(epoch)
        counts += np.bincount(s.indices, minlength=N_IMAGES)
    mean = counts / epochs
    # the per-image mean of floor(r) + Bernoulli(frac r) has std <= 0.5 / sqrt(600) = 0.02
    np.testing.assert_allclose(mean, expected, atol=0.08)
    assert (mean[expected == np.floor(expected)] == expected[expected == np.floor(expected)]).all()
    assert mean.sum() == pytest.approx(expected.sum(), rel=0.01)


# ----------------------------------------------------------------------------- modes
@pytest.mark.parametrize("kind", ["linear", "cosine", "step"])
def test_dynamic_schedule_endpoints(data, kind):
    s = make(data, schedule=AlphaSchedule(kind), total_epochs=5)
    rfs_category, rfs_image = factors(data, "rfs")
    ins_category, ins_image = factors(data, "dynamic", alpha=0.0)
    s.set_epoch(0)
    assert s.alpha == 1.0 and s.progress == 0.0
    assert np.array_equal(s.category_factors, rfs_category)
    assert np.array_equal(s.image_factors, rfs_image)
    s.set_epoch(4)
    assert s.alpha == 0.0 and s.progress == 1.0
    assert np.array_equal(s.category_factors, ins_category)
    assert np.array_equal(s.image_factors, ins_image)
    assert not np.array_equal(rfs_image, ins_image)
    s.set_epoch(9)  # past the last epoch alpha stays at the end value
    assert s.alpha == 0.0
    alphas = [s.alpha_at(e) for e in range(5)]
    assert alphas == sorted(alphas, reverse=True)


def test_dynamic_middle_epoch_and_fixed_alpha(data):
    s = make(data, schedule="linear", total_epochs=3)
    s.set_epoch(1)
    assert s.alpha == 0.5
    assert np.array_equal(s.category_factors, factors(data, "dynamic", 0.5)[0])
    fixed = make(data, alpha=0.25)
    for epoch in (0, 7):
        fixed.set_epoch(epoch)
        assert fixed.alpha == 0.25
        assert np.array_equal(fixed.image_factors, factors(data, "dynamic", 0.25)[1])
    single = make(data, total_epochs=1)
    assert single.alpha_at(0) == 1.0 and single.alpha_at(1) == 0.0


@pytest.mark.parametrize("mode", ["random", "rfs", "irfs"])
def test_fixed_modes(data, mode):
    s = make(data, mode=mode)
    assert s.alpha is None
    assert np.array_equal(s.image_factors, factors(data, mode)[1])
    if mode == "random":
        assert sorted(epoch_list(s, 2)) == list(range(N_IMAGES))


def test_factors_are_read_only(data):
    s = make(data)
    with pytest.raises(ValueError):
        s.image_factors[0] = 5.0
    with pytest.raises(ValueError):
        s.category_factors[0] = 5.0


# ----------------------------------------------------------------------------- resumption
def test_state_dict_resumes_mid_epoch(data):
    s = make(data, rank=1, world_size=2)
    full = epoch_list(s, 2)
    s.set_epoch(2)
    it = iter(s)
    head = [next(it) for _ in range(7)]
    state = s.state_dict()
    assert state["epoch"] == 2 and state["position"] == 7 and head == full[:7]

    resumed = make(data, rank=1, world_size=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the usual training loop calls this again: the position stays
    assert resumed.epoch == 2 and len(resumed) == len(full) - 7
    assert resumed.state_dict() == state
    assert list(resumed) == full[7:]
    assert resumed.state_dict()["position"] == len(full)  # epoch finished
    assert list(resumed) == full  # the resume offset applies once
    assert epoch_list(resumed, 3) == epoch_list(make(data, rank=1, world_size=2), 3)


def test_state_dict_with_consumed_and_epoch_change(data):
    s = make(data)
    s.set_epoch(1)
    full = list(s)
    state = s.state_dict(consumed=12)  # e.g. a DataLoader whose workers prefetched ahead
    resumed = make(data)
    resumed.load_state_dict(state)
    assert list(resumed) == full[12:]
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # another epoch: the pending position is dropped
    assert len(resumed) == resumed.num_samples
    with pytest.raises(ValueError, match="consumed"):
        s.state_dict(consumed=len(full) + 1)


def test_load_state_dict_mismatch(data):
    state = make(data).state_dict()
    with pytest.raises(ValueError, match="seed"):
        make(data, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        make(data, world_size=2, rank=0).load_state_dict(state)
    with pytest.raises(ValueError, match="position"):
        make(data).load_state_dict({**state, "position": 10**6})


def test_works_with_dataloader(data):
    s = make(data, mode="rfs")
    s.set_epoch(1)
    loader = DataLoader(list(range(N_IMAGES)), batch_size=8, sampler=s)
    got = [i for batch in loader for i in batch.tolist()]
    assert got == list(s.indices)
    assert len(loader) == math.ceil(len(s) / 8)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "rfs", "alpha": 0.5}, "dynamic"),
        ({"mode": "irfs", "schedule": "linear"}, "dynamic"),
        ({"alpha": 0.5, "schedule": "linear"}, "not both"),
        ({"schedule": "linear", "total_epochs": None}, "total_epochs"),
        ({"total_epochs": 0}, "total_epochs"),
        ({"schedule": "exp"}, "schedule"),
        ({"alpha": 1.5}, "alpha"),
        ({"mode": "rfs", "threshold": 0.0}, "threshold"),
        ({"mode": "cas"}, "mode"),
        ({"seed": -1}, "seed"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"world_size": 0, "rank": 0}, "world_size"),
    ],
)
def test_validation(data, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(data, **kwargs)


def test_validation_of_data():
    with pytest.raises(ValueError, match="num_images"):
        RepeatFactorSampler([], [], 0, 3, mode="rfs")
    with pytest.raises(ValueError, match="category_index"):
        RepeatFactorSampler([0], [5], 1, 3, mode="rfs")
    s = make((np.zeros(0, np.int64), np.zeros(0, np.int64)), mode="irfs")
    assert sorted(s) == list(range(N_IMAGES))  # no annotations: every image once
    with pytest.raises(ValueError, match="epoch"):
        s.set_epoch(-1)
