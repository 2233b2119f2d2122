import json
import os

import pytest
import torch

from drcl.cli import main
from drcl.engine.checkpoint import load_checkpoint
from drcl.model.detector import build_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def ft_args(small_data, tiny_args):
    return tiny_args + [
        f"data.val_json={small_data / 'annotations' / 'val.json'}",
        f"data.val_images={small_data / 'images' / 'val'}",
        "train.max_iters=4", "eval.batch_size=4",
    ]


def _run(cmd, args, *extra):
    return main([cmd, "--config", "configs/tiny_finetune.yaml", *extra] + sum((["--set", a] for a in args), []))


@pytest.fixture
def encoder_file(tmp_path):
    torch.manual_seed(0)
    enc = build_encoder("tiny", norm="gn")
    with torch.no_grad():
        enc.roi_heads.box_head.fc7.weight.fill_(0.01)
    path = tmp_path / "encoder.pt"
    torch.save(enc.state_dict(), path)
    return path


def test_finetune_from_2drcl_weights_then_evaluate(tmp_path, ft_args, encoder_file, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "ft"
    assert _run("finetune", ft_args, "--out", str(out), "--init", str(encoder_file)) == 0
    printed = capsys.readouterr().out
    assert "loaded 80 tensors: backbone.body (60), backbone.fpn (16), roi_heads.box_head (4)" in printed
    assert "new (random init): roi_heads.box_predictor (4), rpn.head (6)" in printed
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["iteration"] == 4 and state["meta"]["init"] == str(encoder_file)
    assert state["meta"]["category_ids"] == list(range(1, 9))
    # the encoder's weights are where fine-tuning started: the fixture's fc7 is 0.01 everywhere,
    # random init would be zero-mean; 4 small steps move it by far less than 0.01
    fc7 = state["model"]["roi_heads.box_head.fc7.weight"]
    assert abs(float(fc7.mean()) - 0.01) < 1e-3 and float(fc7.std()) < 2e-3
    metrics = json.loads((out / "eval" / "metrics.json").read_text())["bbox"]
    dets = json.loads((out / "eval" / "detections.json").read_text())
    assert dets and {"image_id", "category_id", "score", "bbox"} <= set(dets[0])
    assert (out / "eval" / "per_category_bbox.csv").exists()
    # the run's metrics are those of its detection file under the standalone evaluator
    from_file = tmp_path / "from_file.json"
    val_json = next(a.split("=", 1)[1] for a in ft_args if a.startswith("data.val_json="))
    assert main(["evaluate", "--gt", val_json, "--detections", str(out / "eval" / "detections.json"),
                 "--json", str(from_file)]) == 0
    reference = json.loads(from_file.read_text())
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"):
        assert metrics[key] == pytest.approx(reference[key], abs=1e-9), key

    # the same model scored again through `drcl evaluate --checkpoint`
    js = tmp_path / "again.json"
    assert _run("evaluate", ft_args, "--checkpoint", str(out / "checkpoints" / "last.pt"), "--json", str(js)) == 0
    assert json.loads(js.read_text())["bbox"]["AP"] == pytest.approx(metrics["AP"], abs=1e-9)


def test_init_with_other_norm_is_refused(tmp_path, ft_args, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "bn.pt"
    torch.save(build_encoder("tiny", norm="bn").state_dict(), path)
    assert _run("finetune", ft_args, "--out", str(tmp_path / "x"), "--init", str(path)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("drcl finetune: error: ") and "bn.pt" in err and "normalisation mismatch" in err


@pytest.mark.slow
def test_mask_rcnn_finetune_scores_bbox_and_segm(tmp_path, ft_args, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "mask"
    assert _run("finetune", ft_args + ["model.masks=true", "train.max_iters=2"], "--out", str(out)) == 0
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"bbox", "segm"}
    dets = json.loads((out / "eval" / "detections.json").read_text())
    assert "segmentation" in dets[0] and set(dets[0]["segmentation"]) == {"size", "counts"}


def test_evaluate_a_detection_file(lvis_files, tmp_path, capsys):
    gt, _ = lvis_files
    dets = [{"image_id": 1, "category_id": 1, "bbox": [4, 6, 20, 10], "score": 0.9},
            {"image_id": 2, "category_id": 2, "bbox": [0, 0, 80, 60], "score": 0.8}]
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    out = tmp_path / "m.json"
    assert main(["evaluate", "--gt", str(gt), "--detections", str(path), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    # by hand: category 1 found exactly (AP 1); category 2 one of its two boxes at the top score
    # (precision 1 up to recall 0.5: 51 of the 101 recall points); category 3 none (AP 0)
    expected = (1.0 + 51 / 101 + 0.0) / 3
    assert result["AP50"] == pytest.approx(expected, abs=1e-6) and result["AP"] == pytest.approx(expected, abs=1e-6)
    assert result["APc"] == pytest.approx(1.0) and result["APf"] == pytest.approx(51 / 101) and result["APr"] == 0.0
    assert (tmp_path / "m_per_category.csv").exists()
    path.write_text(json.dumps([{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}]))
    assert main(["evaluate", "--gt", str(gt), "--detections", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("drcl evaluate: error: ") and "detection #0" in err


def test_evaluate_needs_one_mode(capsys):
    assert main(["evaluate", "--gt", "a.json"]) == 2
    assert "--detections" in capsys.readouterr().err


@pytest.mark.parametrize("fmt,name,key", [
    ("torchvision", "w.pth", "backbone.body.conv1.weight"),
    ("mmdet", "w.pth", "state_dict"),
    ("detectron2", "w.pkl", "model"),
])
def test_export_command(tmp_path, encoder_file, fmt, name, key):
    import pickle

    out = tmp_path / name
    assert main(["export", str(encoder_file), "--format", fmt, "--out", str(out)]) == 0
    data = pickle.loads(out.read_bytes()) if fmt == "detectron2" else torch.load(out)
    assert key in data


def test_class_agnostic_detector_makes_proposals(tmp_path, ft_args, small_data, monkeypatch, capsys):
    """data.class_agnostic merges every category into one; the run's detections become proposals."""
    from drcl.data.annotations import load_annotations
    from drcl.data.boxes import load_proposals

    monkeypatch.chdir(ROOT)
    out = tmp_path / "agnostic"
    assert _run("finetune", ft_args + ["data.class_agnostic=true", "eval.score_threshold=0.0"], "--out", str(out)) == 0
    assert "boxes of" in capsys.readouterr().out
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["meta"]["category_ids"] == [1] and state["meta"]["class_agnostic"] is True
    assert state["model"]["roi_heads.box_predictor.cls_score.weight"].shape[0] == 2  # background + object
    metrics = json.loads((out / "eval" / "metrics.json").read_text())["bbox"]
    assert 0 <= metrics["AP"] <= 1  # scored against the val set with its categories merged too
    assert {d["category_id"] for d in json.loads((out / "eval" / "detections.json").read_text())} == {1}

    val_json, val_images = small_data / "annotations" / "val.json", small_data / "images" / "val"
    proposals = tmp_path / "p.json"
    assert main(["proposals", str(val_json), "--images", str(val_images), "--out", str(proposals), "--method", "detector",
                 "--checkpoint", str(out / "checkpoints" / "last.pt"), "--config", "configs/tiny_finetune.yaml",
                 "--set", "eval.score_threshold=0.0", "--set", "train.threads=1", "--per-image", "5"]) == 0
    records = json.loads(proposals.read_text())
    val = load_annotations(val_json, val_images)
    per_image = {}
    for r in records:
        per_image.setdefault(r["image_id"], []).append(r["score"])
    assert set(per_image) == {img["id"] for img in val.images}  # a random-init head still scores every anchor
    assert all(len(s) == 5 and s == sorted(s, reverse=True) for s in per_image.values())
    assert {r["category_id"] for r in records} == {1}
    assert sum(len(b) for b in load_proposals(proposals, val).values()) == len(records)

    # scoring the checkpoint again with training counts: "object" counts every training box
    import csv

    train_json = small_data / "annotations" / "train.json"
    csv_out = tmp_path / "again" / "m.json"
    assert main(["evaluate", "--checkpoint", str(out / "checkpoints" / "last.pt"), "--config",
                 "configs/tiny_finetune.yaml", "--json", str(csv_out), "--train-gt", str(train_json),
                 *sum((["--set", a] for a in ft_args), [])]) == 0
    with open(tmp_path / "again" / "per_category_bbox.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["train_instance_count"]) for r in rows] == [len(json.loads(train_json.read_text())["annotations"])]


class _Killed(Exception):
    """Stands for the process dying right after a checkpoint was written."""


@pytest.mark.parametrize("updates", [2, 3], ids=["checkpoint-mid-round", "checkpoint-at-round-end"])
def test_resume_after_a_kill_computes_what_the_uninterrupted_run_does(tmp_path, ft_args, monkeypatch, updates):
    """Rounds of 3 and of 2 iterations, killed after the checkpoint of iteration 2. The detector's
    RPN / RoI samplers draw from the global RNG, so anything else that draws from it between a
    checkpoint and the next step (making the loader's iterator did) breaks the resume."""
    import drcl.engine.trainer as trainer
    from drcl.config import load_config
    from drcl.finetune import finetune

    monkeypatch.chdir(ROOT)
    cfg = load_config("configs/tiny_finetune.yaml", ft_args + ["train.max_iters=6", f"sampler.updates={updates}"])
    finals = {}
    save = trainer.save_checkpoint

    def keep(obj, path):
        finals[path] = {k: v.clone() for k, v in obj["model"].items()}
        return save(obj, path)

    def keep_then_die(obj, path):
        keep(obj, path)
        raise _Killed

    monkeypatch.setattr(trainer, "save_checkpoint", keep)
    finetune(cfg, tmp_path / "whole", evaluate=False)
    monkeypatch.setattr(trainer, "save_checkpoint", keep_then_die)
    with pytest.raises(_Killed):
        finetune(cfg, tmp_path / "cut", evaluate=False)
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["iteration"] == 2
    monkeypatch.setattr(trainer, "save_checkpoint", keep)
    finetune(cfg, tmp_path / "cut", evaluate=False, resume=True)

    whole, cut = (finals[tmp_path / run / "checkpoints" / "last.pt"] for run in ("whole", "cut"))
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    losses = {run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("whole", "cut")}  # log_every 1: each row is one step's loss
    assert [r["iter"] for r in losses["cut"]] == list(range(1, 7))
    assert [r["loss"] for r in losses["cut"]] == [r["loss"] for r in losses["whole"]]
