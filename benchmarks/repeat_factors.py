"""Benchmark: repeat factors and one sampler epoch at LVIS v1 train scale.

Simulates LVIS v1 train (100,170 images, 1,270,141 instances, 1,203 categories: 337 rare
in 1-10 images, 461 common in 11-100, 405 frequent in > 100; a seeded long-tailed draw, no
images) and times

(a) category + image repeat factors (dynamic mode) from the two annotation arrays, and
(b) (a) plus one epoch of indices (stochastic rounding, shuffle, shard),

for ``drcl.sampling`` against a straightforward per-image Python loop, the way detectron2's
``RepeatFactorTrainingSampler`` does it (loop over images building category sets, loop over
images for the rounding). Best of ``--repeats`` runs.

    PYTHONPATH=src python benchmarks/repeat_factors.py
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import time
from collections import defaultdict

import numpy as np
import torch

from drcl.sampling import (
    RepeatFactorSampler,
    category_frequencies,
    category_repeat_factors,
    image_repeat_factors,
)
from common import best_of  # benchmarks/common.py

LVIS_V1_TRAIN = {
    "images": 100_170,
    "instances": 1_270_141,
    "rare": 337,
    "common": 461,
    "frequent": 405,
}


# ----------------------------------------------------------------------------- data
def simulate_lvis(seed: int, categories_per_image: float = 3.5):
    """(image_index, category_index, N, C) with LVIS v1 train's counts and group sizes."""
    rng = np.random.default_rng(seed)
    n_img, n_ins = LVIS_V1_TRAIN["images"], LVIS_V1_TRAIN["instances"]
    n_r, n_c, n_f = (LVIS_V1_TRAIN[k] for k in ("rare", "common", "frequent"))
    n_cat = n_r + n_c + n_f
    # images per category: rare 1-10, common 11-100 (log-uniform), frequent > 100 (Pareto)
    rare = rng.integers(1, 11, n_r)
    common = np.round(np.exp(rng.uniform(np.log(11), np.log(100), n_c))).astype(np.int64)
    tail = rng.pareto(1.1, n_f)
    budget = int(categories_per_image * n_img) - rare.sum() - common.sum() - 101 * n_f
    frequent = np.minimum(101 + np.round(tail / tail.sum() * budget).astype(np.int64), n_img // 2)
    image_counts = rng.permutation(np.concatenate([rare, common, frequent]))
    # distinct images for each category
    pair_img = np.concatenate([rng.choice(n_img, k, replace=False) for k in image_counts])
    pair_cat = np.repeat(np.arange(n_cat), image_counts)
    # no image without annotations: give each uncovered image one frequent category
    uncovered = np.flatnonzero(np.bincount(pair_img, minlength=n_img) == 0)
    big = np.flatnonzero(image_counts > 100)
    pair_img = np.concatenate([pair_img, uncovered])
    filler = rng.choice(big, uncovered.size, p=image_counts[big] / image_counts[big].sum())
    pair_cat = np.concatenate([pair_cat, filler])
    # instances: one per pair plus a long-tailed crowd, heavier for frequent categories
    crowd = rng.lognormal(0.0, 1.0, n_cat) * np.where(image_counts > 100, 3.0, 1.0)
    weights = crowd[pair_cat]
    extra = rng.multinomial(n_ins - pair_img.size, weights / weights.sum())
    per_pair = 1 + extra
    order = rng.permutation(n_ins)  # annotation order as in a JSON file: not grouped
    image_index = np.repeat(pair_img, per_pair)[order]
    category_index = np.repeat(pair_cat, per_pair)[order]
    return image_index, category_index, n_img, n_cat


def describe(image_index, category_index, n_img, n_cat) -> str:
    f_img, _ = category_frequencies(image_index, category_index, n_img, n_cat)
    counts = np.round(f_img * n_img).astype(int)
    groups = (
        int(((counts >= 1) & (counts <= 10)).sum()),
        int(((counts >= 11) & (counts <= 100)).sum()),
        int((counts > 100).sum()),
    )
    empty = int((np.bincount(image_index, minlength=n_img) == 0).sum())
    expected = tuple(LVIS_V1_TRAIN[k] for k in ("rare", "common", "frequent"))
    assert groups == expected and image_index.size == LVIS_V1_TRAIN["instances"], groups
    return (
        f"{n_img:,} images ({empty} without annotations), {image_index.size:,} instances, "
        f"{n_cat:,} categories (rare/common/frequent by image count: {groups[0]}/{groups[1]}/"
        f"{groups[2]}; max images per category {counts.max():,})"
    )


# ----------------------------------------------------------------------------- baseline
def loop_factors(dataset_dicts, threshold: float, alpha: float) -> list[float]:
    """detectron2-style loops, extended with instance frequencies for the dynamic score."""
    image_count: dict[int, int] = defaultdict(int)
    instance_count: dict[int, int] = defaultdict(int)
    num_instances = 0
    for record in dataset_dicts:  # for each image (without repeats)
        cat_ids = [ann["category_id"] for ann in record["annotations"]]
        num_instances += len(cat_ids)
        for cat_id in cat_ids:
            instance_count[cat_id] += 1
        for cat_id in set(cat_ids):
            image_count[cat_id] += 1
    num_images = len(dataset_dicts)
    category_rep = {}
    for cat_id, n in image_count.items():
        f_img, f_ins = n / num_images, instance_count[cat_id] / num_instances
        score = 1.0 / (alpha / f_img + (1.0 - alpha) / f_ins)
        category_rep[cat_id] = max(1.0, math.sqrt(threshold / score))
    rep_factors = []
    for record in dataset_dicts:
        cat_ids = {ann["category_id"] for ann in record["annotations"]}
        rep_factors.append(max((category_rep[c] for c in cat_ids), default=1.0))
    return rep_factors


def loop_epoch(rep_factors, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    rng = random.Random(seed * 1_000_003 + epoch)
    indices: list[int] = []
    for dataset_index, rep_factor in enumerate(rep_factors):
        whole = int(rep_factor)
        indices.extend([dataset_index] * (whole + (rng.random() < rep_factor - whole)))
    rng.shuffle(indices)
    pad = -len(indices) % world_size
    indices += indices[:pad]
    return indices[rank::world_size]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated dataset")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--threshold", type=float, default=1e-3, help="repeat threshold t")
    parser.add_argument(
        "--world-size", type=int, default=1, help="shard for this many ranks (rank 0 is timed)"
    )
    args = parser.parse_args(argv)

    data_start = time.perf_counter()
    image_index, category_index, n_img, n_cat = simulate_lvis(args.seed)
    print(f"simulated LVIS v1 train in {time.perf_counter() - data_start:.1f} s: "
          f"{describe(image_index, category_index, n_img, n_cat)}")
    # dynamic mode, linear schedule over 101 epochs: epoch 50 has alpha = 0.5, and every
    # later epoch has a new alpha, so timing "next epoch" includes recomputing the factors
    total_epochs, epoch, alpha = 101, 50, 0.5

    def ours_factors():
        f_img, f_ins = category_frequencies(image_index, category_index, n_img, n_cat)
        category = category_repeat_factors(f_img, f_ins, "dynamic", args.threshold, alpha)
        return image_repeat_factors(category, image_index, category_index, n_img)

    def ours_epoch():
        sampler = RepeatFactorSampler(
            image_index,
            category_index,
            n_img,
            n_cat,
            mode="dynamic",
            threshold=args.threshold,
            schedule="linear",
            total_epochs=total_epochs,
            seed=0,
            rank=0,
            world_size=args.world_size,
        )
        sampler.set_epoch(epoch)
        return sampler, list(sampler)

    annotations_of = [[] for _ in range(n_img)]
    for i, c in zip(image_index.tolist(), category_index.tolist()):
        annotations_of[i].append({"category_id": c})
    dataset_dicts = [{"annotations": anns} for anns in annotations_of]

    def loop_all():
        rep = loop_factors(dataset_dicts, args.threshold, alpha)
        return rep, loop_epoch(rep, 0, epoch, 0, args.world_size)

    t_ours_factors, image_factors = best_of(ours_factors, args.repeats)
    t_ours_epoch, (sampler, indices) = best_of(ours_epoch, args.repeats)
    def ours_next_epoch():
        sampler.set_epoch(sampler.epoch + 1)  # a new alpha: factors are recomputed
        return list(sampler)

    t_ours_next, _ = best_of(ours_next_epoch, args.repeats)
    t_loop_factors, loop_rep = best_of(
        lambda: loop_factors(dataset_dicts, args.threshold, alpha), args.repeats
    )
    t_loop_epoch, (_, loop_indices) = best_of(loop_all, args.repeats)

    np.testing.assert_allclose(image_factors, loop_rep, rtol=1e-12)
    assert sampler.alpha_at(epoch) == alpha
    print(f"factors agree with the loop; epoch {epoch} (alpha={alpha}): {len(indices):,} "
          f"indices on rank 0 of {args.world_size} (loop: {len(loop_indices):,}); "
          f"mean image factor {image_factors.mean():.3f}, max {image_factors.max():.2f}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, NumPy {np.__version__}, torch {torch.__version__}")
    print()
    rows = [
        ("(a) category + image factors", t_ours_factors, t_loop_factors),
        ("(b) factors + one epoch of indices", t_ours_epoch, t_loop_epoch),
    ]
    print(f"{'best of ' + str(args.repeats):<38}{'drcl (s)':>10}{'loop (s)':>10}{'speed-up':>10}")
    for name, ours, loop in rows:
        print(f"{name:<38}{ours:>10.3f}{loop:>10.3f}{loop / ours:>9.1f}x")
    print(f"{'    next epoch, same sampler':<38}{t_ours_next:>10.3f}")
    print()
    print("| benchmark | factors: drcl / loop | factors + epoch: drcl / loop | next epoch (drcl) |")
    print("|---|---|---|---|")
    print(
        f"| LVIS v1 train scale, dynamic, t={args.threshold:g}, {os.cpu_count()} CPUs | "
        f"{t_ours_factors:.3f} s / {t_loop_factors:.2f} s "
        f"({t_loop_factors / t_ours_factors:.0f}x) | "
        f"{t_ours_epoch:.3f} s / {t_loop_epoch:.2f} s ({t_loop_epoch / t_ours_epoch:.0f}x) | "
        f"{t_ours_next:.3f} s |"
    )


if __name__ == "__main__":
    main()
