"""``drcl finetune``: train a torchvision Faster / Mask R-CNN with FPN, then score it on the val
set under LVIS rules.

The detector comes from the config's preset (``model.preset``, ``model.norm``; Mask R-CNN when
``model.masks`` is true and the training file has segmentations). ``--init`` (``model.init``)
loads backbone, FPN and box head from a 2DRCL run (its ``encoder.pt`` or
``checkpoints/last.pt``) or any other layout :mod:`drcl.weights` reads (ImageNet classifiers:
the backbone only; torchvision / detectron2 / mmdet detectors) and reports which tensors were
loaded and which start from random init (RPN, box predictor, mask head; ``OUT/init.json``);
``model.imagenet`` starts the backbone from torchvision's ImageNet weights instead. Training
uses the same loop as pre-training (:mod:`drcl.engine.trainer`): sampler ``random | rfs |
irfs | dynamic``, atomic checkpoints, exact resume, DDP, AMP, progress bar and logs.

At the end, when ``data.val_json`` is set, the model runs on the val images and
``OUT/eval/`` gets the detections, the metrics (``metrics.json``), per-category AP (CSV) and a
plot of AP against training frequency.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torchvision.transforms import v2

from drcl.config import require
from drcl.data.annotations import Annotations, load_annotations, merge_categories
from drcl.data.dataset import DetectionDataset, collate, mask_api
from drcl.atomic import write_json
from drcl.engine.checkpoint import load_checkpoint
from drcl.engine.distributed import cleanup
from drcl.engine.trainer import Task, make_loader, prepare_run, train
from drcl.errors import DataError, MissingDependency
from drcl.evaluation.inference import predict
from drcl.evaluation.lvis_eval import (add_train_counts, check_evaluator, evaluate_detections, format_results,
                                       plot_ap_vs_frequency, write_per_category_csv)
from drcl.model.detector import build_detector
from drcl.weights import init_model, summary_line, write_report

def build_model(cfg: dict, num_categories: int, segmentations: bool, init: str | None = None, verbose: bool = True,
                out_dir=None):
    """The detector for ``num_categories`` categories (a Mask R-CNN when ``model.masks`` is
    set and the data has ``segmentations``), initialised from ``init`` when given (any layout
    :mod:`drcl.weights` reads); with ``verbose`` one line says what was loaded and, with
    ``out_dir``, ``OUT/init.json`` lists it."""
    m, e = cfg["model"], cfg["eval"]
    masks = m["masks"] and segmentations
    detector = build_detector(m["preset"], num_classes=num_categories + 1, norm=m["norm"], masks=masks,
                              imagenet=m["imagenet"], box_score_thresh=e["score_threshold"],
                              box_detections_per_img=e["max_dets"])
    if init is not None:
        report = init_model(detector, init, m["preset"], m["norm"], style=m["init_style"])
        if verbose:
            print(summary_line(report))
            if out_dir is not None:
                write_report(report, out_dir)
    return detector, masks


class _Forward:
    def __call__(self, model, batch, generator, weights):
        images, targets = batch
        targets = [{k: (v.as_subclass(torch.Tensor) if torch.is_tensor(v) else v) for k, v in t.items()}
                   for t in targets]
        losses = model(list(images), targets)
        return {**losses, "loss": sum(losses.values())}


def load_val(cfg: dict, class_agnostic: bool = False) -> Annotations:
    """The val set of ``data.val_json`` / ``data.val_images``; with ``class_agnostic`` its
    categories merged into one, as a class-agnostic detector was trained
    (:func:`~drcl.data.annotations.merge_categories`)."""
    require(cfg, "data.val_json", "data.val_images")
    val = load_annotations(cfg["data"]["val_json"], cfg["data"]["val_images"], check_images="header")
    return merge_categories(val) if class_agnostic else val


def evaluate_model(detector, cfg: dict, device, out: Path, train_ann: Annotations | None, masks: bool,
                   category_ids: list, progress: bool = True, val: Annotations | None = None) -> dict:
    """Detections on the val set (``val``, else read from ``data.val_json`` /
    ``data.val_images``), scored under LVIS rules; everything written under ``out``."""
    check_evaluator()
    val = val if val is not None else load_val(cfg, cfg["data"]["class_agnostic"])
    if [c["id"] for c in val.categories] != category_ids:
        raise DataError(f"{val.path}: its categories differ from the ones the model was trained on")
    dets = predict(detector, DetectionDataset(val), category_ids, cfg["eval"]["batch_size"], device, progress)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "detections.json", dets)
    results = {}
    for iou_type in ("bbox", "segm") if masks else ("bbox",):
        if not dets:
            raise DataError(f"the model made no detections on {val.path}: nothing to score")
        result = evaluate_detections(val, dets, iou_type=iou_type, max_dets=cfg["eval"]["max_dets"])
        if train_ann is not None:
            add_train_counts(result, train_ann)
        write_per_category_csv(result, out / f"per_category_{iou_type}.csv")
        try:
            plot_ap_vs_frequency(result, out / f"ap_vs_frequency_{iou_type}.png")
        except ValueError:
            pass  # no category with a defined AP to plot
        except MissingDependency as e:
            print(f"skipped: {e}")
        print(format_results(result))
        results[iou_type] = result
    write_json(out / "metrics.json", {k: {m: v for m, v in r.items() if m != "per_category"} for k, r in results.items()})
    return results


def finetune(cfg: dict, out_dir: str | os.PathLike, init: str | None = None, resume: bool = False,
             evaluate: bool = True) -> dict:
    d = cfg["data"]
    ckpt_path = Path(out_dir) / "checkpoints" / "last.pt"
    info, device, ann = prepare_run(cfg, out_dir, resume, segmentations=cfg["model"]["masks"])
    try:
        if d["class_agnostic"]:
            ann = merge_categories(ann)
            if info.is_main:
                print(f"data.class_agnostic: the {ann.num_instances} boxes of {ann.path} are one category, 'object'")
        if evaluate and d["val_json"] and not info.distributed:
            check_evaluator()  # now, not after training
        init = init if init is not None else cfg["model"]["init"]
        cfg = {**cfg, "model": {**cfg["model"], "init": init}}  # config.yaml records where the run started
        segmentations = bool(ann.has_segmentation.any())
        # a resumed run continues from its checkpoint, not from its init
        detector, masks = build_model(cfg, ann.num_categories, segmentations, None if resume else init,
                                      verbose=info.is_main, out_dir=out_dir)
        if masks:
            mask_api()  # now, not in a data loader worker
        detector.to(device)
        augment = v2.Compose([v2.RandomHorizontalFlip(0.5), v2.ToDtype(torch.float32, scale=True)])
        dataset = DetectionDataset(ann, transforms=augment, masks=masks)
        sampler, loader, round_iters = make_loader(cfg, ann, dataset, collate, info)
        category_ids = [c["id"] for c in ann.categories]

        def finish(out_path):
            summary = {}
            if evaluate and d["val_json"] and info.distributed:
                # rank 0 alone would run the whole val set while the others wait at a barrier
                # (and NCCL's timeout); score the checkpoint in a single process instead
                print(f"skipping the evaluation in a distributed run: drcl evaluate --checkpoint {ckpt_path} "
                      f"--config {out_path / 'config.yaml'}")
            elif evaluate and d["val_json"]:
                summary["eval"] = evaluate_model(detector, cfg, device, out_path / "eval", ann, masks, category_ids)
            return summary

        task = Task("finetune", detector, ann, sampler, loader, round_iters, _Forward(),
                    terms=lambda result: [k for k in result if k.startswith("loss_")], finish=finish,
                    meta={"category_ids": category_ids, "masks": masks, "init": init,
                          "class_agnostic": d["class_agnostic"]})
        return train(task, cfg, out_dir, resume, info, device)
    finally:
        cleanup(info)


def load_finetuned(checkpoint: str | os.PathLike, cfg: dict):
    """A detector restored from a ``drcl finetune`` checkpoint (with ``cfg``'s ``eval``
    settings: score threshold, detections per image) and the checkpoint's ``meta``
    (``category_ids``, ``masks``, ``class_agnostic``)."""
    state = load_checkpoint(checkpoint)
    meta = state.get("meta") or {}
    if "category_ids" not in meta:
        raise DataError(f"{checkpoint}: not a drcl finetune checkpoint")
    # the checkpoint's weights replace everything: no need for ImageNet files on disk
    model = {**state["config"]["model"], "imagenet": False}
    detector, _ = build_model({**state["config"], "model": model, "eval": cfg["eval"]}, len(meta["category_ids"]),
                              meta["masks"], verbose=False)
    detector.load_state_dict(state["model"])
    return detector, meta
