"""Export of encoder weights to torchvision, detectron2 and mmdetection layouts (drcl.export).

detectron2 and mmdetection are not installable here, so their layouts are checked by an exact
round trip through the one key table and against key names / shapes of their R50-FPN and R18
models written out by hand from their model definitions (see docs/export.md).
"""

import json
import os
import pickle
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from drcl.errors import DataError
from drcl.export import (
    FORMATS,
    KEY_MAP,
    detect_norm,
    export_weights,
    import_weights,
    load_into_detector,
    save_export,
)
from drcl.model.detector import build_detector, build_encoder


def _encoder_sd(preset, norm):
    torch.manual_seed(0)
    encoder = build_encoder(preset, norm=norm)
    with torch.no_grad():  # distinct running statistics, so a swapped buffer would show
        for name, buf in encoder.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_()
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
            elif name.endswith("num_batches_tracked"):
                buf.fill_(7)
    return encoder, encoder.state_dict()


@pytest.fixture(scope="module")
def r50_bn():
    return _encoder_sd("r50-fpn", "bn")


@pytest.fixture(scope="module")
def tiny_gn():
    return _encoder_sd("tiny", "gn")


@pytest.fixture(scope="module")
def tiny_bn():
    return _encoder_sd("tiny", "bn")


def _weights(sd):
    return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}


def _assert_same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# --- the table -------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["r50_bn", "tiny_gn", "tiny_bn"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_is_exact(request, which, fmt):
    _, sd = request.getfixturevalue(which)
    exported = export_weights(sd, fmt)
    assert len(exported) == len(_weights(sd))
    assert not any(k.endswith("num_batches_tracked") for k in exported)
    _assert_same(import_weights(exported, fmt), _weights(sd))


def test_table_covers_the_encoder_and_the_fpn_max_pool_has_no_weights(r50_bn, tiny_gn):
    for encoder, sd in (r50_bn, tiny_gn):
        assert list(encoder.backbone.fpn.extra_blocks.parameters()) == []
        assert list(encoder.backbone.fpn.extra_blocks.buffers()) == []
        assert list(encoder.box_roi_pool.state_dict()) == []
        # torchvision's FPN convs carry a bias (Conv2dNormActivation without a norm), as
        # detectron2's (FPN.NORM "") and mmdet's (norm_cfg None) do
        assert "backbone.fpn.inner_blocks.3.0.bias" in sd and "backbone.fpn.layer_blocks.0.0.bias" in sd
    assert len(KEY_MAP) == 10 and all(len(row) == 3 for row in KEY_MAP)


def test_detectron2_r50_keys_and_shapes(r50_bn):
    d2 = export_weights(r50_bn[1], "detectron2")
    known = {
        "backbone.bottom_up.stem.conv1.weight": (64, 3, 7, 7),
        "backbone.bottom_up.stem.conv1.norm.running_mean": (64,),
        "backbone.bottom_up.res2.0.shortcut.weight": (256, 64, 1, 1),
        "backbone.bottom_up.res2.0.shortcut.norm.bias": (256,),
        "backbone.bottom_up.res2.0.conv1.weight": (64, 64, 1, 1),
        "backbone.bottom_up.res3.0.conv2.weight": (128, 128, 3, 3),  # stride in the 3x3: STRIDE_IN_1X1=False
        "backbone.bottom_up.res4.5.conv3.norm.weight": (1024,),
        "backbone.bottom_up.res5.0.shortcut.weight": (2048, 1024, 1, 1),
        "backbone.bottom_up.res5.2.conv3.norm.running_var": (2048,),
        "backbone.fpn_lateral2.weight": (256, 256, 1, 1),
        "backbone.fpn_lateral5.weight": (256, 2048, 1, 1),
        "backbone.fpn_lateral5.bias": (256,),
        "backbone.fpn_output2.weight": (256, 256, 3, 3),
        "backbone.fpn_output5.bias": (256,),
        "roi_heads.box_head.fc1.weight": (1024, 256 * 7 * 7),
        "roi_heads.box_head.fc2.bias": (1024,),
    }
    for key, shape in known.items():
        assert tuple(d2[key].shape) == shape, key
    assert "backbone.bottom_up.res2.1.shortcut.weight" not in d2
    stages = {k.split(".")[2] for k in d2 if k.startswith("backbone.bottom_up.")}
    assert stages == {"stem", "res2", "res3", "res4", "res5"}
    # R50: stem 5 + 16 bottlenecks x 3 convs x 5 + 4 shortcuts x 5; FPN 8 convs x 2; box head 4
    assert len(d2) == 5 + 16 * 15 + 4 * 5 + 16 + 4


def test_mmdet_r50_keys_and_shapes(r50_bn):
    mm = export_weights(r50_bn[1], "mmdet")
    known = {
        "backbone.conv1.weight": (64, 3, 7, 7),
        "backbone.bn1.running_var": (64,),
        "backbone.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "backbone.layer1.0.downsample.1.running_mean": (256,),
        "backbone.layer2.0.conv2.weight": (128, 128, 3, 3),  # style='pytorch'
        "backbone.layer4.2.bn3.running_var": (2048,),
        "neck.lateral_convs.0.conv.weight": (256, 256, 1, 1),
        "neck.lateral_convs.3.conv.weight": (256, 2048, 1, 1),
        "neck.lateral_convs.3.conv.bias": (256,),
        "neck.fpn_convs.0.conv.weight": (256, 256, 3, 3),
        "roi_head.bbox_head.shared_fcs.0.weight": (1024, 256 * 7 * 7),
        "roi_head.bbox_head.shared_fcs.1.weight": (1024, 1024),
        "roi_head.bbox_head.shared_fcs.1.bias": (1024,),
    }
    for key, shape in known.items():
        assert tuple(mm[key].shape) == shape, key
    assert not any(k.startswith("backbone.body.") for k in mm)


def test_resnet18_basic_blocks_and_group_norm_names(tiny_gn):
    sd = tiny_gn[1]
    d2 = export_weights(sd, "detectron2")
    assert tuple(d2["backbone.bottom_up.res2.0.conv2.weight"].shape) == (64, 64, 3, 3)
    assert "backbone.bottom_up.res2.0.shortcut.weight" not in d2  # 64 -> 64: no projection
    assert tuple(d2["backbone.bottom_up.res3.0.conv1.weight"].shape) == (128, 64, 3, 3)
    assert tuple(d2["backbone.bottom_up.res3.0.shortcut.weight"].shape) == (128, 64, 1, 1)
    assert not any(".conv3." in k for k in d2)  # BasicBlock: conv1, conv2 only
    assert set(k.rsplit(".", 1)[1] for k in d2 if ".norm." in k) == {"weight", "bias"}  # GroupNorm
    assert tuple(d2["backbone.fpn_lateral5.weight"].shape) == (128, 512, 1, 1)  # tiny preset: 128-wide FPN
    assert tuple(d2["roi_heads.box_head.fc1.weight"].shape) == (256, 128 * 7 * 7)
    mm = export_weights(sd, "mmdet")  # mmcv names GroupNorm layers gn1/gn2 (bn1/bn2 for BN)
    assert "backbone.gn1.weight" in mm and "backbone.layer3.1.gn2.bias" in mm
    assert "backbone.layer2.0.downsample.1.weight" in mm
    assert not any(".bn" in k for k in mm)
    assert detect_norm(sd) == "gn" and detect_norm(mm) == "gn" and detect_norm(d2) == "gn"


def test_bad_input_is_a_clear_error(tiny_bn):
    sd = dict(tiny_bn[1])
    with pytest.raises(ValueError, match="unknown export format"):
        export_weights(sd, "onnx")
    sd["rpn.head.conv.0.0.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="rpn.head.conv.0.0.weight"):
        export_weights(sd, "mmdet")
    with pytest.raises(ValueError, match="not an encoder"):
        export_weights({"roi_heads.box_head.fc6.weight": torch.zeros(1)}, "torchvision")


# --- loading into torchvision detectors --------------------------------------------------------

def test_r50_loads_into_stock_torchvision_faster_rcnn(r50_bn):
    sd = export_weights(r50_bn[1], "torchvision")
    # weights=None builds the stock model with BatchNorm2d (FrozenBatchNorm2d needs weights)
    stock = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=5)
    result = stock.load_state_dict(sd, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(
        k.startswith(("rpn.head.", "roi_heads.box_predictor.cls_score.", "roi_heads.box_predictor.bbox_pred."))
        for k in result.missing_keys)
    loaded = stock.state_dict()
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), k


@pytest.mark.parametrize("norm", ["gn", "bn", "frozen_bn"])
def test_tiny_loads_into_build_detector(norm, tiny_gn, tiny_bn):
    weights = tiny_gn[1] if norm == "gn" else tiny_bn[1]
    detector = build_detector("tiny", num_classes=4, norm=norm)
    result = load_into_detector(detector, weights)
    assert result.unexpected_keys == []
    assert all(k.startswith(("rpn.head.", "roi_heads.box_predictor.")) for k in result.missing_keys)
    loaded = detector.state_dict()
    for k, v in _weights(weights).items():
        assert torch.equal(loaded[k], v), k


def test_norm_mismatch_is_refused(tiny_gn, tiny_bn):
    gn, bn = tiny_gn[1], tiny_bn[1]
    frozen = build_detector("tiny", num_classes=2, norm="frozen_bn")
    # without the check, GroupNorm weights load "fine" into FrozenBatchNorm2d with strict=False
    # and leave running_mean / running_var at 0 / 1: a silently wrong model
    plain = frozen.load_state_dict(export_weights(gn, "torchvision"), strict=False)
    assert "backbone.body.bn1.running_mean" in plain.missing_keys and plain.unexpected_keys == []
    with pytest.raises(ValueError, match="normalisation mismatch"):
        load_into_detector(frozen, gn)
    with pytest.raises(ValueError, match="normalisation mismatch"):
        load_into_detector(build_detector("tiny", num_classes=2, norm="gn"), bn)
    for fmt, target in (("torchvision", "frozen_bn"), ("detectron2", "FrozenBN"), ("mmdet", "SyncBN")):
        with pytest.raises(ValueError, match="GroupNorm"):
            export_weights(gn, fmt, norm=target)
    with pytest.raises(ValueError, match="normalisation mismatch"):
        export_weights(bn, "detectron2", norm="GN")
    export_weights(gn, "detectron2", norm="GN")
    export_weights(bn, "mmdet", norm="BN")
    with pytest.raises(ValueError, match="unknown normalisation"):
        export_weights(bn, "mmdet", norm="LN")


def test_wrong_preset_is_refused(tiny_bn):
    with pytest.raises(ValueError, match="shape mismatch"):
        load_into_detector(build_detector("r50-fpn", num_classes=2, norm="frozen_bn"), tiny_bn[1])


# --- files ---------------------------------------------------------------------------------------

def test_save_export_containers(tmp_path, tiny_bn):
    sd = tiny_bn[1]
    expected = _weights(sd)

    path = save_export(sd, "torchvision", tmp_path / "tv.pth")
    _assert_same(torch.load(path, weights_only=True), expected)

    path = save_export(sd, "detectron2", tmp_path / "d2" / "model.pkl", meta={"preset": "tiny"})
    with open(path, "rb") as f:  # as detectron2's DetectionCheckpointer reads a .pkl
        data = pickle.load(f, encoding="latin1")
    assert "model" in data and "__author__" in data and not data["matching_heuristics"]
    assert all(isinstance(v, np.ndarray) for v in data["model"].values())
    assert data["drcl"]["preset"] == "tiny"
    _assert_same(import_weights(data, "detectron2"), expected)

    path = save_export(sd, "mmdet", tmp_path / "mm.pth", meta={"preset": "tiny"})
    data = torch.load(path, weights_only=True)  # as mmengine's load_checkpoint reads it
    assert set(data) == {"state_dict", "meta"} and data["meta"]["preset"] == "tiny"
    assert "neck.fpn_convs.0.conv.weight" in data["state_dict"]
    _assert_same(import_weights(data, "mmdet"), expected)

    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["mm.pth", "model.pkl", "tv.pth"]
    with pytest.raises(ValueError, match=r"\.pkl"):
        save_export(sd, "detectron2", tmp_path / "model.pth")


def test_save_export_is_atomic(tmp_path, tiny_bn, monkeypatch):
    path = tmp_path / "w.pth"
    path.write_bytes(b"previous")

    def broken(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_export(tiny_bn[1], "mmdet", path)
    assert path.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["w.pth"]


def test_exported_weights_are_readable_to_the_group(tmp_path, tiny_bn):
    old = os.umask(0o022)
    try:
        for fmt, name in (("torchvision", "tv.pth"), ("detectron2", "d2.pkl"), ("mmdet", "mm.pth")):
            path = save_export(tiny_bn[1], fmt, tmp_path / name)
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, fmt  # not mkstemp's 0600
    finally:
        os.umask(old)


def test_cli_detectron2_needs_a_pkl_name_and_says_so_in_one_line(tmp_path, tiny_bn, capsys):
    from drcl.cli import build_parser, main

    # checked before the checkpoint is read: the missing checkpoint is not what is reported
    assert main(["export", str(tmp_path / "missing.pt"), "--format", "detectron2", "--out",
                 str(tmp_path / "w.pth")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("drcl export: error: detectron2 weights need a file name ending "
                                                    "in .pkl")
    assert "'w.pth', e.g. 'w.pkl'" in err
    assert not (tmp_path / "w.pth").exists()

    helps = build_parser()._subparsers._group_actions[0].choices["export"].format_help()
    assert "must end in .pkl" in " ".join(helps.split())

    ckpt = tmp_path / "encoder.pt"
    torch.save(tiny_bn[1], ckpt)
    assert main(["export", str(ckpt), "--format", "detectron2", "--out", str(tmp_path / "w.pkl")]) == 0
    with open(tmp_path / "w.pkl", "rb") as f:
        _assert_same(import_weights(pickle.load(f), "detectron2"), _weights(tiny_bn[1]))


# --- the frameworks' own layouts, written down independently of KEY_MAP (tests/fixtures/README.md) ---

FIXTURES = Path(__file__).parent / "fixtures"
LAYOUTS = {  # fixture, and the part of it export writes: backbone, FPN and box head (docs/export.md)
    "detectron2": ("detectron2_faster_rcnn_R_50_FPN.json", ("backbone.", "roi_heads.box_head.")),
    "mmdet": ("mmdet_faster_rcnn_r50_fpn.json", ("backbone.", "neck.", "roi_head.bbox_head.shared_fcs.")),
}
NOT_PRETRAINED = ("proposal_generator.", "roi_heads.box_predictor.", "rpn_head.", "roi_head.bbox_head.fc_")


def _layout(fmt):
    data = json.loads((FIXTURES / LAYOUTS[fmt][0]).read_text())
    assert data["framework"] == fmt
    return {k: tuple(v) for k, v in data["parameters"].items()}


@pytest.mark.parametrize("fmt", ["detectron2", "mmdet"])
def test_export_writes_exactly_the_frameworks_r50_fpn_encoder(r50_bn, fmt):
    """Set-equal, with shapes, to the backbone / FPN / box-head part of the framework's own
    Faster R-CNN R50-FPN state dict; the rest of it is RPN, box predictor and BN step counters."""
    layout = _layout(fmt)
    expected = {k: s for k, s in layout.items()
                if k.startswith(LAYOUTS[fmt][1]) and not k.endswith(".num_batches_tracked")}
    exported = {k: tuple(v.shape) for k, v in export_weights(r50_bn[1], fmt).items()}
    assert sorted(set(expected) - set(exported)) == []  # every encoder tensor of the framework is written
    assert sorted(set(exported) - set(expected)) == []  # and nothing it does not have
    assert {k: s for k, s in exported.items() if s != expected[k]} == {}
    assert all(k.startswith(NOT_PRETRAINED) or k.endswith(".num_batches_tracked") for k in set(layout) - set(expected))


def _torchvision_to(fmt: str, key: str) -> str:
    """The framework's name of a torchvision detector tensor, from the frameworks' naming
    (not from drcl.export): ResNet stages layer1..4 are detectron2's res2..5; FPN input i is
    C(i+2); the box head's fc6 / fc7 are detectron2's fc1 / fc2 and mmdet's shared_fcs.0 / .1."""
    parts = key.split(".")
    p = parts[-1]
    if parts[:2] == ["backbone", "body"]:
        if parts[2] in ("conv1", "bn1"):  # the stem
            if fmt == "detectron2":
                return "backbone.bottom_up.stem.conv1." + ("norm." if parts[2] == "bn1" else "") + p
            return f"backbone.{parts[2]}.{p}"
        layer, block, module = int(parts[2][len("layer"):]), parts[3], parts[4]
        if fmt == "mmdet":  # same names as torchvision's ResNet below the stem
            return f"backbone.layer{layer}.{block}." + ".".join(parts[4:])
        prefix = f"backbone.bottom_up.res{layer + 1}.{block}."
        if module == "downsample":
            return prefix + ("shortcut." if parts[5] == "0" else "shortcut.norm.") + p
        if module.startswith("bn"):
            return prefix + f"conv{module[2:]}.norm.{p}"
        return prefix + f"{module}.{p}"
    if parts[:2] == ["backbone", "fpn"]:
        i, lateral = int(parts[3]), parts[2] == "inner_blocks"
        if fmt == "detectron2":
            return f"backbone.fpn_{'lateral' if lateral else 'output'}{i + 2}.{p}"
        return f"neck.{'lateral_convs' if lateral else 'fpn_convs'}.{i}.conv.{p}"
    fc = {"fc6": 0, "fc7": 1}[parts[2]]
    return f"roi_heads.box_head.fc{fc + 1}.{p}" if fmt == "detectron2" else f"roi_head.bbox_head.shared_fcs.{fc}.{p}"


@pytest.mark.parametrize("fmt", ["detectron2", "mmdet"])
def test_init_from_a_hand_written_framework_checkpoint(fmt, tmp_path):
    """``--init`` (drcl.weights.init_model) on a whole-detector checkpoint written here in the
    framework's container from the fixture's names and shapes, every tensor random: each
    backbone / FPN / box-head tensor of the torchvision detector ends up equal to the file's
    tensor of the same module, and the RPN and box predictor are reported as not used."""
    from drcl.weights import init_model

    layout = _layout(fmt)
    g = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(s, generator=g) if s else torch.tensor(100) for k, s in layout.items()}
    if fmt == "detectron2":
        path = tmp_path / "model_final.pkl"
        with open(path, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in weights.items()}, "__author__": "Detectron2 Model Zoo"}, f)
    else:
        path = tmp_path / "faster_rcnn_r50_fpn_1x_coco.pth"
        torch.save({"meta": {"mmdet_version": "3.3.0"}, "state_dict": weights}, path)
    detector = build_detector("r50-fpn", num_classes=81, norm="frozen_bn")
    with pytest.raises(DataError, match="model.init_style"):  # the file does not say its ResNet style
        init_model(detector, path, "r50-fpn", "frozen_bn")
    report = init_model(detector, path, "r50-fpn", "frozen_bn", style="pytorch")
    assert report["layout"] == fmt
    state = detector.state_dict()
    encoder = [k for k in state if k.startswith(("backbone.body.", "backbone.fpn.", "roi_heads.box_head."))]
    used = set()
    for k in encoder:
        source = _torchvision_to(fmt, k)
        assert torch.equal(state[k], torch.as_tensor(weights[source])), (k, source)
        used.add(source)
    assert set(report["loaded"]) == set(encoder)
    assert set(report["ignored"]) == {k for k in layout if k not in used and not k.endswith(".num_batches_tracked")}
    assert all(k.startswith(NOT_PRETRAINED) for k in report["ignored"])
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in report["new"]} == {"rpn.head", "roi_heads.box_predictor"}


def test_exports_of_gpu_weights_are_cpu_tensors(tiny_bn):
    """Weights from a GPU model (stood in by fake 'cuda' tensors) export as CPU tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        gpu = {k: v.to("cuda") for k, v in tiny_bn[1].items()}
        for fmt in FORMATS:
            assert {v.device.type for v in export_weights(gpu, fmt).values()} == {"cpu"}, fmt
