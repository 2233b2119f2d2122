"""Start a model from weights in any layout drcl reads: ``drcl pretrain --init`` /
``drcl finetune --init`` (config key ``model.init``).

:func:`read_init` opens a file (or a run folder) and tells the layout from its keys:

| layout | what it is | what it gives |
|---|---|---|
| ``torchvision-classification`` | a torchvision ResNet classifier's ``state_dict`` (ImageNet: ``resnet50-0676ba61.pth``; ``drcl upstream``) | backbone |
| ``drcl-pretrain`` | a ``drcl pretrain`` checkpoint (``checkpoints/last.pt``) | backbone, FPN, box head (the online encoder) |
| ``torchvision`` | torchvision detector keys: ``encoder.pt``, ``drcl export --format torchvision``, a torchvision Faster / Mask R-CNN ``state_dict``, a ``drcl finetune`` checkpoint | backbone, FPN, box head |
| ``detectron2`` | a detectron2 checkpoint (``.pkl`` or ``.pth``, ``{"model": ...}``) with ResNet-FPN keys | backbone, FPN, box head |
| ``mmdet`` | an mmdetection checkpoint (``{"state_dict": ...}``) with ResNet-FPN keys | backbone, FPN, box head |

detectron2 and mmdet detectors may hold a "caffe"-style ResNet (MSRA's: the stride in the first
1x1 conv of a block, BGR 0-255 input; detectron2's model zoo R-50, mmdet's ``*_caffe`` models)
with the same keys and shapes as a torchvision-style ("pytorch") one. drcl's ResNets are
torchvision's, which would run caffe-style weights with wrong features and no error, so
:func:`resnet_style` looks for what the file says (drcl's own export tag; detectron2's
``pixel_mean`` order; the ``style=`` of the mmdet config saved in ``meta``): caffe style is
refused, and a file that does not say needs ``model.init_style: pytorch`` from the user.

Detector layouts are renamed with the export table run backwards
(:func:`drcl.export.import_encoder`); whatever is not backbone, FPN or box head (a
classifier's ``fc``, RPN, box predictor, mask head, the 2DRCL projectors) is left out and
listed. :func:`init_model` then loads the weights into the model's encoder through
:func:`drcl.export.load_into_detector`, which refuses a norm family, preset or shape that does
not fit, naming the first mismatching tensor, and returns a report of what was loaded, what
starts from random init and what in the file was not used.
"""

from __future__ import annotations

import os
import pickle
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from drcl.atomic import write_json
from drcl.engine.checkpoint import load_checkpoint, run_weights_path, strip_encoder
from drcl.errors import DataError
from drcl.export import import_encoder, load_into_detector
from drcl.model.detector import imagenet_weights_file, imagenet_weights_url, preset as preset_spec
from drcl.model.drcl import ENCODER_PREFIX

LAYOUTS = ("torchvision-classification", "drcl-pretrain", "torchvision", "detectron2", "mmdet")
#: ``model.init_style``: ``auto`` tells a detectron2 / mmdet file's ResNet style from the file and
#: refuses one that does not say; ``pytorch`` vouches for a file that does not say.
INIT_STYLES = ("auto", "pytorch")
#: ``--init imagenet``: torchvision's ImageNet checkpoint of the preset's backbone in the torch cache.
IMAGENET = "imagenet"
_CLASSIFIER = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")
_TWO_PART = {"backbone", "roi_heads", "roi_head", "online", "momentum", "rpn"}
_WEIGHT_NAMES = ("weight", "bias", "running_mean", "running_var")


@dataclass
class InitWeights:
    path: Path
    layout: str
    state: dict  # backbone / FPN / box-head tensors under torchvision detector keys
    ignored: list[str] = field(default_factory=list)  # the file's other tensors, unused


def resolve_init(spec: str | os.PathLike, preset: str) -> Path:
    """``imagenet`` -> torchvision's ImageNet file of ``preset``'s backbone in the torch cache;
    a run folder -> its ``encoder.pt`` or ``checkpoints/last.pt``; a file as it is."""
    if str(spec) == IMAGENET and not Path(spec).exists():
        backbone = preset_spec(preset)["backbone"]
        path = imagenet_weights_file(backbone)
        if not path.exists():
            raise DataError(f"model.init imagenet (--init imagenet): no ImageNet weights at {path}; drcl downloads "
                            f"nothing: get torchvision's {backbone} IMAGENET1K_V1 file there, e.g. "
                            f"curl -L --create-dirs -o {path} {imagenet_weights_url(backbone)} (or copy it from a "
                            f"machine where torchvision.models.{backbone}(weights='IMAGENET1K_V1') ran), or set "
                            f"TORCH_HOME to the folder whose hub/checkpoints/ holds it")
        return path
    path = run_weights_path(spec)
    if not path.exists():
        raise DataError(f"{path}: no such weights file")
    return path


def _load(path: Path):
    """torch.save files; detectron2's pickled ``.pkl`` files."""
    try:
        return load_checkpoint(path)
    except DataError:
        try:
            with open(path, "rb") as f:
                return pickle.load(f, encoding="latin1")
        except Exception:
            raise DataError(f"{path}: neither a torch checkpoint nor a pickled (detectron2) one") from None


def _unwrap(obj) -> dict:
    """The flat state dict inside drcl / detectron2 (``model``) and mmdet (``state_dict``) containers."""
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            return obj[wrapper]
    return obj


def _layout(sd: dict) -> str | None:
    keys = list(sd)
    if any(k.startswith(ENCODER_PREFIX) for k in keys):
        return "drcl-pretrain"
    if any(k.startswith("backbone.bottom_up.") for k in keys):
        return "detectron2"
    if any(k.startswith("backbone.body.") for k in keys):
        return "torchvision"
    if any(k.startswith(("backbone.layer1.", "neck.", "roi_head.")) for k in keys):
        return "mmdet"
    if "conv1.weight" in sd and any(k.startswith("layer1.") for k in keys):
        return "torchvision-classification"
    return None


_MMDET_STYLE = re.compile(r"""style\s*=\s*['"](caffe|pytorch)['"]""")


def resnet_style(raw, sd: dict, layout: str) -> tuple[str | None, str]:
    """``("pytorch" | "caffe" | None, the evidence)`` for a detectron2 / mmdet file: ``raw`` is
    the loaded file, ``sd`` its state dict. None when the file does not say."""
    meta = raw.get("meta") if isinstance(raw, dict) and isinstance(raw.get("meta"), dict) else {}
    if (isinstance(raw, dict) and raw.get("__author__") == "drcl") or meta.get("exported_by") == "drcl":
        return "pytorch", "exported by drcl"
    if layout == "detectron2" and "pixel_mean" in sd:
        mean = [float(v) for v in _flat(sd["pixel_mean"])]
        if len(mean) == 3 and mean[0] != mean[2]:
            order = "BGR" if mean[0] < mean[2] else "RGB"
            return ("caffe" if order == "BGR" else "pytorch"), f"pixel_mean {[round(v, 2) for v in mean]} is {order}"
    if layout == "mmdet":
        for key in ("cfg", "config"):
            found = _MMDET_STYLE.search(meta.get(key) or "") if isinstance(meta.get(key), str) else None
            if found:
                return found.group(1), f"its saved mmdet config says style='{found.group(1)}'"
    return None, ""


def _flat(value) -> list:
    return value.reshape(-1).tolist() if hasattr(value, "reshape") else list(value)


def read_init(path: str | os.PathLike, style: str = "auto") -> InitWeights:
    """Encoder weights (torchvision detector keys) from ``path`` in any layout of the table
    above; a file in none of them is a one-line :class:`DataError`, and so is a detectron2 /
    mmdet file with a caffe-style ResNet, or one that does not say its style unless ``style``
    is ``pytorch`` (``model.init_style``; see the module docstring)."""
    path = Path(path)
    raw = _load(path)
    sd = _unwrap(raw)
    if not isinstance(sd, dict) or not sd:
        raise DataError(f"{path}: not a state dict (a mapping of tensor names to tensors)")
    layout = _layout(sd)
    if layout is None:
        raise DataError(f"{path}: not a layout drcl reads ({', '.join(LAYOUTS)}); its first keys are "
                        f"{', '.join(list(sd)[:3])}")
    if layout in ("detectron2", "mmdet"):
        found, evidence = resnet_style(raw, sd, layout)
        if found == "caffe":
            raise DataError(f"{path}: a caffe-style ResNet ({evidence}): stride in the 1x1 conv, BGR 0-255 input; "
                            f"drcl's ResNets are torchvision's (stride in the 3x3 conv, RGB input), which would run "
                            f"these weights with wrong features: start from a pytorch-style {layout} file")
        if found is None and style != "pytorch":
            raise DataError(f"{path}: this {layout} file does not say whether its ResNet is pytorch style (stride in "
                            f"the 3x3 conv, RGB input, as torchvision's) or caffe style (stride in the 1x1 conv, BGR "
                            f"0-255 input: detectron2's model-zoo R-50, mmdet's *_caffe models), which have the same "
                            f"keys and shapes: if it is pytorch style, set model.init_style: pytorch "
                            f"(--set model.init_style=pytorch); caffe-style weights cannot be used")
    if layout == "drcl-pretrain":
        state = strip_encoder(sd)
        ignored = [k for k in sd if not k.startswith(ENCODER_PREFIX)]
    elif layout == "torchvision-classification":
        body = {k: v for k, v in sd.items() if k.startswith(_CLASSIFIER)}
        state, ignored = import_encoder({f"backbone.body.{k}": v for k, v in body.items()}, "torchvision")
        ignored += [k for k in sd if k not in body and not k.endswith(".num_batches_tracked")]
    else:
        try:
            state, ignored = import_encoder(sd, layout)
        except ValueError as e:
            raise DataError(f"{path}: {e}") from None
    if not state:
        raise DataError(f"{path}: no backbone, FPN or box-head tensors in this {layout} file")
    return InitWeights(path, layout, state, ignored)


def module_of(key: str) -> str:
    """The module a tensor belongs to, for reports: ``backbone.body``, ``rpn.head``, ``fc``."""
    parts = key.split(".")
    if parts[1:2] == ["encoder"] and parts[0] in ("online", "momentum"):  # 2DRCL's encoders
        return ".".join(parts[:4])
    return ".".join(parts[:2] if parts[0] in _TWO_PART else parts[:1])


def group_keys(keys) -> str:
    """``backbone.body (60), roi_heads.box_head (4)``: tensor counts per module."""
    counts = Counter(module_of(k) for k in keys)
    return ", ".join(f"{g} ({n})" for g, n in sorted(counts.items())) or "none"


def _weight_names(model: nn.Module) -> set[str]:
    """Parameters and norm weights / statistics (FrozenBatchNorm2d keeps all four as buffers);
    not queues or step counters."""
    names = {n for n, _ in model.named_parameters()}
    return names | {n for n, _ in model.named_buffers() if n.rsplit(".", 1)[-1] in _WEIGHT_NAMES}


def init_model(model: nn.Module, spec: str | os.PathLike, preset: str, norm: str, prefix: str = "",
               skip: tuple[str, ...] = (), style: str = "auto") -> dict:
    """Load the weights ``spec`` names (a path, a run folder or ``imagenet``) into the encoder
    of ``model`` found at ``prefix`` (``""`` for a torchvision detector, ``"online.encoder."``
    for :class:`~drcl.model.drcl.DRCL`); ``style`` is ``model.init_style`` (:func:`read_init`).
    Returns the report: ``source``, ``layout``, ``loaded``
    (``model`` keys), ``new`` (the model's weights left at random init, less those under
    ``skip``) and ``ignored`` (tensors of the file not used)."""
    path = resolve_init(spec, preset)
    weights = read_init(path, style)
    encoder = model.get_submodule(prefix.rstrip(".")) if prefix else model
    try:
        load_into_detector(encoder, weights.state)
    except ValueError as e:
        spec_ = preset_spec(preset)
        raise DataError(f"{path}: cannot start the {preset} ({spec_['backbone']}, norm {norm}) encoder from "
                        f"these {weights.layout} weights: {e}") from None
    loaded = [prefix + k for k in weights.state if not k.endswith(".num_batches_tracked")]  # not loaded
    done = set(loaded)
    names = _weight_names(model)
    new = [k for k in model.state_dict() if k in names and k not in done and not k.startswith(skip)]
    return {"source": str(path), "layout": weights.layout, "loaded": loaded, "new": new,
            "ignored": weights.ignored}


def summary_line(report: dict, prefix: str = "") -> str:
    """One line: where from, how many tensors per module were loaded, which start new."""
    def strip(keys):
        return [k[len(prefix):] if prefix and k.startswith(prefix) else k for k in keys]

    line = (f"init from {report['source']} ({report['layout']}): loaded {len(report['loaded'])} tensors: "
            f"{group_keys(strip(report['loaded']))}; new (random init): {group_keys(strip(report['new']))}")
    if report["ignored"]:
        line += f"; not used: {group_keys(report['ignored'])}"
    return line


def write_report(report: dict, out_dir: str | os.PathLike, **extra) -> Path:
    """``OUT/init.json``: the report with per-module counts."""
    path = Path(out_dir) / "init.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = {k: dict(sorted(Counter(module_of(x) for x in report[k]).items())) for k in ("loaded", "new", "ignored")}
    write_json(path, {**report, **extra, "counts": counts})
    return path
