"""Repeat factors against detectron2's test case and a plain per-image Python reference."""

from __future__ import annotations

import math
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drcl.sampling import (
    MODES,
    box_weights,
    category_frequencies,
    category_repeat_factors,
    choose_boxes,
    expected_sampling_share,
    image_repeat_factors,
    repeat_factors_for,
    sampling_shares,
)

ALPHAS = [0.0, 0.1, 0.25, 0.5, 0.9, 1.0]


# ----------------------------------------------------------------------------- reference
def reference_factors(
    image_index, category_index, num_images, num_categories, mode, t, alpha, sqrt
):
    """Per-image, per-category loops, the way detectron2 writes RFS (plus IRFS / dynamic)."""
    image_cats = [set() for _ in range(num_images)]
    instances = [0] * num_categories
    for i, c in zip(image_index, category_index):
        image_cats[i].add(c)
        instances[c] += 1
    images_with = [0] * num_categories
    for cats in image_cats:
        for c in cats:
            images_with[c] += 1
    num_instances = len(image_index)
    category = []
    for c in range(num_categories):
        if images_with[c] == 0 or mode == "random":
            category.append(1.0)
            continue
        f_img = images_with[c] / num_images
        f_ins = instances[c] / num_instances
        if mode == "rfs":
            s = f_img
        elif mode == "irfs":
            s = math.sqrt(f_img * f_ins)
        else:
            s = 1.0 / (alpha / f_img + (1.0 - alpha) / f_ins)
        category.append(max(1.0, math.sqrt(t / s) if sqrt else t / s))
    image = [max((category[c] for c in cats), default=1.0) for cats in image_cats]
    return np.array(category), np.array(image)


def random_dataset(seed, num_images=80, num_categories=25, num_annotations=400):
    """Zipf-like categories; some categories absent, some images empty."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, num_categories + 1) ** 1.3
    popularity[[3, 17]] = 0.0  # absent categories
    popularity /= popularity.sum()
    category_index = rng.choice(num_categories, size=num_annotations, p=popularity)
    image_index = rng.integers(0, num_images - 5, size=num_annotations)  # last 5 images empty
    return image_index, category_index, num_images, num_categories


# ----------------------------------------------------------------------------- detectron2
def test_rfs_matches_detectron2_test_case():
    # detectron2 tests/data/test_sampler.py::test_repeat_factors_from_category_frequency:
    # [{"annotations": [{"category_id": 0}, {"category_id": 1}]},
    #  {"annotations": [{"category_id": 0}]}, {"annotations": []}], repeat_thresh=0.5
    image_index, category_index = [0, 0, 1], [0, 1, 0]
    f_img, f_ins = category_frequencies(image_index, category_index, 3, 2)
    category = category_repeat_factors(f_img, f_ins, "rfs", threshold=0.5)
    image = image_repeat_factors(category, image_index, category_index, 3)
    np.testing.assert_allclose(image, [math.sqrt(3 / 2), 1.0, 1.0], rtol=1e-12)
    np.testing.assert_allclose(category, [1.0, math.sqrt(1.5)], rtol=1e-12)


def test_frequencies():
    # image 0: cat 0 twice + cat 2; image 1: cat 0; image 2: empty; cat 1 absent
    f_img, f_ins = category_frequencies([0, 0, 0, 1], [0, 0, 2, 0], 3, 3)
    np.testing.assert_allclose(f_img, [2 / 3, 0, 1 / 3])
    np.testing.assert_allclose(f_ins, [3 / 4, 0, 1 / 4])


# ----------------------------------------------------------------------------- vs reference
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sqrt", [True, False])
@pytest.mark.parametrize("threshold", [0.05, 0.3])
@pytest.mark.parametrize(
    "mode, alpha",
    [("random", 1.0), ("rfs", 1.0), ("irfs", 1.0)] + [("dynamic", a) for a in ALPHAS],
)
def test_matches_reference_loop(seed, sqrt, threshold, mode, alpha):
    image_index, category_index, n, c = random_dataset(seed)
    f_img, f_ins = category_frequencies(image_index, category_index, n, c)
    category = category_repeat_factors(f_img, f_ins, mode, threshold, alpha, sqrt)
    image = image_repeat_factors(category, image_index, category_index, n)
    ref_category, ref_image = reference_factors(
        image_index.tolist(), category_index.tolist(), n, c, mode, threshold, alpha, sqrt
    )
    np.testing.assert_allclose(category, ref_category, rtol=1e-12)
    np.testing.assert_allclose(image, ref_image, rtol=1e-12)
    assert (image[-5:] == 1).all() and (category[[3, 17]] == 1).all()
    if mode in ("rfs", "irfs", "dynamic"):
        assert category.max() > 1.0  # the data are long-tailed enough to matter


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("sqrt", [True, False])
def test_dynamic_endpoints_are_exact(seed, sqrt):
    image_index, category_index, n, c = random_dataset(seed)
    f_img, f_ins = category_frequencies(image_index, category_index, n, c)
    for t in (1e-3, 0.05, 0.3):
        rfs = category_repeat_factors(f_img, f_ins, "rfs", t, sqrt=sqrt)
        dyn1 = category_repeat_factors(f_img, f_ins, "dynamic", t, alpha=1.0, sqrt=sqrt)
        assert np.array_equal(dyn1, rfs)
        # alpha = 0 is RFS on instance frequencies
        ins = category_repeat_factors(f_ins, f_ins, "rfs", t, sqrt=sqrt)
        dyn0 = category_repeat_factors(f_img, f_ins, "dynamic", t, alpha=0.0, sqrt=sqrt)
        assert np.array_equal(dyn0, ins)


def test_irfs_is_geometric_mean():
    f_img = np.array([0.5, 1e-4, 2e-3, 0.0])
    f_ins = np.array([0.1, 4e-6, 8e-3, 0.0])
    got = category_repeat_factors(f_img, f_ins, "irfs", threshold=1e-3)
    expected = [1.0, math.sqrt(1e-3 / math.sqrt(4e-10)), 1.0, 1.0]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_random_mode_and_empty_data():
    f_img, f_ins = category_frequencies([], [], 4, 3)
    assert (f_img == 0).all() and (f_ins == 0).all()
    for mode in MODES:
        assert (category_repeat_factors(f_img, f_ins, mode) == 1).all()
    assert (image_repeat_factors(np.ones(3), [], [], 4) == 1).all()
    f_img, f_ins = category_frequencies([0, 1], [0, 1], 2, 2)
    assert (category_repeat_factors(f_img, f_ins, "random", threshold=0.9) == 1).all()


def test_absent_categories_give_one_without_warnings():
    f_img = np.array([0.0, 1e-4, 0.0])
    f_ins = np.array([0.0, 1e-5, 0.0])
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        for mode in MODES:
            for alpha in ALPHAS:
                got = category_repeat_factors(f_img, f_ins, mode, alpha=alpha)
                assert got[0] == 1.0 and got[2] == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "cas"}, "mode"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": -1e-3}, "threshold"),
        ({"threshold": float("inf")}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
    ],
)
def test_factor_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        category_repeat_factors(np.array([0.5]), np.array([0.5]), **{"mode": "dynamic", **kwargs})


def test_frequency_validation():
    with pytest.raises(ValueError, match="same length"):
        category_repeat_factors(np.array([0.5, 0.1]), np.array([0.5]))
    with pytest.raises(ValueError, match="disagree"):
        category_repeat_factors(np.array([0.5, 0.1]), np.array([0.5, 0.0]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        category_repeat_factors(np.array([1.5]), np.array([0.5]))
    with pytest.raises(ValueError, match="image_index"):
        category_frequencies([0, 3], [0, 0], 3, 1)
    with pytest.raises(ValueError, match="category_index"):
        category_frequencies([0, 1], [0, 2], 3, 2)
    with pytest.raises(ValueError, match="same length"):
        category_frequencies([0, 1], [0], 3, 2)
    with pytest.raises(ValueError, match="integers"):
        category_frequencies([0.0, 1.0], [0, 1], 3, 2)
    with pytest.raises(ValueError, match="category_index"):
        image_repeat_factors(np.ones(2), [0], [2], 1)


# ----------------------------------------------------------------------------- properties
frequency = st.floats(min_value=1e-9, max_value=1.0, allow_nan=False)
factor_settings = st.tuples(
    st.sampled_from(["rfs", "irfs", "dynamic"]),
    st.floats(min_value=0.0, max_value=1.0),
    st.floats(min_value=1e-6, max_value=1.0),
    st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(
    f=st.lists(st.tuples(frequency, frequency), min_size=1, max_size=20),
    absent=st.integers(0, 3),
    cfg=factor_settings,
)
def test_factors_at_least_one(f, absent, cfg):
    mode, alpha, t, sqrt = cfg
    f_img = np.array([a for a, _ in f] + [0.0] * absent)
    f_ins = np.array([b for _, b in f] + [0.0] * absent)
    got = category_repeat_factors(f_img, f_ins, mode, t, alpha, sqrt)
    assert got.shape == f_img.shape
    assert np.all(got >= 1.0) and np.all(np.isfinite(got))


@settings(max_examples=500, deadline=None)
@given(
    img=st.tuples(frequency, frequency), ins=st.tuples(frequency, frequency), cfg=factor_settings
)
def test_rarer_category_never_gets_smaller_factor(img, ins, cfg):
    mode, alpha, t, sqrt = cfg
    # category 0 is rarer than category 1 at both the image and the instance level
    f_img = np.array(sorted(img))
    f_ins = np.array(sorted(ins))
    got = category_repeat_factors(f_img, f_ins, mode, t, alpha, sqrt)
    assert got[0] >= got[1]


annotations = st.integers(1, 12).flatmap(
    lambda n: st.tuples(
        st.just(n),
        st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 5)), max_size=40),
    )
)


@settings(max_examples=200, deadline=None)
@given(data=annotations, cfg=factor_settings)
def test_image_factor_is_max_over_its_categories(data, cfg):
    mode, alpha, t, sqrt = cfg
    n, pairs = data
    image_index = np.array([i for i, _ in pairs], dtype=np.int64)
    category_index = np.array([c for _, c in pairs], dtype=np.int64)
    f_img, f_ins = category_frequencies(image_index, category_index, n, 6)
    category = category_repeat_factors(f_img, f_ins, mode, t, alpha, sqrt)
    image = image_repeat_factors(category, image_index, category_index, n)
    assert np.all(image[image_index] >= category[category_index])
    for i in range(n):
        cats = category_index[image_index == i]
        assert image[i] == (category[cats].max() if cats.size else 1.0)
    assert np.array_equal(
        category_repeat_factors(f_img, f_ins, "dynamic", t, 1.0, sqrt),
        category_repeat_factors(f_img, f_ins, "rfs", t, alpha, sqrt),
    )


# ----------------------------------------------------------------------------- shares, boxes
def test_expected_sampling_share():
    image_index, category_index, n, c = random_dataset(0)
    f_img, f_ins = category_frequencies(image_index, category_index, n, c)
    ones = np.ones(n)
    np.testing.assert_allclose(expected_sampling_share(ones, image_index, category_index, c), f_ins)
    category = category_repeat_factors(f_img, f_ins, "rfs", threshold=0.3)
    image = image_repeat_factors(category, image_index, category_index, n)
    share = expected_sampling_share(image, image_index, category_index, c)
    reference = np.zeros(c)
    for i, k in zip(image_index, category_index):
        reference[k] += image[i]
    np.testing.assert_allclose(share, reference / reference.sum(), rtol=1e-12)
    assert share.sum() == pytest.approx(1.0)
    rare = np.argmin(np.where(f_ins > 0, f_ins, np.inf))
    assert share[rare] > f_ins[rare]  # rebalancing raises the tail's share
    assert (expected_sampling_share(ones, [], [], c) == 0).all()


def test_box_weights():
    factors = np.array([1.0, 2.5, 4.0])
    np.testing.assert_array_equal(box_weights(factors, [2, 0, 0, 1]), [4.0, 1.0, 1.0, 2.5])
    with pytest.raises(ValueError):
        box_weights(factors, [3])


def test_choose_boxes_distinct_and_bounded():
    g = torch.Generator().manual_seed(0)
    weights = np.array([1.0, 0.0, 3.0, 2.0, 0.5, 1.0])
    for k in range(0, 9):
        for _ in range(20):
            got = choose_boxes(weights, k, g)
            assert got.dtype == torch.int64
            assert len(got) == min(k, 5)
            assert len(set(got.tolist())) == len(got)
            assert 1 not in got.tolist()  # zero weight is never chosen
    assert choose_boxes([], 3, g).numel() == 0
    assert choose_boxes(torch.zeros(4), 3, g).numel() == 0
    a = choose_boxes(weights, 3, torch.Generator().manual_seed(5))
    b = choose_boxes(weights, 3, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_choose_boxes_prefers_heavy_weights():
    g = torch.Generator().manual_seed(0)
    weights = torch.tensor([10.0, 1.0, 1.0, 1.0, 1.0])
    first = Counter(int(choose_boxes(weights, 1, g)[0]) for _ in range(2000))
    assert 0.66 < first[0] / 2000 < 0.77  # 10 / 14 = 0.714
    pairs = Counter(i for _ in range(1000) for i in choose_boxes(weights, 2, g).tolist())
    assert pairs[0] > 900  # P(heavy box among 2 of 5) = 1 - (4/14) * (3/13) = 0.934
    assert all(pairs[i] < 450 for i in range(1, 5))


def test_choose_boxes_validation():
    with pytest.raises(ValueError):
        choose_boxes([1.0, -1.0], 1)
    with pytest.raises(ValueError):
        choose_boxes([1.0, float("nan")], 1)
    with pytest.raises(ValueError):
        choose_boxes([1.0], -1)


# ----------------------------------------------------------------------------- one-call helpers
@pytest.mark.parametrize("sqrt", [True, False])
@pytest.mark.parametrize("mode, alpha", [("rfs", 1.0), ("irfs", 1.0), ("dynamic", 0.25)])
def test_repeat_factors_for_matches_reference(mode, alpha, sqrt):
    image_index, category_index, n, c = random_dataset(1)
    category, image = repeat_factors_for(image_index, category_index, n, c, mode, 0.3, alpha, sqrt)
    ref_category, ref_image = reference_factors(
        image_index.tolist(), category_index.tolist(), n, c, mode, 0.3, alpha, sqrt
    )
    np.testing.assert_allclose(category, ref_category, rtol=1e-12)
    np.testing.assert_allclose(image, ref_image, rtol=1e-12)


@pytest.mark.parametrize("threshold", [0.05, 0.3])
def test_sampling_shares_match_reference(threshold):
    """The per-sampler shares ``drcl stats --plot`` draws: each label at its own mode / alpha
    and at the caller's threshold, from the per-image reference loop."""
    image_index, category_index, n, c = random_dataset(2)
    shares = sampling_shares(image_index, category_index, n, c, threshold=threshold)
    settings_ = {
        "random": ("random", 1.0), "rfs": ("rfs", 1.0), "irfs": ("irfs", 1.0),
        "dynamic a=1": ("dynamic", 1.0), "dynamic a=0.5": ("dynamic", 0.5),
        "dynamic a=0": ("dynamic", 0.0),
    }
    assert set(shares) == set(settings_)
    for label, (mode, alpha) in settings_.items():
        _, image = reference_factors(
            image_index.tolist(), category_index.tolist(), n, c, mode, threshold, alpha, True
        )
        expected = np.zeros(c)
        for i, k in zip(image_index, category_index):
            expected[k] += image[i]
        np.testing.assert_allclose(shares[label], expected / expected.sum(), rtol=1e-12, err_msg=label)
    np.testing.assert_allclose(shares["random"], np.bincount(category_index, minlength=c) / len(category_index))
    # instance-level rebalancing (a = 0) differs from image-level (a = 1) on these data
    assert not np.allclose(shares["dynamic a=0"], shares["dynamic a=1"])
