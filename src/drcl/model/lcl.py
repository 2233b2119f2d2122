"""Local Contrastive Learning (LCL): box-level contrast across the two views.

Up to K boxes per image are chosen without replacement with probability proportional to
their category's repeat factor r_a(c) (DRB at the instance level, docs/method.md), so tail
instances in crowded images are not drowned by head instances; uniformly with DRB off.
For each chosen box, MultiScaleRoIAlign (7x7) over the FPN -> box head -> projector ->
predictor gives the online query; the same box in the other view through the momentum
encoder is the positive; every other box in the batch and the box queue is a negative:

    L_LCL = ( NCE(q1; [k2, queue]) + NCE(q2; [k1, queue]) ) / 2

With ``supervised=True`` keys of the same category (label > 0) in the batch and the queue
count as extra positives (the multi-positive form in :mod:`drcl.model.infonce`). Keys of the
same object that are not positives (an older key of it in the queue, when not supervised)
are ignored rather than counted as negatives.
"""

from __future__ import annotations

import torch

from drcl.model.infonce import two_view_nce
from drcl.sampling import choose_boxes

#: Object ids for the queue: image id * OBJECT_STRIDE + annotation id (unique per object
#: for annotation ids below 2**31, as LVIS's and COCO's are).
OBJECT_STRIDE = 2**31


def select_boxes(targets1, targets2, k: int, category_weights: torch.Tensor | None, generator: torch.Generator):
    """Choose up to ``k`` paired boxes per image.

    ``targets*`` are the views' targets (boxes paired by position, labels 1..C, and
    optionally ``ann_ids`` and ``image_id``); ``category_weights`` (C,) are per-category
    weights (repeat factors), or None for uniform; boxes with label 0 (proposals, random
    boxes) weigh 1. Returns (boxes1 list, boxes2 list, labels (sum K,), object ids (sum K,),
    -1 where the image id or annotation ids are unknown), all on the host.

    Everything here is host work: the training loop keeps the targets on the host, so nothing
    waits for the device (targets on a GPU are copied over once per kind of tensor).
    """
    pairs = list(zip(targets1, targets2))
    if not pairs:
        empty = torch.zeros(0, dtype=torch.long)
        return [], [], empty, empty
    counts = [len(t1["labels"]) for t1, _ in pairs]

    def host(key, targets):
        return torch.cat([t[key] for t in targets]).cpu().split(counts)

    labels_all, boxes1_all, boxes2_all = host("labels", targets1), host("boxes", targets1), host("boxes", targets2)
    ann_ids_all = host("ann_ids", targets1) if all("ann_ids" in t for t in targets1) else [None] * len(pairs)
    host_weights = category_weights.to(torch.float64).cpu() if category_weights is not None else None
    boxes1, boxes2, labels, ids = [], [], [], []
    for t1, lab, b1, b2, ann_ids in zip(targets1, labels_all, boxes1_all, boxes2_all, ann_ids_all):
        w = torch.ones(len(lab), dtype=torch.float64)
        known = lab > 0  # label 0: proposal or random box, category unknown
        if host_weights is not None:
            w[known] = host_weights[lab[known] - 1]
        idx = choose_boxes(w, k, generator)
        boxes1.append(b1[idx])
        boxes2.append(b2[idx])
        labels.append(lab[idx])
        image_id = int(t1.get("image_id", -1))
        if image_id >= 0 and ann_ids is not None:
            ids.append(image_id * OBJECT_STRIDE + ann_ids[idx].to(torch.int64))
        else:
            ids.append(torch.full((len(idx),), -1, dtype=torch.int64))
    return boxes1, boxes2, torch.cat(labels), torch.cat(ids)


def lcl_loss(q1, q2, k1, k2, labels, queue_keys, queue_labels, temperature: float = 0.2, supervised: bool = False,
             ids: torch.Tensor | None = None, queue_ids: torch.Tensor | None = None):
    """q*, k* (N, D) for the same N boxes in order; labels (N,); queue (Q, D) with labels (Q,);
    ``ids`` (N,) and ``queue_ids`` (Q,) object ids (-1: unknown)."""
    n = q1.shape[0]
    pos = torch.zeros(n, n + queue_keys.shape[0], dtype=torch.bool, device=q1.device)
    pos[:, :n] = torch.eye(n, dtype=torch.bool, device=q1.device)
    if supervised:
        key_labels = torch.cat([labels, queue_labels])
        pos |= (labels[:, None] == key_labels[None, :]) & (labels[:, None] > 0)
    return two_view_nce(q1, q2, k1, k2, queue_keys, pos, temperature, ids, queue_ids)
