"""LVIS-rules evaluation: equality with the official lvis-api, validation, reporting."""

import copy
import csv
import gc
import json
import math

import lvis
import numpy as np
import pycocotools.mask as mask_utils  # lvis-api imports it without declaring it (a test extra)
import pytest

from drcl.errors import DataError
from drcl.data.annotations import load_annotations
from drcl.evaluation import (
    CSV_COLUMNS,
    METRICS,
    TRAIN_CSV_COLUMNS,
    add_train_counts,
    evaluate_detections,
    format_results,
    plot_ap_vs_frequency,
    plot_ap_vs_frequency_panels,
    write_per_category_csv,
)
from drcl.evaluation.lvis_eval import MAX_NAMED_RARE, ap_vs_frequency_points

pytestmark = pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning")

# ----------------------------------------------------------------------------- synthetic data

# id, frequency; 9 categories with ground truth plus 10 (rare) with none: its AP is -1
CATEGORIES = [(3, "f"), (5, "f"), (8, "f"), (11, "c"), (12, "c"), (20, "c"), (21, "r"), (30, "r"), (31, "r"), (40, "r")]
NO_GT_CATEGORY = 40


def _polygon(rng, x, y, w, h):
    """An octagon-ish polygon whose bounding box is exactly [x, y, w, h]."""
    fx = rng.uniform(0.15, 0.4, 4)
    fy = rng.uniform(0.15, 0.4, 4)
    pts = [
        (x + fx[0] * w, y), (x + w - fx[1] * w, y),
        (x + w, y + fy[0] * h), (x + w, y + h - fy[1] * h),
        (x + w - fx[2] * w, y + h), (x + fx[3] * w, y + h),
        (x, y + h - fy[2] * h), (x, y + fy[3] * h),
    ]
    return [[round(float(v), 2) for p in pts for v in p]]


def _rle(poly, h, w):
    return mask_utils.merge(mask_utils.frPyObjects(poly, h, w))


def make_lvis(seed=0, n_images=40):
    """An LVIS v1-style ground truth: r/c/f categories, polygons, neg and not-exhaustive lists,
    boxes of all three area ranges, annotation ids starting at 1."""
    rng = np.random.default_rng(seed)
    cat_ids = [c for c, _ in CATEGORIES if c != NO_GT_CATEGORY]
    weights = np.array([6, 5, 4, 3, 3, 2, 1, 1, 1], float)
    images, annotations = [], []
    for i in range(1, n_images + 1):
        W, H = int(rng.integers(140, 220)), int(rng.integers(120, 200))
        images.append({
            "id": i, "width": W, "height": H,
            "coco_url": f"http://images.cocodataset.org/val2017/{i:012d}.jpg",
        })
        present = set()
        for _ in range(int(rng.integers(1, 6))):
            c = int(rng.choice(cat_ids, p=weights / weights.sum()))
            scale = rng.choice([12, 40, 110])  # small, medium, large
            w = float(min(W - 2, max(4.0, scale * rng.uniform(0.6, 1.4))))
            h = float(min(H - 2, max(4.0, scale * rng.uniform(0.6, 1.4))))
            x = float(rng.uniform(0, W - w)); y = float(rng.uniform(0, H - h))
            poly = _polygon(rng, x, y, w, h)
            rle = _rle(poly, H, W)
            xs, ys = poly[0][0::2], poly[0][1::2]
            annotations.append({
                "id": len(annotations) + 1, "image_id": i, "category_id": c,
                "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                "area": float(mask_utils.area(rle)), "segmentation": poly,
            })
            present.add(c)
        absent = [c for c, _ in CATEGORIES if c not in present]
        neg = sorted(int(c) for c in rng.choice(absent, size=int(rng.integers(0, 4)), replace=False))
        if i % 4 == 0 and NO_GT_CATEGORY not in neg:
            neg.append(NO_GT_CATEGORY)  # detections of the no-GT category are evaluated here
        not_exh = sorted(c for c in present if rng.random() < 0.3)
        images[-1]["neg_category_ids"] = neg
        images[-1]["not_exhaustive_category_ids"] = not_exh
    counts = {c: (0, 0) for c, _ in CATEGORIES}
    for c in counts:
        imgs = {a["image_id"] for a in annotations if a["category_id"] == c}
        counts[c] = (len(imgs) * 7 + 1, sum(a["category_id"] == c for a in annotations) * 7 + 1)
    categories = [
        {"id": c, "name": f"cat_{c}", "synonyms": [f"cat_{c}"], "frequency": f,
         "image_count": counts[c][0], "instance_count": counts[c][1]}
        for c, f in CATEGORIES
    ]
    return {"images": images, "annotations": annotations, "categories": categories}


def make_detections(gt, seed=1, crowded_image=None):
    """Jittered copies of the ground truth (some twice, some missed) plus false positives of
    every kind: annotated, negative, not-exhaustive and unverified categories. Each detection
    carries both a box and a compressed-RLE mask. ``crowded_image`` gets 310 detections."""
    rng = np.random.default_rng(seed)
    sizes = {img["id"]: (img["height"], img["width"]) for img in gt["images"]}
    cat_ids = [c for c, _ in CATEGORIES]
    dets = []

    def add(image_id, cat, x, y, w, h, score):
        H, W = sizes[image_id]
        x, y = float(np.clip(x, 0, W - 2)), float(np.clip(y, 0, H - 2))
        w, h = float(np.clip(w, 1.5, W - x)), float(np.clip(h, 1.5, H - y))
        rle = _rle(_polygon(rng, x, y, w, h), H, W)
        dets.append({
            "image_id": image_id, "category_id": int(cat),
            "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
            "score": round(float(score), 5),
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
        })

    for a in gt["annotations"]:
        if a["image_id"] == crowded_image:
            continue  # found only by low-scoring detections, below the cap (see the end)
        for _ in range(int(rng.choice([0, 1, 1, 1, 2]))):
            x, y, w, h = a["bbox"]
            j = rng.normal(0, 0.08, 4)
            add(a["image_id"], a["category_id"], x + j[0] * w, y + j[1] * h, w * (1 + j[2]), h * (1 + j[3]),
                rng.uniform(0.2, 1.0))
    for img in gt["images"]:
        H, W = img["height"], img["width"]
        for _ in range(int(rng.integers(2, 9))):
            w, h = float(rng.uniform(6, W / 2)), float(rng.uniform(6, H / 2))
            add(img["id"], rng.choice(cat_ids), rng.uniform(0, W - w), rng.uniform(0, H - h), w, h,
                rng.uniform(0.0, 0.9))
    if crowded_image is not None:
        img = gt["images"][crowded_image - 1]
        H, W = img["height"], img["width"]
        present = [a for a in gt["annotations"] if a["image_id"] == crowded_image]
        assert len(present) <= 10
        for a in present:  # hits ranked below 300 on their image: LVIS's cap drops them all
            x, y, w, h = a["bbox"]
            add(crowded_image, a["category_id"], x + 0.5, y + 0.5, w, h, rng.uniform(0.0, 0.01))
        while sum(d["image_id"] == crowded_image for d in dets) < 310:
            a = present[len(dets) % len(present)]
            x, y, w, h = a["bbox"]
            add(crowded_image, a["category_id"], x + w * 0.6, y, w, h, rng.uniform(0.05, 0.5))  # near-misses
    order = rng.permutation(len(dets))  # results files are not grouped by image
    return [dets[k] for k in order]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("lvis_eval")
    gt = make_lvis()
    dets = make_detections(gt, crowded_image=7)
    gt_path = root / "val.json"
    gt_path.write_text(json.dumps(gt))
    det_path = root / "dets.json"
    det_path.write_text(json.dumps(dets))
    return gt, dets, gt_path, det_path


def lvis_api(gt_path, dets, iou_type, max_dets=300):
    """The official numbers: lvis-api 0.5.3 LVISEval on the same input (detectron2-style: a
    segm result carries only its mask, so its area is the mask's)."""
    dets = copy.deepcopy(dets)
    for d in dets:
        d.pop("segmentation" if iou_type == "bbox" else "bbox")
    lvis_gt = lvis.LVIS(str(gt_path))
    results = lvis.LVISResults(lvis_gt, dets, max_dets=max_dets)
    ev = lvis.LVISEval(lvis_gt, results, iou_type=iou_type)
    ev.run()
    precision = ev.eval["precision"][:, :, :, 0]  # [T, R, K, area=all]
    per_cat = {}
    for k, cat_id in enumerate(ev.params.cat_ids):
        p = precision[:, :, k]
        per_cat[cat_id] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
    return {m: float(ev.results[m]) for m in METRICS}, per_cat


# ----------------------------------------------------------------------------- lvis-api equality


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("categories_at_a_time", [None, 3])
def test_equals_lvis_api(dataset, iou_type, categories_at_a_time, monkeypatch):
    """Also with the categories scored a few at a time (as LVIS v1 val's 1,203 are, a million
    image x category pairs at a time): the metrics over the joined precision array."""
    gt, dets, gt_path, det_path = dataset
    monkeypatch.setattr(np, "float", float, raising=False)  # lvis 0.5.3 uses np.float (gone in NumPy 2)
    if categories_at_a_time:
        import drcl.evaluation.lvis_eval as lvis_eval

        monkeypatch.setattr(lvis_eval, "_PAIRS_PER_CHUNK", categories_at_a_time * len(gt["images"]))
        assert len(gt["categories"]) % categories_at_a_time != 0  # and a last chunk that is shorter
    ours = evaluate_detections(gt_path, det_path, iou_type=iou_type)
    theirs, theirs_per_cat = lvis_api(gt_path, dets, iou_type)
    for m in METRICS:
        assert ours[m] == pytest.approx(theirs[m], abs=1e-4), m
    # the data exercises every metric (none undefined) and every rule (dropping the negative
    # or the not-exhaustive lists, or capping per category instead of per image, moves AP by
    # 0.2, 0.05 and 0.007 on this data)
    assert all(0 < ours[m] < 1 for m in METRICS), {m: ours[m] for m in METRICS}
    assert sum(bool(img["neg_category_ids"]) for img in gt["images"]) > 20
    assert sum(bool(img["not_exhaustive_category_ids"]) for img in gt["images"]) > 10
    assert ours["capped"] == 10 and ours["num_detections"] == len(dets) - 10
    assert ours["num_images"] == len(gt["images"])
    per_cat = {c["id"]: c["ap"] for c in ours["per_category"]}
    assert per_cat.keys() == theirs_per_cat.keys()
    for cat_id, ap in per_cat.items():
        assert ap == pytest.approx(theirs_per_cat[cat_id], abs=1e-4), cat_id
    assert per_cat[NO_GT_CATEGORY] == -1.0


def test_equals_lvis_api_with_a_small_cap_and_a_loaded_list(dataset, monkeypatch):
    gt, dets, gt_path, _ = dataset
    monkeypatch.setattr(np, "float", float, raising=False)
    before = copy.deepcopy(dets)
    ours = evaluate_detections(gt_path, dets, iou_type="bbox", max_dets=4)
    assert dets == before  # the caller's list is not modified
    theirs, _ = lvis_api(gt_path, dets, "bbox", max_dets=4)
    for m in METRICS:
        assert ours[m] == pytest.approx(theirs[m], abs=1e-4), m
    assert ours["capped"] > 0


def test_zero_area_ground_truth_is_left_out_like_lvis_api(dataset, tmp_path, monkeypatch):
    gt, dets, _, _ = dataset
    monkeypatch.setattr(np, "float", float, raising=False)
    other = copy.deepcopy(gt)
    for a in other["annotations"][::5]:
        a["area"] = 0
    path = tmp_path / "zero.json"
    path.write_text(json.dumps(other))
    ours = evaluate_detections(path, dets)
    theirs, _ = lvis_api(path, dets, "bbox")
    for m in METRICS:
        assert ours[m] == pytest.approx(theirs[m], abs=1e-4), m
    assert ours["dropped_zero_area"] == {"ground_truth": len(other["annotations"][::5]), "detections": 0}


def test_segm_ignores_a_detection_bbox(dataset):
    """The mask decides a segm detection's area range, whatever its 'bbox' says."""
    _, dets, gt_path, _ = dataset
    without = [{k: v for k, v in d.items() if k != "bbox"} for d in dets]
    shifted = [dict(d, bbox=[0, 0, 1000, 1000]) for d in dets]
    a = evaluate_detections(gt_path, without, iou_type="segm")
    b = evaluate_detections(gt_path, shifted, iou_type="segm")
    assert {m: a[m] for m in METRICS} == {m: b[m] for m in METRICS}


def _uncompressed(rle):
    from faster_coco_eval.core import mask as fce_mask  # pycocotools' decode warns on NumPy 2

    flat = fce_mask.decode(rle).flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.r_[0, edges, flat.size])
    if flat[0]:
        runs = np.r_[0, runs]  # counts start with a run of zeros
    return {"size": rle["size"], "counts": [int(v) for v in runs]}


def test_segmentation_formats_and_missing_area(dataset, tmp_path):
    """Ground truth as polygons, compressed or uncompressed RLE, with or without ``area``
    (then the mask's), loaded or not, and detections as RLE or polygons: the same numbers."""
    from drcl.data.annotations import load_annotations

    gt, dets, gt_path, _ = dataset
    other = copy.deepcopy(gt)
    for k, a in enumerate(other["annotations"]):
        img = other["images"][a["image_id"] - 1]
        rle = _rle(a["segmentation"], img["height"], img["width"])
        if k % 3 == 0:
            a["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
        elif k % 3 == 1:
            a["segmentation"] = _uncompressed(rle)
        if k % 2:
            del a["area"]
    path = tmp_path / "other.json"
    path.write_text(json.dumps(other))
    some = [d for d in dets if d["image_id"] <= 12]
    as_polygons = copy.deepcopy(some)
    for d in as_polygons:
        x, y, w, h = d["bbox"]
        d["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    for iou_type in ("bbox", "segm"):
        a = evaluate_detections(gt_path, dets, iou_type=iou_type)
        b = evaluate_detections(load_annotations(path), dets, iou_type=iou_type)
        assert {m: a[m] for m in METRICS} == pytest.approx({m: b[m] for m in METRICS}, abs=1e-12)
    # polygons in the results are rasterised like the same masks given as RLE
    as_rle = [dict(d, segmentation=_uncompressed(_rle(d["segmentation"], *_hw(gt, d)))) for d in as_polygons]
    a = evaluate_detections(gt_path, as_polygons, iou_type="segm")
    b = evaluate_detections(gt_path, as_rle, iou_type="segm")
    assert {m: a[m] for m in METRICS} == {m: b[m] for m in METRICS}


def _hw(gt, d):
    img = gt["images"][d["image_id"] - 1]
    return img["height"], img["width"]


# ----------------------------------------------------------------------------- LVIS rules by hand


def _one_image_gt(tmp_path, polygons=False):
    gt = {
        "images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.jpg",
                    "neg_category_ids": [2], "not_exhaustive_category_ids": [3]}],
        "annotations": [
            {"id": 0, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600},
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [60, 60, 30, 30], "area": 900},
        ],
        "categories": [{"id": k, "name": f"c{k}", "frequency": f} for k, f in ((1, "f"), (2, "c"), (3, "r"), (4, "r"))],
    }
    if polygons:
        for a in gt["annotations"]:
            x, y, w, h = a["bbox"]
            a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return path


def _det(cat, box, score):
    return {"image_id": 1, "category_id": cat, "bbox": box, "score": score}


def test_federated_rules(tmp_path):
    gt = _one_image_gt(tmp_path)  # annotation id 0 is fine: ids are renumbered internally
    hits = [_det(1, [10, 10, 40, 40], 0.5), _det(3, [60, 60, 30, 30], 0.5)]
    base = evaluate_detections(gt, hits)
    assert base["AP"] == pytest.approx(1.0) and base["APc"] == -1
    # a confident false positive of a category neither annotated nor negative: dropped
    unverified = evaluate_detections(gt, hits + [_det(4, [0, 0, 20, 20], 0.9)])
    assert unverified["AP"] == pytest.approx(1.0)
    # of a not-exhaustive category: ignored
    not_exhaustive = evaluate_detections(gt, hits + [_det(3, [0, 0, 20, 20], 0.9)])
    assert not_exhaustive["AP"] == pytest.approx(1.0)
    # of a negative category with no ground truth anywhere: APc stays undefined
    negative = evaluate_detections(gt, hits + [_det(2, [0, 0, 20, 20], 0.9)])
    assert negative["APc"] == -1
    # of a negative category that has ground truth on another image: a false positive ranked
    # above that category's one true positive, so its AP is precision 1/2 at every recall
    data = json.loads(gt.read_text())
    data["images"].append({"id": 2, "width": 100, "height": 100, "file_name": "b.jpg",
                           "neg_category_ids": [], "not_exhaustive_category_ids": []})
    data["annotations"].append({"id": 2, "image_id": 2, "category_id": 2, "bbox": [20, 20, 40, 40], "area": 1600})
    gt2 = tmp_path / "gt_elsewhere.json"
    gt2.write_text(json.dumps(data))
    found = hits + [{"image_id": 2, "category_id": 2, "bbox": [20, 20, 40, 40], "score": 0.5}]
    assert evaluate_detections(gt2, found)["APc"] == pytest.approx(1.0)
    negative = evaluate_detections(gt2, found + [_det(2, [0, 0, 20, 20], 0.9)])
    assert negative["APc"] == pytest.approx(0.5)
    assert negative["APf"] == pytest.approx(1.0) and negative["APr"] == pytest.approx(1.0)
    # the same detection on an image that does not list category 2 as negative: unverified, dropped
    data["images"][0]["neg_category_ids"] = []
    gt2.write_text(json.dumps(data))
    assert evaluate_detections(gt2, found + [_det(2, [0, 0, 20, 20], 0.9)])["APc"] == pytest.approx(1.0)
    # of an annotated, exhaustive category: a false positive ranked first
    annotated = evaluate_detections(gt, hits + [_det(1, [0, 60, 20, 20], 0.9)])
    assert annotated["APf"] < 0.6


def test_negative_list_membership_is_equality(tmp_path):
    """The federated drop happens before faster-coco-eval sees the detections; it must read a
    negative list as lvis-api does (``cat_id in list``): 2.0 names category 2, an unhashable
    entry names none."""
    gt = json.loads(_one_image_gt(tmp_path).read_text())
    gt["images"].append({"id": 2, "width": 100, "height": 100, "file_name": "b.jpg"})
    gt["annotations"].append({"id": 2, "image_id": 2, "category_id": 2, "bbox": [10, 10, 40, 40], "area": 1600})
    hits = [_det(1, [10, 10, 40, 40], 0.5), _det(3, [60, 60, 30, 30], 0.5),
            {"image_id": 2, "category_id": 2, "bbox": [10, 10, 40, 40], "score": 0.5}]
    fp = _det(2, [0, 60, 20, 20], 0.9)  # category 2 on image 1, which lists it as negative

    def apc(neg):
        gt["images"][0]["neg_category_ids"] = neg
        path = tmp_path / "gt2.json"
        path.write_text(json.dumps(gt))
        return evaluate_detections(path, hits + [fp])["APc"]

    assert apc([]) == pytest.approx(1.0)  # unverified: dropped
    counted = apc([2])
    assert counted < 0.6  # negative: a false positive ranked first
    assert apc([2.0]) == counted
    assert apc([[2], 2]) == counted and apc([[2]]) == pytest.approx(1.0)


def test_garbage_collector_state_is_restored(tmp_path):
    gt = _one_image_gt(tmp_path)
    hits = [_det(1, [10, 10, 40, 40], 0.5)]
    assert gc.isenabled()
    evaluate_detections(gt, hits)
    assert gc.isenabled()
    with pytest.raises(DataError):
        evaluate_detections(gt, [_det(9, [10, 10, 40, 40], 0.5)])
    assert gc.isenabled()
    gc.disable()
    try:
        evaluate_detections(gt, hits)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_top_300_per_image_over_all_categories(tmp_path):
    gt = _one_image_gt(tmp_path)
    noise = [_det(4, [1, 1, 5, 5], 0.9)] * 300  # unverified category: dropped after the cap
    late_hit = [_det(1, [10, 10, 40, 40], 0.1)]
    assert evaluate_detections(gt, noise + late_hit)["APf"] == 0.0
    assert evaluate_detections(gt, noise + late_hit, max_dets=301)["APf"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- bad input


def _good():
    return {"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.5}


BAD_RECORDS = [
    ({"image_id": 99}, "unknown image id 99"),
    ({"image_id": "1"}, "unknown image id '1'"),
    ({"category_id": 77}, "unknown category id 77"),
    ({"bbox": [1, 2, 3]}, "bbox must be 4 finite numbers"),
    ({"bbox": [1, 2, float("nan"), 3]}, "bbox must be 4 finite numbers"),
    ({"bbox": [1, 2, "3", 3]}, "bbox must be 4 finite numbers"),
    ({"bbox": [1, 2, 0, 3]}, "non-positive width or height"),
    ({"bbox": [1, 2, 5, -3]}, "non-positive width or height"),
    ({"score": float("inf")}, "score must be a finite number"),
    ({"score": None}, "score must be a finite number"),
    ({"image_id": None, "drop": "image_id"}, "missing key 'image_id'"),
    ({"drop": "category_id"}, "missing key 'category_id'"),
    ({"drop": "score"}, "missing key 'score'"),
    ({"drop": "bbox"}, "missing key 'bbox'"),
]


@pytest.mark.parametrize("change,problem", BAD_RECORDS)
def test_bad_detection_names_file_and_record(tmp_path, change, problem):
    gt = _one_image_gt(tmp_path)
    bad = {**_good(), **{k: v for k, v in change.items() if k != "drop"}}
    bad.pop(change.get("drop"), None)
    path = tmp_path / "dets.json"
    path.write_text(json.dumps([_good(), _good(), bad], allow_nan=True))
    with pytest.raises(DataError) as e:
        evaluate_detections(gt, path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: detection #2: ") and problem in msg and "\n" not in msg


def test_segm_needs_a_segmentation(tmp_path):
    gt = _one_image_gt(tmp_path, polygons=True)
    path = tmp_path / "dets.json"
    path.write_text(json.dumps([_good()]))
    with pytest.raises(DataError, match=rf"^{path}: detection #0: missing key 'segmentation'"):
        evaluate_detections(gt, path, iou_type="segm")


def test_segm_rle_of_the_wrong_size(tmp_path):
    gt = _one_image_gt(tmp_path, polygons=True)
    rle = mask_utils.encode(np.asfortranarray(np.ones((50, 50), np.uint8)))
    det = dict(_good(), segmentation={"size": [50, 50], "counts": rle["counts"].decode()})
    with pytest.raises(DataError, match=r"^detections: detection #0: segmentation RLE size \[50, 50\]"):
        evaluate_detections(gt, [det], iou_type="segm")


@pytest.mark.parametrize(
    "content,problem",
    [
        ("", "empty file"),
        ("  \n", "empty file"),
        ("[]", "no detections"),
        ('{"image_id": 1}', "expected a JSON list of detections, got a JSON object"),
        ("[{", "malformed JSON"),
    ],
)
def test_bad_detection_file(tmp_path, content, problem):
    gt = _one_image_gt(tmp_path)
    path = tmp_path / "dets.json"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        evaluate_detections(gt, path)
    assert str(e.value).startswith(f"{path}: ") and problem in str(e.value)


def test_missing_detection_file(tmp_path):
    gt = _one_image_gt(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        evaluate_detections(gt, tmp_path / "nope.json")


def test_segm_ground_truth_needs_segmentation(tmp_path):
    gt = _one_image_gt(tmp_path)  # boxes only
    with pytest.raises(DataError, match=rf"^{gt}: annotation id 0: missing key 'segmentation'"):
        evaluate_detections(gt, [_good()], iou_type="segm")


def test_bad_arguments(tmp_path):
    gt = _one_image_gt(tmp_path)
    with pytest.raises(ValueError, match="iou_type"):
        evaluate_detections(gt, [_good()], iou_type="keypoints")
    with pytest.raises(ValueError, match="max_dets"):
        evaluate_detections(gt, [_good()], max_dets=0)


# ----------------------------------------------------------------------------- reporting


@pytest.fixture(scope="module")
def result(dataset):
    _, _, gt_path, det_path = dataset
    return evaluate_detections(gt_path, det_path)


def test_per_category_csv(result, tmp_path):
    path = tmp_path / "per_category.csv"
    write_per_category_csv(result, path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == CSV_COLUMNS == ("id", "name", "frequency", "image_count", "instance_count", "ap")
    assert [int(r["id"]) for r in rows] == [c for c, _ in CATEGORIES]
    assert [r["frequency"] for r in rows] == [f for _, f in CATEGORIES]
    for row, cat in zip(rows, result["per_category"]):
        assert math.isclose(float(row["ap"]), cat["ap"]) and int(row["image_count"]) == cat["image_count"]
    assert float(rows[-1]["ap"]) == -1.0


def test_plot_ap_vs_frequency(result, tmp_path):
    path = tmp_path / "ap.png"
    plot_ap_vs_frequency(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    other = tmp_path / "ap_train.png"
    plot_ap_vs_frequency(result, other, train_counts={c["id"]: 5 for c in result["per_category"]})
    assert other.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_ap_vs_frequency(result, tmp_path / "none.png", train_counts={})


def test_train_counts_in_csv_and_plot(result, dataset, tmp_path):
    gt, _, _, _ = dataset
    # a training file: category 3 in two images (three boxes), category 21 in one, 40 absent
    train = {"images": [{"id": i, "width": 50, "height": 50, "file_name": f"{i}.jpg"} for i in (1, 2)],
             "categories": gt["categories"],
             "annotations": [{"id": k, "image_id": i, "category_id": c, "bbox": [1, 1, 5, 5]}
                             for k, (i, c) in enumerate([(1, 3), (1, 3), (2, 3), (2, 21)], start=1)]}
    path = tmp_path / "train.json"
    path.write_text(json.dumps(train))
    counted = add_train_counts(copy.deepcopy(result), load_annotations(path))
    by_id = {c["id"]: c for c in counted["per_category"]}
    assert (by_id[3]["train_image_count"], by_id[3]["train_instance_count"]) == (2, 3)
    assert (by_id[21]["train_image_count"], by_id[21]["train_instance_count"]) == (1, 1)
    assert by_id[5]["train_instance_count"] == 0 and by_id[40]["train_instance_count"] == 0

    csv_path = tmp_path / "per_category.csv"
    write_per_category_csv(counted, csv_path)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == CSV_COLUMNS + TRAIN_CSV_COLUMNS
    assert {int(r["id"]): int(r["train_instance_count"]) for r in rows} == {
        c["id"]: c["train_instance_count"] for c in counted["per_category"]}

    # the plot's x: the train instance counts (categories without any left out), rare ones named
    points = ap_vs_frequency_points(counted)
    assert points["f"]["x"] == [3] and points["r"]["x"] == [1]
    assert points["named"] == [(1, by_id[21]["ap"], "cat_21")]
    # without train counts: the ground truth's instance_count (LVIS val carries train counts)
    plain = ap_vs_frequency_points(result)
    assert sorted(plain["c"]["x"]) == sorted(c["instance_count"] for c in gt["categories"] if c["id"] in (11, 12, 20))
    assert [name for *_, name in plain["named"]] == [
        c["name"] for c in sorted((c for c in result["per_category"] if c["frequency"] == "r" and c["ap"] >= 0),
                                  key=lambda c: -c["ap"])][:MAX_NAMED_RARE]
    png = tmp_path / "two.png"
    plot_ap_vs_frequency_panels({"a": counted, "b": result}, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_format_results(result):
    text = format_results(result)
    lines = text.splitlines()
    assert lines[0].split() == ["bbox", *METRICS]
    assert [float(v) for v in lines[1].split()] == pytest.approx([result[m] for m in METRICS], abs=5e-4)
    assert "10 categories (4 r, 3 c, 3 f)" in text
    undefined = dict(result, APr=-1.0)
    assert format_results(undefined).splitlines()[1].split()[6] == "-"
