"""``drcl upstream``: a supervised ResNet classifier trained on the ground-truth boxes of one
dataset: the small-scale stand-in for ImageNet weights (docs/method.md, "Starting from
supervised weights").

One step: a batch of training images (horizontal flips), each ground-truth box jittered (every
edge moved by up to ``JITTER`` of the box's side, drawn from the step's seeded generator),
cropped and resized to a ``data.image_size`` square with RoIAlign on the pixels, normalised
with the ImageNet mean / std, and classified by the preset's torchvision ResNet
(:func:`~drcl.model.detector.build_resnet`, ``model.norm``) whose ``fc`` has one output per
category: cross-entropy. Sampler, optimiser, checkpoints, exact resume, DDP, AMP, progress bar
and logs are :mod:`drcl.engine.trainer`'s.

At the end ``OUT/classifier.pt`` holds the classifier's ``state_dict`` in torchvision's layout
(``conv1`` ... ``layer4``, ``fc``), the layout of torchvision's ImageNet files, so
``drcl pretrain --init OUT/classifier.pt`` (or ``--init OUT``) starts from it exactly as it would
from ImageNet weights: the backbone is loaded, FPN and box head start new. With
``data.val_json`` set, the top-1 accuracy on the val set's box crops is printed and written to
``OUT/upstream.json``.

    upstream(load_config("tiny_upstream", overrides), "runs/up")  # -> {"classifier": ..., "val_top1": ...}
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import roi_align
from torchvision.transforms import v2

from drcl.atomic import write_json
from drcl.data.annotations import load_annotations
from drcl.data.dataset import DetectionDataset, collate
from drcl.engine.checkpoint import cpu_state_dict, save_checkpoint
from drcl.engine.distributed import cleanup
from drcl.engine.trainer import Task, make_loader, prepare_run, train
from drcl.errors import DataError
from drcl.model.detector import build_resnet
from drcl.model.drcl import IMAGENET_MEAN, IMAGENET_STD

#: Largest shift of each box edge, as a fraction of the box's width / height.
JITTER = 0.1


def box_crops(images, targets, size: int, generator: torch.Generator | None = None):
    """Every ground-truth box of the batch as a normalised ``size`` x ``size`` crop
    (RoIAlign on the pixels; ``generator``: jitter each edge by up to ``JITTER`` of the box's
    side first). Returns ``(crops (N, 3, size, size), labels (N,) in 0..C-1)``."""
    crops, labels = [], []
    for image, target in zip(images, targets):
        boxes = target["boxes"].as_subclass(torch.Tensor).float().to(image.device)  # the val set's stay on the host
        if boxes.numel() == 0:
            continue
        if generator is not None:
            wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
            shift = (torch.rand(boxes.shape, generator=generator) * 2 - 1).to(boxes.device)
            boxes = boxes + JITTER * wh * shift
            h, w = image.shape[-2:]
            boxes = torch.stack([boxes[:, 0].clamp(0, w - 1), boxes[:, 1].clamp(0, h - 1),
                                 boxes[:, 2].clamp(1, w), boxes[:, 3].clamp(1, h)], dim=1)
        crops.append(roi_align(image[None].float(), [boxes], output_size=size, aligned=True))
        labels.append(target["labels"].as_subclass(torch.Tensor).to(image.device) - 1)
    if not crops:
        return None, None
    mean = torch.tensor(IMAGENET_MEAN, device=crops[0].device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=crops[0].device).view(1, 3, 1, 1)
    return (torch.cat(crops) - mean) / std, torch.cat(labels)


class _Forward:
    def __init__(self, size: int):
        self.size = size

    def __call__(self, model, batch, generator, weights):
        images, targets = batch
        crops, labels = box_crops(images, targets, self.size, generator)
        if crops is None:  # no box in the batch: a zero loss that still reaches every parameter
            return {"loss": sum(p.sum() for p in model.parameters()) * 0.0, "accuracy": 0.0, "crops": 0.0}
        logits = model(crops)
        accuracy = (logits.argmax(1) == labels).float().mean().detach()
        return {"loss": nn.functional.cross_entropy(logits, labels), "accuracy": accuracy,
                "crops": float(labels.numel())}


@torch.no_grad()
def crop_accuracy(model: nn.Module, dataset: DetectionDataset, size: int, device, batch_size: int = 16) -> float:
    """Top-1 of ``model`` over every ground-truth box crop of ``dataset`` (no jitter)."""
    was_training = model.training
    model.eval()
    right = total = 0
    to_float = v2.ToDtype(torch.float32, scale=True)
    for start in range(0, len(dataset), batch_size):
        images, targets = zip(*(dataset[i] for i in range(start, min(start + batch_size, len(dataset)))))
        crops, labels = box_crops([to_float(im).to(device) for im in images], targets, size)
        if crops is None:
            continue
        right += int((model(crops).argmax(1) == labels).sum())
        total += labels.numel()
    model.train(was_training)
    return right / max(total, 1)


def upstream(cfg: dict, out_dir: str | os.PathLike, resume: bool = False) -> dict:
    """Train (or resume) the upstream classifier into ``out_dir``: ``config.yaml``,
    ``metrics.jsonl``, ``checkpoints/last.pt``, at the end ``classifier.pt`` and, with a val
    set, ``upstream.json``. Returns the trainer's summary plus ``classifier`` (path) and
    ``val_top1`` (or None)."""
    d, m = cfg["data"], cfg["model"]
    info, device, ann = prepare_run(cfg, out_dir, resume)
    try:
        model = build_resnet(m["preset"], norm=m["norm"], num_classes=ann.num_categories).to(device)
        augment = v2.Compose([v2.RandomHorizontalFlip(0.5), v2.ToDtype(torch.float32, scale=True)])
        dataset = DetectionDataset(ann, transforms=augment, masks=False)
        sampler, loader, round_iters = make_loader(cfg, ann, dataset, collate, info)
        category_ids = [c["id"] for c in ann.categories]

        def finish(out: Path):
            path = save_checkpoint(cpu_state_dict(model.state_dict()), out / "classifier.pt")
            top1 = None
            if d["val_json"] and info.distributed:
                # rank 0 alone would score every val crop while the others wait at a barrier (NCCL's timeout)
                print("skipping the val top-1 in a distributed run")
            elif d["val_json"]:
                val = load_annotations(d["val_json"], d["val_images"], check_images="header", records=False)
                if [c["id"] for c in val.categories] != category_ids:
                    raise DataError(f"{val.path}: its categories differ from the training file's")
                top1 = crop_accuracy(model, DetectionDataset(val, masks=False), d["image_size"], device)
                write_json(out / "upstream.json", {"val_top1": top1, "categories": len(category_ids),
                                                   "category_ids": category_ids})
            print(f"done; classifier weights {path} (torchvision classification layout: --init reads it like "
                  f"ImageNet weights)" + ("" if top1 is None else f"; val box-crop top-1 {100 * top1:.1f} %"))
            return {"classifier": str(path), "val_top1": top1}

        task = Task("upstream", model, ann, sampler, loader, round_iters, _Forward(d["image_size"]),
                    terms=lambda result: ["loss"], finish=finish, ddp_unused=False,
                    meta={"upstream_category_ids": category_ids})
        return train(task, cfg, out_dir, resume, info, device)
    finally:
        cleanup(info)
