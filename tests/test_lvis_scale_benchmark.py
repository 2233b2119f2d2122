"""``benchmarks/lvis_scale.py``'s memory figures: what BENCHMARKS.md's "workers stay flat" rests on."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
lvis_scale = pytest.importorskip("lvis_scale")

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")


_PROBE = """
import json, os, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from lvis_scale import _smaps
before = _smaps(os.getpid())
block = np.ones(64 * 2**20 // 8)  # 64 MiB of private, written, anonymous pages
after = _smaps(os.getpid())
with open(sys.argv[2], "wb") as f:
    f.write(b"\\1" * (32 * 2**20))
mapped = np.memmap(sys.argv[2], dtype=np.uint8, mode="r")
int(mapped.sum())  # read every page: file-backed, counted in RSS but not in the heap
read = _smaps(os.getpid())
print(json.dumps([before, after, read]))
"""


def test_private_heap_sees_memory_a_process_writes_and_not_a_file_it_maps(tmp_path):
    # a fresh process: in the test run's own, freed memory of earlier tests may be reused
    out = subprocess.run([sys.executable, "-c", _PROBE, str(BENCHMARKS), str(tmp_path / "mapped.bin")],
                         capture_output=True, text=True, check=True)
    before, after, read = json.loads(out.stdout)
    assert after["heap"] - before["heap"] == pytest.approx(64 / 1024, abs=8 / 1024)
    assert read["rss"] - after["rss"] >= 24 / 1024
    assert abs(read["heap"] - after["heap"]) < 8 / 1024


def _samples(heaps_per_worker):
    """Samples as measure_run records them: images per worker and each worker's memory (GB)."""
    return [{"images_per_worker": 100.0 * k, "total_pss": 1.0 + 0.01 * k,
             "workers": [{"heap": h[k], "private": h[k], "pss": h[k]} for h in heaps_per_worker]}
            for k in range(len(heaps_per_worker[0]))]


def test_growth_is_counted_from_the_settled_sample_to_the_end():
    n = 21  # 0 .. 2,000 images per worker
    warm_then_flat = [0.02 + 0.08 * min(k, 5) / 5 for k in range(n)]  # +80 MB over the first 500 images
    leaking = [0.02 + 0.001 * k for k in range(n)]                       # +1 MB every 100 images
    s = lvis_scale.summary(_samples([warm_then_flat, leaking]), workers=2)
    assert s["images_per_worker"] == {"first": 500.0, "last": 2000.0}
    flat, leak = s["worker_growth_mb"]
    assert flat == pytest.approx(0.0, abs=1e-6)
    assert leak == pytest.approx(15 * 1.024, rel=1e-6)  # 15 samples after the 500th image, 1e-3 GB each
    assert s["total_pss_gb"] == pytest.approx(1.2)
