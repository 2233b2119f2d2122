"""``--init``: start 2DRCL's encoder (and a fine-tuned detector) from weights in every layout
drcl reads, on checkpoints generated here (tiny preset)."""

import functools
import json
import os
import pickle

import pytest
import torch

from drcl.cli import main
from drcl.config import drcl_config, load_config
from drcl.engine.checkpoint import load_checkpoint
from drcl.errors import DataError
from drcl.export import save_export
from drcl.model.detector import build_detector, build_encoder, build_resnet
from drcl.model.drcl import DRCL, ENCODER_PREFIX
from drcl.pretrain import start_from
from drcl.weights import read_init

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("backbone.body.", "backbone.fpn.", "roi_heads.box_head.")


def _source(seed=1, norm="gn"):
    """A tiny encoder whose every tensor differs from a seed-0 model's."""
    torch.manual_seed(seed)
    enc = build_encoder("tiny", norm=norm)
    with torch.no_grad():
        for name, t in enc.state_dict().items():
            if t.is_floating_point():
                t.add_(torch.rand_like(t) * 0.1)
    return enc.state_dict()


def _encoder_only(sd):
    return {k: v for k, v in sd.items() if k.startswith(PARTS) and not k.endswith("num_batches_tracked")}


def _classifier(path, preset="tiny", norm="gn", seed=2):
    torch.manual_seed(seed)
    sd = build_resnet(preset, norm=norm).state_dict()
    with torch.no_grad():
        for t in sd.values():
            if t.is_floating_point():
                t.add_(torch.rand_like(t) * 0.1)
    torch.save(sd, path)
    return {f"backbone.body.{k}": v for k, v in sd.items() if not k.startswith("fc.")
            and not k.endswith("num_batches_tracked")}


def _make(layout, tmp_path):
    """(path to give --init, expected encoder tensors under torchvision keys, expected parts,
    expected modules of the file left out)."""
    if layout == "torchvision-classification":
        path = tmp_path / "resnet18.pth"
        return path, _classifier(path), ("backbone.body.",), {"fc"}
    if layout == "drcl-pretrain":
        torch.manual_seed(3)
        model = DRCL(drcl_config(load_config("tiny")))
        model.online.encoder.load_state_dict(_source())
        run = tmp_path / "run"
        (run / "checkpoints").mkdir(parents=True)
        torch.save({"model": model.state_dict(), "iteration": 5}, run / "checkpoints" / "last.pt")
        return run, _encoder_only(_source()), PARTS, {"online.hcl_projector", "online.lcl_projector", "momentum.encoder.backbone.body",
                                                      "momentum.encoder.backbone.fpn", "momentum.encoder.roi_heads.box_head",
                                                      "momentum.hcl_projector", "momentum.lcl_projector", "decoder",
                                                      "hcl_queue", "lcl_queue"}
    if layout == "torchvision":  # a drcl finetune checkpoint: a whole torchvision detector
        torch.manual_seed(4)
        detector = build_detector("tiny", num_classes=6, norm="gn")
        detector.load_state_dict(_source(), strict=False)
        path = tmp_path / "ft.pt"
        torch.save({"model": detector.state_dict(), "meta": {"category_ids": [1, 2, 3, 4, 5]}}, path)
        return path, _encoder_only(_source()), PARTS, {"roi_heads.box_predictor", "rpn.head"}
    if layout == "detectron2":
        path = tmp_path / "d2.pkl"
        save_export(_source(), "detectron2", path)
        with open(path, "rb") as f:
            data = pickle.load(f)
        data["model"]["proposal_generator.rpn_head.conv.weight"] = torch.zeros(3, 3).numpy()
        data["model"]["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(6, 256).numpy()
        data["model"]["pixel_mean"] = torch.zeros(3, 1, 1).numpy()
        with open(path, "wb") as f:
            pickle.dump(data, f)
        return path, _encoder_only(_source()), PARTS, {"proposal_generator", "roi_heads.box_predictor", "pixel_mean"}
    if layout == "mmdet":
        path = tmp_path / "mmdet.pth"
        save_export(_source(), "mmdet", path)
        data = torch.load(path, weights_only=False)
        data["state_dict"]["rpn_head.rpn_conv.weight"] = torch.zeros(3, 3)
        data["state_dict"]["roi_head.bbox_head.fc_cls.weight"] = torch.zeros(6, 256)
        torch.save(data, path)
        return path, _encoder_only(_source()), PARTS, {"rpn_head", "roi_head.bbox_head"}
    raise AssertionError(layout)


@pytest.mark.parametrize("layout", ["torchvision-classification", "drcl-pretrain", "torchvision", "detectron2", "mmdet"])
def test_each_layout_loads_into_the_online_encoder(layout, tmp_path):
    path, expected, parts, ignored = _make(layout, tmp_path)
    cfg = load_config("tiny", [f"model.init={path}"])
    torch.manual_seed(0)
    model = DRCL(drcl_config(cfg))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = start_from(model, cfg, tmp_path / "out")
    assert report["layout"] == layout == read_init(report["source"]).layout

    state = model.state_dict()
    encoder_keys = [k for k in state if k.startswith(ENCODER_PREFIX) and not k.endswith("num_batches_tracked")]
    # every tensor of the parts the file holds now equals the file's, number for number
    for k in encoder_keys:
        name = k[len(ENCODER_PREFIX):]
        if name.startswith(parts):
            assert torch.equal(state[k], expected[name]), k
            assert not torch.equal(state[k], before[k]) or not state[k].is_floating_point(), k
        else:
            assert torch.equal(state[k], before[k]), k  # left at random init
    # the report: loaded = those tensors; new = the rest of the online side, the heads included
    loaded = {k for k in encoder_keys if k[len(ENCODER_PREFIX):].startswith(parts)}
    assert set(report["loaded"]) == loaded
    new = set(report["new"])
    assert not new & loaded and not any(k.startswith("momentum.") for k in new)
    assert {k for k in encoder_keys if k not in loaded} <= new
    assert any(k.startswith("online.hcl_projector.") for k in new) and any(k.startswith("decoder.") for k in new)
    assert not any("queue" in k for k in new)
    written = json.loads((tmp_path / "out" / "init.json").read_text())
    assert set(written["loaded"]) == loaded and written["layout"] == layout
    assert set(written["counts"]["ignored"]) == ignored
    # the key encoder starts as an exact copy of the initialised online encoder
    for k, v in model.online.state_dict().items():
        assert torch.equal(model.momentum.state_dict()[k], v), k


def test_finetune_accepts_an_imagenet_layout_classifier(tmp_path, small_data, tiny_args, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "resnet18.pth"
    expected = _classifier(path)
    out = tmp_path / "ft"
    args = tiny_args + ["train.max_iters=1"]
    assert main(["finetune", "--config", "configs/tiny_finetune.yaml", "--out", str(out), "--init", str(path),
                 "--no-eval"] + sum((["--set", a] for a in args), [])) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("init from"))
    assert "(torchvision-classification): loaded 60 tensors: backbone.body (60)" in line
    assert "backbone.fpn (16)" in line.split("new (random init):")[1] and "not used: fc (2)" in line
    report = json.loads((out / "init.json").read_text())
    assert report["counts"]["loaded"] == {"backbone.body": 60}
    # after one small step the backbone is still (nearly) the classifier's, not a random draw
    model = load_checkpoint(out / "checkpoints" / "last.pt")["model"]
    w = "backbone.body.layer4.1.conv2.weight"
    assert (model[w] - expected[w]).abs().max() < 1e-2 * expected[w].abs().max()


def _pretrain(args, out, init, *extra):
    return main(["pretrain", "--config", "configs/tiny.yaml", "--out", str(out), "--init", str(init), *extra]
                + sum((["--set", a] for a in args), []))


@pytest.mark.parametrize("case", ["norm", "preset", "shape"])
def test_mismatch_is_a_one_line_error_naming_file_and_tensor(case, tmp_path, tiny_args, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    if case == "norm":  # BatchNorm ImageNet-style weights into the tiny config's GroupNorm
        path = tmp_path / "bn.pth"
        _classifier(path, norm="bn")
        tensor = "backbone.body.bn1.running_mean"
    elif case == "preset":  # ResNet-50 weights into the tiny preset's ResNet-18
        path = tmp_path / "r50.pth"
        _classifier(path, preset="r50-fpn")
        tensor = "backbone.body.layer1.0.conv1.weight"
    else:  # a box head of another width
        sd = _source()
        sd["roi_heads.box_head.fc6.weight"] = torch.zeros(128, 128 * 7 * 7)
        path = tmp_path / "encoder.pt"
        torch.save(sd, path)
        tensor = "roi_heads.box_head.fc6.weight"
    assert _pretrain(tiny_args, tmp_path / "run", path) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar of the image check
    assert err.startswith("drcl pretrain: error: ")
    assert str(path) in err and tensor in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_deeper_backbone_with_fitting_shapes_is_refused(tmp_path):
    # ResNet-50 weights fit every shape of ResNet-101 but lack its extra blocks
    path = tmp_path / "r50.pth"
    _classifier(path, preset="r50-fpn")
    encoder = build_encoder("r101-fpn", norm="gn")
    from drcl.weights import init_model

    with pytest.raises(DataError, match=r"r50\.pth: .*first mismatching tensor backbone\.body\.layer3\.6\."):
        init_model(encoder, path, "r101-fpn", "gn")


def test_resume_does_not_apply_init_again(tmp_path, tiny_args, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "resnet18.pth"
    expected = _classifier(path)
    run = tmp_path / "run"
    args = tiny_args + ["train.max_iters=2", "train.checkpoint_every=1", "train.health_every=0"]
    assert _pretrain(args, run, path) == 0
    report = (run / "init.json").read_text()
    state = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    # the run started from the file and trained away from it
    w = "backbone.body.conv1.weight"
    assert not torch.equal(state[ENCODER_PREFIX + w], expected[w])
    # the file is now weights that cannot load at all: resuming must not read it
    _classifier(path, preset="r50-fpn")
    capsys.readouterr()
    assert _pretrain(args, run, path, "--resume") == 0, capsys.readouterr().err
    assert "init from" not in capsys.readouterr().out
    assert (run / "init.json").read_text() == report
    encoder = torch.load(run / "encoder.pt")
    for k, v in encoder.items():
        assert torch.equal(v, state[ENCODER_PREFIX + k]), k  # the checkpoint's weights, untouched


@functools.lru_cache(maxsize=1)
def _source_once():
    return _source()


def _foreign(layout, tmp_path, hint=None):
    """A detectron2 / mmdet detector file as those frameworks write it (not drcl's export tag),
    with ``hint``: detectron2 ``pixel_mean`` values or an mmdet config text in ``meta``."""
    path = tmp_path / ("d2.pkl" if layout == "detectron2" else "mmdet.pth")
    save_export(_source_once(), layout, path)
    if layout == "detectron2":
        with open(path, "rb") as f:
            data = pickle.load(f)
        data = {"model": data["model"], "__author__": "Detectron2 Model Zoo"}
        if hint is not None:
            data["model"]["pixel_mean"] = torch.tensor(hint).reshape(3, 1, 1).numpy()
        with open(path, "wb") as f:
            pickle.dump(data, f)
    else:
        data = torch.load(path, weights_only=False)
        data["meta"] = {"mmdet_version": "3.3.0", **({"cfg": hint} if hint is not None else {})}
        torch.save(data, path)
    return path


@pytest.mark.parametrize("layout, hint, found", [
    ("detectron2", None, None), ("detectron2", [103.53, 116.28, 123.675], "caffe"),
    ("detectron2", [123.675, 116.28, 103.53], "pytorch"),
    ("mmdet", None, None), ("mmdet", "model = dict(backbone=dict(type='ResNet', depth=18, style='caffe'))", "caffe"),
    ("mmdet", "model = dict(backbone=dict(type='ResNet', depth=18, style = \"pytorch\"))", "pytorch"),
])
def test_a_detector_files_resnet_style_is_read_from_the_file_or_asked_for(layout, hint, found, tmp_path):
    """detectron2 / mmdet caffe-style ResNets have torchvision's keys and shapes but the stride in
    the 1x1 conv and BGR 0-255 input: refused; a file that does not say needs
    model.init_style: pytorch; one that says pytorch loads."""
    path = _foreign(layout, tmp_path, hint)
    if found == "caffe":
        for style in ("auto", "pytorch"):  # the file's word stands
            with pytest.raises(DataError, match=r"a caffe-style ResNet \(.*stride in the 1x1 conv, BGR 0-255") as e:
                read_init(path, style)
            assert str(path) in str(e.value) and "\n" not in str(e.value)
        return
    if found is None:
        with pytest.raises(DataError, match=r"does not say whether its ResNet is pytorch style .* set "
                                            r"model.init_style: pytorch \(--set model.init_style=pytorch\)") as e:
            read_init(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    weights = read_init(path, "pytorch" if found is None else "auto")
    assert weights.layout == layout and set(weights.state) == set(_encoder_only(_source_once()))


def test_init_style_from_the_config_reaches_the_loader(tmp_path):
    path = _foreign("detectron2", tmp_path)
    for style, ok in (("auto", False), ("pytorch", True)):
        cfg = load_config("tiny", [f"model.init={path}", f"model.init_style={style}", "model.hcl_queue=16",
                                   "model.lcl_queue=32"])
        model = DRCL(drcl_config(cfg))
        if ok:
            assert start_from(model, cfg, tmp_path / "out", report=False)["layout"] == "detectron2"
        else:
            with pytest.raises(DataError, match="model.init_style"):
                start_from(model, cfg, tmp_path / "out", report=False)


def test_missing_imagenet_file_says_how_to_get_it(tmp_path, monkeypatch):
    from drcl.weights import resolve_init

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(DataError) as e:
        resolve_init("imagenet", "r50-fpn")
    text = str(e.value)
    path = tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    assert "\n" not in text and text.startswith("model.init imagenet (--init imagenet): no ImageNet weights at")
    assert f"curl -L --create-dirs -o {path} https://download.pytorch.org/models/resnet50-0676ba61.pth" in text
    assert "TORCH_HOME" in text
