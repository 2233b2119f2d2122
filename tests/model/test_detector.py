import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from drcl.model.detector import PRESETS, build_detector, build_encoder, imagenet_weights_file


@pytest.mark.parametrize("norm,cls", [("bn", nn.BatchNorm2d), ("gn", nn.GroupNorm), ("frozen_bn", FrozenBatchNorm2d)])
def test_norm_choice(norm, cls):
    enc = build_encoder("tiny", norm=norm)
    assert isinstance(enc.backbone.body.bn1, cls)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert "backbone.body.conv1.weight" in trainable  # all stages trainable for pre-training


def test_tiny_preset_is_slim_and_trains_as_a_detector():
    det = build_detector("tiny", num_classes=4, norm="gn")
    assert det.roi_heads.box_head.fc7.out_features == 256
    assert det.rpn._post_nms_top_n["training"] == PRESETS["tiny"]["detector"]["rpn_post_nms_top_n_train"]
    det.train()
    images = [torch.rand(3, 96, 96)]
    targets = [{"boxes": torch.tensor([[10.0, 10, 50, 60]]), "labels": torch.tensor([2])}]
    losses = det(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()


def test_encoder_keys_load_into_the_detector_without_renaming():
    enc = build_encoder("tiny", norm="bn")
    with torch.no_grad():
        enc.roi_heads.box_head.fc6.weight.fill_(0.5)
    det = build_detector("tiny", num_classes=7, norm="bn")
    missing, unexpected = det.load_state_dict(enc.state_dict(), strict=False)
    assert unexpected == []
    assert all(k.startswith(("rpn.", "roi_heads.box_predictor.")) for k in missing)
    assert (det.roi_heads.box_head.fc6.weight == 0.5).all()


def test_encoder_outputs():
    enc = build_encoder("tiny", norm="gn")
    out = enc(torch.rand(2, 3, 64, 64), [torch.tensor([[0.0, 0, 32, 32]]), torch.tensor([[8.0, 8, 40, 60], [0, 0, 64, 64]])])
    assert out["c5"].shape == (2, 512)
    assert out["fpn"]["0"].shape == (2, 128, 16, 16)  # tiny preset: 128-wide FPN
    assert out["roi"].shape == (3, 256)


def test_imagenet_weights_must_be_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ImageNet weights for resnet18 not found at .*resnet18-f37072fd.pth"):
        build_encoder("tiny", imagenet=True)
    assert imagenet_weights_file("resnet18").parent == tmp_path / "hub" / "checkpoints"


def test_imagenet_weights_load_from_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    from torchvision.models import resnet18

    reference = resnet18()
    with torch.no_grad():
        reference.conv1.weight.fill_(0.25)
    path = imagenet_weights_file("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    enc = build_encoder("tiny", norm="frozen_bn", imagenet=True)
    assert (enc.backbone.body.conv1.weight == 0.25).all()


def test_unknown_preset_and_norm():
    with pytest.raises(ValueError, match="unknown preset 'r18'"):
        build_encoder("r18")
    with pytest.raises(ValueError, match="norm must be"):
        build_encoder("tiny", norm="ln")


def test_mask_rcnn_variant_trains():
    det = build_detector("tiny", num_classes=3, norm="gn", masks=True)
    masks = torch.zeros(1, 96, 96, dtype=torch.uint8)
    masks[0, 10:60, 10:50] = 1
    targets = [{"boxes": torch.tensor([[10.0, 10, 50, 60]]), "labels": torch.tensor([1]), "masks": masks}]
    losses = det([torch.rand(3, 96, 96)], targets)
    assert "loss_mask" in losses
    sum(losses.values()).backward()


def test_boxes_pooled_with_host_levels_equal_torchvision_multiscale_roi_align():
    from drcl.model.detector import pool_boxes

    enc = build_encoder("tiny", norm="gn")
    g = torch.Generator().manual_seed(0)
    h, w = 512, 512
    images = torch.rand(3, 3, h, w, generator=g)
    with torch.no_grad():
        fpn = enc.backbone.fpn(enc.backbone.body(images))
    boxes = []
    sides = torch.tensor([4.0, 30, 111, 130, 160, 240, 300, 500])  # levels 2, 2, 2, 3, 3, 4, 4, 5 (224 px: 4)
    for picked in (sides, sides[:0], sides[[1, 4, 7]]):  # an image without boxes too
        wh = picked[:, None] * torch.tensor([[1.0, 0.9]])
        xy = torch.rand(len(picked), 2, generator=g) * (torch.tensor([w, h]) - wh).clamp(min=0)
        boxes.append(torch.cat([xy, xy + wh], 1))
    reference = enc.box_roi_pool(fpn, boxes, [(h, w)] * 3)
    pooled = pool_boxes(enc.box_roi_pool, fpn, boxes, (h, w))
    assert torch.equal(pooled, reference)
    # the boxes spread over more than one level, so the level split was exercised
    from torchvision.ops.poolers import LevelMapper

    levels = LevelMapper(2, 5)(boxes)
    assert set(levels.tolist()) == {0, 1, 2, 3}
