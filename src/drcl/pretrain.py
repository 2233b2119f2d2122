"""``drcl pretrain``: 2DRCL pre-training on a COCO / LVIS training set, or on a folder of
images alone (``data.train_json`` left out) with boxes from a proposals file.

Annotations -> dataset with a box source (ground truth, proposals or random boxes) and two
box-aware views -> repeat-factor sampler (dynamic: alpha from ``sampler.alpha_start`` to
``sampler.alpha_end`` over the run) -> :class:`~drcl.model.drcl.DRCL`, whose momentum encoder is
updated after every step with m from ``train.momentum_base`` to 1. ``model.init`` (``--init``)
starts the online encoder from other weights, and the momentum encoder as its copy
(:mod:`drcl.weights`; ``OUT/init.json`` lists what was loaded; a resumed run continues from its
checkpoint instead). The loop, checkpoints and logs are :mod:`drcl.engine.trainer`'s; the
training-health signals and warnings :mod:`drcl.engine.health`'s (also in ``OUT/health.json``
at the end). At the end ``OUT/encoder.pt`` holds the online encoder under torchvision detector
keys (backbone, FPN, box head) for fine-tuning, as CPU tensors, with its BatchNorm statistics
re-estimated on clean views (:func:`write_encoder`).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Iterable

import torch
from tqdm import tqdm

from drcl.config import ConfigError, drcl_config
from drcl.data.boxes import ProposalBoxes, RandomBoxes, load_proposals
from drcl.data.dataset import DetectionDataset
from drcl.engine.checkpoint import cpu_state_dict, save_checkpoint
from drcl.engine.distributed import cleanup
from drcl.engine.health import Health, fixed_batch
from drcl.engine.precise_bn import batchnorm_layers, update_bn_stats, without_sync_bn
from drcl.engine.trainer import NonFiniteLoss, Task, make_loader, prepare_run, to_device, train
from drcl.model.drcl import DRCL, ENCODER_PREFIX, TERMS
from drcl.model.memory import momentum_at, staleness
from drcl.views import TwoViewTransform, collate_views
from drcl.weights import init_model, summary_line, write_report

__all__ = ["NonFiniteLoss", "pretrain"]


class _Compose:
    """Box source (optional), then the two views."""

    def __init__(self, source, views):
        self.source, self.views = source, views

    def __call__(self, image, target):
        if self.source is not None:
            image, target = self.source(image, target)
        return self.views(image, target)


class _Forward:
    """One step's forward: the views finished on the device (their photometric half, when the
    workers left it to the device), then the model."""

    def __init__(self, views: TwoViewTransform):
        self.views = views

    def __call__(self, model, batch, generator, weights):
        images1, images2, targets1, targets2 = self.views.finish(batch)
        return model(images1, images2, targets1, targets2, weights, generator)


def _images_to_device(batch, device):
    """The views' pixels (and photometric parameters) to the device; the targets stay on the
    host, where the boxes are chosen (:func:`drcl.model.lcl.select_boxes`)."""
    return tuple(to_device(x, device) if torch.is_tensor(x) else x for x in batch)


def photometric_on(cfg: dict, device: torch.device) -> str:
    """``data.photometric`` resolved: ``auto`` is ``device`` on CUDA, ``loader`` elsewhere."""
    where = cfg["data"]["photometric"]
    return ("device" if device.type == "cuda" else "loader") if where == "auto" else where


def start_from(model: DRCL, cfg: dict, out_dir, report: bool = True) -> dict:
    """Load ``model.init`` into the online encoder, copy it into the momentum encoder, print
    one line and write ``OUT/init.json`` (when ``report``)."""
    m = cfg["model"]
    result = init_model(model, m["init"], m["preset"], m["norm"], prefix=ENCODER_PREFIX, skip=("momentum.",),
                        style=m["init_style"])
    model.reset_momentum()
    if report:
        print(summary_line(result, ENCODER_PREFIX) + "; momentum encoder: a copy")
        write_report(result, out_dir, momentum="a copy of the online encoder after loading")
    return result


def write_encoder(model: DRCL, path, batches: Iterable = (), images: int = 0) -> int:
    """Write the online encoder's weights to ``path`` (``OUT/encoder.pt``) as CPU tensors.

    When the encoder has BatchNorm layers, their running statistics are first re-estimated
    (:func:`~drcl.engine.precise_bn.update_bn_stats`, on a copy: the model keeps its own) from
    the clean, unmasked views of the first ``images`` images of ``batches`` (two-view batches
    as the training loader gives them; both views, normalised as in training): the online
    encoder saw only masked views in training, and its statistics are what fine-tuning
    freezes. A copy with SyncBatchNorm gets plain BatchNorm, so rank 0 alone can run it.
    Returns the number of images used (0: GroupNorm or FrozenBatchNorm2d, nothing to do)."""
    encoder, used = model.online.encoder, 0
    if images > 0 and batchnorm_layers(encoder):
        encoder = without_sync_bn(copy.deepcopy(encoder))
        device = next(encoder.parameters()).device

        def clean_views():
            nonlocal used
            for images1, images2, _, _ in batches:
                if used >= images:
                    return
                used += images1.shape[0]
                yield (torch.cat([images1, images2]).to(device) - model.mean) / model.std

        update_bn_stats(encoder, clean_views(), lambda x: encoder(x, fpn=False))
    save_checkpoint(cpu_state_dict(encoder.state_dict()), path)
    return used


def queue_line(cfg: dict, world_size: int) -> str | None:
    """One line on the queues' staleness at this batch and number of processes: each queue's
    oldest key in steps (both views of every image enter each step, gathered over processes;
    LCL at ``model.boxes_per_image`` boxes each, fewer boxes make its keys older) against the
    momentum encoder's horizon at the start (:func:`~drcl.model.memory.staleness`)."""
    m, t = cfg["model"], cfg["train"]
    keys = 2 * t["batch_size"] * world_size
    parts = []
    for term, per_image, what in (("hcl", 1, "keys"), ("lcl", m["boxes_per_image"], "box keys")):
        if m[term]:
            age, horizon = staleness(m[f"{term}_queue"], keys * per_image, t["momentum_base"])
            extra = f" at {per_image} boxes per image" if term == "lcl" else ""
            parts.append(f"{term.upper()} queue {m[f'{term}_queue']:,} {what} = {age:.0f} steps at {keys * per_image:,} "
                         f"a step{extra} (key age / momentum horizon {age / horizon:.2f})")
    if not parts:
        return None
    return (f"{'; '.join(parts)}; the momentum encoder averages over ~{horizon:.0f} steps at the start "
            f"(train.momentum_base {t['momentum_base']:g})")


def pretrain(cfg: dict, out_dir: str | os.PathLike, resume: bool = False) -> dict:
    """Run (or resume) pre-training into ``out_dir``: ``config.yaml``, ``metrics.jsonl``,
    ``tb/``, ``checkpoints/last.pt`` and, at the end, ``encoder.pt``."""
    d, t = cfg["data"], cfg["train"]
    ckpt_path = Path(out_dir) / "checkpoints" / "last.pt"
    if d["boxes"] == "gt" and not d["train_json"]:
        raise ConfigError("data.boxes is 'gt' but data.train_json is not set: pre-training on an image folder "
                          "takes its boxes from a proposals file (data.boxes: proposals, made by drcl proposals) "
                          "or data.boxes: random")
    info, device, ann = prepare_run(cfg, out_dir, resume, images_only=True)
    try:
        source = None
        if d["boxes"] == "gt" and not ann.num_instances:
            raise ConfigError(f"{ann.path} has no annotations, so data.boxes 'gt' has no boxes: use data.boxes: "
                              "proposals (drcl proposals) or random")
        if d["boxes"] == "proposals":
            source = ProposalBoxes(load_proposals(d["proposals"], ann))
        elif d["boxes"] == "random":
            source = RandomBoxes()
        if source is not None and cfg["model"]["supervised"] and info.is_main:
            print(f"data.boxes is '{d['boxes']}': its boxes have no category, so LCL has no supervised positives")
        views = TwoViewTransform(size=d["image_size"], scale=tuple(d["crop_scale"]),
                                 photometric=photometric_on(cfg, device))
        dataset = DetectionDataset(ann, transforms=_Compose(source, views), masks=False)
        sampler, loader, round_iters = make_loader(cfg, ann, dataset, collate_views, info)
        model = DRCL(drcl_config(cfg))
        line = queue_line(cfg, info.world_size)
        if info.is_main and line:
            print(line)
        if cfg["model"]["init"] and not resume:  # a resumed run continues from its checkpoint
            start_from(model, cfg, out_dir, info.is_main)
        model.to(device)
        # the health batch's boxes are the run's own (proposals) where they do not change with the RNG
        plain = DetectionDataset(ann, transforms=source if d["boxes"] == "proposals" else None, masks=False)
        # no boxes to look at (images alone with random boxes): no box-spread health, and no scan for them
        has_boxes = d["boxes"] == "proposals" or bool(ann.num_instances)
        health = Health(model, fixed_batch(plain, d["image_size"]) if has_boxes else None,
                        every=t["health_every"], warmup=t["warmup_iters"], max_iters=t["max_iters"],
                        say=tqdm.write if info.is_main else (lambda text: None))

        def after_step(it):
            m = momentum_at(it / t["max_iters"], t["momentum_base"])
            model.momentum_update(m)
            return {"momentum": m}

        def finish(out):
            # the loader's views, finished as in training (their photometric half, on the device path)
            batches = (views.finish(_images_to_device(b, device)) for b in loader)
            used = write_encoder(model, out / "encoder.pt", batches, t["precise_bn_images"])
            stats = f" (BatchNorm statistics from the clean views of {used} images)" if used else ""
            print(f"done; checkpoint {ckpt_path}, encoder weights {out / 'encoder.pt'}{stats}")
            return {"encoder": str(out / "encoder.pt"), "precise_bn_images": used}

        task = Task("pretrain", model, ann, sampler, loader, round_iters, _Forward(views),
                    terms=lambda result: [k for k in TERMS if k in result], after_step=after_step, finish=finish,
                    health=health, to_device=_images_to_device)
        return train(task, cfg, out_dir, resume, info, device)
    finally:
        cleanup(info)
