"""Benchmark: LVIS-rules bbox evaluation, drcl (faster-coco-eval) against the official lvis-api.

Writes a seeded LVIS-like validation set (default 5,000 images, 400 categories in rare /
common / frequent groups of 130 / 150 / 120, 1-8 boxes per image, ``neg_category_ids`` and
``not_exhaustive_category_ids`` on every image) and a results file with 100 detections per
image (jittered ground-truth boxes and false positives of annotated, negative and unverified
categories), then times, each from the two JSON files:

* ``drcl.evaluation.evaluate_detections`` (validation, top-300 rule, faster-coco-eval), and
* lvis-api 0.5.3: ``LVIS`` + ``LVISResults`` + ``LVISEval.evaluate/accumulate/summarize``,

and checks that the nine numbers agree to 1e-4. lvis 0.5.3 calls ``np.float`` (removed in
NumPy 2); this script restores it around the lvis-api call only.

``--breakdown`` adds one more drcl run with timers on its stages, to say where drcl's time
goes: JSON parsing, drcl's own Python (validation, the top-300 cap, the federated drop, the
records handed over), faster-coco-eval's Python (its COCO indexes, ``_prepare`` and the
image x category IoU tables of ``evaluate``) and faster-coco-eval's C++ evaluate + accumulate.

    PYTHONPATH=src python benchmarks/evaluation.py [--images 5000] [--repeats 2] [--breakdown]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from drcl.evaluation import METRICS, evaluate_detections
from common import best_of  # benchmarks/common.py

GROUP_SIZES = {"r": 130, "c": 150, "f": 120}


# ----------------------------------------------------------------------------- data
def make_data(n_images: int, dets_per_image: int, seed: int) -> tuple[dict, list]:
    rng = np.random.default_rng(seed)
    freq = [g for g, k in GROUP_SIZES.items() for _ in range(k)]
    n_cat = len(freq)
    cat_ids = np.arange(1, n_cat + 1)
    # frequent categories far more likely on an image than rare ones
    weight = np.array([{"r": 0.3, "c": 2.0, "f": 20.0}[g] for g in freq]) * rng.lognormal(0, 0.5, n_cat)
    weight /= weight.sum()
    images, annotations, detections = [], [], []
    for i in range(1, n_images + 1):
        W, H = int(rng.integers(320, 641)), int(rng.integers(240, 481))
        n_box = int(rng.integers(1, 9))
        cats = rng.choice(cat_ids, n_box, p=weight)
        side = np.exp(rng.uniform(np.log(8), np.log(min(W, H) * 0.9), (n_box, 2)))
        xy = rng.uniform(0, 1, (n_box, 2)) * (np.array([W, H]) - side)
        for (x, y), (w, h), c in zip(xy, side, cats):
            annotations.append({
                "id": len(annotations) + 1, "image_id": i, "category_id": int(c),
                "bbox": [round(float(x), 2), round(float(y), 2), round(float(w), 2), round(float(h), 2)],
                "area": round(float(w * h), 2),
            })
        present = sorted({int(c) for c in cats})
        others = np.setdiff1d(cat_ids, present)
        neg = sorted(int(c) for c in rng.choice(others, int(rng.integers(2, 12)), replace=False))
        not_exh = [c for c in present if rng.random() < 0.15]
        images.append({
            "id": i, "width": W, "height": H,
            "coco_url": f"http://images.cocodataset.org/val2017/{i:012d}.jpg",
            "neg_category_ids": neg, "not_exhaustive_category_ids": not_exh,
        })
        # detections: ~2 jittered hits per box, the rest false positives (half on annotated or
        # negative categories, half on unverified ones, which LVIS drops)
        boxes = np.c_[xy, side]
        n_hit = min(dets_per_image, 2 * n_box)
        src = rng.integers(0, n_box, n_hit)
        jit = boxes[src] + rng.normal(0, 0.1, (n_hit, 4)) * np.c_[side[src], side[src]]
        det_cats = list(cats[src])
        n_fp = dets_per_image - n_hit
        fp_side = np.exp(rng.uniform(np.log(8), np.log(min(W, H) * 0.9), (n_fp, 2)))
        fp_xy = rng.uniform(0, 1, (n_fp, 2)) * (np.array([W, H]) - fp_side)
        pool = np.array(present + neg)
        fp_cats = np.where(rng.random(n_fp) < 0.5, rng.choice(pool, n_fp), rng.choice(cat_ids, n_fp))
        all_boxes = np.r_[jit, np.c_[fp_xy, fp_side]]
        all_boxes[:, 2:] = np.maximum(all_boxes[:, 2:], 1.0)
        scores = np.r_[rng.uniform(0.3, 1.0, n_hit), rng.uniform(0.0, 0.8, n_fp)]
        for box, c, s in zip(all_boxes.round(2).tolist(), det_cats + list(fp_cats), scores.round(5).tolist()):
            detections.append({"image_id": i, "category_id": int(c), "bbox": box, "score": s})
    counts = np.bincount([a["category_id"] for a in annotations], minlength=n_cat + 1)
    categories = [
        {"id": int(c), "name": f"category_{c}", "frequency": g,
         "image_count": int(counts[c]), "instance_count": int(counts[c])}
        for c, g in zip(cat_ids, freq)
    ]
    return {"images": images, "annotations": annotations, "categories": categories}, detections


# ----------------------------------------------------------------------------- runners
def run_drcl(gt_path: str, det_path: str) -> dict:
    return evaluate_detections(gt_path, det_path, iou_type="bbox")


# stage -> seconds, filled by the timers of drcl_breakdown
STAGES = {
    "read": "ground truth: read JSON + validate (drcl)",
    "json": "detections: parse JSON (Python's json)",
    "drcl": "drcl: validate, top-300 cap, federated drop, records",
    "index": "faster-coco-eval: COCO indexes (Python)",
    "prepare": "faster-coco-eval: _prepare (Python)",
    "pairs": "faster-coco-eval: image x category IoU tables (Python)",
    "cpp": "faster-coco-eval: evaluate + accumulate (C++)",
    "setup": "faster-coco-eval: COCOeval setup, accumulate, summarize",
}


def drcl_breakdown(gt_path: str, det_path: str) -> tuple[float, dict]:
    """One drcl run with timers wrapped around its stages: (total seconds, {stage: seconds});
    ``pairs`` is faster-coco-eval's ``evaluate`` less its ``_prepare`` and its C++ call, and the
    total less every stage is the rest: freeing the records and faster-coco-eval's tables on
    return (most of it), per-category AP, the result dict."""
    import faster_coco_eval
    import faster_coco_eval.core.faster_eval_api as fce_api
    from drcl.evaluation import lvis_eval

    spent = dict.fromkeys([*STAGES, "evaluate"], 0.0)

    def timer(stage, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[stage] += time.perf_counter() - start
        return timed

    targets = [
        (lvis_eval, "load_annotations", "read"), (lvis_eval, "read_json", "json"),
        (lvis_eval, "_ground_truth", "drcl"), (lvis_eval, "_detections", "drcl"),
        (faster_coco_eval.COCO, "__init__", "index"),
        (faster_coco_eval.COCOeval_faster, "_prepare", "prepare"),
        (faster_coco_eval.COCOeval_faster, "evaluate", "evaluate"),
        (fce_api._C, "COCOevalEvaluateAccumulate", "cpp"),
        (faster_coco_eval.COCOeval_faster, "__init__", "setup"),
        (faster_coco_eval.COCOeval_faster, "accumulate", "setup"),
        (faster_coco_eval.COCOeval_faster, "summarize", "setup"),
    ]
    with contextlib.ExitStack() as restore:
        for owner, name, stage in targets:
            original = getattr(owner, name)
            restore.callback(setattr, owner, name, original)
            setattr(owner, name, timer(stage, original))
        start = time.perf_counter()
        run_drcl(gt_path, det_path)
        total = time.perf_counter() - start
    spent["pairs"] = spent.pop("evaluate") - spent["prepare"] - spent["cpp"]
    return total, spent


def print_breakdown(total: float, spent: dict) -> None:
    print(f"{'drcl, one run with stage timers':<58}{'seconds':>9}{'share':>8}")
    for stage, label in STAGES.items():
        print(f"{label:<58}{spent[stage]:>9.2f}{spent[stage] / total:>8.0%}")
    rest = total - sum(spent.values())
    print(f"{'the rest: freeing records and tables, per-category AP':<58}{rest:>9.2f}{rest / total:>8.0%}")
    print(f"{'total':<58}{total:>9.2f}")
    fce = sum(spent[s] for s in ("index", "prepare", "pairs", "cpp", "setup"))
    own = spent["read"] + spent["drcl"]
    print(f"faster-coco-eval {fce:.2f} s ({fce / total:.0%}: C++ {spent['cpp']:.2f}, Python "
          f"{fce - spent['cpp']:.2f}); drcl's Python {own:.2f} s ({own / total:.0%}); JSON parsing of "
          f"the detections {spent['json']:.2f} s; the rest {rest:.2f} s")


def run_lvis_api(gt_path: str, det_path: str) -> dict:
    from lvis import LVIS, LVISEval, LVISResults

    had = hasattr(np, "float")
    np.float = float  # lvis 0.5.3 accumulate() uses np.float, removed in NumPy 2
    try:
        gt = LVIS(gt_path)
        results = LVISResults(gt, det_path, max_dets=300)
        ev = LVISEval(gt, results, iou_type="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    finally:
        if not had:
            del np.float
    return {m: float(ev.results[m]) for m in METRICS}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="validation images")
    parser.add_argument("--dets", type=int, default=100, help="detections per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many drcl runs")
    parser.add_argument("--lvis-repeats", type=int, default=1, help="best of this many lvis-api runs")
    parser.add_argument("--breakdown", action="store_true",
                        help="one more drcl run with timers: where its time goes")
    args = parser.parse_args(argv)
    logging.getLogger("lvis").setLevel(logging.ERROR)

    start = time.perf_counter()
    gt, dets = make_data(args.images, args.dets, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        gt_path, det_path = str(Path(tmp) / "val.json"), str(Path(tmp) / "dets.json")
        Path(gt_path).write_text(json.dumps(gt))
        Path(det_path).write_text(json.dumps(dets))
        groups = {g: sum(c["frequency"] == g for c in gt["categories"]) for g in "rcf"}
        print(
            f"generated in {time.perf_counter() - start:.1f} s: {len(gt['images']):,} images, "
            f"{len(gt['annotations']):,} boxes, {len(gt['categories'])} categories "
            f"(r/c/f {groups['r']}/{groups['c']}/{groups['f']}), {len(dets):,} detections"
        )
        t_ours, ours = best_of(lambda: run_drcl(gt_path, det_path), args.repeats)
        t_lvis, theirs = best_of(lambda: run_lvis_api(gt_path, det_path), args.lvis_repeats)
        breakdown = drcl_breakdown(gt_path, det_path) if args.breakdown else None

    worst = max(abs(ours[m] - theirs[m]) for m in METRICS)
    print("        " + "".join(f"{m:>8}" for m in METRICS))
    print("drcl    " + "".join(f"{ours[m]:>8.4f}" for m in METRICS))
    print("lvis-api" + "".join(f"{theirs[m]:>8.4f}" for m in METRICS))
    print(f"largest difference {worst:.2e} ({'agree' if worst <= 1e-4 else 'DISAGREE'} to 1e-4)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, NumPy {np.__version__}")
    print()
    print(f"{'bbox, load + evaluate + accumulate + summarize':<48}{'seconds':>10}")
    print(f"{f'drcl.evaluation (best of {args.repeats})':<48}{t_ours:>10.2f}")
    print(f"{f'lvis-api 0.5.3 (best of {args.lvis_repeats})':<48}{t_lvis:>10.2f}")
    print(f"{'speed-up':<48}{t_lvis / t_ours:>9.1f}x")
    print()
    print("| benchmark | drcl (s) | lvis-api (s) | speed-up |")
    print("|---|---|---|---|")
    print(
        f"| LVIS bbox eval, {args.images:,} images x {args.dets} dets, "
        f"{len(gt['categories'])} categories | {t_ours:.2f} | {t_lvis:.2f} | {t_lvis / t_ours:.1f}x |"
    )
    if breakdown is not None:
        print()
        print_breakdown(*breakdown)
    if worst > 1e-4:
        raise SystemExit("drcl and lvis-api disagree")


if __name__ == "__main__":
    main()
