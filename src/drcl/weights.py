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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from drcl.atomic import write_json
from drcl.engine.checkpoint import load_checkpoint, run_weights_path, strip_encoder
from drcl.errors import DataError
from drcl.export import import_encoder, load_into_detector
from drcl.model.detector import imagenet_weights_file, preset as preset_spec
from drcl.model.drcl import ENCODER_PREFIX

LAYOUTS = ("torchvision-classification", "drcl-pretrain", "torchvision", "detectron2", "mmdet")
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
        path = imagenet_weights_file(preset_spec(preset)["backbone"])
        if not path.exists():
            raise DataError(f"--init imagenet: no ImageNet weights at {path} (place torchvision's "
                            f"{path.name} there, or set TORCH_HOME)")
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


def read_init(path: str | os.PathLike) -> InitWeights:
    """Encoder weights (torchvision detector keys) from ``path`` in any layout of the table
    above; a file in none of them is a one-line :class:`DataError`."""
    path = Path(path)
    sd = _unwrap(_load(path))
    if not isinstance(sd, dict) or not sd:
        raise DataError(f"{path}: not a state dict (a mapping of tensor names to tensors)")
    layout = _layout(sd)
    if layout is None:
        raise DataError(f"{path}: not a layout drcl reads ({', '.join(LAYOUTS)}); its first keys are "
                        f"{', '.join(list(sd)[:3])}")
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
               skip: tuple[str, ...] = ()) -> dict:
    """Load the weights ``spec`` names (a path, a run folder or ``imagenet``) into the encoder
    of ``model`` found at ``prefix`` (``""`` for a torchvision detector, ``"online.encoder."``
    for :class:`~drcl.model.drcl.DRCL`). Returns the report: ``source``, ``layout``, ``loaded``
    (``model`` keys), ``new`` (the model's weights left at random init, less those under
    ``skip``) and ``ignored`` (tensors of the file not used)."""
    path = resolve_init(spec, preset)
    weights = read_init(path)
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
