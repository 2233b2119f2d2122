"""Looking at detections: boxes drawn on images, a gallery of the images that hold chosen
categories, and a confusion table of which categories take their ground truth.

:func:`visualize` (``drcl visualize``) reads a ground-truth file (COCO / LVIS v1, through
:func:`~drcl.data.annotations.load_annotations`), a COCO-results detection file and the image
folder, and writes under ``OUT``:

* ``images/<image id>.png``: ground truth and detections drawn on up to ``max_images`` val
  images holding the chosen categories (``torchvision.utils.draw_bounding_boxes``);
* ``gallery.png``: those images in one grid;
* ``confusion.csv`` and ``confusion.png``: the confusion table below, as rows and as a heat map.

Categories
----------
``rare``, ``common`` or ``frequent`` (the ground truth's LVIS ``frequency``, or the project's
image-count rule when a file lacks it: :func:`drcl.data.annotations.frequency_group`), or
category ids, ``"3,17,42"``.

Drawing
-------
Only detections with ``score >= min_score`` are drawn and counted. Colours: ground truth
green (:data:`GT_COLOR`); a detection blue (:data:`MATCH_COLOR`) when it overlaps a ground-truth
box of its own category with IoU >= 0.5, else red (:data:`OTHER_COLOR`). A detection is
labelled ``name score``; a ground-truth box is labelled with its name only when no detection
of its category finds it (otherwise the detection's label already names it). Images are
scaled up so that their longer side is at least :data:`MIN_SIDE` pixels, to keep labels
legible.

Which images: round-robin over the chosen categories (fewest ground-truth boxes first), each
image at most once, so the gallery shows as many categories as ``max_images`` allows.

Confusion table
---------------
For each ground-truth box g of a chosen category c, among the detections on g's image with
``score >= min_score``, exactly one outcome (so ``found + confused + missed = boxes``):

* **found**: a detection of c has IoU(g, d) >= 0.5 (:data:`IOU`);
* **confused into k**: otherwise, if a detection of another category has IoU >= 0.5 with g,
  k is the category of the one with the highest IoU (ties: the higher score, then file order);
* **missed**: otherwise.

IoU is the usual box IoU, |g ∩ d| / |g ∪ d| on [x, y, w, h] boxes. A confusion is therefore a
box the detector saw but named wrongly, and only counted when no detection of the right
category also found it.

Bad input follows the project's ``on_bad`` rule: ``"error"`` stops at the first bad record
with one line naming the file and the record (``DT.json: detection #7: unknown category id
77``, ``GT.json: image id 3: image file ... not found``); ``"skip"`` drops it and counts it in
the returned ``skipped``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import textwrap
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

from drcl.atomic import atomic_write
from drcl.data.annotations import GROUP_NAMES, Annotations, load_annotations
from drcl.data.stats import GROUP_COLORS, pyplot
from drcl.errors import DataError
from drcl.evaluation.lvis_eval import read_detections, validate_detections

#: Ground truth / detection on a ground-truth box of its category / any other detection.
GT_COLOR = (0, 220, 0)
MATCH_COLOR = (30, 144, 255)
OTHER_COLOR = (255, 40, 40)
#: IoU at which a detection finds (or, of another category, takes) a ground-truth box.
IOU = 0.5
#: Default minimum score of a drawn or counted detection.
MIN_SCORE = 0.3
#: Drawn images are scaled up to at least this longer side (labels stay legible).
MIN_SIDE = 480
#: The confusion heat map shows at most this many rows (categories with the most boxes not
#: found first) and confused-into columns (most boxes first; the rest are summed in "other").
MAX_ROWS = 40
MAX_COLS = 20
CSV_COLUMNS = ("gt_id", "gt_name", "gt_frequency", "gt_boxes", "outcome",
               "det_id", "det_name", "det_frequency", "count", "share")
_GROUP_WORDS = {"rare": "r", "common": "c", "frequent": "f"}


def select_categories(ann: Annotations, spec: str) -> list[int]:
    """Positions (in ``ann.categories``) of the categories named by ``spec``: ``rare``,
    ``common``, ``frequent`` or comma-separated category ids. ``ValueError`` for an unknown
    word or id, or a group with no category."""
    spec = spec.strip()
    if spec.lower() in _GROUP_WORDS:
        group = _GROUP_WORDS[spec.lower()]
        chosen = [c for c, f in enumerate(ann.frequency) if f == group]
        if not chosen:
            raise ValueError(f"{ann.path}: no category is {spec.lower()} "
                             f"(groups from the {ann.frequency_source} frequency)")
        return chosen
    chosen = []
    for part in spec.split(","):
        try:
            cid = int(part)
        except ValueError:
            raise ValueError(f"--categories takes rare, common, frequent or category ids, not {part.strip()!r}") from None
        if cid not in ann.category_pos:
            raise ValueError(f"{ann.path}: no category id {cid}")
        if ann.category_pos[cid] not in chosen:
            chosen.append(ann.category_pos[cid])
    return chosen


def _xyxy(boxes) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def box_iou(a, b) -> np.ndarray:
    """IoU of every [x, y, w, h] box in ``a`` with every one in ``b`` (len(a) x len(b))."""
    from torchvision.ops import box_iou as tv_box_iou

    return tv_box_iou(torch.from_numpy(_xyxy(a)), torch.from_numpy(_xyxy(b))).numpy()


class _ByImage:
    """Detections with ``score >= min_score`` grouped by image id, highest score first."""

    def __init__(self, detections: list[dict], min_score: float):
        groups = defaultdict(list)
        for n, d in enumerate(detections):
            if d["score"] >= min_score:
                groups[d["image_id"]].append((-float(d["score"]), n))
        self.detections = detections
        self.order = {i: [n for _, n in sorted(g)] for i, g in groups.items()}

    def get(self, image_id) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(boxes [x, y, w, h], category ids, scores) of one image."""
        idx = self.order.get(image_id, [])
        d = self.detections
        return (np.array([d[n]["bbox"] for n in idx], dtype=np.float64).reshape(-1, 4),
                np.array([d[n]["category_id"] for n in idx], dtype=np.int64),
                np.array([d[n]["score"] for n in idx], dtype=np.float64))


def box_outcomes(gt_boxes, gt_cats, det_boxes, det_cats) -> tuple[np.ndarray, np.ndarray]:
    """Per ground-truth box of one image: ``found`` (bool) and the category id it is confused
    into (-1 where found or missed), as the module notes define them. Detections must be in
    decreasing score order (ties of IoU go to the first)."""
    gt_cats = np.asarray(gt_cats, dtype=np.int64)
    det_cats = np.asarray(det_cats, dtype=np.int64)
    found = np.zeros(len(gt_cats), dtype=bool)
    into = np.full(len(gt_cats), -1, dtype=np.int64)
    if len(gt_cats) == 0 or len(det_cats) == 0:
        return found, into
    iou = box_iou(gt_boxes, det_boxes)
    hit = iou >= IOU
    same = gt_cats[:, None] == det_cats[None, :]
    found = (hit & same).any(axis=1)
    other = np.where(hit & ~same, iou, -1.0)
    best = other.argmax(axis=1)  # first maximum: the higher score among equal IoUs
    confused = ~found & (other.max(axis=1) >= 0)
    into[confused] = det_cats[best[confused]]
    return found, into


def confusion_table(ann: Annotations, detections: list[dict], categories: list[int],
                    min_score: float = MIN_SCORE) -> list[dict]:
    """One row per chosen category with ground truth in ``ann``: ``{id, name, frequency,
    boxes, found, confused, missed, into}``, ``into`` a list of ``{id, name, frequency,
    count}`` (most first) of the categories its boxes were confused into. ``detections`` are
    validated COCO results (see :func:`~drcl.evaluation.lvis_eval.validate_detections`)."""
    chosen = set(categories)
    by_image = _ByImage(detections, min_score)
    boxes, found, into = Counter(), Counter(), defaultdict(Counter)
    category_ids = np.array([cat["id"] for cat in ann.categories], dtype=np.int64)
    for i in range(ann.num_images):
        mine = [k for k in ann.instances_of(i).tolist() if ann.category_index[k] in chosen]
        if not mine:
            continue
        gt_cats = category_ids[ann.category_index[mine]].tolist()
        det_boxes, det_cats, _ = by_image.get(int(ann.image_ids[i]))
        hit, took = box_outcomes(ann.boxes[mine].tolist(), gt_cats, det_boxes, det_cats)
        for c, h, t in zip(gt_cats, hit.tolist(), took.tolist()):
            boxes[c] += 1
            found[c] += h
            if t >= 0:
                into[c][t] += 1

    def describe(cid):
        pos = ann.category_pos[cid]
        return {"id": cid, "name": ann.categories[pos]["name"], "frequency": ann.frequency[pos]}

    rows = []
    for pos in categories:
        cid = ann.categories[pos]["id"]
        if not boxes[cid]:
            continue
        confused = sum(into[cid].values())
        rows.append({**describe(cid), "boxes": boxes[cid], "found": found[cid], "confused": confused,
                     "missed": boxes[cid] - found[cid] - confused,
                     "into": [{**describe(k), "count": n}
                              for k, n in sorted(into[cid].items(), key=lambda kv: (-kv[1], kv[0]))]})
    return rows


def write_confusion_csv(rows: list[dict], path: str | os.PathLike) -> None:
    """Long format (:data:`CSV_COLUMNS`): per category a ``found`` and a ``missed`` row, then one
    ``confused`` row per category its boxes went to; ``share`` = count / the category's boxes."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        head = [r["id"], r["name"], r["frequency"], r["boxes"]]
        for outcome in ("found", "missed"):
            writer.writerow(head + [outcome, "", "", "", r[outcome], f"{r[outcome] / r['boxes']:.4f}"])
        for k in r["into"]:
            writer.writerow(head + ["confused", k["id"], k["name"], k["frequency"], k["count"],
                                    f"{k['count'] / r['boxes']:.4f}"])
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def plot_confusion(rows: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """Heat map of :func:`confusion_table`'s rows: the share of each category's ground-truth
    boxes found, missed or confused into each other category (counts written in the cells);
    at most :data:`MAX_ROWS` rows and :data:`MAX_COLS` confused-into columns, column names
    coloured by the target's frequency group."""
    shown = sorted(rows, key=lambda r: (-(r["boxes"] - r["found"]), -r["confused"], r["id"]))[:MAX_ROWS]
    totals = Counter()
    for r in shown:
        for k in r["into"]:
            totals[(k["id"], k["name"], k["frequency"])] += k["count"]
    targets = [t for t, _ in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0][0]))]
    columns, rest = targets[:MAX_COLS], targets[MAX_COLS:]
    labels = ["found", "missed"] + [f"{name} ({cid})" for cid, name, _ in columns] + (["other"] if rest else [])
    counts = np.zeros((max(len(shown), 1), len(labels)), dtype=np.int64)
    col = {t[0]: 2 + j for j, t in enumerate(columns)}
    for i, r in enumerate(shown):
        counts[i, 0], counts[i, 1] = r["found"], r["missed"]
        for k in r["into"]:
            counts[i, col.get(k["id"], len(labels) - 1)] += k["count"]
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    row_labels = [f"{r['name']} ({r['id']}, {r['boxes']})" for r in shown]
    plt = pyplot("the confusion plot")
    width = 1.5 + 0.07 * max((len(t) for t in row_labels), default=0) + 0.45 * len(labels)
    height = 1.2 + 0.3 * len(shown) + 0.06 * max(len(t) for t in labels)
    fig, ax = plt.subplots(figsize=(max(6.0, width), max(3.0, height)), dpi=110)
    found_col = np.zeros_like(share, dtype=bool)
    found_col[:, 0] = True
    ax.imshow(np.ma.masked_where(found_col, share), cmap="Reds", vmin=0, vmax=1, aspect="auto")
    ax.imshow(np.ma.masked_where(~found_col, share), cmap="Greens", vmin=0, vmax=1, aspect="auto")
    for (i, j), n in np.ndenumerate(counts):
        if n:
            ax.text(j, i, str(n), ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    for tick, t in zip(ax.get_xticklabels()[2:], columns):
        tick.set_color(GROUP_COLORS[t[2]])
    ax.set_yticks(range(len(shown)), row_labels, fontsize=7)
    ax.set_ylabel("ground-truth category (id, boxes)", fontsize=8)
    ax.set_title(title or "Where the chosen categories' ground-truth boxes go", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def draw_boxes(image: torch.Tensor, gt: list[tuple], detections: list[tuple], width: int = 2) -> torch.Tensor:
    """``image`` (uint8, C x H x W) with the ground truth and detections drawn on it.

    ``gt``: ``(bbox [x, y, w, h], label or None)``; ``detections``: ``(bbox, label, matched)``,
    drawn in :data:`MATCH_COLOR` when ``matched`` else :data:`OTHER_COLOR`, over the ground
    truth (:data:`GT_COLOR`). The rectangle's pixels are the box's integer corners (x, y) to
    (x + w, y + h) and ``width`` pixels inwards; labels sit inside the top-left corner."""
    from torchvision.utils import draw_bounding_boxes

    layers = [(gt, [GT_COLOR] * len(gt)),
              (detections, [MATCH_COLOR if m else OTHER_COLOR for _, _, m in detections])]
    for items, colors in layers:
        if not items:
            continue
        boxes = torch.from_numpy(_xyxy([item[0] for item in items]))
        labels = [item[1] for item in items]  # None: no label
        image = draw_bounding_boxes(image, boxes, labels=labels, colors=colors, width=width, fill_labels=True)
    return image


def _drawn_image(ann: Annotations, i: int, images_dir, by_image: _ByImage) -> torch.Tensor:
    """Image ``i`` scaled up to :data:`MIN_SIDE` with its ground truth and detections drawn."""
    from PIL import Image

    with Image.open(ann.image_path(i, images_dir)) as im:
        im = im.convert("RGB")
        scale = max(1.0, MIN_SIDE / max(im.size))
        if scale > 1:
            im = im.resize((round(im.size[0] * scale), round(im.size[1] * scale)), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
    names = {cat["id"]: cat["name"] for cat in ann.categories}
    anns = ann.instances_of(i)
    gt_boxes = ann.boxes[anns].reshape(-1, 4)
    gt_cats = np.array([ann.categories[c]["id"] for c in ann.category_index[anns]], dtype=np.int64)
    det_boxes, det_cats, scores = by_image.get(int(ann.image_ids[i]))
    if len(anns) and len(det_cats):
        match = (box_iou(gt_boxes, det_boxes) >= IOU) & (gt_cats[:, None] == det_cats[None, :])
    else:
        match = np.zeros((len(anns), len(det_cats)), dtype=bool)
    gt = [(b * scale, None if match[g].any() else names[c]) for g, (b, c) in enumerate(zip(gt_boxes, gt_cats.tolist()))]
    dets = [(b * scale, f"{names[c]} {s:.2f}", bool(match[:, d].any()))
            for d, (b, c, s) in enumerate(zip(det_boxes, det_cats.tolist(), scores.tolist()))]
    # lowest score first, so the best detections are drawn on top
    return draw_boxes(pixels, gt, dets[::-1], width=2)


def _gallery_order(ann: Annotations, categories: list[int]) -> list[int]:
    """Image positions round-robin over the chosen categories (fewest boxes first)."""
    images_of = defaultdict(dict)  # category -> {image: None}, in file order
    for i, c in zip(ann.image_index.tolist(), ann.category_index.tolist()):
        images_of[c][i] = None
    queues = [list(images_of[c]) for c in sorted(categories, key=lambda c: (ann.instance_count[c], c)) if images_of[c]]
    order, seen = [], set()
    for rank in range(max((len(q) for q in queues), default=0)):
        for q in queues:
            if rank < len(q) and q[rank] not in seen:
                seen.add(q[rank])
                order.append(q[rank])
    return order


def plot_gallery(tiles: list[tuple[torch.Tensor, str]], path: str | os.PathLike, title: str,
                 cols: int | None = None) -> None:
    """One PNG grid of drawn images (``(image, caption)``, row by row, ``cols`` to a row:
    default about the square root of their number), captions under a legend title."""
    plt = pyplot("the gallery")
    n = len(tiles)
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows + 0.6), dpi=110, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, caption) in zip(axes.flat, tiles):
        ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_title(textwrap.fill(caption, 48), fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def visualize(
    gt: str | os.PathLike | Annotations,
    detections: str | os.PathLike | list,
    images_dir: str | os.PathLike,
    out: str | os.PathLike,
    categories: str = "rare",
    min_score: float = MIN_SCORE,
    max_images: int = 16,
    on_bad: str = "error",
    progress: bool = True,
) -> dict:
    """Write the drawn images, ``gallery.png``, ``confusion.csv`` and ``confusion.png`` under
    ``out`` (see the module notes).

    Returns ``{"categories": [ids], "rows": confusion rows, "images": [written PNG paths],
    "skipped": Counter of dropped records (``on_bad="skip"``), "gt": Annotations}``. Raises
    :class:`DataError` on bad input (``on_bad="error"``), ``ValueError`` on bad arguments.
    """
    from tqdm import tqdm

    if not 0 <= min_score <= 1 or not math.isfinite(min_score):
        raise ValueError(f"the minimum score must be in [0, 1], not {min_score}")
    if max_images < 1:
        raise ValueError(f"the number of images must be at least 1, not {max_images}")
    pyplot("drcl visualize")  # before any slow work
    ann = gt if isinstance(gt, Annotations) else load_annotations(gt, images_dir, on_bad=on_bad, records=False)
    chosen = select_categories(ann, categories)
    dets, label = read_detections(detections)
    dets, bad_dets = validate_detections(dets, label, ann.image_pos, set(ann.category_pos), on_bad)
    skipped = Counter(ann.skipped)
    if bad_dets:
        skipped["detections"] += bad_dets

    out = Path(out)
    rows = confusion_table(ann, dets, chosen, min_score)
    write_confusion_csv(rows, out / "confusion.csv")
    what = _describe(categories)
    plot_confusion(rows, out / "confusion.png", f"Where the ground-truth boxes of {what} go\n"
                   f"(share of each row's boxes; detections with score >= {min_score:g}, IoU >= {IOU:g})")

    by_image = _ByImage(dets, min_score)
    chosen_set = set(chosen)
    tiles, written = [], []
    order = _gallery_order(ann, chosen)
    with tqdm(total=min(max_images, len(order)), desc="drawing images", unit="img", disable=not progress) as bar:
        for i in order:
            if len(tiles) == max_images:
                break
            image_id = int(ann.image_ids[i])
            problem = ann.file_problem(i, images_dir, decode=True)
            if problem:
                if on_bad == "error":
                    raise DataError(f"{ann.path}: image id {image_id}: {problem}")
                skipped["image files"] += 1
                continue
            image = _drawn_image(ann, i, images_dir, by_image)
            path = out / "images" / f"{image_id}.png"
            _save_png(image, path)
            written.append(path)
            held = sorted({ann.categories[ann.category_index[k]]["name"] for k in ann.instances_of(i)
                           if ann.category_index[k] in chosen_set})
            tiles.append((image, f"image {image_id}: " + ", ".join(held)))
            bar.update(1)
    if tiles:
        plot_gallery(tiles, out / "gallery.png", f"Val images holding {what}\n{_legend(min_score)}")
    return {"categories": [ann.categories[c]["id"] for c in chosen], "rows": rows, "images": written,
            "skipped": skipped, "gt": ann}


def _describe(categories: str) -> str:
    spec = categories.strip().lower()
    return f"{spec} objects" if spec in _GROUP_WORDS else f"categories {categories}"


def _legend(min_score: float) -> str:
    return ("green: ground truth (named when no detection of its class finds it); blue: detection on a\n"
            f"ground-truth box of its class (IoU >= {IOU:g}); red: other detection; scores >= {min_score:g}")


def plot_detections_side_by_side(
    gt: Annotations,
    runs: dict[str, str | os.PathLike | list],
    images_dir: str | os.PathLike,
    path: str | os.PathLike,
    categories: str = "rare",
    min_score: float = MIN_SCORE,
    max_images: int = 4,
) -> int:
    """One PNG: a row per val image holding the chosen categories (chosen as for the
    gallery), a column per run (``{label: detections}``, COCO results files or lists), each
    tile drawn as in ``drcl visualize``. Returns the number of rows. Bad input raises a
    one-line :class:`DataError`."""
    chosen = select_categories(gt, categories)
    by_run = {}
    for label, source in runs.items():
        dets, name = read_detections(source)
        dets, _ = validate_detections(dets, name, gt.image_pos, set(gt.category_pos))
        by_run[label] = _ByImage(dets, min_score)
    chosen_set = set(chosen)
    tiles, rows = [], 0
    for i in _gallery_order(gt, chosen)[:max_images]:
        image_id = int(gt.image_ids[i])
        problem = gt.file_problem(i, images_dir, decode=True)
        if problem:
            raise DataError(f"{gt.path}: image id {image_id}: {problem}")
        held = sorted({gt.categories[gt.category_index[k]]["name"] for k in gt.instances_of(i)
                       if gt.category_index[k] in chosen_set})
        for label, by_image in by_run.items():
            tiles.append((_drawn_image(gt, i, images_dir, by_image), f"{label}: image {image_id} ({', '.join(held)})"))
        rows += 1
    if tiles:
        what = _describe(categories)
        plot_gallery(tiles, path, f"The same val images holding {what}, detections of each run\n{_legend(min_score)}",
                     cols=len(by_run))
    return rows


def _save_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    atomic_write(path, lambda f: pil.save(f, format="PNG"))


def format_summary(rows: list[dict], top: int = 5) -> str:
    """A few lines: boxes found / confused / missed over all rows, then the ``top`` largest
    confusions."""
    boxes = sum(r["boxes"] for r in rows)
    if not boxes:
        return "no ground-truth boxes of the chosen categories"
    total = {k: sum(r[k] for r in rows) for k in ("found", "confused", "missed")}
    lines = [f"{boxes} ground-truth boxes in {len(rows)} categories: "
             + ", ".join(f"{k} {n} ({n / boxes:.1%})" for k, n in total.items())]
    pairs = sorted(((k["count"], r, k) for r in rows for k in r["into"]), key=lambda t: (-t[0], t[1]["id"], t[2]["id"]))
    for n, r, k in pairs[:top]:
        lines.append(f"  {r['name']} ({r['id']}, {GROUP_NAMES[r['frequency']]}) -> {k['name']} ({k['id']}, "
                     f"{GROUP_NAMES[k['frequency']]}): {n} of {r['boxes']} boxes")
    return "\n".join(lines)


__all__ = ["CSV_COLUMNS", "GT_COLOR", "IOU", "MATCH_COLOR", "MIN_SCORE", "OTHER_COLOR", "box_iou", "box_outcomes",
           "confusion_table", "draw_boxes", "format_summary", "plot_confusion", "plot_detections_side_by_side",
           "plot_gallery", "select_categories", "visualize", "write_confusion_csv"]
