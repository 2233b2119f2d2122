import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from drcl.cli import main
from drcl.engine.checkpoint import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(args, out, extra=()):
    cmd = [sys.executable, "-m", "drcl", "pretrain", "--config", "configs/tiny.yaml", "--out", str(out)]
    for a in list(args) + list(extra):
        cmd += ["--set", a]
    return cmd


def _weights(run):
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


@pytest.mark.slow
@pytest.mark.parametrize("photometric", ["loader", "device"])
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path, tiny_args, photometric):
    # on the device path the workers draw each view's photometric parameters from the sample's seed
    tiny_args = tiny_args + [f"data.photometric={photometric}"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cli(tiny_args, full), cwd=ROOT, check=True, capture_output=True)

    proc = subprocess.Popen(_cli(tiny_args, killed), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    stopped_at = load_checkpoint(ckpt)["iteration"]
    assert stopped_at < 6

    done = subprocess.run(_cli(tiny_args, killed) + ["--resume"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"resuming at iteration {stopped_at}" in done.stdout
    a, b = _weights(full), _weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=0), k
    # the metrics log has each iteration once, as the uninterrupted run's
    iters = [json.loads(line)["iter"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert iters == list(range(1, 7))
    rows_full = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    rows_killed = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows_killed] == pytest.approx([r["loss"] for r in rows_full], abs=1e-5)


def test_nan_loss_stops_with_iteration_and_term(tmp_path, tiny_args, monkeypatch, capsys):
    from drcl.model.drcl import DRCL

    forward = DRCL.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        out = forward(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            out["ar"] = out["ar"] * float("nan")
        return out

    monkeypatch.setattr(DRCL, "forward", poisoned)
    out = tmp_path / "nan"
    args = ["pretrain", "--config", "configs/tiny.yaml", "--out", str(out)] + sum((["--set", a] for a in tiny_args), [])
    monkeypatch.chdir(ROOT)
    assert main(args) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the closed progress bars
    assert err.startswith("drcl pretrain: error: iteration 3: loss term 'ar' is nan")
    assert "last good checkpoint" in err
    assert load_checkpoint(out / "checkpoints" / "last.pt")["iteration"] == 2


def test_existing_run_needs_resume(tmp_path, tiny_args, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    base = ["pretrain", "--config", "configs/tiny.yaml", "--out", str(out)]
    sets = sum((["--set", a] for a in tiny_args + ["train.max_iters=2"]), [])
    assert main(base + ["--resume"] + sets) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert main(base + sets) == 0
    assert main(base + sets) == 2
    assert "pass --resume" in capsys.readouterr().err



def test_encoder_file_is_the_trained_online_encoder(tmp_path, tiny_args, monkeypatch, capsys):
    from drcl.config import drcl_config, load_config
    from drcl.model.drcl import DRCL

    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    # BatchNorm, so that encoder.pt's statistics are re-estimated: on 4 images = 2 loader batches of 2
    args = tiny_args + ["train.health_every=2", "model.norm=bn", "train.precise_bn_images=4", "train.snapshot_every=3"]
    assert main(["pretrain", "--config", "configs/tiny.yaml", "--out", str(out)] + sum((["--set", a] for a in args), [])) == 0
    assert {v.device.type for v in torch.load(out / "encoder.pt", weights_only=True).values()} == {"cpu"}
    encoder = torch.load(out / "encoder.pt")
    model = _weights(out)
    # snapshots: the checkpoint as it was at iterations 3 and 6
    snaps = sorted(p.name for p in (out / "checkpoints").glob("iter_*.pt"))
    assert snaps == ["iter_0000003.pt", "iter_0000006.pt"]
    third = load_checkpoint(out / "checkpoints" / "iter_0000003.pt")
    assert third["iteration"] == 3 and load_checkpoint(out / "checkpoints" / "iter_0000006.pt")["iteration"] == 6
    name = "online.encoder.backbone.body.conv1.weight"
    assert not torch.equal(third["model"][name], model[name])
    torch.manual_seed(load_config("configs/tiny.yaml", args)["seed"])
    init = DRCL(drcl_config(load_config("configs/tiny.yaml", args))).state_dict()
    assert set(encoder) == {k[len("online.encoder."):] for k in model if k.startswith("online.encoder.")}
    for name in ("backbone.body.conv1.weight", "backbone.fpn.layer_blocks.0.0.weight", "roi_heads.box_head.fc6.weight",
                 "backbone.body.bn1.weight"):
        assert torch.equal(encoder[name], model[f"online.encoder.{name}"]), name  # the online encoder
        assert not torch.equal(encoder[name], init[f"online.encoder.{name}"]), name  # it moved in 6 steps
        assert not torch.equal(encoder[name], model[f"momentum.encoder.{name}"]), name  # not the key encoder
    # its BatchNorm statistics are new (PreciseBN over 2 clean loader batches; tests/engine/test_precise_bn.py
    # checks their values), the checkpoint keeps the training ones
    assert int(encoder["backbone.body.bn1.num_batches_tracked"]) == 2
    assert not torch.allclose(encoder["backbone.body.bn1.running_var"], model["online.encoder.backbone.body.bn1.running_var"])
    # training health: per-term signals in the log, the summary printed and saved
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("hcl_chance", "hcl_gap", "hcl_batch_gap", "lcl_gap", "grad_norm", "clipped", "box_cos", "box_erank",
                "hcl_grad_share", "sr_grad_share"):
        assert all(key in r and math.isfinite(r[key]) for r in rows[1:]), key
    # chance: log of 2 batch keys + a full queue of 16, less older keys of the query's own image
    assert rows[-1]["hcl_chance"] == pytest.approx(math.log(18), abs=0.3)
    health = json.loads((out / "health.json").read_text())
    assert health["reference"]["box_cos"] != health["window"]["box_cos"]  # measured again after the start
    printed = capsys.readouterr().out
    assert "training health" in printed and "(BatchNorm statistics from the clean views of 4 images)" in printed
    assert "HCL queue 16 keys = 4 steps at 4 a step (key age / momentum horizon 0.04)" in printed


# rank 1 alone sees a NaN in its 4th step; run as a script in place of `python -m drcl`
POISONED_RANK = """
import os, sys
from drcl.cli import main
from drcl.model.drcl import DRCL
forward, calls = DRCL.forward, [0]
def poisoned(self, *a, **k):
    out = forward(self, *a, **k)
    calls[0] += 1
    if calls[0] == 4 and os.environ["RANK"] == "1":
        out["lcl"] = out["lcl"] * float("nan")
    return out
DRCL.forward = poisoned
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_stop_together_on_one_ranks_nan_and_torchrun_resumes_exactly(tmp_path, tiny_args):
    """Two CPU processes (gloo). A NaN on rank 1 alone stops both, promptly, with exit code 3
    (the processes are started by hand: torchrun's agent would kill the survivor and hide its
    code). Then ``torchrun --nproc_per_node 2 ... --resume`` continues from the checkpoint of
    iteration 2 and computes iteration 3 exactly as the first run did; the ranks' batches never
    overlap; the per-term gradient measurement (health_every=1) keeps the ranks in step."""
    out = tmp_path / "ddp"
    args = ["pretrain", "--config", "configs/tiny.yaml", "--out", str(out)]
    # random sampling: each image at most once per round, so the ranks' batches must not overlap
    for a in tiny_args + ["train.max_iters=4", "train.checkpoint_every=2", "train.log_image_ids=true",
                          "sampler.mode=random", "train.health_every=1"]:
        args += ["--set", a]
    script = tmp_path / "poisoned_rank.py"
    script.write_text(POISONED_RANK)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        errs = [p.communicate(timeout=240)[1] for p in procs]  # a rank left waiting would hang here
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [3, 3], errs
    last = [e.strip().splitlines()[-1] for e in errs]
    assert "iteration 4: loss term 'lcl' is not finite on rank 1; every process stopped" in last[0], last[0]
    assert "iteration 4: loss term 'lcl' is nan on this process (rank 1); every process stopped" in last[1], last[1]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["iteration"] == 2
    first = {r["iter"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert sorted(first) == [1, 2, 3]

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "drcl", *args,
           "--resume"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming at iteration 2" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [1, 2, 3, 4]  # rank 0 alone writes the log, each iteration once
    for r in rows:
        rank0, rank1 = r["image_ids"]
        assert len(rank0) == len(rank1) == 2 and not set(rank0) & set(rank1)
    again = rows[2]
    for key, value in first[3].items():  # iteration 3 again, from the checkpoint: the same batch and numbers
        if key != "images_per_s":
            assert again[key] == (value if isinstance(value, list) else pytest.approx(value, abs=1e-5)), key
    assert load_checkpoint(out / "checkpoints" / "last.pt")["iteration"] == 4


def test_pretrain_on_an_image_folder_with_proposals(tmp_path, tiny_args, small_data, monkeypatch, capsys):
    """No annotation file: the folder's images, boxes from `drcl proposals` on the same folder."""
    import shutil

    monkeypatch.chdir(ROOT)
    folder = tmp_path / "photos"
    shutil.copytree(small_data / "images" / "train", folder)
    proposals = tmp_path / "p.json"
    assert main(["proposals", str(folder), "--out", str(proposals)]) == 0
    args = [a for a in tiny_args if not a.startswith(("data.train_json=", "data.train_images="))]
    args += ["data.train_json=", f"data.train_images={folder}", "data.boxes=proposals", f"data.proposals={proposals}",
             "train.max_iters=3", "train.checkpoint_every=3"]
    capsys.readouterr()
    out = tmp_path / "run"
    assert main(["pretrain", "--config", "configs/tiny.yaml", "--out", str(out)] + sum((["--set", a] for a in args), [])) == 0
    printed = capsys.readouterr().out
    assert "has no labelled boxes: repeat factors (sampler.mode dynamic) need categories, so images are drawn " \
           "uniformly (random)" in printed
    assert "LCL has no supervised positives" in printed
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["iteration"] == 3 and (out / "encoder.pt").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["lcl"]) and r["lcl"] > 0 for r in rows)  # LCL ran on the proposals


def test_image_folder_needs_a_box_source(tmp_path, tiny_args, small_data, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    args = [a for a in tiny_args if not a.startswith("data.train_json=")]
    assert main(["pretrain", "--config", "configs/tiny.yaml", "--out", str(tmp_path / "r"), "--set", "data.train_json=",
                 *sum((["--set", a] for a in args), [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "data.boxes is 'gt' but data.train_json is not set" in err


def test_encoder_file_holds_cpu_tensors_when_trained_on_a_gpu(tmp_path, monkeypatch):
    """encoder.pt must load with a plain torch.load on a machine without the GPU. On the CPU a
    GPU model is stood in by fake tensors on 'cuda' (FakeTensorMode); torch.save is caught."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from drcl.config import drcl_config, load_config
    from drcl.model.drcl import DRCL
    from drcl.pretrain import write_encoder

    model = DRCL(drcl_config(load_config("tiny", ["model.hcl_queue=16", "model.lcl_queue=32"])))
    saved = {}
    monkeypatch.setattr(torch, "save", lambda obj, f, **kw: saved.update(obj))
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to("cuda")
        assert next(model.parameters()).device.type == "cuda"
        write_encoder(model, tmp_path / "encoder.pt")
    assert len(saved) == 80 and {v.device.type for v in saved.values()} == {"cpu"}


def test_the_start_line_gives_each_queues_key_age_against_the_momentum_horizon():
    from drcl.config import load_config
    from drcl.pretrain import queue_line

    assert queue_line(load_config("lvis_r50"), 8) == (
        "HCL queue 8,192 keys = 64 steps at 128 a step (key age / momentum horizon 0.26); LCL queue 65,536 box keys "
        "= 64 steps at 1,024 a step at 8 boxes per image (key age / momentum horizon 0.26); the momentum encoder "
        "averages over ~250 steps at the start (train.momentum_base 0.996)")
    # the same config on 2 GPUs: keys four times older
    assert "HCL queue 8,192 keys = 256 steps at 32 a step (key age / momentum horizon 1.02)" in \
        queue_line(load_config("lvis_r50"), 2)
    assert queue_line(load_config("lvis_r50", ["model.hcl=false", "model.lcl=false"]), 8) is None
