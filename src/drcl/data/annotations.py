"""Reading and validating COCO / LVIS v1 annotation files.

One function, :func:`load_annotations`, turns a JSON file (and optionally its image folder)
into an :class:`Annotations` object: compact arrays of what training uses (per image: id,
size, file name; per instance: id, box, image, category, crowd flag) and, where a command
needs them, the file's records exactly as they were (every key kept, LVIS's ``frequency``,
``image_count``, ``instance_count``, ``neg_category_ids`` and ``not_exhaustive_category_ids``
included).

At LVIS scale the two differ by gigabytes. LVIS v1 train (1.1 GB of JSON, 1.27M annotations
with polygons) is about 4 GB of Python objects per process, and DataLoader workers forked
from it copy those objects page by page as they touch their reference counts. So:

* ``records=False`` (training) keeps the arrays only: a few numpy buffers that forked
  workers share untouched. The file is read in chunks (:mod:`drcl.data.jsonstream`), and
  polygons are cut out of the text before it is parsed, which is most of the time
  ``json.loads`` spends on LVIS;
* ``segmentations=True`` (Mask R-CNN) also keeps each annotation's segmentation, polygons as
  their JSON text in one byte buffer (exact, parsed when an image's masks are drawn);
* ``records=True`` (the default: statistics, evaluation, export of the file) keeps the
  records too.

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
(and whatever depends on it) and counts it in :attr:`Annotations.skipped`. Problems are
reported in the order categories, images, annotations, each in file order, whatever the
order of the file's top-level keys.
"""

from __future__ import annotations

import json
import math
import os
import re
from array import array
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from drcl.data.jsonstream import NotStreamable, stream_object
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


class Segmentations:
    """Each annotation's ``segmentation`` in compact form. Polygon lists are float32
    coordinates, one polygon after another in ``coords`` (polygon ``p`` is
    ``coords[ends[p - 1]:ends[p]]``), and annotation ``k``'s polygons are those of its group
    ``ref[k]`` (``groups[j - 1]:groups[j]``); anything else (RLE, an empty list) is kept as it was
    in ``others`` (``ref`` -2); ``ref`` -1: no segmentation.

    float32 is half of the coordinates' text and a third of float64; a coordinate comes back
    through float32's shortest decimal, which is the file's own for numbers of up to 7
    significant digits (COCO's and LVIS's have 2 decimals), so the masks drawn from it are the
    ones the records give, pixel for pixel (a float32 value itself moves a vertex by 1e-6 and
    flips pixels on the rasteriser's half-pixel boundaries)."""

    def __init__(self, coords: np.ndarray, ends: np.ndarray, groups: np.ndarray, ref: np.ndarray, others: dict):
        self.coords, self.ends, self.groups, self.ref, self.others = coords, ends, groups, ref, others

    def __getitem__(self, k: int):
        j = int(self.ref[k])
        if j == -1:
            return None
        if j == -2:
            return self.others[k]
        first = int(self.groups[j - 1]) if j else 0
        out = []
        for p in range(first, int(self.groups[j])):
            start = int(self.ends[p - 1]) if p else 0
            out.append(self.coords[start:int(self.ends[p])].astype(str).astype(np.float64).tolist())
        return out

    def select(self, keep: np.ndarray) -> "Segmentations":
        """The segmentations of the annotations where ``keep`` is true, in order."""
        new_position = np.cumsum(keep) - 1
        others = {int(new_position[k]): v for k, v in self.others.items() if keep[k]}
        return Segmentations(self.coords, self.ends, self.groups, self.ref[keep], others)


@dataclass(eq=False)
class Annotations:
    """A validated annotation file.

    Per image ``i`` (in file order, bad ones removed under ``on_bad="skip"``): ``image_ids``,
    ``widths``, ``heights``, ``file_names`` and ``url_dirs`` (the ``coco_url`` folder an LVIS
    record without ``file_name`` may sit in, else ``""``). Per annotation ``k``: ``ann_ids``,
    ``boxes`` (``[x, y, w, h]`` as in the file), ``image_index[k]`` / ``category_index[k]``
    (positions of its image / category), ``iscrowd`` and ``has_segmentation`` (the record has
    the key). Derived: ``image_count[c]`` / ``instance_count[c]`` (images containing category
    c / its instances, counted in this file) and ``frequency[c]`` (``"r"``, ``"c"`` or ``"f"``).

    ``categories`` are the file's category records. The image and annotation records are
    :attr:`images` / :attr:`annotations` when loaded with ``records=True``; segmentations are
    :meth:`segmentation`.
    """

    path: str
    categories: list[dict]
    image_ids: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    file_names: np.ndarray
    url_dirs: np.ndarray
    ann_ids: np.ndarray
    boxes: np.ndarray
    image_index: np.ndarray
    category_index: np.ndarray
    iscrowd: np.ndarray
    has_segmentation: np.ndarray
    images_dir: str | None = None
    skipped: Counter = field(default_factory=Counter)
    segments: Segmentations | None = None
    image_records: list[dict] | None = None
    annotation_records: list[dict] | None = None

    def __post_init__(self) -> None:
        self.category_pos = {cat["id"]: i for i, cat in enumerate(self.categories)}
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
        # each image's annotations, in file order: by_image[starts[i]:starts[i + 1]]
        self._by_image = np.argsort(self.image_index, kind="stable")
        self._starts = np.searchsorted(self.image_index[self._by_image], np.arange(self.num_images + 1))

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_instances(self) -> int:
        return len(self.ann_ids)

    @property
    def num_categories(self) -> int:
        return len(self.categories)

    @property
    def images(self) -> list[dict]:
        """The image records (loaded with ``records=True``)."""
        if self.image_records is None:
            raise RuntimeError(f"{self.path} was read without its records: load_annotations(..., records=True)")
        return self.image_records

    @property
    def annotations(self) -> list[dict]:
        """The annotation records (loaded with ``records=True``)."""
        if self.annotation_records is None:
            raise RuntimeError(f"{self.path} was read without its records: load_annotations(..., records=True)")
        return self.annotation_records

    @cached_property
    def image_pos(self) -> dict:
        """Image id -> position."""
        return dict(zip(self.image_ids.tolist(), range(self.num_images)))

    def instances_of(self, i: int) -> np.ndarray:
        """Positions of image ``i``'s annotations, in file order."""
        return self._by_image[self._starts[i]:self._starts[i + 1]]

    def segmentation(self, k: int):
        """Annotation ``k``'s ``segmentation`` as in the file (None without one)."""
        if self.segments is not None:
            return self.segments[k]
        if self.annotation_records is not None:
            return self.annotation_records[k].get("segmentation")
        raise RuntimeError(f"{self.path} was read without its segmentations: "
                           "load_annotations(..., segmentations=True)")

    def image_size(self, i: int) -> tuple[float, float]:
        """``(width, height)`` of image ``i`` as its record says."""
        return _number(self.widths[i]), _number(self.heights[i])

    def file_name(self, i: int) -> str:
        """File name of image ``i`` (``file_name``, else the last component of ``coco_url``)."""
        return str(self.file_names[i])

    def image_path(self, i: int, images_dir: str | os.PathLike | None = None) -> Path:
        """Path of image ``i`` inside ``images_dir`` (default: the folder given at load)."""
        root = images_dir if images_dir is not None else self.images_dir or "."
        return find_image_file(self.file_name(i), str(self.url_dirs[i]), root)

    def file_problem(self, i: int, images_dir: str | os.PathLike | None = None, decode: bool = False) -> str | None:
        """What is wrong with image ``i``'s file (:func:`image_file_problem`), or ``None``."""
        return image_file_problem(self.image_path(i, images_dir), *self.image_size(i), decode)

    def describe_image(self, i: int) -> str:
        return f"image id {self.image_ids[i]} ({self.file_name(i)})"

    @classmethod
    def from_records(cls, path: str, images: list, annotations: list, categories: list, images_dir=None,
                     on_bad: str = "error") -> "Annotations":
        """Records already in memory, checked as :func:`load_annotations` checks a file's."""
        builder = _Builder(str(path), on_bad, records=True, segmentations=False)
        builder.set_categories(categories)
        for n, rec in enumerate(images):
            builder.image(rec, n)
        for n, rec in enumerate(annotations):
            builder.annotation(rec, n)
        return builder.finish(images_dir, "none", False)


def _number(x):
    """A stored float back as the JSON number it was (640.0 -> 640)."""
    x = float(x)
    return int(x) if x.is_integer() else x


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


def _url_dir(rec: dict) -> str:
    """The folder of ``coco_url`` for a record without ``file_name`` (LVIS v1), else ``""``."""
    url = rec.get("coco_url")
    if url and not rec.get("file_name"):
        parts = str(url).rstrip("/").split("/")
        if len(parts) >= 2:
            return parts[-2]
    return ""


def find_image_file(name: str, url_dir: str, images_dir: str | os.PathLike) -> Path:
    """An image's file in ``images_dir``: ``DIR/name``, else (LVIS records without
    ``file_name``) ``DIR/url_dir/name``; the first candidate if neither exists."""
    root = Path(images_dir)
    candidates = [root / name] + ([root / url_dir / name] if url_dir else [])
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
    records: bool = True,
    segmentations: bool = False,
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
        progress: show progress bars while reading the file and checking images.
        records: keep the file's image and annotation records (``Annotations.images`` /
            ``.annotations``); without them the file is read in chunks and only the arrays
            are kept (a fraction of the memory, and faster).
        segmentations: keep each annotation's segmentation (``Annotations.segmentation``)
            also when ``records`` is false.
    """
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', not {on_bad!r}")
    if check_images not in ("none", "header", "decode"):
        raise ValueError(f"check_images must be 'none', 'header' or 'decode', not {check_images!r}")
    if check_images != "none" and images_dir is None:
        raise ValueError("check_images needs images_dir")
    path = str(path)
    builder = _read(path, on_bad, records, segmentations, progress)
    return builder.finish(images_dir, check_images, progress)


#: Files at least this large get a progress bar while they are read (LVIS v1 train: ~30 s).
PROGRESS_BYTES = 64 << 20

#: A polygon-list segmentation (a list of lists of numbers) in JSON text, and what takes its
#: place when it is cut out before parsing (:func:`_read`): a string no real file holds.
_POLYGONS = re.compile(r'"segmentation"[ \t\n\r]*:[ \t\n\r]*(\[[ \t\n\r]*\[[-+0-9.eE, \t\n\r\[\]]*\][ \t\n\r]*\])')
_POLYGON = re.compile(r"\[([^\[\]]*)\]")  # an innermost list: one polygon's numbers
_CUT = "\x01polygons"
_CUT_TEXT = '"segmentation":"\\u0001polygons"'


def _read(path: str, on_bad: str, records: bool, segmentations: bool, progress: bool) -> "_Builder":
    """Feed the file's records to a :class:`_Builder`: streamed (without keeping the records
    or parsing polygons) when it can be, else through ``json.loads``, whose errors name the
    line and column of bad syntax."""
    builder = _Builder(path, on_bad, records, segmentations)
    transform = None
    if not records:
        if segmentations:
            def keep_text(match):
                builder.add_polygons(match.group(1))
                return _CUT_TEXT

            transform = lambda text: _POLYGONS.sub(keep_text, text)  # noqa: E731
        else:
            template = _CUT_TEXT.replace("\\", "\\\\")  # re.sub reads backslashes in a template
            transform = lambda text: _POLYGONS.sub(template, text)  # noqa: E731
    bar = None
    if progress and os.path.isfile(path) and os.path.getsize(path) >= PROGRESS_BYTES:
        from tqdm import tqdm

        bar = tqdm(total=os.path.getsize(path), desc="reading annotations", unit="B", unit_scale=True, leave=False)
    try:
        values, counts = stream_object(path, {"images": builder.image, "annotations": builder.annotation},
                                       transform=transform, progress=None if bar is None else bar.update)
        for key in ("images", "annotations", "categories"):
            if key not in values and key not in counts:
                raise DataError(f"{path}: missing top-level key '{key}'")
            if key in values and not isinstance(values[key], list):
                raise DataError(f"{path}: top-level '{key}' must be a list")
        builder.set_categories(values["categories"])
    except (NotStreamable, OSError):
        builder = _Builder(path, on_bad, records, segmentations)
        data = _read_json(path)
        builder.set_categories(data["categories"])
        for n, rec in enumerate(data["images"]):
            builder.image(rec, n)
        for n, rec in enumerate(data["annotations"]):
            builder.annotation(rec, n)
    finally:
        if bar is not None:
            bar.close()
    return builder


class _Builder:
    """Takes records one at a time, in any order of the three lists, and makes the
    :class:`Annotations` (:meth:`finish`): images and categories are checked as they come,
    annotations (which refer to both) at the end, with numpy."""

    def __init__(self, path: str, on_bad: str, records: bool, segmentations: bool):
        self.path, self.records, self.want_segments = path, records, segmentations
        self.checker = _Checker(path, on_bad)
        self.categories: list[dict] = []
        # images
        self.img_ids, self.widths, self.heights = array("q"), array("d"), array("d")
        self.names: list[str] = []
        self.url_dirs: list[str] = []
        self.img_records: list[dict] = []
        self.seen_images: set = set()
        # annotations, one row per record (bad ones included) until finish()
        self.ann_ids, self.ann_images, self.ann_cats = array("q"), array("q"), array("q")
        self.boxes = array("d")
        self.box_code = bytearray()  # 0 well-formed, 1 not 4 finite numbers, 2 non-positive size
        self.crowd, self.has_seg = bytearray(), bytearray()
        self.pre: dict[int, tuple[str, str]] = {}  # missing keys, an id that is no integer
        self.odd: dict[int, dict] = {}  # original values a message may quote
        self.ann_records: list = []
        # segmentations: polygon lists cut out of the file (add_polygons), then one per record
        self.seg_coords = array("f")
        self.seg_lengths = array("q")  # each polygon's number of coordinates
        self.seg_groups = array("q")  # where each annotation's polygons end in seg_lengths
        self.seg_pending: list[str] = []  # polygons' text not parsed yet (parsed in bulk: _parse_pending)
        self.seg_pending_values = 0
        self.seg_next = 0  # the next cut-out polygon list to hand to a record
        self.seg_ref = array("q")
        self.seg_others: dict[int, object] = {}

    # ---------------------------------------------------------------- records as they come
    def set_categories(self, records: list) -> None:
        self.categories = self.checker.categories(records)

    def image(self, rec, n: int) -> None:
        name = self.checker.record_name("image", rec, n)
        problem = self.checker.image_problem(rec, self.seen_images)
        if problem:
            self.checker.bad("images", name, problem)
            return
        self.seen_images.add(rec["id"])
        self.img_ids.append(rec["id"])
        self.widths.append(rec["width"])
        self.heights.append(rec["height"])
        self.names.append(image_file_name(rec))
        self.url_dirs.append(_url_dir(rec))
        if self.records:
            self.img_records.append(rec)

    def add_polygons(self, text: str) -> None:
        """A polygon list's JSON text (``[[x, y, ...], ...]``) as float32 coordinates: its
        polygons' lengths now, their numbers parsed in bulk, a few MB of text at a time."""
        for poly in _POLYGON.findall(text):
            n = poly.count(",") + 1 if poly.strip() else 0
            self.seg_lengths.append(n)
            if n:
                self.seg_pending.append(poly)
                self.seg_pending_values += n
        self.seg_groups.append(len(self.seg_lengths))
        if self.seg_pending_values > 1 << 20:
            self._parse_pending()

    def _parse_pending(self) -> None:
        if not self.seg_pending:
            return
        values = np.fromstring(",".join(self.seg_pending), dtype=np.float32, sep=",")
        if len(values) != self.seg_pending_values:
            raise NotStreamable  # not lists of numbers after all: json.loads says where
        self.seg_coords.frombytes(values.tobytes())
        self.seg_pending, self.seg_pending_values = [], 0

    def annotation(self, rec, n: int) -> None:
        if type(rec) is dict and "id" in rec and "image_id" in rec and "category_id" in rec and "bbox" in rec:
            aid, iid, cid, box = rec["id"], rec["image_id"], rec["category_id"], rec["bbox"]
            if not _is_id(aid):
                self.pre[n] = (f"annotation id {aid!r}", f"id must be an integer, got {aid!r}")
                aid = 0
            if not (_is_id(iid) and _is_id(cid)):
                self.odd.setdefault(n, {}).update(image_id=iid, category_id=cid)
                iid = iid if _is_id(iid) else _NO_ID
                cid = cid if _is_id(cid) else _NO_ID
            code = 0
            if type(box) is list and len(box) == 4 and all(type(v) in _NUMBER for v in box):
                x, y, w, h = box
                if not (math.isfinite(x) and math.isfinite(y) and math.isfinite(w) and math.isfinite(h)):
                    code = 1
                elif w <= 0 or h <= 0:
                    code = 2
            else:
                code = 1
            if code:
                self.odd.setdefault(n, {})["bbox"] = box
                box = _NAN_BOX
            crowd = rec.get("iscrowd", 0)
        else:
            self.pre[n] = (self.checker.record_name("annotation", rec, n),
                           self.checker.missing(rec, ("id", "image_id", "category_id", "bbox")))
            aid, iid, cid, box, code, crowd = 0, _NO_ID, _NO_ID, _NAN_BOX, 0, 0
        self.ann_ids.append(aid)
        self.ann_images.append(iid)
        self.ann_cats.append(cid)
        self.boxes.extend(box)
        self.box_code.append(code)
        self.crowd.append(1 if crowd else 0)
        has_seg = type(rec) is dict and "segmentation" in rec
        self.has_seg.append(has_seg)
        if self.want_segments and not self.records:
            seg = rec["segmentation"] if has_seg else None
            if seg == _CUT:
                self.seg_ref.append(self.seg_next)
                self.seg_next += 1
            elif has_seg:
                self.seg_ref.append(-2)
                self.seg_others[n] = seg
            else:
                self.seg_ref.append(-1)
        if self.records:
            self.ann_records.append(rec)

    # ---------------------------------------------------------------- the end
    def finish(self, images_dir, check_images: str, progress: bool) -> Annotations:
        checker = self.checker
        checker.raise_first("categories")
        checker.raise_first("images")
        checker.defer = False  # the rest is checked in the order problems are reported
        img_ids = np.frombuffer(self.img_ids, dtype=np.int64) if self.img_ids else np.zeros(0, np.int64)
        widths = np.frombuffer(self.widths, dtype=np.float64) if self.widths else np.zeros(0)
        heights = np.frombuffer(self.heights, dtype=np.float64) if self.heights else np.zeros(0)
        m = len(self.ann_ids)
        ann_ids = np.frombuffer(self.ann_ids, dtype=np.int64) if m else np.zeros(0, np.int64)
        boxes = (np.frombuffer(self.boxes, dtype=np.float64) if m else np.zeros(0)).reshape(-1, 4)
        img_pos = _positions(img_ids, np.frombuffer(self.ann_images, dtype=np.int64) if m else np.zeros(0, np.int64))
        cat_ids = np.array([c["id"] for c in self.categories], dtype=np.int64)
        cat_pos = _positions(cat_ids, np.frombuffer(self.ann_cats, dtype=np.int64) if m else np.zeros(0, np.int64))
        keep_ann = self._annotation_problems(img_ids, widths, heights, ann_ids, boxes, img_pos, cat_pos) == 0

        keep_img = np.ones(len(img_ids), dtype=bool)
        if check_images != "none":
            bad = self._check_files(img_ids, widths, heights, images_dir, check_images == "decode", progress)
            if bad:
                keep_img[bad] = False
                dropped = keep_ann & ~keep_img[np.maximum(img_pos, 0)]
                checker.skipped["annotations of skipped images"] += int(dropped.sum())
                keep_ann &= ~dropped
        new_img_pos = np.cumsum(keep_img) - 1
        segments = None
        if self.want_segments and not self.records:
            def frozen(a, dtype):  # the array's own buffer, no copy
                return np.frombuffer(a, dtype=dtype) if len(a) else np.zeros(0, dtype)

            self._parse_pending()
            segments = Segmentations(frozen(self.seg_coords, np.float32),
                                     np.cumsum(frozen(self.seg_lengths, np.int64)),
                                     frozen(self.seg_groups, np.int64), frozen(self.seg_ref, np.int64),
                                     self.seg_others).select(keep_ann)
        images = [r for r, k in zip(self.img_records, keep_img) if k] if self.records else None
        anns = [r for r, k in zip(self.ann_records, keep_ann) if k] if self.records else None
        return Annotations(
            path=self.path, categories=self.categories,
            image_ids=img_ids[keep_img].copy(), widths=widths[keep_img].copy(), heights=heights[keep_img].copy(),
            file_names=np.array([n for n, k in zip(self.names, keep_img) if k], dtype=str).reshape(-1),
            url_dirs=np.array([u for u, k in zip(self.url_dirs, keep_img) if k], dtype=str).reshape(-1),
            ann_ids=ann_ids[keep_ann].copy(), boxes=boxes[keep_ann].copy(),
            image_index=new_img_pos[img_pos[keep_ann]].astype(np.int64), category_index=cat_pos[keep_ann],
            iscrowd=np.frombuffer(bytes(self.crowd), dtype=bool)[keep_ann],
            has_segmentation=np.frombuffer(bytes(self.has_seg), dtype=bool)[keep_ann],
            images_dir=None if images_dir is None else str(images_dir), skipped=checker.skipped,
            segments=segments, image_records=images, annotation_records=anns)

    def _annotation_problems(self, img_ids, widths, heights, ann_ids, boxes, img_pos, cat_pos) -> np.ndarray:
        """Per annotation record, the first of its problems in the order the checks run
        (0 none): missing key or non-integer id, duplicate id, unknown image, unknown category,
        malformed box, non-positive box, box outside the image. Raises the first under
        ``on_bad="error"``, counts them under ``"skip"``."""
        m = len(ann_ids)
        if m == 0:
            return np.zeros(0, dtype=np.int8)
        box_code = np.frombuffer(bytes(self.box_code), dtype=np.uint8).astype(np.int8)
        pre = np.zeros(m, dtype=bool)
        pre[list(self.pre)] = True
        known = img_pos >= 0
        W = np.where(known, widths[np.maximum(img_pos, 0)] if len(widths) else 0.0, np.inf)
        H = np.where(known, heights[np.maximum(img_pos, 0)] if len(heights) else 0.0, np.inf)
        x, y, w, h = boxes.T
        t = BOX_TOLERANCE
        with np.errstate(invalid="ignore"):
            outside = (box_code == 0) & known & ((x < -t) | (y < -t) | (x + w > W + t) | (y + h > H + t))
        box_code[outside] = 3
        other_ok = ~pre & known & (cat_pos >= 0) & (box_code == 0)
        # a record repeats an id when an earlier record with that id was kept; the kept one
        # of each id is its first record that passes every other check
        order = np.argsort(ann_ids, kind="stable")
        sorted_ids = ann_ids[order]
        group = np.cumsum(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]]) - 1
        first_ok = np.full(group[-1] + 1, m, dtype=np.int64)
        ok_sorted = other_ok[order] & ~pre[order]
        np.minimum.at(first_ok, group[ok_sorted], order[ok_sorted])
        dup = np.zeros(m, dtype=bool)
        dup[order] = order > first_ok[group]
        dup &= ~pre
        code = np.select([pre, dup, ~known, cat_pos < 0, box_code > 0], [1, 2, 3, 4, 4 + box_code], 0).astype(np.int8)
        bad = np.flatnonzero(code)
        if bad.size and self.checker.on_bad == "error":
            n = int(bad[0])
            self.checker.bad("annotations", *self._message(n, int(code[n]), img_pos, widths, heights, img_ids, boxes))
        if bad.size:
            self.checker.skipped["annotations"] += int(bad.size)
        return code

    def _message(self, n: int, code: int, img_pos, widths, heights, img_ids, boxes) -> tuple[str, str]:
        if code == 1:
            return self.pre[n]
        odd = self.odd.get(n, {})
        name = f"annotation id {self.ann_ids[n]}"
        if code == 2:
            return name, "duplicate annotation id"
        if code == 3:
            return name, f"unknown image id {odd.get('image_id', self.ann_images[n])}"
        if code == 4:
            return name, f"unknown category id {odd.get('category_id', self.ann_cats[n])}"
        if code == 5:
            return name, f"bbox must be 4 finite numbers [x, y, w, h], got {odd['bbox']!r}"
        if code == 6:
            return name, f"bbox {odd['bbox']} has non-positive width or height"
        i = int(img_pos[n])
        box = [_number(v) for v in boxes[n]]
        return name, f"bbox {box} lies outside the {_number(widths[i])}x{_number(heights[i])} image id {img_ids[i]}"

    def _check_files(self, img_ids, widths, heights, images_dir, decode: bool, progress: bool) -> list[int]:
        """Positions of images whose file is missing, unreadable or of the wrong size."""
        from tqdm import tqdm

        bad = []
        for i in tqdm(range(len(img_ids)), desc="checking images", unit="img", disable=not progress):
            file = find_image_file(self.names[i], self.url_dirs[i], images_dir)
            problem = image_file_problem(file, _number(widths[i]), _number(heights[i]), decode)
            if problem:
                self.checker.bad("images", f"image id {img_ids[i]}", problem)
                bad.append(i)
        return bad


_NUMBER = (int, float)
_INT64 = range(-(2**63) + 1, 2**63)


def _is_id(x) -> bool:
    """An id the arrays can hold: an integer (not a bool) within int64."""
    return type(x) is int and x in _INT64


_NAN_BOX = (math.nan,) * 4
_NO_ID = -(2**63)  # an image / category id no record has (ids are checked to be integers)


def _positions(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Position of each of ``wanted`` in ``ids`` (distinct), -1 if absent."""
    if ids.size == 0:
        return np.full(wanted.shape, -1, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    at = np.minimum(np.searchsorted(ids, wanted), ids.size - 1)
    return np.where(ids[at] == wanted, order[at], -1).astype(np.int64)


# --------------------------------------------------------------------------- other sources


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
    builder = _Builder(str(root), on_bad, records=True, segmentations=False)
    builder.checker.defer = False  # nothing else to check first: stop at the first bad file
    read = 0
    for image_id, name in enumerate(tqdm(files, desc="reading images", unit="img", disable=not progress), start=1):
        size, problem = open_image_file(root / name, check_images == "decode")
        if problem:
            builder.checker.bad("images", f"image id {image_id}", problem)
            continue
        builder.image({"id": image_id, "file_name": name, "width": size[0], "height": size[1]}, read)
        read += 1
    if not read:
        raise DataError(f"{root}: none of its {len(files)} image files could be read")
    return builder.finish(root, "none", False)


#: The one category of a class-agnostic detector (:func:`merge_categories`).
OBJECT_CATEGORY = {"id": 1, "name": "object"}


def merge_categories(ann: Annotations) -> Annotations:
    """The same file with every category merged into one, :data:`OBJECT_CATEGORY`: for
    training and scoring a class-agnostic detector whose detections become proposals.

    Annotations keep their ids and boxes with ``category_id`` 1. An image's LVIS
    ``not_exhaustive_category_ids`` become ``[1]`` when it listed any category (its objects
    are not all annotated) and ``neg_category_ids`` become ``[]`` (a category known to be
    absent says nothing about objects in general)."""
    images = annotations = None
    if ann.image_records is not None:
        images = []
        for img in ann.image_records:
            img = dict(img)
            if "not_exhaustive_category_ids" in img:
                img["not_exhaustive_category_ids"] = [1] if img["not_exhaustive_category_ids"] else []
            if "neg_category_ids" in img:
                img["neg_category_ids"] = []
            images.append(img)
    if ann.annotation_records is not None:
        annotations = [{**a, "category_id": OBJECT_CATEGORY["id"]} for a in ann.annotation_records]
    return replace(ann, categories=[dict(OBJECT_CATEGORY)], category_index=np.zeros_like(ann.category_index),
                   image_records=images, annotation_records=annotations)


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
    """Checks records one by one and says what is wrong. Under ``on_bad="error"`` a problem
    is raised at once, or with ``defer`` (while the file is still being read, when a later
    list may hold a problem to report first) kept until :meth:`raise_first` asks for the
    first of its kind; under ``"skip"`` problems are counted."""

    def __init__(self, path: str, on_bad: str, defer: bool = True):
        self.path = path
        self.on_bad = on_bad
        self.defer = defer
        self.skipped: Counter = Counter()
        self.first: dict[str, str] = {}

    def bad(self, what: str, record: str, problem: str) -> None:
        if self.on_bad == "skip":
            self.skipped[what] += 1
        elif self.defer:
            self.first.setdefault(what, f"{self.path}: {record}: {problem}")
        else:
            raise DataError(f"{self.path}: {record}: {problem}")

    def raise_first(self, what: str) -> None:
        if what in self.first:
            raise DataError(self.first[what])

    def record_name(self, kind: str, rec, n: int) -> str:
        if isinstance(rec, dict) and "id" in rec:
            return f"{kind} id {rec['id']}"
        return f"{kind} #{n} (no id)"

    def missing(self, rec, keys) -> str | None:
        if not isinstance(rec, dict):
            return "is not a JSON object"
        missing = [k for k in keys if k not in rec]
        if missing:
            return "missing key " + ", ".join(f"'{k}'" for k in missing)
        return None

    def categories(self, records: list) -> list[dict]:
        kept, seen = [], set()
        for n, rec in enumerate(records):
            name = self.record_name("category", rec, n)
            problem = self.missing(rec, ("id", "name"))
            if problem is None and not _is_id(rec["id"]):
                problem = f"id must be an integer, got {rec['id']!r}"
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

    def image_problem(self, rec, seen: set) -> str | None:
        problem = self.missing(rec, ("id", "width", "height"))
        if problem is None and not (rec.get("file_name") or rec.get("coco_url")):
            problem = "has neither 'file_name' nor 'coco_url'"
        if problem is None and not _is_id(rec["id"]):
            problem = f"id must be an integer, got {rec['id']!r}"
        if problem is None and rec["id"] in seen:
            problem = "duplicate image id"
        if problem is None and not all(_is_number(rec[k]) and rec[k] > 0 for k in ("width", "height")):
            problem = f"width and height must be positive numbers, got {rec['width']!r} x {rec['height']!r}"
        return problem


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


def image_file_problem(file, width, height, decode: bool = False) -> str | None:
    """What is wrong with an image file whose record says ``width`` x ``height`` (missing,
    not an image, of another size; with ``decode`` also pixels that do not decode), or
    ``None``."""
    size, problem = open_image_file(file, decode)
    if problem is None and size != (width, height):
        problem = f"file {file} is {size[0]}x{size[1]} but the record says {width}x{height}"
    return problem
