"""Scoring detections under LVIS rules (bbox and segm), fast, with lvis-api's numbers.

:func:`evaluate_detections` scores a COCO-results-format detection list (a JSON file or an
already-loaded list of dicts: ``image_id``, ``category_id``, ``score`` and ``bbox`` [x, y, w, h]
or ``segmentation``) against a COCO / LVIS v1 ground-truth file, the way the official lvis-api
(``lvis.LVISEval``, v0.5.3) does, and returns AP, AP50, AP75, APs, APm, APl, APr, APc, APf as
fractions in [0, 1] (-1 where a metric is undefined: no ground truth for it) plus per-category
AP. The work is done by faster-coco-eval's C++ evaluator in ``lvis_style`` mode; the test suite
checks that the nine numbers and the per-category APs equal lvis-api's to 1e-4.

LVIS rules
----------
* **Top 300 per image.** Before anything else, only the ``max_dets`` (300) highest-scoring
  detections of each image are kept, over all categories together (lvis-api's
  ``LVISResults.limit_dets_per_image``; ties keep file order). ``result["capped"]`` counts what
  was dropped. AP is then computed with no further per-category limit.
* **Federated.** A detection of category c on image i is evaluated only if c is annotated on i
  or listed in i's ``neg_category_ids``; otherwise it is dropped (neither true nor false
  positive). Images without ``neg_category_ids`` count as having an empty list.
* **Not exhaustive.** An unmatched detection of a category in the image's
  ``not_exhaustive_category_ids`` is ignored rather than counted as a false positive.
* **Groups.** APr / APc / APf average the per-category precision over the categories whose
  ``frequency`` is ``r`` / ``c`` / ``f``. When the ground truth's categories lack ``frequency``,
  the groups come from the ground truth's own image counts (1-10, 11-100, > 100; see
  :func:`drcl.data.annotations.frequency_group`).
* Area ranges (all, small < 32², medium 32²-96², large > 96²) use the ground truth's ``area``
  and the detection's area (box w*h for bbox, mask area for segm).

Where faster-coco-eval (COCO machinery) and lvis-api differ, and what we do about it
----------------------------------------------------------------------------------
Found by reading both sources (faster_coco_eval 1.8 ``core/cocoeval.py``,
``core/faster_eval_api.py``, ``core/coco.py``; lvis 0.5.3 ``eval.py``, ``results.py``,
``lvis.py``) and checked by ``tests/evaluation/test_lvis_eval.py``:

1. *Top-300 rule.* faster-coco-eval's ``maxDets`` truncates per (image, category) pair, while
   lvis-api truncates per image (over all categories) in ``LVISResults`` and then uses every
   remaining detection (and faster-coco-eval's default ``maxDets`` [1, 10, 100] reports AP at
   100 per pair). We cap per image ourselves and set ``maxDets = [max_dets]``, which can then
   never bite (a pair cannot hold more than its image). On the test data, capping per pair
   instead moves AP by 0.007.
2. *iscrowd.* LVIS has no ``iscrowd``; lvis-api computes every IoU as non-crowd and ignores no
   ground truth, whereas faster-coco-eval sets ``ignore = iscrowd`` and uses crowd IoU for
   ``iscrowd=1``. We give every ground-truth annotation ``iscrowd=0``, also in COCO files
   with crowd regions, exactly as lvis-api treats them (on the test data with every 7th
   annotation marked crowd, keeping ``iscrowd`` moves the metrics by up to 0.12). lvis-api
   would honour an ``ignore`` key on ground-truth records; LVIS files have none and we do not
   support it.
3. *Zero areas.* lvis-api selects annotations with ``0 < area < inf`` (``LVIS.get_ann_ids``),
   so ground truth with area 0 and empty detection masks are silently left out. We drop them
   too (``result["dropped_zero_area"]``).
4. *Missing ``area``* (allowed in our ground truth, a KeyError in lvis-api): the mask area of
   the segmentation when there is one, else the box's w*h.
5. *Segm detections that also carry a ``bbox``.* lvis-api (and faster-coco-eval's
   ``loadRes``) then set the detection's area to the *box's* w*h, not the mask's, which puts
   it in the wrong area range (0.02 on APs/APm/APl of the test data). Like detectron2's LVIS
   evaluator (which pops ``bbox`` from segm results before calling lvis-api), we use the mask
   area; the box is ignored. The test compares with lvis-api fed mask-only segm results.
6. *Annotation id 0.* Both evaluators use ground-truth ids as match markers with 0 meaning
   "unmatched"; we renumber ground truth 1..N internally, so id 0 in a file is harmless.
7. *Missing keys.* lvis-api requires ``neg_category_ids`` and
   ``not_exhaustive_category_ids`` on every image (faster-coco-eval and we default them to
   empty lists) and ``frequency`` on every category (both; we fill it from image counts, see
   above).
8. *Memory.* faster-coco-eval keeps about 1 KB for every image x category pair it scores, 24
   GB for LVIS v1 val's 19,809 images x 1,203 categories. We score the categories in chunks
   of at most a million pairs and compute the nine metrics from the joined precision array,
   as its ``summarize`` does (each category's precision depends on that category alone).

Everything else (IoU thresholds .50:.05:.95, 101 recall points, precision envelope, the -1
conventions, frequency-group means over the precision array) is the same in both.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import io
import itertools
import math
import os
from collections import Counter

import numpy as np

from drcl.atomic import atomic_write
from drcl.data.annotations import GROUP_NAMES, GROUPS, Annotations, load_annotations, read_json
from drcl.data.stats import GROUP_COLORS, pyplot
from drcl.errors import DataError, import_optional


#: The nine summary metrics, in print order.
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
IOU_TYPES = ("bbox", "segm")
#: LVIS's limit on detections per image.
MAX_DETS = 300

#: Image x category pairs scored at a time. faster-coco-eval keeps about 1 KB for each pair of
#: the categories it is given; LVIS v1 val has 19,809 x 1,203 = 24M (some 24 GB at once), so
#: the categories are scored in chunks (each category's precision is its own; the metrics are
#: computed over the joined array).
_PAIRS_PER_CHUNK = 1_000_000

CSV_COLUMNS = ("id", "name", "frequency", "image_count", "instance_count", "ap")
#: Added to the per-category CSV after :func:`add_train_counts`.
TRAIN_CSV_COLUMNS = ("train_image_count", "train_instance_count")
#: The AP-vs-frequency plot names at most this many rare categories (the highest AP first).
MAX_NAMED_RARE = 30


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# --------------------------------------------------------------------------- masks


def _segm_problem(segm, height: int, width: int) -> str | None:
    """What is wrong with a segmentation (polygons, uncompressed or compressed RLE of the
    image's size), or ``None``."""
    if isinstance(segm, list):
        if not segm:
            return "segmentation is an empty list"
        for poly in segm:
            if not (isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0) or not all(
                _is_number(v) for v in poly
            ):
                return "segmentation polygons must be lists of at least 6 finite numbers (x, y pairs)"
        return None
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(v) for v in size)):
            return f"segmentation RLE needs 'size' [height, width], got {size!r}"
        if list(size) != [height, width]:
            return f"segmentation RLE size {list(size)} is not the image's [{height}, {width}]"
        if isinstance(counts, list):
            if not all(_is_int(v) and v >= 0 for v in counts) or sum(counts) != height * width:
                return "uncompressed RLE counts must be non-negative integers summing to height*width"
            return None
        if not isinstance(counts, (str, bytes)) or not counts:
            return f"segmentation RLE 'counts' must be a non-empty string or a list, got {counts!r:.40}"
        return None
    return f"segmentation must be polygons or an RLE dict, got {type(segm).__name__}"


def _to_rle(segm, height: int, width: int) -> dict:
    """Compressed RLE (``counts`` a string) of a valid segmentation (see :func:`_segm_problem`)."""
    from faster_coco_eval.core import mask as mask_utils

    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    counts = segm["counts"]
    if isinstance(counts, list):
        return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", errors="replace")
    return {"size": [height, width], "counts": counts}


# --------------------------------------------------------------------------- ground truth


def _ground_truth(ann: Annotations, iou_type: str) -> tuple[dict, Counter]:
    """The ground truth as a fresh COCO-style dict for faster-coco-eval (the Annotations
    records are not modified)."""
    path = ann.path
    dropped: Counter = Counter()
    images = []
    for img in ann.images:
        rec = {"id": img["id"], "height": img["height"], "width": img["width"]}
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            value = img.get(key, [])
            if not isinstance(value, list):
                raise DataError(f"{path}: image id {img['id']}: '{key}' must be a list, got {value!r}")
            rec[key] = value
        images.append(rec)
    sizes = {img["id"]: (int(img["height"]), int(img["width"])) for img in ann.images}
    annotations = []
    for a in ann.annotations:
        rec = {
            "id": len(annotations) + 1,  # lvis-api and faster-coco-eval treat id 0 as "unmatched"
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": list(a["bbox"]),
            "iscrowd": 0,  # lvis-api ignores iscrowd: every region is an ordinary instance
        }
        h, w = sizes[a["image_id"]]
        segm = a.get("segmentation")
        problem = None if segm is None else _segm_problem(segm, h, w)
        if iou_type == "segm":
            if segm is None:
                raise DataError(f"{path}: annotation id {a['id']}: missing key 'segmentation' (needed for segm)")
            if problem:
                raise DataError(f"{path}: annotation id {a['id']}: {problem}")
            # handed over as it is: faster-coco-eval turns polygons into RLE in C++
            rec["segmentation"] = segm
        area = a.get("area")
        if area is None:
            if segm is not None and problem is None:
                from faster_coco_eval.core import mask as mask_utils

                area = float(mask_utils.area(_to_rle(segm, h, w)))
            else:
                area = a["bbox"][2] * a["bbox"][3]
        elif not _is_number(area):
            raise DataError(f"{path}: annotation id {a['id']}: area must be a finite number, got {area!r}")
        if area <= 0:
            # lvis-api keeps annotations with 0 < area only (LVIS.get_ann_ids)
            dropped["ground_truth"] += 1
            continue
        rec["area"] = float(area)
        annotations.append(rec)
    categories = [
        {"id": cat["id"], "name": cat["name"], "frequency": freq}
        for cat, freq in zip(ann.categories, ann.frequency)
    ]
    return {"images": images, "annotations": annotations, "categories": categories}, dropped


# --------------------------------------------------------------------------- detections


def read_detections(detections: str | os.PathLike | list) -> tuple[list, str]:
    """A COCO-results detection list and the label that errors name: a JSON file is read (its
    path is the label), a list is taken as is (label ``"detections"``); anything but a JSON
    list is a one-line :class:`DataError`."""
    if isinstance(detections, (str, os.PathLike)):
        label = str(detections)
        detections = read_json(label, "JSON list of detections")
    else:
        label = "detections"
    _require_list(detections, label)
    return detections, label


def _require_list(detections, label: str) -> None:
    if not isinstance(detections, list):
        kind = {dict: "a JSON object", str: "a string"}.get(type(detections), type(detections).__name__)
        raise DataError(f"{label}: expected a JSON list of detections, got {kind}")


def validate_detections(
    detections: list, label: str, image_ids, category_ids, on_bad: str = "error"
) -> tuple[list[dict], int]:
    """The bbox detections that pass :func:`detection_problem` against the ground truth's
    ``image_ids`` (a dict keyed by image id) and ``category_ids`` (a set), and how many did not: ``on_bad="error"`` raises a
    one-line :class:`DataError` (``LABEL: detection #N: problem``) at the first bad one,
    ``"skip"`` drops it. The records are not copied."""
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', not {on_bad!r}")
    if _fields_fast(detections, image_ids, category_ids, "bbox") is not None:
        return detections, 0
    kept = []
    for n, d in enumerate(detections):
        problem = detection_problem(d, image_ids, category_ids, "bbox")
        if problem is None:
            kept.append(d)
        elif on_bad == "error":
            raise DataError(f"{label}: detection #{n}: {problem}")
    return kept, len(detections) - len(kept)


def _detections(
    detections, label: str, gt: dict, iou_type: str, max_dets: int
) -> tuple[list[dict], int, int, int]:
    """Validated detections, capped to ``max_dets`` per image, as fresh dicts for
    faster-coco-eval; also the number capped, the number of empty masks dropped and the
    number of detections the cap kept (before the federated drop).

    Only the detections that LVIS evaluates (see :func:`_evaluated`) become dicts: the rest
    would be dropped by faster-coco-eval's ``_prepare`` anyway, and building, indexing and
    skipping them was a third of the Python time at 5,000 images (BENCHMARKS.md)."""
    _require_list(detections, label)
    if not detections:
        raise DataError(f"{label}: no detections (empty list)")
    sizes = {img["id"]: (int(img["height"]), int(img["width"])) for img in gt["images"]}
    category_ids = {cat["id"] for cat in gt["categories"]}
    shape_key = "bbox" if iou_type == "bbox" else "segmentation"

    def bad(n: int, problem: str):
        raise DataError(f"{label}: detection #{n}: {problem}")

    fields = _fields_fast(detections, sizes, category_ids, shape_key)
    if fields is None:  # something is wrong: find the first bad record and say what
        fields = _fields_checked(detections, sizes, category_ids, shape_key, bad)
    image_ids, category, score_arr, boxes, box_lists = fields

    # LVIS's rule: the max_dets highest-scoring detections of each image (all categories
    # together), ties broken by file order, as lvis-api's LVISResults.limit_dets_per_image.
    count = len(detections)
    positions = {image_id: k for k, image_id in enumerate(sizes)}
    image_pos = np.fromiter(map(positions.__getitem__, image_ids), dtype=np.int64, count=count)
    order = np.lexsort((np.arange(count), -score_arr, image_pos))
    sorted_images = image_pos[order]
    group_start = np.r_[0, np.flatnonzero(np.diff(sorted_images)) + 1]
    group_sizes = np.diff(np.r_[group_start, count])
    rank = np.arange(count) - np.repeat(group_start, group_sizes)
    keep = np.sort(order[rank < max_dets])
    capped = count - keep.size
    evaluated = _evaluated(gt, positions, image_pos[keep], category, keep)

    if iou_type == "bbox":
        n_kept = keep.size
        keep = keep[evaluated]
        areas = (boxes[keep, 2] * boxes[keep, 3]).tolist()
        keep_list = keep.tolist()
        out = [
            {
                "image_id": detections[n]["image_id"],
                "category_id": detections[n]["category_id"],
                "score": score,
                "bbox": box_lists[n],  # shared, not copied: nothing downstream modifies it
                "area": area,
                "iscrowd": 0,
                "id": k,
            }
            for k, (n, score, area) in enumerate(zip(keep_list, score_arr[keep].tolist(), areas), start=1)
        ]
        return out, capped, 0, n_kept

    from faster_coco_eval.core import mask as mask_utils

    rles = []
    for n in keep.tolist():
        d = detections[n]
        h, w = sizes[d["image_id"]]
        problem = _segm_problem(d["segmentation"], h, w)
        if problem:
            bad(n, problem)
        rles.append(_to_rle(d["segmentation"], h, w))
    # The mask's area and box, not the detection's 'bbox' (see the module notes, 5).
    areas = np.asarray(mask_utils.area(rles), dtype=np.float64).tolist()
    mask_boxes = np.asarray(mask_utils.toBbox(rles), dtype=np.float64).reshape(-1, 4).tolist()
    out, empty = [], 0
    rows = zip(keep.tolist(), score_arr[keep].tolist(), rles, areas, mask_boxes, evaluated.tolist())
    for n, score, rle, area, box, is_evaluated in rows:
        if area <= 0:  # lvis-api leaves out area-0 results (LVIS.get_ann_ids)
            empty += 1
            continue
        if not is_evaluated:
            continue
        d = detections[n]
        out.append(
            {
                "image_id": d["image_id"],
                "category_id": d["category_id"],
                "score": score,
                "segmentation": rle,
                "area": area,
                "bbox": box,
                "iscrowd": 0,
                "id": len(out) + 1,
            }
        )
    return out, capped, empty, keep.size - empty


def _evaluated(gt: dict, positions: dict, image_pos: np.ndarray, category: list, rows: np.ndarray) -> np.ndarray:
    """Which detections LVIS evaluates (a bool per row): those whose category is annotated on
    their image or in its ``neg_category_ids`` (the federated rule; the others are neither true
    nor false positives). ``image_pos`` is each row's image index (``positions[image id]``),
    ``category[rows[k]]`` its category id. Membership follows faster-coco-eval's and lvis-api's
    ``cat_id in list``, so a 3.0 in a negative list counts for category 3."""
    cat_index = {cat["id"]: k for k, cat in enumerate(gt["categories"])}
    n_cat = len(cat_index)
    allowed = [positions[a["image_id"]] * n_cat + cat_index[a["category_id"]] for a in gt["annotations"]]
    for img in gt["images"]:
        for value in img["neg_category_ids"]:
            try:
                pos = cat_index.get(value)
            except TypeError:  # unhashable: equal to no category id
                continue
            if pos is not None:
                allowed.append(positions[img["id"]] * n_cat + pos)
    cat_pos = np.fromiter(map(cat_index.__getitem__, map(category.__getitem__, rows.tolist())),
                          dtype=np.int64, count=rows.size)
    return np.isin(image_pos * n_cat + cat_pos, np.array(allowed, dtype=np.int64))


def _fields_fast(detections: list, sizes: dict, category_ids: set, shape_key: str):
    """(image ids, category ids, scores, boxes array, box lists) when every record is well-formed (boxes
    ``None`` for segm), checked with C-speed set and array operations; ``None`` at the first
    sign of trouble."""
    if set(map(type, detections)) != {dict}:
        return None
    try:
        image_ids = [d["image_id"] for d in detections]
        category = [d["category_id"] for d in detections]
        scores = [d["score"] for d in detections]
        shapes = [d[shape_key] for d in detections]
    except KeyError:
        return None
    if not (set(map(type, image_ids)) <= {int} and set(image_ids) <= sizes.keys()):
        return None
    if not (set(map(type, category)) <= {int} and set(category) <= category_ids):
        return None
    if not set(map(type, scores)) <= {int, float}:
        return None
    score_arr = np.array(scores, dtype=np.float64)
    if not np.isfinite(score_arr).all():
        return None
    if shape_key != "bbox":
        return image_ids, category, score_arr, None, None
    if not (set(map(type, shapes)) == {list} and set(map(len, shapes)) == {4}):
        return None
    if not set(map(type, itertools.chain.from_iterable(shapes))) <= {int, float}:
        return None
    boxes = np.array(shapes, dtype=np.float64).reshape(-1, 4)
    if not (np.isfinite(boxes).all() and (boxes[:, 2:] > 0).all()):
        return None
    return image_ids, category, score_arr, boxes, shapes


def _fields_checked(detections: list, sizes: dict, category_ids: set, shape_key: str, bad):
    """Record-by-record version of :func:`_fields_fast` that calls ``bad(index, problem)`` at
    the first bad record."""
    image_ids, category, scores, boxes = [], [], [], []
    for n, d in enumerate(detections):
        problem = detection_problem(d, sizes, category_ids, shape_key)
        if problem:
            bad(n, problem)
        if shape_key == "bbox":
            boxes.append([float(v) for v in d["bbox"]])
        image_ids.append(d["image_id"])
        category.append(d["category_id"])
        scores.append(float(d["score"]))
    score_arr = np.array(scores, dtype=np.float64)
    if shape_key != "bbox":
        return image_ids, category, score_arr, None, None
    return image_ids, category, score_arr, np.array(boxes, dtype=np.float64).reshape(-1, 4), boxes


def detection_problem(d, image_ids, category_ids, shape_key: str = "bbox") -> str | None:
    """What is wrong with one detection record, or ``None``: not an object, a missing key, an
    image or category id not in ``image_ids`` / ``category_ids``, a score that is not a finite
    number, a ``bbox`` that is not 4 finite numbers with positive width and height (segm
    shapes are checked later, against the image's size)."""
    if not isinstance(d, dict):
        return f"is not a JSON object ({type(d).__name__})"
    missing = [k for k in ("image_id", "category_id", "score", shape_key) if k not in d]
    if missing:
        return "missing key " + ", ".join(f"'{k}'" for k in missing)
    image_id, category_id, score = d["image_id"], d["category_id"], d["score"]
    if not _is_int(image_id) or image_id not in image_ids:
        return f"unknown image id {image_id!r}"
    if not _is_int(category_id) or category_id not in category_ids:
        return f"unknown category id {category_id!r}"
    if not _is_number(score):
        return f"score must be a finite number, got {score!r}"
    if shape_key == "bbox":
        box = d["bbox"]
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_number(v) for v in box)):
            return f"bbox must be 4 finite numbers [x, y, w, h], got {box!r}"
        if box[2] <= 0 or box[3] <= 0:
            return f"bbox {list(box)} has non-positive width or height"
    return None


# --------------------------------------------------------------------------- evaluation


def check_evaluator() -> None:
    """Raise :class:`~drcl.errors.MissingDependency` when faster-coco-eval, which computes every
    score here, is not installed; callers check before slow work (inference, training)."""
    import_optional("faster_coco_eval", "LVIS evaluation")


def evaluate_detections(
    gt: str | os.PathLike | Annotations,
    detections: str | os.PathLike | list,
    iou_type: str = "bbox",
    max_dets: int = MAX_DETS,
) -> dict:
    """Score detections against a ground-truth file under LVIS rules.

    Args:
        gt: COCO / LVIS v1 ground-truth JSON (validated by
            :func:`~drcl.data.annotations.load_annotations`), or an already-loaded
            :class:`~drcl.data.annotations.Annotations`.
        detections: COCO results: a JSON file or a list of dicts with ``image_id``,
            ``category_id``, ``score`` and ``bbox`` [x, y, w, h] (``iou_type="bbox"``) or
            ``segmentation`` (``"segm"``: compressed or uncompressed RLE of the image's size, or
            polygons). Not modified.
        iou_type: ``"bbox"`` or ``"segm"``.
        max_dets: detections kept per image (the highest-scoring, over all categories), 300 in
            LVIS.

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"}`` as floats in
        [0, 1] or -1 (undefined), plus ``iou_type``, ``max_dets``, ``num_images``,
        ``num_detections`` (after the cap), ``capped`` (dropped by the per-image cap),
        ``dropped_zero_area`` and ``per_category``: one dict per ground-truth category,
        ``{id, name, frequency, ap, image_count, instance_count}`` where ``ap`` is the mean of
        the LVIS precision array over IoU thresholds and recall points (-1 with no ground
        truth) and the counts are the category record's (``None`` when it has none).

    Raises:
        DataError: bad ground truth or detections, one line naming the file and the record.
        MissingDependency: faster-coco-eval is not installed.
    """
    check_evaluator()
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be 'bbox' or 'segm', not {iou_type!r}")
    if not _is_int(max_dets) or max_dets < 1:
        raise ValueError(f"max_dets must be a positive integer, not {max_dets!r}")
    with _gc_paused():
        return _evaluate(gt, detections, iou_type, max_dets)


@contextlib.contextmanager
def _gc_paused():
    """Pause Python's cyclic garbage collector (restored on exit). Scoring builds about a
    million small, acyclic dicts and lists (the JSON records and faster-coco-eval's per
    image x category tables); with the collector on, its repeated full passes over them were
    a quarter of the time at 5,000 images (BENCHMARKS.md). Reference counting still frees
    everything that is dropped."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _evaluate(gt, detections, iou_type: str, max_dets: int) -> dict:
    """:func:`evaluate_detections` after its argument checks."""
    ann = gt if isinstance(gt, Annotations) else load_annotations(gt)
    gt_dict, dropped = _ground_truth(ann, iou_type)

    detections, label = read_detections(detections)
    dts, capped, empty, num_detections = _detections(detections, label, gt_dict, iou_type, max_dets)
    dropped["detections"] += empty

    from faster_coco_eval import COCO, COCOeval_faster

    def quiet(*args, **kwargs):
        pass

    coco_gt = COCO(gt_dict, print_function=quiet)
    coco_dt = COCO(
        {"images": gt_dict["images"], "categories": gt_dict["categories"], "annotations": dts},
        print_function=quiet,
    )
    cat_ids = sorted(coco_gt.getCatIds())
    per_chunk = max(1, _PAIRS_PER_CHUNK // max(1, len(gt_dict["images"])))
    precisions = []
    for start in range(0, len(cat_ids), per_chunk):
        evaluator = COCOeval_faster(coco_gt, coco_dt, iouType=iou_type, lvis_style=True, print_function=quiet)
        evaluator.params.catIds = cat_ids[start:start + per_chunk]
        evaluator.params.maxDets = [max_dets]
        evaluator.evaluate()
        evaluator.accumulate()
        # precision: [IoU thresholds, recall points, categories, area ranges, max dets]
        precisions.append(np.asarray(evaluator.eval["precision"])[..., -1])
        params = evaluator.params
        del evaluator  # its image x category tables go before the next chunk's are made
    precision = np.concatenate(precisions, axis=2)
    by_id = {cat["id"]: (cat, freq) for cat, freq in zip(ann.categories, ann.frequency)}
    result: dict = _summary(precision, params.iouThrs, params.areaRngLbl, [by_id[c][1] for c in cat_ids])
    precision = precision[:, :, :, params.areaRngLbl.index("all")]
    per_category = []
    for k, cat_id in enumerate(cat_ids):
        cat, freq = by_id[int(cat_id)]
        per_category.append(
            {
                "id": cat["id"],
                "name": cat["name"],
                "frequency": freq,
                "ap": _mean_valid(precision[:, :, k]),
                "image_count": cat.get("image_count"),
                "instance_count": cat.get("instance_count"),
            }
        )
    result.update(
        iou_type=iou_type,
        max_dets=max_dets,
        num_images=len(gt_dict["images"]),
        num_detections=num_detections,
        capped=capped,
        dropped_zero_area={"ground_truth": dropped["ground_truth"], "detections": dropped["detections"]},
        per_category=per_category,
    )
    return result


def _mean_valid(s: np.ndarray) -> float:
    """The mean of the precision entries that are not -1, or -1 when there are none."""
    valid = s[s > -1]
    return float(valid.mean()) if valid.size else -1.0


def _summary(precision: np.ndarray, iou_thrs, area_labels: list, frequency: list) -> dict:
    """The nine metrics from the LVIS precision array [IoU thresholds, recall points,
    categories, area ranges]: each the mean of its entries that are not -1 (-1 when there are
    none), as faster-coco-eval's and lvis-api's ``summarize`` take them; ``frequency`` is each
    category's group letter."""
    every = area_labels.index("all")
    out = {"AP": _mean_valid(precision[..., every]),
           "AP50": _mean_valid(precision[np.where(iou_thrs == 0.5)[0]][..., every]),
           "AP75": _mean_valid(precision[np.where(iou_thrs == 0.75)[0]][..., every])}
    for name, label in (("APs", "small"), ("APm", "medium"), ("APl", "large")):
        out[name] = _mean_valid(precision[..., area_labels.index(label)])
    frequency = np.asarray(frequency)
    for group in GROUPS:
        out[f"AP{group}"] = _mean_valid(precision[:, :, frequency == group, every])
    return out


# --------------------------------------------------------------------------- reporting


def format_results(result: dict) -> str:
    """The nine metrics as a small two-line table (three decimals, ``-`` where undefined)."""
    width = 7
    head = f"{result.get('iou_type', ''):<6}" + "".join(f"{m:>{width}}" for m in METRICS)
    values = "".join(
        f"{'-':>{width}}" if result[m] < 0 else f"{result[m]:>{width}.3f}" for m in METRICS
    )
    lines = [head, f"{'':<6}{values}"]
    groups = Counter(c["frequency"] for c in result.get("per_category", []))
    if groups:
        lines.append(
            f"{len(result['per_category'])} categories ("
            + ", ".join(f"{groups.get(g, 0)} {g}" for g in GROUPS)
            + f"), {result.get('num_images', '?')} images, {result.get('num_detections', '?')} detections"
            + f" (top {result.get('max_dets', MAX_DETS)} per image)"
        )
    return "\n".join(lines)


def add_train_counts(result: dict, train: Annotations) -> dict:
    """Add ``train_image_count`` and ``train_instance_count`` (counted in the training file
    ``train``, 0 for a category it lacks) to every entry of ``result["per_category"]``, in
    place; returns ``result``. Frequency groups are left as the evaluation had them."""
    by_id = {
        cat["id"]: (int(images), int(instances))
        for cat, images, instances in zip(train.categories, train.image_count, train.instance_count)
    }
    for cat in result["per_category"]:
        cat["train_image_count"], cat["train_instance_count"] = by_id.get(cat["id"], (0, 0))
    return result


def write_per_category_csv(result: dict, path: str | os.PathLike) -> None:
    """One row per category: id, name, frequency, image_count, instance_count, ap (empty
    cells for missing counts, -1 for an undefined AP), then train_image_count and
    train_instance_count when :func:`add_train_counts` has added them."""
    columns = CSV_COLUMNS
    if any("train_instance_count" in cat for cat in result["per_category"]):
        columns += TRAIN_CSV_COLUMNS
    lines = io.StringIO(newline="")
    writer = csv.writer(lines)
    writer.writerow(columns)
    for cat in result["per_category"]:
        writer.writerow(["" if cat.get(c) is None else cat[c] for c in columns])
    atomic_write(path, lambda f: f.write(lines.getvalue().encode()))


def ap_vs_frequency_points(result: dict, train_counts: dict | None = None) -> dict:
    """The points of :func:`plot_ap_vs_frequency`: per group ``{"x", "ap", "name"}`` lists,
    and ``"named"``: the (x, ap, name) of the rare categories the plot names (at most
    :data:`MAX_NAMED_RARE`, the highest AP first).

    x is ``train_counts[category id]`` when given, else the ``train_instance_count`` that
    :func:`add_train_counts` added, else the category record's ``instance_count``. Categories
    with an undefined AP (-1) or without a positive count are left out."""
    points = {g: {"x": [], "ap": [], "name": []} for g in GROUPS}
    for cat in result["per_category"]:
        if train_counts is not None:
            count = train_counts.get(cat["id"])
        elif cat.get("train_instance_count") is not None:
            count = cat["train_instance_count"]
        else:
            count = cat.get("instance_count")
        if cat["ap"] < 0 or count is None or count <= 0:
            continue
        group = points[cat["frequency"]]
        group["x"].append(count)
        group["ap"].append(cat["ap"])
        group["name"].append(cat["name"])
    rare = points["r"]
    order = sorted(range(len(rare["x"])), key=lambda k: -rare["ap"][k])[:MAX_NAMED_RARE]
    points["named"] = [(rare["x"][k], rare["ap"][k], rare["name"][k]) for k in order]
    return points


def plot_ap_vs_frequency(
    result: dict, path: str | os.PathLike, train_counts: dict | None = None
) -> None:
    """PNG of per-category AP against the category's number of training instances (log x),
    coloured by group (rare red, common orange, frequent blue), the rare categories named
    (at most :data:`MAX_NAMED_RARE`, the highest AP first).

    The count is ``train_counts[category id]`` when given, else the ``train_instance_count``
    that :func:`add_train_counts` added, else the category record's ``instance_count`` (LVIS
    v1 val carries the *train* counts there, as does ``drcl make-data``'s val file); see
    :func:`ap_vs_frequency_points`. With nothing to plot a ``ValueError`` says why.
    """
    plot_ap_vs_frequency_panels({"": result}, path, train_counts)


def plot_ap_vs_frequency_panels(
    results: dict[str, dict], path: str | os.PathLike, train_counts: dict | None = None
) -> None:
    """:func:`plot_ap_vs_frequency` for several results side by side (``{label: result}``,
    e.g. two initialisations scored on the same val set), with shared axes; a panel's title
    is its label and its AP, APr, APc, APf. ``ValueError`` when no panel has a point."""
    panels = [(label, result, ap_vs_frequency_points(result, train_counts)) for label, result in results.items()]
    if not any(points[g]["x"] for _, _, points in panels for g in GROUPS):
        raise ValueError(
            "nothing to plot: no category has both a defined AP and a positive training instance count "
            "(pass train_counts={category id: instances} or add_train_counts() if the ground truth has "
            "no instance_count)"
        )
    plt = pyplot("the AP-vs-frequency plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.8), dpi=120, squeeze=False,
                             sharex=True, sharey=True)
    for ax, (label, result, points) in zip(axes[0], panels):
        for g in GROUPS:
            xs, ys = points[g]["x"], points[g]["ap"]
            if xs:
                ax.scatter(xs, ys, s=14, alpha=0.75, color=GROUP_COLORS[g], label=f"{GROUP_NAMES[g]} ({len(xs)})")
        for x, y, name in points["named"]:
            ax.annotate(name, (x, y), xytext=(3, 2), textcoords="offset points", fontsize=6, color=GROUP_COLORS["r"])
        ax.set_xscale("log")
        ax.set_xlabel("training instances of the category (log scale)")
        ax.set_ylabel(f"{result.get('iou_type', '')} AP".strip())
        ax.set_ylim(-0.02, 1.02)
        numbers = "   ".join(f"{m} {'-' if result[m] < 0 else format(result[m], '.3f')}"
                             for m in ("AP", "APr", "APc", "APf"))
        ax.set_title(f"{label}: {numbers}" if label else numbers, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
