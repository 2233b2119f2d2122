"""``benchmarks/gpu.py --smoke``: every part of the prepared GPU run, at toy sizes on the CPU, so
the one command a GPU gets is known to work before it meets one (issue 12)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"bf16+channels_last", "bf16"}


@pytest.mark.slow
def test_gpu_run_smoke(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--out", str(out),
                           "--work", str(tmp_path / "work")],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "gpu.json").read_text())
    parts = results["parts"]
    assert sorted(parts) == ["1", "2", "3", "4"]
    for k, part in parts.items():
        assert "error" not in part, (k, part.get("error"), part.get("traceback"))
    assert results["meta"]["device"] == "cpu" and results["meta"]["bf16_peak_flops"] is None

    # 1: every configuration measured; the full step costs more FLOPs than the HCL-only one
    rows = parts["1"]["rows"]
    assert {(r["model"], r["setting"]) for r in rows} == (
        {("2DRCL", s) for s in SETTINGS} | {("HCL only", s) for s in SETTINGS}
        | {("2DRCL", s) for s in ("fp32", "bf16+channels_last, batch from host", "bf16+channels_last, fused SGD",
                                  "bf16+channels_last, batch from host, photometric on the device",
                                  "bf16+channels_last, twice the batch", "bf16+channels_last, health probe every step")})
    for r in rows:
        assert "error" not in r and "skipped" not in r, r
        assert r["images_per_s"] > 0 and r["steps"] >= 1 and r["s_per_step"] > 0
        assert r["mfu"] is None and r["peak_gib"] is None  # no known peak, no CUDA memory on a CPU
    by_setting = {(r["model"], r["setting"]): r for r in rows}
    base = by_setting[("2DRCL", "bf16+channels_last")]
    assert base["flops_per_step"] > by_setting[("HCL only", "bf16+channels_last")]["flops_per_step"] > 0
    doubled = by_setting[("2DRCL", "bf16+channels_last, twice the batch")]
    assert doubled["batch"] == 2 * base["batch"] and doubled["flops_per_step"] > 1.5 * base["flops_per_step"]
    assert by_setting[("2DRCL", "bf16+channels_last, batch from host, photometric on the device")][
        "photometric_on_device"]
    assert parts["1"]["2drcl_over_hcl_flops"] > 1
    assert set(parts["1"]["2drcl_over_hcl_time"]) >= SETTINGS
    assert set(parts["1"]["health_probe"]["overhead_at"]) == {"25", "250"}  # JSON keys

    # 2: Mask R-CNN steps at both batch sizes
    rows = parts["2"]["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["images_per_s"] > 0 and r["steps"] >= 1 for r in rows), rows

    # 3: the loader per worker count on both photometric paths, where the time goes, the step fed by
    # the device path's loader against the same step on a host batch, and the workers that rate needs
    p3 = parts["3"]
    assert [(r["path"], r["workers"]) for r in p3["rows"]] == [("device", 0), ("loader", 0), ("device", 1),
                                                                ("loader", 1)]
    assert all(r["images_per_s"] > 0 and r["images_per_s_per_worker"] > 0 for r in p3["rows"]), p3["rows"]
    st = p3["stages"]
    assert st["seconds"]["decode"] > 0 and 0 < st["expected_s_per_image_device_path"] < st["expected_s_per_image"]
    assert [r["workers"] for r in p3["fed"]] == [1]
    assert all(r["images_per_s"] > 0 and r["of_synthetic"] > 0 for r in p3["fed"]), p3["fed"]
    assert p3["synthetic_images_per_s"] > 0
    assert set(p3["workers_needed"]) == {"loader", "device"}
    assert all(n["workers"] >= 1 for n in p3["workers_needed"].values())

    # 4: pre-training sized from its warm-up, then probe and fine-tune from it and from random init
    p4 = parts["4"]
    pre = p4["pretrain"]
    assert pre["iterations"] == p4["estimate"]["planned_iters"] >= 2 and pre["epochs"] > 0
    assert pre["images_per_s"] > 0 and pre["health"]["loss"] is not None
    for init in ("random", "pretrained"):
        assert 0.0 <= p4[f"probe_{init}"]["acc"] <= 1.0 and p4[f"probe_{init}"]["val_boxes"] > 0
        ft = p4[f"finetune_{init}"]
        assert ft["iterations"] == p4["finetune_iters"] and math.isfinite(ft["final_loss"])
        if p4["ap_measured"]:
            assert ft["ap"]["AP"] is not None
    assert p4["ap_measured"] or "not measured" in p4["ap_note"]
    # the probe at each snapshot of the run (half-way in the smoke run), before the result's
    assert [r["iteration"] for r in p4["probe_by_epoch"]] == [pre["iterations"] // 2]
    assert 0.0 <= p4["probe_by_epoch"][0]["acc"] <= 1.0
    assert "device" in (out / "part4" / "pretrain" / "config.yaml").read_text()  # photometric on the device
    assert (out / "part4" / "pretrain" / "metrics.jsonl").exists()
    assert not (out / "part4" / "pretrain" / "checkpoints").exists()  # bulky files stay in --work

    md = (out / "gpu.md").read_text()
    for heading in ("## 1. Pre-training step", "## 2. Fine-tuning step", "## 3. Pre-training input pipeline",
                    "## 4. Long run"):
        assert heading in md
    assert "| 2DRCL | bf16+channels_last |" in md and "| 2DRCL | fp32 |" in md and "Box probe against" in md
    assert "| pretrained |" in md and "| random |" in md
