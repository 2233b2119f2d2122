"""Linear probe of box features: the fast signal for representation quality on tail classes.

A frozen encoder (backbone + FPN + RoI box head, :class:`~drcl.model.detector.Encoder`)
embeds every ground-truth box of the train and val sets (``roi``: RoIAlign 7x7 over the FPN
levels -> ``TwoMLPHead``, ``representation_size`` dims). A multinomial logistic regression
is fitted on the train embeddings and scored on the val embeddings: top-1 accuracy per LVIS
frequency group (rare / common / frequent, from the *train* annotations' ``frequency``) and
overall, and the mean of per-class accuracies per group. BENCHMARKS.md uses this probe to
compare pre-training recipes against the random-init baseline (``weights=None``).

    from drcl.config import load_config
    from drcl.evaluation.probe import run_probe, format_probe

    cfg = load_config("configs/tiny.yaml")
    result = run_probe(cfg, "runs/pretrain")   # or None for the random-init baseline
    print(format_probe(result))

Choices, and why:

* Encoder. Built for ``cfg["model"]["preset"]`` / ``["norm"]``. With ``weights=None`` its
  initialisation is torchvision's under ``torch.manual_seed(seed)`` (in a forked RNG: the
  caller's RNG state is left alone). Weights go through
  :func:`drcl.export.load_into_detector`, which checks the norm family (BatchNorm vs
  GroupNorm) and every shape; on top of that every encoder key must be present (only
  BatchNorm's ``num_batches_tracked`` step counters may be missing). Any mismatch is a
  one-line :class:`~drcl.errors.DataError` naming the file.
* Frozen, eval mode. With ``norm="bn"`` (or ``"frozen_bn"``) eval mode normalises with the
  running statistics a pre-training run accumulated; a randomly initialised BatchNorm has
  running mean 0 / variance 1, i.e. it is an identity map, so the random-init "bn" baseline
  is an un-normalised ResNet (its scale does not matter: the probe standardises features).
  With ``norm="gn"`` train and eval mode compute the same thing. Compare runs of one norm.
* Images. No augmentation: the uint8 image -> float in [0, 1] -> ImageNet mean / std (as
  :class:`~drcl.model.drcl.DRCL` normalises), at the file's resolution unless
  ``image_size`` is given (longer side resized to it, boxes scaled with it). Images of
  equal size are batched (``batch_size``); mixed sizes are grouped by size. Crowd boxes are
  left out (as :class:`~drcl.data.dataset.DetectionDataset` leaves them out); images without
  boxes are skipped.
* Labels. A box's class is its category in the train file's category list (val categories
  are matched to train categories by id; a val category unknown to the train file is an
  error). A class with val boxes and no train boxes stays in the classifier and scores 0.
* Classifier. Features standardised with the train mean / std (constant dimensions left
  unscaled); weights and biases start at zero and minimise mean cross-entropy +
  ``weight_decay / 2 * ||W||^2`` with full-batch L-BFGS (strong-Wolfe line search) for
  ``epochs`` iterations, in float64. No randomness at all: equal features give equal
  results, and the whole probe is deterministic given ``seed`` (the random init). The
  loss is unweighted by default, as a linear probe usually is; ``balanced=True`` weights
  each class by ``N / (K * n_c)`` (sklearn's "balanced"), which raises rare-class accuracy
  at the cost of frequent ones and asks "is the class linearly separable?" rather than
  "does the long-tailed classifier find it?".

Scale: meant for the generated sets and small LVIS subsets (``max_images``), on CPU or GPU.
Embeddings are kept in memory (N boxes x representation_size floats).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from drcl.data.annotations import GROUP_NAMES, GROUPS, Annotations, load_annotations
from drcl.data.dataset import DetectionDataset
from drcl.errors import DataError
from drcl.model.detector import Encoder, build_encoder
from drcl.model.drcl import IMAGENET_MEAN, IMAGENET_STD

#: Keys of :func:`run_probe`'s result (besides ``per_class``), in :func:`format_probe`'s order.
ACCURACY_KEYS = ("acc", "acc_r", "acc_c", "acc_f", "class_acc", "class_acc_r", "class_acc_c", "class_acc_f")

DEFAULT_EPOCHS = 100
DEFAULT_WEIGHT_DECAY = 1e-3


# --------------------------------------------------------------------------- encoder


def load_encoder(preset: str, norm: str, weights=None, seed: int = 0, style: str = "auto") -> Encoder:
    """A frozen encoder in eval mode: random init under ``seed``, then (unless ``weights`` is
    None) the weights in any layout ``--init`` reads (:func:`drcl.weights.init_model`: a
    pre-training run or its ``encoder.pt``, a classifier such as ``drcl upstream``'s, a
    torchvision / detectron2 / mmdet detector), checked key by key and shape by shape; parts
    the file lacks (a classifier's FPN and box head) keep the seeded random init. ``style``:
    ``model.init_style``."""
    from drcl.weights import init_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = build_encoder(preset, norm)
    if weights is not None:
        init_model(encoder, weights, preset, norm, style=style)
    encoder.eval()
    encoder.requires_grad_(False)
    return encoder


# --------------------------------------------------------------------------- embeddings


def _resize(image: torch.Tensor, boxes: torch.Tensor, image_size: int | None):
    if image_size is None:
        return image, boxes
    h, w = image.shape[-2:]
    scale = image_size / max(h, w)
    if scale == 1:
        return image, boxes
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    return image, boxes * torch.tensor([size[1] / w, size[0] / h] * 2)


@torch.no_grad()
def embed_boxes(encoder: Encoder, dataset: DetectionDataset, label_map: np.ndarray, *, batch_size: int = 16,
                image_size: int | None = None, max_images: int | None = None, device="cpu",
                progress: bool = True, desc: str = "embedding boxes") -> tuple[torch.Tensor, torch.Tensor]:
    """``roi`` embeddings (N, representation_size) float32 and class indices (N,) int64 of
    every (non-crowd) ground-truth box of ``dataset``'s first ``max_images`` images.
    ``label_map[label - 1]`` turns the dataset's labels into class indices."""
    device = torch.device(device)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    feats, labels = [], []
    pending: dict[tuple, list] = {}  # image size -> [(image, boxes, class indices)]

    def flush(key):
        group = pending.pop(key)
        images = torch.stack([g[0] for g in group]).to(device)
        images = (images - mean) / std
        out = encoder(images, [g[1].to(device) for g in group])
        feats.append(out["roi"].float().cpu())
        labels.extend(g[2] for g in group)

    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    for i in tqdm(range(n), desc=desc, unit="img", disable=not progress, dynamic_ncols=True):
        image = dataset.load_image(i).as_subclass(torch.Tensor)
        target = dataset.target(i, *image.shape[-2:])
        boxes = target["boxes"].as_subclass(torch.Tensor).float()
        if len(boxes) == 0:
            continue
        image, boxes = _resize(image.float() / 255.0, boxes, image_size)
        classes = torch.as_tensor(label_map[target["labels"].numpy() - 1], dtype=torch.int64)
        key = tuple(image.shape[-2:])
        pending.setdefault(key, []).append((image, boxes, classes))
        if len(pending[key]) >= batch_size:
            flush(key)
    for key in list(pending):
        flush(key)
    dim = encoder.representation_size
    if not feats:
        return torch.zeros((0, dim)), torch.zeros(0, dtype=torch.int64)
    return torch.cat(feats), torch.cat(labels)


# --------------------------------------------------------------------------- classifier


@dataclass
class LinearProbe:
    """Standardisation + linear layer: ``predict(x) = argmax((x - mean) / std @ weight.T + bias)``."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # (K, D)
    bias: torch.Tensor  # (K,)
    loss: float

    def logits(self, x) -> torch.Tensor:
        x = (torch.as_tensor(x, dtype=torch.float64) - self.mean) / self.std
        return x @ self.weight.T + self.bias

    def predict(self, x) -> torch.Tensor:
        return self.logits(x).argmax(dim=1)


def fit_linear(x, y, num_classes: int, *, epochs: int = DEFAULT_EPOCHS, weight_decay: float = DEFAULT_WEIGHT_DECAY,
               balanced: bool = False) -> LinearProbe:
    """Multinomial logistic regression on features ``x`` (N, D) with class indices ``y`` (N,)
    in ``0..num_classes-1``: standardised features, zero init, full-batch L-BFGS for ``epochs``
    iterations on mean cross-entropy + ``weight_decay / 2 * ||W||^2``. Deterministic."""
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.int64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"expected features (N, D) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError("no training boxes to fit the probe on")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False) if x.shape[0] > 1 else torch.zeros_like(mean)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    z = (x - mean) / std
    class_weight = None
    if balanced:
        counts = torch.bincount(y, minlength=num_classes).to(torch.float64)
        class_weight = torch.where(counts > 0, len(y) / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    weight = torch.zeros((num_classes, x.shape[1]), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=epochs, max_eval=epochs * 5 // 4 + 1,
                            history_size=20, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def objective():
        logits = z @ weight.T + bias
        if class_weight is None:
            ce = F.cross_entropy(logits, y)
        else:  # weighted sum / N (not / sum of weights) so the scale matches the unweighted loss
            ce = (F.cross_entropy(logits, y, reduction="none") * class_weight[y]).mean()
        return ce + 0.5 * weight_decay * weight.pow(2).sum()

    def closure():
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        loss = float(objective())
    return LinearProbe(mean, std, weight.detach(), bias.detach(), loss)


# --------------------------------------------------------------------------- scoring


def group_accuracy(pred, target, frequency, num_classes: int | None = None) -> dict:
    """Top-1 accuracy of predictions ``pred`` for class indices ``target``, overall and per
    frequency group (``frequency[c]`` in ``r``/``c``/``f``):

    * ``acc`` / ``acc_g``: correct boxes / boxes (box-weighted; ``acc`` is the box-weighted
      mean of the group accuracies);
    * ``class_acc`` / ``class_acc_g``: mean over classes with at least one box of the class's
      accuracy;
    * ``boxes_g`` / ``classes_g``: boxes and classes (with boxes) in group ``g``;
    * ``per_class_acc``: list (None for a class without boxes).

    A group without boxes scores None (JSON null), not 0.
    """
    pred = np.asarray(pred, dtype=np.int64).ravel()
    target = np.asarray(target, dtype=np.int64).ravel()
    if pred.shape != target.shape:
        raise ValueError(f"pred and target differ in length: {pred.shape[0]} vs {target.shape[0]}")
    num_classes = len(frequency) if num_classes is None else num_classes
    groups = np.asarray(list(frequency))
    correct = np.bincount(target, weights=(pred == target).astype(np.float64), minlength=num_classes)
    boxes = np.bincount(target, minlength=num_classes).astype(np.float64)
    present = boxes > 0
    class_acc = np.divide(correct, boxes, out=np.zeros(num_classes), where=present)

    def ratio(num, den):
        return float(num / den) if den else None

    out = {
        "acc": ratio(correct.sum(), boxes.sum()),
        "class_acc": ratio(class_acc[present].sum(), present.sum()),
    }
    for g in GROUPS:
        sel = groups == g
        out[f"acc_{g}"] = ratio(correct[sel].sum(), boxes[sel].sum())
        out[f"class_acc_{g}"] = ratio(class_acc[sel & present].sum(), (sel & present).sum())
        out[f"boxes_{g}"] = int(boxes[sel].sum())
        out[f"classes_{g}"] = int((sel & present).sum())
    out["per_class_acc"] = [float(a) if p else None for a, p in zip(class_acc, present)]
    return out


# --------------------------------------------------------------------------- the probe


def _label_map(train: Annotations, other: Annotations) -> np.ndarray:
    """``map[k]``: the train class index of ``other``'s k-th category."""
    out = np.empty(other.num_categories, dtype=np.int64)
    for k, cat in enumerate(other.categories):
        if cat["id"] not in train.category_pos:
            raise DataError(f"{other.path}: category id {cat['id']} ({cat.get('name')!r}) is not in the train "
                            f"file {train.path}; the probe needs the same category list")
        out[k] = train.category_pos[cat["id"]]
    return out


def run_probe(cfg: dict, weights=None, *, epochs: int = DEFAULT_EPOCHS, seed: int = 0, progress: bool = True,
              batch_size: int = 16, weight_decay: float = DEFAULT_WEIGHT_DECAY, balanced: bool = False,
              image_size: int | None = None, max_images: int | None = None, device: str | None = None) -> dict:
    """Linear probe of frozen box features (see the module docstring); returns a JSON-ready dict.

    Args:
        cfg: a loaded config; uses ``data.train_json`` / ``train_images`` / ``val_json`` /
            ``val_images`` / ``on_bad``, ``model.preset`` / ``norm`` and ``train.device``.
        weights: a pre-training run folder, its ``encoder.pt`` / ``checkpoints/last.pt``, or a
            saved encoder state dict; None for the random-init baseline.
        epochs: L-BFGS iterations of the full-batch classifier fit.
        seed: seeds the random init (ignored for the weights themselves).
        batch_size: images per encoder forward.
        weight_decay, balanced: classifier settings (:func:`fit_linear`).
        image_size: resize each image's longer side to this (None: the file's resolution).
        max_images: embed only the first ``max_images`` images of each split.
        device: ``cpu`` / ``cuda`` / ``auto``; None takes ``train.device``.

    Result keys: ``preset``, ``norm``, ``weights`` (str or None), ``seed``, ``epochs``,
    ``weight_decay``, ``balanced``, ``num_classes``, ``train_boxes``, ``val_boxes``,
    ``acc``, ``acc_r``, ``acc_c``, ``acc_f``, ``class_acc``, ``class_acc_r/c/f`` (val, in
    [0, 1], None for a group without val boxes), ``boxes_r/c/f`` and ``classes_r/c/f`` (val
    boxes / classes with val boxes per group), ``train_acc``, ``train_loss``,
    ``embed_seconds``, ``fit_seconds``, ``seconds`` (total) and ``per_class`` (a list of
    ``{"id", "name", "frequency", "train_boxes", "val_boxes", "acc"}``).
    """
    from drcl.config import require
    from drcl.engine.trainer import pick_device

    require(cfg, "data.train_json", "data.train_images", "data.val_json", "data.val_images")
    start = time.perf_counter()
    d, m = cfg["data"], cfg["model"]
    dev = pick_device(device or cfg["train"]["device"])
    encoder = load_encoder(m["preset"], m["norm"], weights, seed, m["init_style"]).to(dev)

    train_ann = load_annotations(d["train_json"], d["train_images"], on_bad=d["on_bad"], records=False)
    val_ann = load_annotations(d["val_json"], d["val_images"], on_bad=d["on_bad"], records=False)
    num_classes = train_ann.num_categories
    embeds = {}
    for split, ann in (("train", train_ann), ("val", val_ann)):
        dataset = DetectionDataset(ann, masks=False)
        embeds[split] = embed_boxes(encoder, dataset, _label_map(train_ann, ann), batch_size=batch_size,
                                    image_size=image_size, max_images=max_images, device=dev,
                                    progress=progress, desc=f"embedding {split} boxes")
    embed_seconds = time.perf_counter() - start

    (x_train, y_train), (x_val, y_val) = embeds["train"], embeds["val"]
    fit_start = time.perf_counter()
    probe = fit_linear(x_train, y_train, num_classes, epochs=epochs, weight_decay=weight_decay, balanced=balanced)
    fit_seconds = time.perf_counter() - fit_start
    val = group_accuracy(probe.predict(x_val).numpy(), y_val.numpy(), train_ann.frequency, num_classes)
    train_acc = float((probe.predict(x_train) == y_train).double().mean())

    train_counts = np.bincount(y_train.numpy(), minlength=num_classes)
    val_counts = np.bincount(y_val.numpy(), minlength=num_classes)
    per_class = [
        {"id": cat["id"], "name": cat.get("name"), "frequency": train_ann.frequency[c],
         "train_boxes": int(train_counts[c]), "val_boxes": int(val_counts[c]), "acc": val["per_class_acc"][c]}
        for c, cat in enumerate(train_ann.categories)
    ]
    result = {
        "preset": m["preset"],
        "norm": m["norm"],
        "weights": None if weights is None else os.fspath(weights),
        "seed": seed,
        "epochs": epochs,
        "weight_decay": weight_decay,
        "balanced": balanced,
        "num_classes": num_classes,
        "train_boxes": len(y_train),
        "val_boxes": len(y_val),
        **{k: v for k, v in val.items() if k != "per_class_acc"},
        "train_acc": train_acc,
        "train_loss": probe.loss,
        "embed_seconds": round(embed_seconds, 3),
        "fit_seconds": round(fit_seconds, 3),
        "seconds": round(time.perf_counter() - start, 3),
        "per_class": per_class,
    }
    return result


def format_probe(result: dict) -> str:
    """A small table of :func:`run_probe`'s result: box and class-mean accuracy per group."""

    def pct(v):
        return "    -" if v is None else f"{100 * v:5.1f}"

    source = result.get("weights") or f"random init (seed {result.get('seed')})"
    lines = [
        f"linear probe: {result['preset']} / {result['norm']}, {source}",
        (f"  {result['train_boxes']} train boxes, {result['val_boxes']} val boxes, "
         f"{result['num_classes']} classes, {result['seconds']:.1f} s"),
        f"  {'group':<10}{'boxes':>7}{'classes':>9}{'acc %':>8}{'class-mean %':>14}",
    ]
    for g in GROUPS:
        lines.append(f"  {GROUP_NAMES[g]:<10}{result[f'boxes_{g}']:>7}{result[f'classes_{g}']:>9}"
                     f"{pct(result[f'acc_{g}']):>8}{pct(result[f'class_acc_{g}']):>14}")
    classes = sum(result[f"classes_{g}"] for g in GROUPS)
    lines.append(f"  {'all':<10}{result['val_boxes']:>7}{classes:>9}{pct(result['acc']):>8}"
                 f"{pct(result['class_acc']):>14}")
    lines.append(f"  train acc {pct(result['train_acc']).strip()} %")
    return "\n".join(lines)
