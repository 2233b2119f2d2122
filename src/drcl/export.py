"""Export pre-trained encoder weights to torchvision, detectron2 and mmdetection layouts.

The input is an encoder state dict under torchvision detector keys (``Encoder.state_dict()``,
``DRCL.encoder_state_dict()``): ``backbone.body.*`` (ResNet), ``backbone.fpn.*`` (FPN) and
``roi_heads.box_head.*`` (TwoMLPHead fc6 / fc7).

One table, :data:`KEY_MAP`, names each module in the three layouts; :func:`export_weights`
reads it left to right and :func:`import_weights` right to left, so the two are exact
inverses. ``num_batches_tracked`` (a BatchNorm step counter, not a weight) is dropped in
every format: torchvision's and detectron2's FrozenBatchNorm2d have no such buffer, and
PyTorch's BatchNorm keeps its own counter, without a missing-key report, when a plain
(metadata-less) dict lacks it.

Containers written by :func:`save_export` (see docs/export.md):

- ``torchvision``: the flat state dict, ``torch.save`` (``.pth``).
- ``detectron2``: ``{"model": {key: numpy array}, "__author__": "drcl",
  "matching_heuristics": False}`` pickled to a ``.pkl`` file. detectron2's
  DetectionCheckpointer returns such a file as-is and loads it by exact key; a ``.pth`` would
  go through its name-matching heuristics instead.
- ``mmdet``: ``{"state_dict": {key: tensor}, "meta": {...}}``, ``torch.save`` (``.pth``), as
  mmengine checkpoints are.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from drcl.atomic import atomic_write

FORMATS = ("torchvision", "detectron2", "mmdet")

# (torchvision, detectron2, mmdetection) key templates. Fields: {s} ResNet stage (torchvision
# layer1..4 = detectron2 res2..5), {b} block, {c} conv / norm index in the block, {i} FPN input
# level (0 = C2 -> detectron2 level 2), {p} parameter / buffer name, {n} mmdet norm abbreviation
# (bn or gn, from mmcv's build_norm_layer). {x+k} renders field x plus k.
KEY_MAP: tuple[tuple[str, str, str], ...] = (
    ("backbone.body.conv1.{p}",
     "backbone.bottom_up.stem.conv1.{p}",
     "backbone.conv1.{p}"),
    ("backbone.body.bn1.{p}",
     "backbone.bottom_up.stem.conv1.norm.{p}",
     "backbone.{n}1.{p}"),
    ("backbone.body.layer{s}.{b}.conv{c}.{p}",
     "backbone.bottom_up.res{s+1}.{b}.conv{c}.{p}",
     "backbone.layer{s}.{b}.conv{c}.{p}"),
    ("backbone.body.layer{s}.{b}.bn{c}.{p}",
     "backbone.bottom_up.res{s+1}.{b}.conv{c}.norm.{p}",
     "backbone.layer{s}.{b}.{n}{c}.{p}"),
    ("backbone.body.layer{s}.{b}.downsample.0.{p}",
     "backbone.bottom_up.res{s+1}.{b}.shortcut.{p}",
     "backbone.layer{s}.{b}.downsample.0.{p}"),
    ("backbone.body.layer{s}.{b}.downsample.1.{p}",
     "backbone.bottom_up.res{s+1}.{b}.shortcut.norm.{p}",
     "backbone.layer{s}.{b}.downsample.1.{p}"),
    ("backbone.fpn.inner_blocks.{i}.0.{p}",
     "backbone.fpn_lateral{i+2}.{p}",
     "neck.lateral_convs.{i}.conv.{p}"),
    ("backbone.fpn.layer_blocks.{i}.0.{p}",
     "backbone.fpn_output{i+2}.{p}",
     "neck.fpn_convs.{i}.conv.{p}"),
    ("roi_heads.box_head.fc6.{p}",
     "roi_heads.box_head.fc1.{p}",
     "roi_head.bbox_head.shared_fcs.0.{p}"),
    ("roi_heads.box_head.fc7.{p}",
     "roi_heads.box_head.fc2.{p}",
     "roi_head.bbox_head.shared_fcs.1.{p}"),
)

_FIELD = re.compile(r"\{(\w)(?:\+(\d+))?\}")
_FIELD_RE = {"p": r"[A-Za-z_]+", "n": r"bn|gn"}  # every other field is an integer
_NORM_BUFFERS = ("running_mean", "running_var")
_SKIP = "num_batches_tracked"

# spellings of the target's normalisation: ours (detector.norm_layer), detectron2's
# MODEL.RESNETS.NORM and mmdet's norm_cfg type, lower-cased without "_"
_NORM_FAMILY = {"bn": "bn", "frozenbn": "bn", "syncbn": "bn", "naivesyncbn": "bn", "gn": "gn"}
_NORM_NAME = {"bn": "BatchNorm (running mean / var)", "gn": "GroupNorm (weight / bias only)"}


class _Template:
    def __init__(self, text: str):
        self.text = text
        self.offsets: dict[str, int] = {}
        regex, pos = [], 0
        for m in _FIELD.finditer(text):
            name = m.group(1)
            self.offsets[name] = int(m.group(2) or 0)
            regex += [re.escape(text[pos:m.start()]), f"(?P<{name}>{_FIELD_RE.get(name, r'[0-9]+')})"]
            pos = m.end()
        regex.append(re.escape(text[pos:]))
        self.regex = re.compile("".join(regex))

    def parse(self, key: str) -> dict | None:
        m = self.regex.fullmatch(key)
        if m is None:
            return None
        fields = {k: v if k in _FIELD_RE else int(v) - self.offsets[k] for k, v in m.groupdict().items()}
        if any(isinstance(v, int) and v < 0 for v in fields.values()):
            return None  # e.g. detectron2 res1 / fpn_lateral1: no such module
        return fields

    def render(self, fields: dict) -> str:
        def sub(m):
            value = fields[m.group(1)]
            return value if m.group(1) in _FIELD_RE else str(value + int(m.group(2) or 0))

        return _FIELD.sub(sub, self.text)


_TABLE = [tuple(_Template(t) for t in row) for row in KEY_MAP]


def _column(fmt: str) -> int:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS.index(fmt)


def _rename(state_dict: dict, src: int, dst: int, norm: str, what: str, strict: bool = True):
    """Keys of ``state_dict`` from column ``src`` to ``dst``. ``strict``: a key outside the
    table is an error; else ``(renamed, keys outside the table)``."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        if key.endswith("." + _SKIP):
            continue
        for row in _TABLE:
            fields = row[src].parse(key)
            if fields is not None:
                new = row[dst].render({"n": norm, **fields})
                if new in out:
                    raise ValueError(f"{what}: two keys map to {new!r}")
                out[new] = value
                break
        else:
            unknown.append(key)
    if not strict:
        return out, unknown
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise ValueError(
            f"{what}: {len(unknown)} key(s) are not backbone / FPN / box-head weights in the "
            f"{FORMATS[src]} layout: {', '.join(unknown[:5])}{more}"
        )
    if not out:
        raise ValueError(f"{what}: the state dict is empty")
    return out


def _tensor(value) -> torch.Tensor:
    return value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(value)


def detect_norm(state_dict: dict) -> str:
    """``"bn"`` when the ResNet's norm layers carry running statistics (BatchNorm, SyncBN,
    FrozenBatchNorm2d: interchangeable), ``"gn"`` when they have only weight / bias (GroupNorm).
    Works on any of the three layouts."""
    norm_rows = [row for row in _TABLE if ".norm." in row[1].text]  # detectron2 names every norm "*.norm"
    found = False
    for key in state_dict:
        for row in norm_rows:
            for template in row:
                fields = template.parse(key)
                if fields is not None:
                    found = True
                    if fields["p"] in _NORM_BUFFERS:
                        return "bn"
    if not found:
        raise ValueError("no ResNet normalisation layers found: not an encoder state dict")
    return "gn"


def _norm_family(norm: str) -> str:
    family = _NORM_FAMILY.get(norm.lower().replace("_", ""))
    if family is None:
        raise ValueError(f"unknown normalisation {norm!r}; use bn, frozen_bn, syncbn or gn "
                         f"(detectron2 BN / FrozenBN / SyncBN / GN, mmdet BN / SyncBN / GN)")
    return family


def _check_norm(source: str, target: str | None, prefix: str = "") -> None:
    if target is None:
        return
    if _norm_family(target) != source:
        raise ValueError(
            f"normalisation mismatch: {prefix}the weights come from {_NORM_NAME[source]} norm layers but "
            f"the target uses {target!r} ({_NORM_NAME[_norm_family(target)]}); loading them would "
            f"leave the norm layers half-initialised. Build the target with the norm the weights "
            f"were pre-trained with ({'gn' if source == 'gn' else 'bn / frozen_bn'})."
        )


def export_weights(state_dict: dict, fmt: str, norm: str | None = None) -> dict:
    """Encoder weights (torchvision keys) -> ``{key: tensor}`` in ``fmt``'s layout (flat; see
    :func:`save_export` for the file containers).

    ``fmt``: ``torchvision`` (same keys, for ``detector.load_state_dict(sd, strict=False)``),
    ``detectron2`` or ``mmdet``. ``norm``, when given, is the target's normalisation (``bn``,
    ``frozen_bn``, ``syncbn``, ``gn``, or detectron2 / mmdet spellings); weights pre-trained with
    the other family (GroupNorm vs BatchNorm) raise ``ValueError``.
    """
    dst = _column(fmt)
    source = detect_norm(state_dict)
    _check_norm(source, norm)
    renamed = _rename(state_dict, 0, dst, source, f"export to {fmt}")
    return {k: _tensor(v) for k, v in renamed.items()}


def import_weights(state_dict: dict, fmt: str) -> dict:
    """The inverse of :func:`export_weights`: ``fmt`` layout (flat, or the detectron2 /
    mmdet container) -> torchvision keys, numpy arrays turned into tensors."""
    src = _column(fmt)
    for wrapper in ("model", "state_dict"):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    renamed = _rename(state_dict, src, 0, "bn", f"import from {fmt}")
    return {k: _tensor(v) for k, v in renamed.items()}


def import_encoder(state_dict: dict, fmt: str) -> tuple[dict, list[str]]:
    """The backbone / FPN / box-head part of a whole detector's weights in ``fmt``'s layout
    (flat: unwrap containers first), under torchvision keys, and the keys left out (RPN,
    box predictor, mask head, detectron2's pixel mean / std, ...). BatchNorm step counters are
    dropped without being listed."""
    renamed, other = _rename(state_dict, _column(fmt), 0, "bn", f"import from {fmt}", strict=False)
    return {k: _tensor(v) for k, v in renamed.items()}, other


def _model_norm(detector: nn.Module) -> str:
    for module in detector.backbone.body.modules():
        if isinstance(module, nn.GroupNorm):
            return "gn"
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)):
            return "bn"
    raise ValueError("the detector's backbone has no normalisation layers")


#: The parts of a detector that encoder weights hold; each loads whole or not at all.
ENCODER_PARTS = ("backbone.body.", "backbone.fpn.", "roi_heads.box_head.")


def load_into_detector(detector: nn.Module, state_dict: dict):
    """Load encoder weights (torchvision keys) into a torchvision Faster / Mask R-CNN
    (``build_detector`` or torchvision's stock builders) or an :class:`~drcl.model.detector.Encoder`
    with ``strict=False``, after checking them against the model: the norm family, then every
    key and shape in the weights' order, then that each of :data:`ENCODER_PARTS` the weights
    hold at all they hold whole (ResNet-50 weights lack ResNet-101's extra blocks but fit every
    shape). A mismatch is a one-line ``ValueError`` that names the first mismatching tensor.
    Weights may lack a whole part (ImageNet weights: FPN and box head). Returns
    ``load_state_dict``'s (missing_keys, unexpected_keys): missing are the parts the weights do
    not hold (RPN, box predictor, mask head, ...)."""
    target = detector.state_dict()
    source, want = detect_norm(state_dict), _model_norm(detector)
    if source != want:
        stats = [k for k in (state_dict if source == "bn" else target) if k.endswith(".running_mean")]
        side = "in the weights, not in the model" if source == "bn" else "in the model, not in the weights"
        where = f"first mismatching tensor {stats[0]} ({side}): " if stats else ""
        _check_norm(source, want, prefix=where)
    sd = export_weights(state_dict, "torchvision")
    for k, v in sd.items():
        if k not in target:
            raise ValueError(f"first mismatching tensor {k}: the model has no such tensor (a different "
                             f"architecture or a deeper backbone)")
        if v.shape != target[k].shape:
            raise ValueError(f"shape mismatch at {k} (the first mismatching tensor): weights {tuple(v.shape)} vs "
                             f"model {tuple(target[k].shape)}: the weights come from a different preset "
                             f"(backbone depth, FPN or box-head width)")
    for part in ENCODER_PARTS:
        if any(k.startswith(part) for k in sd):
            lacking = [k for k in target if k.startswith(part) and k not in sd and not k.endswith("." + _SKIP)]
            if lacking:
                raise ValueError(f"first mismatching tensor {lacking[0]}: missing from the weights, which hold the "
                                 f"rest of {part.rstrip('.')} ({len(lacking)} tensors lacking): a shallower backbone")
    return detector.load_state_dict(sd, strict=False)


def _container(state_dict: dict, fmt: str, norm: str | None, meta: dict | None):
    sd = export_weights(state_dict, fmt, norm)
    info = {"exported_by": "drcl", "format": fmt, "norm": detect_norm(state_dict), **(meta or {})}
    if fmt == "detectron2":
        model = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in sd.items()}
        return {"model": model, "__author__": "drcl", "matching_heuristics": False, "drcl": info}
    if fmt == "mmdet":
        return {"state_dict": sd, "meta": info}
    return sd


def check_export_path(fmt: str, path) -> Path:
    """``path`` as a :class:`~pathlib.Path`, or a one-line ``ValueError`` naming the suffix
    ``fmt`` needs: detectron2's DetectionCheckpointer loads a ``.pkl`` by exact key and runs any
    other name through its name-matching heuristics, so detectron2 weights must end in ``.pkl``."""
    path = Path(path)
    if fmt == "detectron2" and path.suffix != ".pkl":
        raise ValueError(f"detectron2 weights need a file name ending in .pkl (DetectionCheckpointer loads .pkl "
                         f"by exact key, other names by name heuristics): {path.name!r}, e.g. "
                         f"{path.with_suffix('.pkl').name!r}")
    return path


def save_export(state_dict: dict, fmt: str, path, norm: str | None = None, meta: dict | None = None) -> Path:
    """Write encoder weights in ``fmt``'s checkpoint container to ``path`` atomically (temp file
    in the same folder, fsync, ``os.replace``). detectron2 needs a ``.pkl`` path. ``meta``
    (plain str / int / float values) is stored with the weights. Returns the path."""
    path = check_export_path(fmt, path)
    data = _container(state_dict, fmt, norm, meta)
    if fmt == "detectron2":
        return atomic_write(path, lambda f: pickle.dump(data, f, protocol=4))
    return atomic_write(path, lambda f: torch.save(data, f))
