import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from drcl.atomic import write_json
from drcl.engine.checkpoint import (
    cpu_state_dict,
    encoder_weights,
    load_checkpoint,
    rng_state,
    run_weights_path,
    save_checkpoint,
    set_rng_state,
)
from drcl.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_checkpoint_killed_mid_write_keeps_the_last_good_one(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"iteration": 4, "w": torch.arange(5.0)}, path)
    script = textwrap.dedent(f"""
        import os, signal
        from drcl.atomic import atomic_write
        def write(f):
            f.write(b"half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        atomic_write({str(path)!r}, write)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL
    state = load_checkpoint(path)
    assert state["iteration"] == 4 and torch.equal(state["w"], torch.arange(5.0))


def test_unreadable_checkpoint_is_a_one_line_error(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=r"last\.pt: cannot read the checkpoint"):
        load_checkpoint(bad)


def test_write_json_is_atomic_and_readable(tmp_path):
    import json

    path = write_json(tmp_path / "sub" / "a.json", {"x": [1, 2]})
    assert json.loads(path.read_text()) == {"x": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]  # no temporary file left


def test_resume_restores_only_the_cuda_rng_states_of_the_gpus_it_has(monkeypatch):
    """A checkpoint saved with 8 GPUs' CUDA RNG states, resumed where one GPU is visible:
    device 0's state is restored and nothing fails (``torch.cuda.set_rng_state_all`` would
    address devices 1-7). Stood in on the CPU by a fake CUDA runtime with one device."""
    state = rng_state()
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    set_rng_state(state)  # the real CPU machine: no GPU at all
    restored = {}

    def set_one(new_state, device="cuda"):
        index = device if isinstance(device, int) else (torch.device(device).index or 0)
        if index >= 1:
            raise RuntimeError("CUDA error: invalid device ordinal")
        restored[index] = new_state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_one)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_one)  # what set_rng_state_all calls
    set_rng_state(state)
    assert list(restored) == [0] and torch.equal(restored[0], state["cuda"][0])


def test_rng_state_round_trip_restores_every_generator():
    """Resume exactly: after set_rng_state(rng_state()) torch, NumPy's global and Python's
    random module draw what they drew the first time."""
    state = rng_state()

    def draws():
        return torch.rand(4).tolist(), np.random.rand(4).tolist(), [random.random() for _ in range(4)]

    first = draws()
    assert draws() != first  # the generators moved on
    set_rng_state(state)
    assert draws() == first


def test_run_weights_path_prefers_encoder_pt(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    assert run_weights_path(tmp_path) == tmp_path / "checkpoints" / "last.pt"
    (tmp_path / "encoder.pt").write_bytes(b"")
    assert run_weights_path(tmp_path) == tmp_path / "encoder.pt"
    assert run_weights_path(tmp_path / "other.pt") == tmp_path / "other.pt"


def test_encoder_weights_from_a_checkpoint_and_from_plain_weights(tmp_path):
    w = torch.ones(2, requires_grad=True)
    model = {"online.encoder.backbone.body.conv1.weight": w, "online.encoder.roi_heads.fc.bias": torch.zeros(3),
             "momentum.encoder.backbone.body.conv1.weight": torch.full((2,), 5.0), "online.predictor.w": torch.ones(1)}
    save_checkpoint({"model": cpu_state_dict(model), "iteration": 3}, tmp_path / "checkpoints" / "last.pt")
    sd = encoder_weights(tmp_path)  # the run folder: checkpoints/last.pt
    assert set(sd) == {"backbone.body.conv1.weight", "roi_heads.fc.bias"}
    assert torch.equal(sd["backbone.body.conv1.weight"], torch.ones(2)) and not sd["backbone.body.conv1.weight"].requires_grad
    save_checkpoint({"model": {"momentum.x": torch.ones(1)}}, tmp_path / "nothing.pt")
    with pytest.raises(DataError, match="without 2DRCL encoder weights"):
        encoder_weights(tmp_path / "nothing.pt")
    save_checkpoint({"weight": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="neither"):
        encoder_weights(tmp_path / "other.pt")
    save_checkpoint(sd, tmp_path / "encoder.pt")
    assert set(encoder_weights(tmp_path)) == set(sd)  # the run folder now: encoder.pt
