"""Reading and validating COCO / LVIS v1 annotation files.

One function, :func:`load_annotations`, turns a JSON file (and optionally its image folder)
into an :class:`Annotations` object: the records exactly as they were in the file (every key
kept, LVIS's ``frequency``, ``image_count``, ``instance_count``, ``neg_category_ids`` and
``not_exhaustive_category_ids`` included) plus the arrays the rest of the package works on.

LVIS v1 differs from COCO in ways we handle here:

* image records may have no ``file_name``; the file name is the last path component of
  ``coco_url`` (``.../train2017/000000391895.jpg`` -> ``000000391895.jpg``), and the file is
  looked up as ``IMAGES/000000391895.jpg`` and then ``IMAGES/train2017/000000391895.jpg``, so
  one COCO image folder with ``train2017/`` and ``val2017/`` serves LVIS val too;
* annotations have no ``iscrowd`` (read as 0);
* categories carry ``frequency`` (``r``/``c``/``f``).

Frequency groups come from ``frequency`` when every category has one; otherwise from the
number of images in this file that contain the category: rare 1-10 (and 0), common 11-100,
frequent > 100.

Bad input never crashes with a traceback: every problem raises :class:`~drcl.errors.DataError`
with one line naming the file and the record, or, with ``on_bad="skip"``, drops the record
(and whatever depends on it) and counts it in :attr:`Annotations.skipped`.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from drcl.errors import DataError

#: Boxes may poke out of the image by this many pixels (rounding in real COCO/LVIS files);
#: the dataset clips them to the image.
BOX_TOLERANCE = 1.0

RARE_MAX_IMAGES = 10
COMMON_MAX_IMAGES = 100
GROUPS = ("r", "c", "f")
GROUP_NAMES = {"r": "rare", "c": "common", "f": "frequent"}


def frequency_group(image_count: int) -> str:
    """LVIS group of a category seen in ``image_count`` training images."""
    if image_count <= RARE_MAX_IMAGES:
        return "r"
    if image_count <= COMMON_MAX_IMAGES:
        return "c"
    return "f"


@dataclass
class Annotations:
    """A validated annotation file.

    ``images``, ``annotations`` and ``categories`` are the file's records (bad ones removed
    under ``on_bad="skip"``). The arrays index into them:

    * ``image_index[k]`` / ``category_index[k]``: position of annotation k's image / category;
    * ``image_count[c]`` / ``instance_count[c]``: images containing category c / its instances,
      counted in this file;
    * ``frequency[c]``: ``"r"``, ``"c"`` or ``"f"``.
    """

    path: str
    images: list[dict]
    annotations: list[dict]
    categories: list[dict]
    images_dir: str | None = None
    skipped: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.image_pos = {img["id"]: i for i, img in enumerate(self.images)}
        self.category_pos = {cat["id"]: i for i, cat in enumerate(self.categories)}
        self.image_index = np.array(
            [self.image_pos[a["image_id"]] for a in self.annotations], dtype=np.int64
        )
        self.category_index = np.array(
            [self.category_pos[a["category_id"]] for a in self.annotations], dtype=np.int64
        )
        c = len(self.categories)
        self.instance_count = np.bincount(self.category_index, minlength=c)
        _, pair_categories = distinct_pairs(self.image_index, self.category_index, c)
        self.image_count = np.bincount(pair_categories, minlength=c)
        if self.categories and all("frequency" in cat for cat in self.categories):
            self.frequency = [cat["frequency"] for cat in self.categories]
            self.frequency_source = "file"
        else:
            self.frequency = [frequency_group(int(n)) for n in self.image_count]
            self.frequency_source = "computed"
        self.anns_by_image: list[list[int]] = [[] for _ in self.images]
        for k, i in enumerate(self.image_index):
            self.anns_by_image[i].append(k)

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_categories(self) -> int:
        return len(self.categories)

    def file_name(self, i: int) -> str:
        """File name of image ``i`` (``file_name``, else the last component of ``coco_url``)."""
        return image_file_name(self.images[i])

    def image_path(self, i: int, images_dir: str | os.PathLike | None = None) -> Path:
        """Path of image ``i`` inside ``images_dir`` (default: the folder given at load)."""
        return find_image_file(self.images[i], images_dir if images_dir is not None else self.images_dir or ".")

    def describe_image(self, i: int) -> str:
        return f"image id {self.images[i]['id']} ({self.file_name(i)})"


def distinct_pairs(image_index: np.ndarray, category_index: np.ndarray, num_categories: int):
    """The distinct (image, category) pairs as two arrays, sorted by image then category.

    Sort-and-compare instead of ``np.unique``: the latter hashes in NumPy >= 2.3 and is
    ~40x slower on LVIS-sized inputs.
    """
    if image_index.size == 0:
        return image_index, category_index
    c = np.int64(max(num_categories, 1))
    key = np.sort(image_index * c + category_index)
    keep = np.empty(key.size, dtype=bool)
    keep[0] = True
    np.not_equal(key[1:], key[:-1], out=keep[1:])
    return np.divmod(key[keep], c)


def image_file_name(rec: dict) -> str:
    """``file_name``, else the last path component of ``coco_url`` (LVIS v1)."""
    if rec.get("file_name"):
        return str(rec["file_name"])
    return str(rec["coco_url"]).rstrip("/").split("/")[-1]


def find_image_file(rec: dict, images_dir: str | os.PathLike) -> Path:
    """The image record's file in ``images_dir``: ``DIR/name``, else (LVIS records without
    ``file_name``) ``DIR/<folder of coco_url>/name``; the first candidate if neither exists."""
    root = Path(images_dir)
    name = image_file_name(rec)
    candidates = [root / name]
    url = rec.get("coco_url")
    if url and not rec.get("file_name"):
        parts = str(url).rstrip("/").split("/")
        if len(parts) >= 2:
            candidates.append(root / parts[-2] / name)
    for path in candidates:
        if path.exists():
            return path
    return candidates[0]


# --------------------------------------------------------------------------- loading


def load_annotations(
    path: str | os.PathLike,
    images_dir: str | os.PathLike | None = None,
    on_bad: str = "error",
    check_images: str = "none",
    progress: bool = False,
) -> Annotations:
    """Read, validate and index a COCO or LVIS v1 annotation file.

    Args:
        path: the JSON file.
        images_dir: folder holding the images; needed for ``check_images``.
        on_bad: ``"error"`` raises :class:`DataError` at the first bad record; ``"skip"``
            drops bad records (an image's annotations go with it) and counts them in
            ``Annotations.skipped``.
        check_images: ``"none"``; ``"header"`` checks each file exists, opens as an image
            and has the record's width and height; ``"decode"`` also decodes every pixel.
        progress: show a progress bar while checking images.
    """
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', not {on_bad!r}")
    if check_images not in ("none", "header", "decode"):
        raise ValueError(f"check_images must be 'none', 'header' or 'decode', not {check_images!r}")
    path = str(path)
    data = _read_json(path)
    checker = _Checker(path, on_bad)
    categories = checker.categories(data["categories"])
    images = checker.images(data["images"])
    annotations = checker.annotations(data["annotations"], images, categories)
    if check_images != "none":
        if images_dir is None:
            raise ValueError("check_images needs images_dir")
        bad = checker.image_files(images, images_dir, decode=check_images == "decode", progress=progress)
        if bad:
            images = [img for img in images if img["id"] not in bad]
            kept = [a for a in annotations if a["image_id"] not in bad]
            checker.skipped["annotations of skipped images"] += len(annotations) - len(kept)
            annotations = kept
    return Annotations(
        path=path,
        images=images,
        annotations=annotations,
        categories=categories,
        images_dir=None if images_dir is None else str(images_dir),
        skipped=checker.skipped,
    )


#: Files an image folder is read for (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def load_image_folder(
    images_dir: str | os.PathLike,
    on_bad: str = "error",
    check_images: str = "header",
    progress: bool = False,
) -> Annotations:
    """An :class:`Annotations` of the images in a folder (searched recursively for
    :data:`IMAGE_EXTENSIONS`), without annotations or categories: for pre-training on images
    alone, with boxes from a proposals file.

    Each image record is ``{"id", "file_name": path, "width", "height"}`` with ``path``
    relative to the folder (``/`` separators); the id is the file's place, from 1, in the sorted
    list of all the folder's image files, so ``drcl proposals`` and ``drcl pretrain`` give a
    folder the same ids, and a file skipped as bad moves no other file's id. (Ids stay small:
    the LCL queue packs image and box ids into one int64.) Every file is opened
    (``check_images="header"``) or also fully decoded (``"decode"``); a file that does not
    is a :class:`DataError` naming it, or with ``on_bad="skip"`` is left out and counted.
    """
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', not {on_bad!r}")
    if check_images not in ("header", "decode"):
        raise ValueError(f"check_images must be 'header' or 'decode' for a folder, not {check_images!r}")
    from tqdm import tqdm

    root = Path(images_dir)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder of images" + ("" if root.exists() else " (no such folder)"))
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    checker = _Checker(str(root), on_bad)
    images = []
    for image_id, name in enumerate(tqdm(files, desc="reading images", unit="img", disable=not progress), start=1):
        size, problem = open_image_file(root / name, check_images == "decode")
        if problem:
            checker.bad("images", f"image id {image_id}", problem)
            continue
        images.append({"id": image_id, "file_name": name, "width": size[0], "height": size[1]})
    if not images:
        raise DataError(f"{root}: none of its {len(files)} image files could be read")
    return Annotations(path=str(root), images=images, annotations=[], categories=[], images_dir=str(root),
                       skipped=checker.skipped)


#: The one category of a class-agnostic detector (:func:`merge_categories`).
OBJECT_CATEGORY = {"id": 1, "name": "object"}


def merge_categories(ann: Annotations) -> Annotations:
    """The same file with every category merged into one, :data:`OBJECT_CATEGORY`: for
    training and scoring a class-agnostic detector whose detections become proposals.

    Annotations keep their ids and boxes with ``category_id`` 1. An image's LVIS
    ``not_exhaustive_category_ids`` become ``[1]`` when it listed any category (its objects
    are not all annotated) and ``neg_category_ids`` become ``[]`` (a category known to be
    absent says nothing about objects in general)."""
    images = []
    for img in ann.images:
        img = dict(img)
        if "not_exhaustive_category_ids" in img:
            img["not_exhaustive_category_ids"] = [1] if img["not_exhaustive_category_ids"] else []
        if "neg_category_ids" in img:
            img["neg_category_ids"] = []
        images.append(img)
    annotations = [{**a, "category_id": OBJECT_CATEGORY["id"]} for a in ann.annotations]
    return Annotations(path=ann.path, images=images, annotations=annotations, categories=[dict(OBJECT_CATEGORY)],
                       images_dir=ann.images_dir, skipped=ann.skipped)


def read_json(path: str, what: str = "JSON file"):
    """Parse a JSON file; a missing, empty, non-UTF-8 or malformed file is a one-line
    :class:`DataError` naming the file (``what`` says what was expected)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a {what}") from None
    if not raw.strip():
        raise DataError(f"{path}: empty file, expected a {what}")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_json(path: str) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(f"{path}: missing top-level key '{key}'")
        if not isinstance(data[key], list):
            raise DataError(f"{path}: top-level '{key}' must be a list")
    return data


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class _Checker:
    """Validates records one by one; raises or counts what it drops."""

    def __init__(self, path: str, on_bad: str):
        self.path = path
        self.on_bad = on_bad
        self.skipped: Counter = Counter()

    def bad(self, what: str, record: str, problem: str) -> None:
        if self.on_bad == "error":
            raise DataError(f"{self.path}: {record}: {problem}")
        self.skipped[what] += 1

    def _record(self, kind: str, rec, n: int) -> str:
        if isinstance(rec, dict) and "id" in rec:
            return f"{kind} id {rec['id']}"
        return f"{kind} #{n} (no id)"

    def _missing(self, rec, keys) -> str | None:
        if not isinstance(rec, dict):
            return "is not a JSON object"
        missing = [k for k in keys if k not in rec]
        if missing:
            return "missing key " + ", ".join(f"'{k}'" for k in missing)
        return None

    def categories(self, records: list) -> list[dict]:
        kept, seen = [], set()
        for n, rec in enumerate(records):
            name = self._record("category", rec, n)
            problem = self._missing(rec, ("id", "name"))
            if problem is None and rec["id"] in seen:
                problem = "duplicate category id"
            if problem is None and "frequency" in rec and rec["frequency"] not in GROUPS:
                problem = f"frequency {rec['frequency']!r} is not one of 'r', 'c', 'f'"
            if problem:
                self.bad("categories", name, problem)
                continue
            seen.add(rec["id"])
            kept.append(rec)
        return kept

    def images(self, records: list) -> list[dict]:
        kept, seen = [], set()
        for n, rec in enumerate(records):
            name = self._record("image", rec, n)
            problem = self._missing(rec, ("id", "width", "height"))
            if problem is None and not (rec.get("file_name") or rec.get("coco_url")):
                problem = "has neither 'file_name' nor 'coco_url'"
            if problem is None and rec["id"] in seen:
                problem = "duplicate image id"
            if problem is None and not all(
                _is_number(rec[k]) and rec[k] > 0 for k in ("width", "height")
            ):
                problem = f"width and height must be positive numbers, got {rec['width']!r} x {rec['height']!r}"
            if problem:
                self.bad("images", name, problem)
                continue
            seen.add(rec["id"])
            kept.append(rec)
        return kept

    def annotations(self, records: list, images: list[dict], categories: list[dict]) -> list[dict]:
        image_by_id = {img["id"]: img for img in images}
        category_ids = {cat["id"] for cat in categories}
        kept, seen = [], set()
        for n, rec in enumerate(records):
            name = self._record("annotation", rec, n)
            problem = self._missing(rec, ("id", "image_id", "category_id", "bbox"))
            if problem is None and rec["id"] in seen:
                problem = "duplicate annotation id"
            if problem is None and rec["image_id"] not in image_by_id:
                problem = f"unknown image id {rec['image_id']}"
            if problem is None and rec["category_id"] not in category_ids:
                problem = f"unknown category id {rec['category_id']}"
            if problem is None:
                problem = _box_problem(rec["bbox"], image_by_id[rec["image_id"]])
            if problem:
                self.bad("annotations", name, problem)
                continue
            seen.add(rec["id"])
            kept.append(rec)
        return kept

    def image_files(self, images: list[dict], images_dir, decode: bool, progress: bool) -> set:
        """Ids of images whose file is missing, unreadable or of the wrong size."""
        from tqdm import tqdm

        bad = set()
        for rec in tqdm(images, desc="checking images", unit="img", disable=not progress):
            problem = image_file_problem(rec, images_dir, decode)
            if problem:
                self.bad("images", f"image id {rec['id']}", problem)
                bad.add(rec["id"])
        return bad


def open_image_file(file, decode: bool) -> tuple[tuple[int, int] | None, str | None]:
    """``((width, height), None)`` for an image file that opens (and, with ``decode``, whose
    pixels all decode), else ``(None, problem)`` with a one-line problem naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as im:
            if decode:
                im.load()
            return im.size, None
    except FileNotFoundError:
        return None, f"image file {file} not found"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return None, f"image file {file} cannot be decoded ({e})"


def image_file_problem(rec: dict, images_dir: str | os.PathLike, decode: bool = False) -> str | None:
    """What is wrong with an image record's file in ``images_dir`` (missing, not an image, of
    another size than the record says; with ``decode`` also pixels that do not decode), or
    ``None``."""
    file = find_image_file(rec, images_dir)
    size, problem = open_image_file(file, decode)
    if problem is None and size != (rec["width"], rec["height"]):
        problem = f"file {file} is {size[0]}x{size[1]} but the record says {rec['width']}x{rec['height']}"
    return problem


def _box_problem(bbox, image: dict) -> str | None:
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        return f"bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"bbox {bbox} has non-positive width or height"
    W, H = image["width"], image["height"]
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + w > W + t or y + h > H + t:
        return f"bbox {bbox} lies outside the {W}x{H} image id {image['id']}"
    return None
