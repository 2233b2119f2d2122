import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from drcl.atomic import write_json
from drcl.engine.checkpoint import load_checkpoint, save_checkpoint
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
    from drcl.engine.checkpoint import rng_state, set_rng_state

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
