"""Detector presets built from torchvision's Faster / Mask R-CNN with FPN.

Everything 2DRCL pre-trains (backbone, FPN, RoI box head) is a module of these detectors, so
pre-trained weights load into them by ``state_dict`` key, without renaming.

| preset   | backbone  | FPN width | box head width | images     | RPN / RoI sampling                |
|----------|-----------|-----------|----------------|------------|-----------------------------------|
| tiny     | ResNet-18 | 128       | 256            | 160 (CPU)  | slim: 300/150 proposals, 128 RoIs |
| r50-fpn  | ResNet-50 | 256       | 1024           | 800 x 1333 | torchvision defaults              |
| r101-fpn | ResNet-101| 256       | 1024           | 800 x 1333 | torchvision defaults              |

The tiny preset's FPN is 128 wide because at 160 px a 256-wide FPN costs more than the
ResNet-18 under it on a CPU (its stride-4 3x3 output conv alone took two thirds of the FPN's
time), and pre-training runs it forward and backward for every view.

Normalisation (docs/method.md): torchvision defaults to FrozenBatchNorm2d, right for fine-tuning
ImageNet weights and wrong for training from scratch or pre-training. ``norm`` picks
``"bn"`` (BatchNorm; converted to SyncBN under DDP by the engine), ``"gn"`` (GroupNorm, 32
groups, for tiny per-device batches) or ``"frozen_bn"``.
"""

from __future__ import annotations

import math
import os
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, ResNet50_Weights, ResNet101_Weights, resnet
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.misc import FrozenBatchNorm2d

from drcl.model.host import to_device

PRESETS: dict[str, dict] = {
    "tiny": {
        "backbone": "resnet18",
        "fpn_channels": 128,
        "representation_size": 256,
        "min_size": 160,
        "max_size": 160,
        "detector": {
            "rpn_pre_nms_top_n_train": 300,
            "rpn_post_nms_top_n_train": 150,
            "rpn_pre_nms_top_n_test": 300,
            "rpn_post_nms_top_n_test": 150,
            "rpn_batch_size_per_image": 128,
            "box_batch_size_per_image": 128,
            "box_detections_per_img": 100,
        },
    },
    "r50-fpn": {"backbone": "resnet50", "fpn_channels": 256, "representation_size": 1024, "min_size": 800, "max_size": 1333, "detector": {}},
    "r101-fpn": {"backbone": "resnet101", "fpn_channels": 256, "representation_size": 1024, "min_size": 800, "max_size": 1333, "detector": {}},
}

IMAGENET_WEIGHTS = {
    "resnet18": ResNet18_Weights.IMAGENET1K_V1,
    "resnet50": ResNet50_Weights.IMAGENET1K_V1,
    "resnet101": ResNet101_Weights.IMAGENET1K_V1,
}

def norm_layer(norm: str):
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        return partial(nn.GroupNorm, 32)
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    raise ValueError(f"norm must be 'bn', 'gn' or 'frozen_bn', not {norm!r}")


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def imagenet_weights_url(backbone: str) -> str:
    """Where torchvision downloads the ImageNet checkpoint of ``backbone`` from."""
    return IMAGENET_WEIGHTS[backbone].url


def imagenet_weights_file(backbone: str) -> Path:
    """Where torchvision's weights API keeps the ImageNet checkpoint of ``backbone``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(imagenet_weights_url(backbone))


def build_resnet(name: str, norm: str = "bn", imagenet: bool = False, num_classes: int = 1000) -> resnet.ResNet:
    """The preset's torchvision ResNet classifier (``conv1`` ... ``layer4``, ``fc``) with the
    given norm layers; ``num_classes`` sizes ``fc``.

    ``imagenet=True`` loads torchvision's ImageNet weights, which must already be on disk
    (no downloads at run time); a missing file is a clear error naming where to put it.
    """
    spec = preset(name)
    weights = None
    if imagenet:
        weights = IMAGENET_WEIGHTS[spec["backbone"]]
        path = imagenet_weights_file(spec["backbone"])
        if not path.exists():
            raise FileNotFoundError(
                f"ImageNet weights for {spec['backbone']} not found at {path}; drcl downloads nothing: get "
                f"torchvision's file there, e.g. curl -L --create-dirs -o {path} {weights.url}, or set TORCH_HOME "
                f"to the folder whose hub/checkpoints/ holds it, or train from random init"
            )
    return getattr(resnet, spec["backbone"])(weights=weights, norm_layer=norm_layer(norm),
                                             **({} if weights else {"num_classes": num_classes}))


def build_backbone(name: str, norm: str = "bn", imagenet: bool = False):
    """ResNet + FPN (``BackboneWithFPN``, as torchvision's ``resnet_fpn_backbone`` builds it
    with all layers trainable, but with the preset's FPN width); ``imagenet`` as in
    :func:`build_resnet`."""
    spec = preset(name)
    body = build_resnet(name, norm, imagenet)
    width = body.inplanes // 8  # channels out of layer1
    return BackboneWithFPN(
        body,
        return_layers={f"layer{k}": str(k - 1) for k in (1, 2, 3, 4)},
        in_channels_list=[width * 2 ** (k - 1) for k in (1, 2, 3, 4)],
        out_channels=spec["fpn_channels"],
        extra_blocks=LastLevelMaxPool(),
    )


def build_detector(name: str, num_classes: int, norm: str = "bn", masks: bool = False, imagenet: bool = False,
                   **overrides) -> FasterRCNN:
    """A torchvision Faster R-CNN (``masks=True``: Mask R-CNN) with FPN for ``preset`` ``name``.

    ``num_classes`` counts the background class (C categories -> C + 1).
    """
    spec = preset(name)
    backbone = build_backbone(name, norm, imagenet)
    rep = spec["representation_size"]
    kwargs = dict(spec["detector"], min_size=spec["min_size"], max_size=spec["max_size"])
    kwargs.update(overrides)
    box_head = TwoMLPHead(backbone.out_channels * 7 * 7, rep)
    box_predictor = FastRCNNPredictor(rep, num_classes)
    if masks:
        mask_predictor = MaskRCNNPredictor(256, 256, num_classes)
        return MaskRCNN(backbone, box_head=box_head, box_predictor=box_predictor, mask_predictor=mask_predictor, **kwargs)
    return FasterRCNN(backbone, box_head=box_head, box_predictor=box_predictor, **kwargs)


class Encoder(nn.Module):
    """What 2DRCL pre-trains: the detector's backbone + FPN and its RoI box head.

    Attribute names mirror torchvision's detectors, so ``encoder.state_dict()`` keys
    (``backbone.body.*``, ``backbone.fpn.*``, ``roi_heads.box_head.*``) are exactly the
    detector's and load with ``detector.load_state_dict(sd, strict=False)``.
    """

    def __init__(self, detector: FasterRCNN):
        super().__init__()
        self.backbone = detector.backbone
        self.roi_heads = nn.Module()
        self.roi_heads.box_head = detector.roi_heads.box_head
        self.box_roi_pool = detector.roi_heads.box_roi_pool  # MultiScaleRoIAlign, 7x7, no parameters
        self.last_channels = self.backbone.body.layer4[-1].conv1.in_channels
        self.representation_size = detector.roi_heads.box_head.fc7.out_features
        self.fpn_channels = self.backbone.out_channels

    def forward(self, images: torch.Tensor, boxes: list[torch.Tensor] | None = None, fpn: bool = True):
        """Normalised images (B, 3, H, W) -> dict with ``c5`` (B, C5 channels, pooled),
        ``fpn`` (OrderedDict of FPN levels; skipped with ``fpn=False``) and, when ``boxes``
        (per-image (K_i, 4) XYXY in pixels) is given, ``roi`` (sum K_i, representation_size)
        box-head embeddings."""
        stages = self.backbone.body(images)
        out = {"c5": stages[next(reversed(stages))].mean(dim=(2, 3))}
        if not (fpn or boxes is not None):
            return out
        out["fpn"] = fpn = self.backbone.fpn(stages)
        if boxes is not None:
            out["roi"] = self.roi_heads.box_head(pool_boxes(self.box_roi_pool, fpn, boxes, tuple(images.shape[-2:])))
        return out


def pool_boxes(pooler: MultiScaleRoIAlign, features: dict, boxes: list[torch.Tensor], image_size: tuple[int, int]):
    """``pooler(features, boxes, [image_size] * len(boxes))``, torchvision's MultiScaleRoIAlign
    of each image's (K_i, 4) XYXY boxes, with each box's FPN level found on the host.

    torchvision maps boxes to levels where they are and picks each level's boxes with
    ``torch.where``: for boxes on a GPU the host waits for it once per level, 8 times in a
    2DRCL step. Here the level arithmetic is torchvision's (``LevelMapper``: level
    ``floor(4 + log2(sqrt(area) / 224) + 1e-6)`` clamped to the pyramid; scales from the
    feature sizes) done on host boxes (the training loop keeps them there; boxes on a device
    are copied back once), and only the rois and each level's indices cross, queued."""
    feats = [features[k] for k in pooler.featmap_names]
    device = feats[0].device
    host = [b.detach().to("cpu", torch.float32) for b in boxes]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], dim=1) for i, b in enumerate(host)])
    scales = [2.0 ** float(torch.tensor(f.shape[-2] / image_size[0]).log2().round()) for f in feats]
    k_min, k_max = -math.log2(scales[0]), -math.log2(scales[-1])
    area = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
    levels = torch.floor(4 + torch.log2(torch.sqrt(area) / 224) + torch.tensor(1e-6, dtype=area.dtype))
    levels = (levels.clamp(min=k_min, max=k_max).to(torch.int64) - int(k_min)).to(torch.int64)
    rois_dev = to_device(rois, device)
    result = torch.zeros((len(rois), feats[0].shape[1], *pooler.output_size), dtype=feats[0].dtype, device=device)
    for level, (feature, scale) in enumerate(zip(feats, scales)):
        idx = torch.nonzero(levels == level).flatten() if len(feats) > 1 else torch.arange(len(rois))
        if len(idx) == 0:
            continue
        idx = to_device(idx, device)
        pooled = roi_align(feature, rois_dev[idx], output_size=pooler.output_size, spatial_scale=scale,
                           sampling_ratio=pooler.sampling_ratio)
        result[idx] = pooled.to(result.dtype)
    return result


def build_encoder(name: str, norm: str = "bn", imagenet: bool = False) -> Encoder:
    # num_classes is irrelevant: the predictor is not part of the encoder
    return Encoder(build_detector(name, num_classes=2, norm=norm, imagenet=imagenet))
