"""``drcl proposals``: class-agnostic boxes for local contrast when the images have none.

The paper's LCL takes 8 boxes per image from a class-agnostic detector (its appendix A.1).
This command writes such boxes for an annotation file's images or for a folder of images, in
COCO results format (``[{"image_id", "category_id": 1, "bbox": [x, y, w, h], "score", "file_name"}]``,
best first per image), the file ``data.boxes: proposals`` / ``data.proposals`` reads
(:func:`drcl.data.boxes.load_proposals`). Two methods:

* ``selective-search``: OpenCV's selective search, filtered by size and aspect ratio as SoCo
  filters its boxes (:mod:`drcl.data.selective_search`), then non-maximum suppression and the
  top K by OpenCV's ranking; ``workers`` processes share the images;
* ``detector``: a ``drcl finetune`` checkpoint (best a class-agnostic one,
  ``data.class_agnostic: true``) run over the images with the project's inference code
  (:func:`drcl.evaluation.inference.predict`); its detections, of any category, go through
  the same suppression and top K by score.

For an image folder the image ids are those ``drcl pretrain`` gives the same folder
(:func:`drcl.data.annotations.load_image_folder`); each record also carries its image's
``file_name``, which :func:`~drcl.data.boxes.load_proposals` checks, so proposals made before
the folder changed are refused rather than put on the wrong images. Every image is decoded before the search: an image
that does not decode (or on which the search fails) is a one-line error naming it, or with
``on_bad="skip"`` is left out and counted.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torchvision.ops import nms
from tqdm import tqdm

from drcl.atomic import atomic_write
from drcl.data.annotations import Annotations, load_annotations, load_image_folder
from drcl.data.selective_search import FilterSettings, one_thread, search_task
from drcl.errors import DataError

METHODS = ("selective-search", "detector")
#: The paper's number of boxes per image for LCL (appendix A.1).
PER_IMAGE = 8


def read_input(path: str | os.PathLike, images: str | os.PathLike | None = None, on_bad: str = "error",
               progress: bool = True) -> Annotations:
    """The images to find boxes in: an image folder, or an annotation file with its image
    folder ``images``; every image decoded once (bad ones raise or, with ``on_bad="skip"``, are
    dropped and counted in ``skipped``)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        if images is not None:
            raise DataError(f"{path} is an image folder: --images applies to an annotation file only")
        return load_image_folder(path, on_bad=on_bad, check_images="decode", progress=progress)
    if images is None:
        raise DataError(f"{path}: an annotation file needs its image folder (--images FOLDER)")
    return load_annotations(path, images, on_bad=on_bad, check_images="decode", progress=progress)


def top_boxes(boxes: torch.Tensor, scores: torch.Tensor, k: int, nms_iou: float = 0.5):
    """Non-maximum suppression at IoU ``nms_iou`` (``torchvision.ops.nms``), then the ``k``
    highest-scoring boxes: ``(boxes (<=k, 4), scores (<=k,))``, best first."""
    keep = nms(boxes.float(), scores.float(), nms_iou)[:k]
    return boxes[keep], scores[keep]


def _records(ann: Annotations, i: int, boxes: torch.Tensor, scores: torch.Tensor) -> list[dict]:
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    image_id, name = int(ann.image_ids[i]), ann.file_name(i)
    return [{"image_id": image_id, "category_id": 1, "bbox": [round(v, 2) for v in b], "score": round(float(s), 6),
             "file_name": name} for b, s in zip(xywh, scores.tolist())]


def selective_search_proposals(ann: Annotations, per_image: int = PER_IMAGE, workers: int = 1, mode: str = "fast",
                               max_side: int = 512, settings: FilterSettings = FilterSettings(),
                               nms_iou: float = 0.5, on_bad: str = "error", progress: bool = True):
    """Proposals of every image of ``ann`` by selective search: ``(records, seconds per
    image)``; failed images raise or (``on_bad="skip"``) are counted in ``ann.skipped``."""
    tasks = [(i, str(ann.image_path(i)), mode, max_side, settings) for i in range(ann.num_images)]
    records, start = [], time.perf_counter()
    bar = tqdm(total=len(tasks), desc="selective search", unit="img", disable=not progress, dynamic_ncols=True)
    pool = None
    try:
        if workers > 1:
            import multiprocessing

            # spawn: the parent holds torch's thread pools, which a forked child must not inherit
            pool = multiprocessing.get_context("spawn").Pool(workers, initializer=one_thread)
            results = pool.imap(search_task, tasks, chunksize=max(1, min(16, len(tasks) // (8 * workers))))
        else:
            one_thread()
            results = map(search_task, tasks)
        for i, boxes, scores, problem in results:
            bar.update(1)
            if problem is not None:
                if on_bad == "error":
                    raise DataError(f"{ann.path}: {ann.describe_image(i)}: {problem}")
                ann.skipped["images"] += 1
                continue
            b, s = top_boxes(torch.from_numpy(boxes), torch.from_numpy(scores), per_image, nms_iou)
            records += _records(ann, i, b, s)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return records, (time.perf_counter() - start) / max(1, ann.num_images)


def detector_proposals(ann: Annotations, checkpoint, cfg: dict, per_image: int = PER_IMAGE, workers: int = 1,
                       nms_iou: float = 0.5, progress: bool = True):
    """Proposals of every image of ``ann`` from a ``drcl finetune`` checkpoint's detections
    (every category counts as "object"): ``(records, seconds per image)``. ``cfg`` gives
    ``eval.batch_size``, ``eval.score_threshold``, ``eval.max_dets``, ``train.device`` and
    ``train.threads``."""
    from drcl.data.dataset import DetectionDataset
    from drcl.engine.trainer import pick_device
    from drcl.evaluation.inference import predict
    from drcl.finetune import load_finetuned

    if cfg["train"]["threads"]:
        torch.set_num_threads(cfg["train"]["threads"])
    device = pick_device(cfg["train"]["device"])
    detector, meta = load_finetuned(checkpoint, cfg)
    if not meta.get("class_agnostic") and progress:
        print(f"{checkpoint}: a detector of {len(meta['category_ids'])} categories (not trained with "
              "data.class_agnostic); all its detections count as objects")
    start = time.perf_counter()
    dets = predict(detector.to(device), DetectionDataset(ann, masks=False), meta["category_ids"],
                   cfg["eval"]["batch_size"], device, progress, workers=max(0, workers - 1))
    per_id: dict = {}
    for d in dets:
        per_id.setdefault(d["image_id"], []).append(d)
    records = []
    for i, image_id in enumerate(ann.image_ids.tolist()):
        found = per_id.get(image_id)
        if not found:
            continue
        xywh = torch.tensor([d["bbox"] for d in found], dtype=torch.float32)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        b, s = top_boxes(boxes, torch.tensor([d["score"] for d in found]), per_image, nms_iou)
        records += _records(ann, i, b, s)
    return records, (time.perf_counter() - start) / max(1, ann.num_images)


def write_proposals(path: str | os.PathLike, records: list[dict]) -> Path:
    """Write ``records`` atomically as a compact JSON list (one record per line)."""
    text = "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n"
    return atomic_write(path, lambda f: f.write(text.encode()))


def summary_line(ann: Annotations, records: list[dict], seconds_per_image: float) -> str:
    with_boxes = len({r["image_id"] for r in records})
    return (f"{len(records)} proposals for {with_boxes} of {ann.num_images} images "
            f"({len(records) / max(1, ann.num_images):.1f} per image, {seconds_per_image * 1000:.0f} ms per image)")

