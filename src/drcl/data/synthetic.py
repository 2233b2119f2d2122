"""A deterministic synthetic long-tailed detection dataset in LVIS v1 format.

Used for demos, tests and CI on the ``tiny`` preset (docs/data.md), where LVIS itself
is out of reach. ``make_dataset`` writes::

    out_dir/annotations/train.json   out_dir/images/train/000000000001.jpg ...
    out_dir/annotations/val.json     out_dir/images/val/000000001001.jpg ...

Design
------
Classes. A category is a point of a shape x texture x palette grid (8 x 9 x 17 = 1,224
points, enough to mimic LVIS's 1,203 categories). The grid is enumerated shell by shell
(sorted by the largest of the three attribute indices), so the first ``n`` classes always
fill a near-cube: 8 classes are 2 shapes x 2 textures x 2 palettes; the default 60 are most of
4 x 4 x 4 (circle, square, triangle, star x outlined, horizontal stripes, dots, vertical
stripes x red-white, blue-yellow, green-black, white-red). Every class therefore has siblings
that differ from it in one attribute only (a red-white striped circle next to a red-white
striped square, a red-white vertically striped circle and a white-red striped circle): the
classes are fine-grained, and a tail class can only be told from its head siblings by
detail. A class's appearance is a function of its id alone (:func:`class_spec`), never of
the seed. ``first_class`` shifts the ids a dataset uses (``classes`` ids from ``first_class``
on), so two datasets can have disjoint classes: the upstream set that stands in for ImageNet
(``make-data --first-class 61 --imbalance 1``) shares no class with a default 60-class target
set, only the attribute values that its classes combine differently.

Counts. The seed decides which class gets which frequency rank (a seeded permutation). Train
instance counts fall geometrically with rank, the largest about ``imbalance`` times the
smallest, and every class gets at least one instance (:func:`long_tail_counts`). Val counts
are equal across classes (within one instance), so rare classes can be scored. Every third
category id is "gregarious": its instances come in runs that tend to share an image, so
image-level and instance-level frequencies differ, as they do in LVIS (docs/method.md, DRB).

Layout. Each image holds 1-6 objects, longest side 15%-45% of the image, aspect 0.75-1,
rotated by up to 15 degrees, at most 20% of each side cut by the image border. Placement
prefers spots that cover at most 35% of an earlier object's box; later objects occlude
earlier ones. Annotations keep the full (border-clipped) polygon and its tight box.
Crowded scenes (``max_objects`` above 6, ``drcl make-data --max-objects``): 1-``max_objects``
objects per image, their sizes scaled by sqrt(6 / max_objects) so the scene keeps its
coverage; with more objects than the 8 boxes LCL takes per image, instance-level rebalancing
has boxes to choose between.

Planning and rendering are separate. :func:`plan_dataset` is pure and cheap: it fixes every
image's objects (class, pose, polygon), so annotations and frequency groups can be computed
without drawing a pixel (:func:`lvis_dicts`). :func:`render_image` draws one planned image:
a cluttered background (smooth colour field, low-contrast blobs and lines, pixel noise) and
the textured objects, with numpy and PIL.ImageDraw, no per-pixel Python loops.

Randomness. Every random draw comes from a ``numpy.random.Generator(PCG64)`` seeded by
``SeedSequence(seed, spawn_key=(split, purpose, index))``: one stream per split for counts,
and per image one for layout and one for pixels. Images can be rendered in any order or in
parallel. The same seed gives the same bytes (JSON with sorted keys, JPEG at quality 90,
4:4:4 chroma, with a given Pillow version); another seed gives another dataset.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from drcl.data.annotations import frequency_group  # LVIS groups: r 1-10, c 11-100, f > 100

__all__ = [
    "MAX_CLASSES",
    "ClassSpec",
    "DatasetPlan",
    "ImagePlan",
    "ObjectPlan",
    "class_spec",
    "long_tail_counts",
    "lvis_dicts",
    "make_dataset",
    "plan_dataset",
    "render_image",
]

# Attribute values are ordered so that the first few of each are the most distinct ones
# (the default 60 classes use the first four of each, see the module docstring).
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "ring", "cross")
TEXTURES = (
    "outlined",
    "horizontal-striped",
    "dotted",
    "vertical-striped",
    "checkered",
    "diagonal-striped",
    "antidiagonal-striped",
    "grid",
    "bullseye",
)
COLOURS = {
    "red": (215, 35, 35),
    "green": (30, 165, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (245, 135, 20),
    "purple": (125, 40, 175),
    "cyan": (40, 205, 215),
    "magenta": (220, 50, 190),
}
# (fill, pattern) colour pairs; reversed pairs are distinct palettes on purpose.
PALETTES = (
    ("red", "white"),
    ("blue", "yellow"),
    ("green", "black"),
    ("white", "red"),
    ("yellow", "blue"),
    ("black", "green"),
    ("orange", "purple"),
    ("cyan", "magenta"),
    ("purple", "orange"),
    ("magenta", "cyan"),
    ("red", "yellow"),
    ("blue", "white"),
    ("green", "magenta"),
    ("yellow", "red"),
    ("white", "blue"),
    ("black", "orange"),
    ("cyan", "red"),
)
MAX_CLASSES = len(SHAPES) * len(TEXTURES) * len(PALETTES)

MIN_OBJECTS, MAX_OBJECTS = 1, 6
MAX_CROWD = 32  # largest max_objects (crowded scenes)
SIZE_RANGE = (0.15, 0.45)  # longest object side / image side
ASPECT_RANGE = (0.75, 1.0)
MAX_ROTATION = math.radians(15.0)
MAX_CUT = 0.2  # largest fraction of an object's extent the image border may cut off
MAX_OVERLAP = 0.35  # intersection / smaller box area preferred between objects
PLACEMENT_TRIES = 12
MIN_BOX_SIDE = 4.0  # pixels; smaller visible boxes are not annotated
GREGARIOUS_RUN = 3.0  # mean run length of gregarious classes
JPEG_QUALITY = 90

_SPLITS = {"train": 0, "val": 1}
_COUNTS, _LAYOUT, _PIXELS = 0, 1, 2  # random stream purposes
_URL = "https://synthetic.drcl.invalid"
_DATE = "2024-01-01 00:00:00"
_LICENSE_URL = "https://creativecommons.org/publicdomain/zero/1.0/"

_TEXTURE_TEXT = {
    "outlined": "a {} outline",
    "horizontal-striped": "horizontal {} stripes",
    "vertical-striped": "vertical {} stripes",
    "diagonal-striped": "diagonal {} stripes",
    "antidiagonal-striped": "antidiagonal {} stripes",
    "checkered": "a {} checkerboard",
    "dotted": "{} dots",
    "grid": "a {} grid",
    "bullseye": "{} concentric rings",
}


# --------------------------------------------------------------------------- classes


@dataclass(frozen=True)
class ClassSpec:
    """What a category looks like: a shape filled with ``fill`` and a ``pattern`` texture."""

    category_id: int
    shape: str
    texture: str
    fill: str
    pattern: str

    @property
    def name(self) -> str:
        """Descriptive name, e.g. ``"red-white horizontal-striped circle"``."""
        return f"{self.fill}-{self.pattern} {self.texture} {self.shape}"

    @property
    def definition(self) -> str:
        text = _TEXTURE_TEXT[self.texture].format(self.pattern)
        return f"a synthetic {self.fill} {self.shape} with {text}"

    @property
    def fill_rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.fill]

    @property
    def pattern_rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.pattern]


def _grid_order() -> list[tuple[int, int, int]]:
    points = [
        (s, t, p)
        for s in range(len(SHAPES))
        for t in range(len(TEXTURES))
        for p in range(len(PALETTES))
    ]
    return sorted(points, key=lambda q: (max(q), q[2], q[1], q[0]))


_GRID = _grid_order()


def class_spec(category_id: int) -> ClassSpec:
    """The appearance of category ``category_id`` (1-based); depends on nothing else."""
    if not 1 <= category_id <= MAX_CLASSES:
        raise ValueError(f"category id must be in 1..{MAX_CLASSES}, got {category_id}")
    s, t, p = _GRID[category_id - 1]
    fill, pattern = PALETTES[p]
    return ClassSpec(category_id, SHAPES[s], TEXTURES[t], fill, pattern)


# --------------------------------------------------------------------------- shapes


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    a = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(a), np.sin(a)], axis=1)


def _star() -> np.ndarray:
    pts = _regular(10, 1.0, -np.pi / 2)
    pts[1::2] *= 0.45
    return pts


def _ring(inner: float = 0.55, n: int = 32) -> np.ndarray:
    """Annulus as one 'keyhole' polygon: outer circle, bridge, inner circle reversed."""
    a = 2 * np.pi * np.arange(n + 1) / n
    outer = np.stack([np.cos(a), np.sin(a)], axis=1)
    return np.concatenate([outer, inner * outer[::-1]])


def _cross(arm: float = 0.35) -> np.ndarray:
    a = arm
    return np.array(
        [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a),
         (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)],
        dtype=float,
    )


# Unit shapes in local coordinates, x right, y down, spanning about [-1, 1] x [-1, 1].
_UNIT_SHAPES = {
    "circle": _regular(32),
    "square": np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=float),
    "triangle": np.array([(0, -1), (1, 1), (-1, 1)], dtype=float),
    "diamond": np.array([(0, -1), (0.7, 0), (0, 1), (-0.7, 0)], dtype=float),
    "star": _star(),
    "ring": _ring(),
    "cross": _cross(),
    "hexagon": _regular(6),
}
OUTLINE_SCALE = 0.7  # the 'outlined' texture fills the shape scaled by this with the fill colour


def _pose_points(unit: np.ndarray, half: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Scale unit shape(s) by half sizes (..., 2) and rotate by angle (...): (..., m, 2)."""
    p = unit * half[..., None, :]
    c, s = np.cos(angle)[..., None], np.sin(angle)[..., None]
    return np.stack([c * p[..., 0] - s * p[..., 1], s * p[..., 0] + c * p[..., 1]], axis=-1)


def _clip_polygon(points: list[tuple[float, float]], size: float) -> list[tuple[float, float]]:
    """Sutherland-Hodgman clipping of a polygon to the square [0, size] x [0, size]."""
    for axis in (0, 1):
        for keep_low in (True, False):
            bound = size if keep_low else 0.0

            def inside(q, axis=axis, keep_low=keep_low, bound=bound):
                return q[axis] <= bound if keep_low else q[axis] >= bound

            out: list[tuple[float, float]] = []
            for i, cur in enumerate(points):
                prev = points[i - 1]
                if inside(cur) != inside(prev):
                    t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                    cross = (prev[0] + t * (cur[0] - prev[0]), prev[1] + t * (cur[1] - prev[1]))
                    out.append((bound, cross[1]) if axis == 0 else (cross[0], bound))
                if inside(cur):
                    out.append(cur)
            points = out
            if not points:
                return []
    return points


def polygon_area(flat: list[float] | tuple[float, ...]) -> float:
    """Shoelace area of a flat [x1, y1, x2, y2, ...] polygon."""
    xy = np.asarray(flat, dtype=float).reshape(-1, 2)
    x, y = xy[:, 0], xy[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class ObjectPlan:
    """One object: its class, pose (centre, half sizes, angle) and annotated polygon."""

    category_id: int
    center: tuple[float, float]
    half_size: tuple[float, float]
    angle: float
    polygon: tuple[float, ...]  # flat [x1, y1, ...], clipped to the image, rounded to 0.01

    @property
    def bbox(self) -> list[float]:
        """Tight [x, y, w, h] box of the polygon."""
        xy = np.asarray(self.polygon).reshape(-1, 2)
        (x0, y0), (x1, y1) = xy.min(axis=0), xy.max(axis=0)
        return [round(float(x0), 2), round(float(y0), 2),
                round(float(x1 - x0), 2), round(float(y1 - y0), 2)]


@dataclass(frozen=True)
class ImagePlan:
    """Everything needed to annotate and render one image."""

    image_id: int
    split: str
    index: int
    size: int
    seed: int
    objects: tuple[ObjectPlan, ...]

    @property
    def file_name(self) -> str:
        return f"{self.image_id:012d}.jpg"


@dataclass(frozen=True)
class DatasetPlan:
    """The whole dataset: train images (ids from 1), then val images (ids continue)."""

    classes: int
    image_size: int
    seed: int
    train: tuple[ImagePlan, ...]
    val: tuple[ImagePlan, ...]
    first_class: int = 1

    @property
    def category_ids(self) -> range:
        return range(self.first_class, self.first_class + self.classes)


def _rng(seed: int, split: str, purpose: int, index: int = 0) -> np.random.Generator:
    seq = np.random.SeedSequence(seed, spawn_key=(_SPLITS[split], purpose, index))
    return np.random.Generator(np.random.PCG64(seq))


def long_tail_counts(total: int, classes: int, imbalance: float) -> np.ndarray:
    """Split ``total`` instances over ``classes`` ranks, geometric in rank.

    Expected counts fall by a factor ``imbalance`` from rank 0 to the last rank; integers by
    largest remainder, then every rank gets at least one (taken from the largest).
    """
    if total < classes:
        raise ValueError(f"need at least {classes} instances for {classes} classes, got {total}")
    weights = float(imbalance) ** (-np.arange(classes) / max(classes - 1, 1))
    raw = total * weights / weights.sum()
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    for i in np.flatnonzero(counts == 0):
        counts[np.argmax(counts)] -= 1
        counts[i] = 1
    return counts


def _objects_per_image(
    rng: np.random.Generator, n_images: int, min_total: int, max_objects: int = MAX_OBJECTS
) -> np.ndarray:
    """1-``max_objects`` per image, topped up at random until there are ``min_total`` in all."""
    k = rng.integers(MIN_OBJECTS, max_objects + 1, n_images)
    while k.sum() < min_total:
        room = np.flatnonzero(k < max_objects)
        k[rng.choice(room)] += 1
    return k


def _label_sequence(rng: np.random.Generator, counts: np.ndarray, first_class: int = 1) -> np.ndarray:
    """Category ids, counts[i] times id first_class + i, in shuffled runs (long runs for
    gregarious ids)."""
    runs = []
    for cid, n in enumerate(counts.tolist(), start=first_class):
        mean = GREGARIOUS_RUN if cid % 3 == 0 else 1.0
        while n > 0:
            length = min(n, int(rng.geometric(1.0 / mean)))
            runs.append(np.full(length, cid))
            n -= length
    order = rng.permutation(len(runs))
    return np.concatenate([runs[i] for i in order])


def _box_overlap(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Max over ``others`` (k, 4) of intersection / smaller area, for boxes (n, 4) xyxy."""
    if len(others) == 0:
        return np.zeros(len(box))
    b, o = box[:, None, :], others[None, :, :]
    iw = np.clip(np.minimum(b[..., 2], o[..., 2]) - np.maximum(b[..., 0], o[..., 0]), 0, None)
    ih = np.clip(np.minimum(b[..., 3], o[..., 3]) - np.maximum(b[..., 1], o[..., 1]), 0, None)
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    area_o = (o[..., 2] - o[..., 0]) * (o[..., 3] - o[..., 1])
    return (iw * ih / np.maximum(np.minimum(area_b, area_o), 1e-9)).max(axis=1)


def _size_scale(max_objects: int) -> float:
    """Object size factor for crowded scenes: 1 up to MAX_OBJECTS, then sqrt(MAX_OBJECTS / max_objects)."""
    return min(1.0, math.sqrt(MAX_OBJECTS / max_objects))


def _place_object(
    rng: np.random.Generator, category_id: int, size: int, placed: np.ndarray, scale: float = 1.0
) -> ObjectPlan | None:
    """Pose one object: try PLACEMENT_TRIES random poses, keep the first with little overlap."""
    n = PLACEMENT_TRIES
    longest = scale * size * np.exp(rng.uniform(*np.log(SIZE_RANGE), n))
    short = longest * rng.uniform(*ASPECT_RANGE, n)
    tall = rng.random(n) < 0.5
    half = np.stack([np.where(tall, short, longest), np.where(tall, longest, short)], 1) / 2
    angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION, n)
    pts = _pose_points(_UNIT_SHAPES[class_spec(category_id).shape], half, angle)
    lo, hi = pts.min(axis=1), pts.max(axis=1)
    cmin, cmax = -lo - MAX_CUT * (hi - lo), size - hi + MAX_CUT * (hi - lo)
    center = cmin + rng.random((n, 2)) * (cmax - cmin)
    boxes = np.clip(np.concatenate([center + lo, center + hi], axis=1), 0, size)
    big = ((boxes[:, 2:] - boxes[:, :2]) >= MIN_BOX_SIDE).all(axis=1)
    if not big.any():
        return None
    overlap = np.where(big, _box_overlap(boxes, placed), np.inf)
    good = np.flatnonzero(overlap <= MAX_OVERLAP)
    i = int(good[0]) if len(good) else int(np.argmin(overlap))
    points = _clip_polygon([tuple(q) for q in (pts[i] + center[i]).tolist()], size)
    flat = tuple(round(v, 2) for q in points for v in q)
    return ObjectPlan(
        category_id,
        (float(center[i, 0]), float(center[i, 1])),
        (float(half[i, 0]), float(half[i, 1])),
        float(angle[i]),
        flat,
    )


def _plan_image(
    seed: int, split: str, index: int, image_id: int, size: int, labels, scale: float = 1.0
) -> ImagePlan:
    rng = _rng(seed, split, _LAYOUT, index)
    objects: list[ObjectPlan] = []
    placed = np.zeros((0, 4))
    for cid in labels:
        obj = _place_object(rng, int(cid), size, placed, scale)
        if obj is None or min(obj.bbox[2:]) < MIN_BOX_SIDE:
            continue  # cannot happen: _check_args keeps the smallest object >= MIN_BOX_SIDE; kept as a guard
        x, y, w, h = obj.bbox
        placed = np.concatenate([placed, [[x, y, x + w, y + h]]])
        objects.append(obj)
    return ImagePlan(image_id, split, index, size, seed, tuple(objects))


def _class_counts(
    rng: np.random.Generator, total: int, classes: int, imbalance: float | None
) -> np.ndarray:
    """Instances per category id (index 0 is id 1).

    Long-tailed over a seeded class -> rank permutation, or balanced within one instance
    (the extra instances on random classes) when ``imbalance`` is None.
    """
    if imbalance is None:
        counts = np.full(classes, total // classes)
        counts[rng.permutation(classes)[: total % classes]] += 1
        return counts
    return long_tail_counts(total, classes, imbalance)[rng.permutation(classes)]


def _plan_split(
    seed: int, split: str, n_images: int, first_id: int, size: int, classes: int, imbalance,
    max_objects: int = MAX_OBJECTS, first_class: int = 1,
) -> tuple[ImagePlan, ...]:
    rng = _rng(seed, split, _COUNTS)
    k = _objects_per_image(rng, n_images, classes, max_objects)
    labels = _label_sequence(rng, _class_counts(rng, int(k.sum()), classes, imbalance), first_class)
    chunks = np.split(labels, np.cumsum(k)[:-1])
    scale = _size_scale(max_objects)
    return tuple(
        _plan_image(seed, split, i, first_id + i, size, chunk, scale) for i, chunk in enumerate(chunks)
    )


def _check_args(classes, train_images, val_images, image_size, imbalance, seed, max_objects, first_class=1) -> None:
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not is_int(classes) or not 3 <= classes <= MAX_CLASSES:
        raise ValueError(f"classes must be an integer in 3..{MAX_CLASSES}, got {classes!r}")
    if not is_int(max_objects) or not MAX_OBJECTS <= max_objects <= MAX_CROWD:
        raise ValueError(f"max_objects must be an integer in {MAX_OBJECTS}..{MAX_CROWD}, got {max_objects!r}")
    if not is_int(first_class) or not 1 <= first_class <= MAX_CLASSES - classes + 1:
        raise ValueError(f"first_class must be an integer in 1..{MAX_CLASSES - classes + 1} for {classes} classes "
                         f"(class ids end at {MAX_CLASSES}), got {first_class!r}")
    for name, value in (("train_images", train_images), ("val_images", val_images)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if value * max_objects < classes:
            raise ValueError(
                f"{name}={value} is too few to show all {classes} classes (at most "
                f"{max_objects} objects per image): need >= {math.ceil(classes / max_objects)}"
            )
    if not is_int(image_size) or image_size < 64:
        raise ValueError(f"image_size must be an integer >= 64, got {image_size!r}")
    if not isinstance(imbalance, (int, float)) or not math.isfinite(imbalance) or imbalance < 1:
        raise ValueError(f"imbalance must be a finite number >= 1, got {imbalance!r}")
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    # the smallest object's shortest visible side must stay annotatable (crowded scenes shrink objects)
    factor = SIZE_RANGE[0] * _size_scale(max_objects) * ASPECT_RANGE[0] * (1 - MAX_CUT)
    if image_size * factor < MIN_BOX_SIDE:
        raise ValueError(f"image_size={image_size} is too small for max_objects={max_objects}: the smallest objects "
                         f"would be {image_size * factor:.1f} px (need {MIN_BOX_SIDE:g}); use image_size >= "
                         f"{math.ceil(MIN_BOX_SIDE / factor)}")


def plan_dataset(
    *,
    classes: int = 60,
    train_images: int = 1000,
    val_images: int = 200,
    image_size: int = 160,
    imbalance: float = 200.0,
    seed: int = 0,
    max_objects: int = MAX_OBJECTS,
    first_class: int = 1,
) -> DatasetPlan:
    """Plan every image's objects without drawing anything (pure and fast). Category ids run
    from ``first_class`` to ``first_class + classes - 1``."""
    _check_args(classes, train_images, val_images, image_size, imbalance, seed, max_objects, first_class)
    seed, first_class = int(seed), int(first_class)
    train = _plan_split(seed, "train", train_images, 1, image_size, classes, float(imbalance), max_objects,
                        first_class)
    val = _plan_split(seed, "val", val_images, train_images + 1, image_size, classes, None, max_objects, first_class)
    return DatasetPlan(classes, image_size, seed, train, val, first_class)


# --------------------------------------------------------------------------- annotations


def _category_counts(images, classes: int, first_class: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Images and instances per category, index 0 being id ``first_class``."""
    image_count = np.zeros(classes, dtype=np.int64)
    instance_count = np.zeros(classes, dtype=np.int64)
    for im in images:
        pos = [o.category_id - first_class for o in im.objects]
        np.add.at(instance_count, pos, 1)
        image_count[sorted(set(pos))] += 1
    return image_count, instance_count


def _categories(plan: DatasetPlan) -> list[dict]:
    image_count, instance_count = _category_counts(plan.train, plan.classes, plan.first_class)
    records = []
    for i, cid in enumerate(plan.category_ids):
        spec = class_spec(cid)
        token = spec.name.replace(" ", "_")
        records.append({
            "id": cid,
            "name": spec.name,
            "synset": f"{token}.n.01",
            "synonyms": [token],
            "def": spec.definition,
            "frequency": frequency_group(int(image_count[i])),
            "image_count": int(image_count[i]),
            "instance_count": int(instance_count[i]),
        })
    return records


def _image_record(im: ImagePlan, category_ids: range) -> dict:
    url = f"{_URL}/{im.split}/{im.file_name}"
    present = {o.category_id for o in im.objects}
    return {
        "id": im.image_id,
        "width": im.size,
        "height": im.size,
        "coco_url": url,
        "flickr_url": url,
        "license": 1,
        "date_captured": _DATE,
        "neg_category_ids": [c for c in category_ids if c not in present],
        "not_exhaustive_category_ids": [],
    }


def _annotation_record(ann_id: int, im: ImagePlan, obj: ObjectPlan) -> dict:
    return {
        "id": ann_id,
        "image_id": im.image_id,
        "category_id": obj.category_id,
        "bbox": obj.bbox,
        "area": round(polygon_area(obj.polygon), 2),
        "segmentation": [list(obj.polygon)],
    }


def lvis_dicts(plan: DatasetPlan) -> dict[str, dict]:
    """LVIS v1 JSON content for both splits: ``{"train": {...}, "val": {...}}``.

    Categories (with train-derived ``frequency``, ``image_count``, ``instance_count``) are the
    same in both files, as in LVIS. Annotation ids continue from train into val.
    """
    categories = _categories(plan)
    out, ann_id = {}, 1
    for split, images in (("train", plan.train), ("val", plan.val)):
        annotations = []
        for im in images:
            for obj in im.objects:
                annotations.append(_annotation_record(ann_id, im, obj))
                ann_id += 1
        out[split] = {
            "info": {
                "description": f"drcl synthetic long-tailed detection dataset ({split})",
                "url": _URL,
                "version": "1.0",
                "year": 2024,
                "contributor": "drcl",
                "date_created": _DATE,
            },
            "licenses": [{"id": 1, "name": "CC0 1.0", "url": _LICENSE_URL}],
            "images": [_image_record(im, plan.category_ids) for im in images],
            "annotations": annotations,
            "categories": categories,
        }
    return out


# --------------------------------------------------------------------------- rendering


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-contrast clutter: smooth colour field, blobs, lines. float32 (size, size, 3)."""
    base = rng.uniform(80, 170) + rng.uniform(-20, 20, 3)
    coarse = np.clip(128 + rng.normal(0, 18, (5, 5, 3)), 0, 255).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), np.float32)
    canvas = np.clip(base + field - 128, 0, 255).astype(np.uint8)
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    n_blobs, n_lines = rng.integers(4, 10), rng.integers(3, 8)
    for _ in range(n_blobs):
        x, y = rng.uniform(-0.1, 1.1, 2) * size
        rx, ry = rng.uniform(0.03, 0.2, 2) * size
        colour = tuple(np.clip(base + rng.uniform(-28, 28, 3), 0, 255).astype(int).tolist())
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=colour)
    for _ in range(n_lines):
        xy = (rng.uniform(-0.1, 1.1, 4) * size).tolist()
        colour = tuple(np.clip(base + rng.uniform(-30, 30, 3), 0, 255).astype(int).tolist())
        draw.line(xy, fill=colour, width=int(rng.integers(1, 4)))
    return np.asarray(img, dtype=np.float32)


def _mask(points: np.ndarray, offset: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """Rasterise a polygon (m, 2) in image coordinates into a boolean (h, w) window.

    Even-odd rule at pixel centres, as a vectorised scanline: for every edge and row, where
    the edge crosses the row's centre line; a pixel is inside when an odd number of
    crossings lie to its left.
    """
    h, w = shape
    p = points - np.asarray(offset, dtype=float)
    x0, y0 = p[:, 0:1], p[:, 1:2]
    x1, y1 = np.roll(x0, -1, axis=0), np.roll(y0, -1, axis=0)
    yc = np.arange(h) + 0.5
    crosses = (y0 > yc) != (y1 > yc)  # (edges, rows)
    edge, row = np.nonzero(crosses)
    t = (yc[row] - y0[edge, 0]) / (y1[edge, 0] - y0[edge, 0])
    x = x0[edge, 0] + t * (x1[edge, 0] - x0[edge, 0])
    first = np.clip(np.floor(x - 0.5).astype(np.int64) + 1, 0, w)  # first pixel right of x
    counts = np.bincount(row * (w + 1) + first, minlength=h * (w + 1)).reshape(h, w + 1)
    return (np.cumsum(counts[:, :w], axis=1) % 2).astype(bool)


_BANDS = 2.5  # texture periods per unit of local coordinates


def _texture(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the pattern colour goes, from local coordinates u, v in about [-1, 1]."""
    b = _BANDS
    if name == "horizontal-striped":
        return np.floor(v * b) % 2 == 0
    if name == "vertical-striped":
        return np.floor(u * b) % 2 == 0
    if name == "diagonal-striped":
        return np.floor((u + v) * b * 0.75) % 2 == 0
    if name == "antidiagonal-striped":
        return np.floor((u - v) * b * 0.75) % 2 == 0
    if name == "checkered":
        return (np.floor(u * b) + np.floor(v * b)) % 2 == 0
    if name == "dotted":
        return ((u * b) % 1 - 0.5) ** 2 + ((v * b) % 1 - 0.5) ** 2 < 0.09
    if name == "grid":
        return (np.abs((u * b) % 1 - 0.5) > 0.32) | (np.abs((v * b) % 1 - 0.5) > 0.32)
    if name == "bullseye":
        return np.floor(np.hypot(u, v) * 3.5) % 2 == 1
    raise ValueError(f"unknown texture {name!r}")


def _draw_object(canvas: np.ndarray, obj: ObjectPlan) -> None:
    """Paint one object into ``canvas`` (float32 HxWx3) in place."""
    spec = class_spec(obj.category_id)
    size = canvas.shape[0]
    poly = np.asarray(obj.polygon).reshape(-1, 2)
    x0, y0 = np.floor(poly.min(axis=0)).astype(int)
    x1, y1 = np.minimum(np.ceil(poly.max(axis=0)).astype(int), size)
    shape = (y1 - y0, x1 - x0)
    mask = _mask(poly, (x0, y0), shape)
    if spec.texture == "outlined":
        unit = _UNIT_SHAPES[spec.shape] * OUTLINE_SCALE
        inner = _pose_points(unit, np.asarray(obj.half_size), np.asarray(obj.angle)) + obj.center
        pattern = ~_mask(inner, (x0, y0), shape)
    else:
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
        dx, dy = xs - obj.center[0], ys - obj.center[1]
        c, s = math.cos(obj.angle), math.sin(obj.angle)
        u = (c * dx + s * dy) / obj.half_size[0]
        v = (-s * dx + c * dy) / obj.half_size[1]
        pattern = _texture(spec.texture, u, v)
    colours = np.where(pattern[..., None], spec.pattern_rgb, spec.fill_rgb)
    window = canvas[y0:y1, x0:x1]
    window[mask] = colours[mask]


def render_image(image: ImagePlan) -> Image.Image:
    """Draw a planned image: background clutter, objects in order, then pixel noise."""
    rng = _rng(image.seed, image.split, _PIXELS, image.index)
    canvas = _background(rng, image.size)
    for obj in image.objects:
        _draw_object(canvas, obj)
    canvas += 4.0 * rng.standard_normal(canvas.shape, dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------- writing


def _write_json(path: Path, content: dict) -> None:
    text = json.dumps(content, sort_keys=True, separators=(",", ":"))
    path.write_text(text + "\n", encoding="utf-8")


def split_paths(root, split: str) -> tuple[Path, Path]:
    """Where :func:`make_dataset` writes a split: ``root/annotations/<split>.json`` and the
    image folder ``root/images/<split>``."""
    root = Path(root)
    return root / "annotations" / f"{split}.json", root / "images" / split


def config_overrides(root) -> list[str]:
    """``--set`` overrides that point a config's ``data`` section at a :func:`make_dataset`
    directory."""
    out = []
    for split in ("train", "val"):
        ann, images = split_paths(root, split)
        out += [f"data.{split}_json={ann}", f"data.{split}_images={images}"]
    return out


def _save_image(job) -> None:
    """Render one planned image and write it as JPEG (a pool worker's task)."""
    image, image_dir = job
    render_image(image).save(Path(image_dir) / image.file_name, "JPEG", quality=JPEG_QUALITY, subsampling=0)


def make_dataset(
    out_dir,
    *,
    classes: int = 60,
    train_images: int = 1000,
    val_images: int = 200,
    image_size: int = 160,
    imbalance: float = 200.0,
    seed: int = 0,
    max_objects: int = MAX_OBJECTS,
    first_class: int = 1,
    progress: bool = True,
    processes: int = 1,
) -> dict:
    """Write a synthetic long-tailed LVIS v1 dataset under ``out_dir`` and summarise it.

    Returns ``{"root", "categories", "frequency": {"r", "c", "f"}, "train": {...}, "val":
    {...}}`` where each split holds ``annotations`` (JSON path), ``images_dir``, ``images``
    and ``instances``. Category ids run from ``first_class`` (see :func:`plan_dataset`).
    ``processes`` > 1 renders the images in that many processes; the files are the same bytes
    (each image is drawn from its own plan). Raises ValueError for bad arguments. Existing
    files of the same names are overwritten; other files under ``out_dir`` are left alone.
    """
    from tqdm import tqdm

    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be an integer >= 1, got {processes!r}")
    plan = plan_dataset(
        classes=classes, train_images=train_images, val_images=val_images,
        image_size=image_size, imbalance=imbalance, seed=seed, max_objects=max_objects, first_class=first_class,
    )
    root = Path(out_dir)
    content = lvis_dicts(plan)
    summary = {"root": str(root), "categories": classes}
    jobs = []
    for split, images in (("train", plan.train), ("val", plan.val)):
        ann_path, image_dir = split_paths(root, split)
        image_dir.mkdir(parents=True, exist_ok=True)
        jobs += [(im, image_dir) for im in images]
        summary[split] = {
            "annotations": str(ann_path),
            "images_dir": str(image_dir),
            "images": len(images),
            "instances": len(content[split]["annotations"]),
        }
    with tqdm(total=len(jobs), desc="synthetic images", unit="img", disable=not progress) as bar:
        if processes > 1:
            import multiprocessing as mp

            with mp.Pool(processes) as pool:
                for _ in pool.imap_unordered(_save_image, jobs, chunksize=16):
                    bar.update(1)
        else:
            for job in jobs:
                _save_image(job)
                bar.update(1)
    for split in ("train", "val"):
        path = Path(summary[split]["annotations"])
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(path, content[split])
    groups = [c["frequency"] for c in content["train"]["categories"]]
    summary["frequency"] = {g: groups.count(g) for g in "rcf"}
    return summary
