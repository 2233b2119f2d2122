import json
import math

from drcl.demo import run_demo

SMALL = {
    "data": {"classes": 5, "train_images": 16, "val_images": 6, "image_size": 64, "imbalance": 4.0},
    # 6 pre-training iterations are worth about 2 fine-tuning ones at these sizes: enough for a
    # wrong FLOPs ratio (e.g. half the pre-training's) to change the baseline's extra iterations
    "pretrain_iters": 6,
    "finetune_iters": 2,
    "overrides": ["train.batch_size=2", "train.threads=1", "train.log_every=1", "train.warmup_iters=1",
                  "model.hcl_queue=8", "model.lcl_queue=16", "eval.batch_size=3"],
}


def test_demo_writes_a_report_with_both_rows(tmp_path, first_steps, monkeypatch):
    spy = first_steps(monkeypatch)  # records the first step of the pre-training and of each fine-tuning
    report = run_demo(tmp_path / "demo", SMALL)
    text = report.read_text()
    assert "| random init, same compute |" in text and "| 2DRCL pre-training |" in text
    assert "| difference |" in text
    assert "| initialisation | AP | AP50 | AP75 | APs | APm | APl | APr | APc | APf |" in text
    assert "as fractions in [0, 1]" in text and "good reconstruction" in text
    assert "training health" in text and "box embeddings: mean cosine" in text
    for png in ("class_frequency", "sampling_share", "losses", "ap_per_group", "reconstructions", "ap_per_class",
                "detections", "convergence"):
        assert (tmp_path / "demo" / f"{png}.png").read_bytes()[:4] == b"\x89PNG", png
        assert f"({png}.png)" in text
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(results["2drcl"]) >= {"AP", "APr", "APc", "APf"}
    # the baseline fine-tuned longer: the pre-training's counted FLOPs in fine-tuning steps, from
    # counts of the first pre-training and 2DRCL fine-tuning steps made here, not the demo's numbers
    (pre,) = spy.first("DRCL")
    ft_2drcl, _ = spy.first("FasterRCNN")  # the 2DRCL run, then the baseline
    extra = math.ceil(SMALL["pretrain_iters"] * spy.flops(pre) / spy.flops(ft_2drcl))
    assert results["extra"] == extra > 1
    assert results["extra"] == math.ceil(SMALL["pretrain_iters"] * results["pretrain_flops_per_iter"]
                                         / results["finetune_flops_per_iter"])
    assert "| stage | iterations | minutes | s / iteration |" in text
    assert "Which comparison: 2DRCL from random init against random init given the same total compute" in text
    ft_iters = SMALL["finetune_iters"]
    assert f"| fine-tuning from random init (+ evaluation) | {ft_iters + results['extra']} |" in text
    rows = (tmp_path / "demo" / "finetune-random" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[-1])["iter"] == ft_iters + results["extra"]
