"""Where local contrast (LCL) gets its boxes when ground truth is not used.

In order of preference (docs/method.md): ground-truth boxes (the dataset's targets as they
are), a proposals file in COCO results format from any class-agnostic detector
(:class:`ProposalBoxes`), or random boxes as the last resort (:class:`RandomBoxes`). Both
replace a target's boxes before the two views are drawn, so the views pair them like
ground truth; their labels are 0 ("unknown category"), which LCL treats as having no
category: weight 1 for DRB box choice and never a supervised extra positive.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torchvision import tv_tensors

from drcl.data.annotations import Annotations, read_json
from drcl.errors import DataError


def load_proposals(path, annotations: Annotations, max_per_image: int = 100, min_score: float = 0.0) -> dict:
    """Read a COCO results file (``[{"image_id", "bbox": [x, y, w, h], "score"}, ...]``) into
    image id -> (K, 4) XYXY float tensor, the ``max_per_image`` highest-scoring boxes with
    score >= ``min_score``, clipped to the image. Unknown image ids, malformed records and
    records whose optional ``file_name`` (``drcl proposals`` writes it) is not that of the
    image with their id are a :class:`DataError` naming the file and the record index."""
    path = str(path)
    records = read_json(path, "JSON list of proposals")
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of proposals in COCO results format")
    images = annotations.image_pos
    per_image = defaultdict(list)
    for n, rec in enumerate(records):
        where = f"{path}: proposal #{n}"
        if not isinstance(rec, dict) or not {"image_id", "bbox"} <= set(rec):
            raise DataError(f"{where}: needs 'image_id' and 'bbox'")
        if rec["image_id"] not in images:
            raise DataError(f"{where}: unknown image id {rec['image_id']}")
        name = annotations.file_name(images[rec["image_id"]])
        if "file_name" in rec and rec["file_name"] != name:
            raise DataError(f"{where}: image id {rec['image_id']} is {rec['file_name']} in the proposals but "
                            f"{name} here (were the proposals made for other images?)")
        box, score = rec["bbox"], rec.get("score", 1.0)
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)):
            raise DataError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {box!r}")
        if box[2] <= 0 or box[3] <= 0:
            raise DataError(f"{where}: bbox {box} has non-positive width or height")
        if not (isinstance(score, (int, float)) and math.isfinite(score)):
            raise DataError(f"{where}: score must be a finite number, got {score!r}")
        if score >= min_score:
            per_image[rec["image_id"]].append((float(score), box))
    out = {}
    for image_id, items in per_image.items():
        items.sort(key=lambda s_b: -s_b[0])
        xywh = torch.tensor([b for _, b in items[:max_per_image]], dtype=torch.float32)
        xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        width, height = annotations.image_size(images[image_id])
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
        out[image_id] = xyxy
    return out


def _replace_boxes(target: dict, boxes: torch.Tensor, canvas_size) -> dict:
    n = boxes.shape[0]
    return {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(canvas_size)),
        "labels": torch.zeros(n, dtype=torch.int64),
        "ann_ids": torch.arange(n, dtype=torch.int64),
        "image_id": target["image_id"],
    }


class ProposalBoxes:
    """Transform: replace an image's boxes with its proposals (none if it has none)."""

    def __init__(self, proposals: dict):
        self.proposals = proposals

    def __call__(self, image, target):
        boxes = self.proposals.get(target["image_id"], torch.zeros(0, 4))
        return image, _replace_boxes(target, boxes, image.shape[-2:])


class RandomBoxes:
    """Transform: replace an image's boxes with ``n`` uniform random boxes whose sides are
    ``min_frac``-``max_frac`` of the image's sides (torch's global RNG, like the views)."""

    def __init__(self, n: int = 8, min_frac: float = 0.1, max_frac: float = 0.5):
        if not 0 < min_frac <= max_frac <= 1:
            raise ValueError(f"need 0 < min_frac <= max_frac <= 1, got {min_frac}, {max_frac}")
        self.n, self.min_frac, self.max_frac = n, min_frac, max_frac

    def __call__(self, image, target):
        h, w = image.shape[-2:]
        size = torch.tensor([w, h], dtype=torch.float32)
        frac = self.min_frac + (self.max_frac - self.min_frac) * torch.rand(self.n, 2)
        wh = frac * size
        xy = torch.rand(self.n, 2) * (size - wh)
        return image, _replace_boxes(target, torch.cat([xy, xy + wh], dim=1), (h, w))
