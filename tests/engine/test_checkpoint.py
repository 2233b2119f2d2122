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
