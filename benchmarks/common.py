"""Shared by the benchmark scripts (run as ``python benchmarks/NAME.py``, which puts this
folder on the import path)."""

import os
import shutil
import time
from pathlib import Path


def best_of(fn, repeats: int):
    """(fastest wall time of ``repeats`` calls, the last call's result)."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def make_data_once(data: Path, **make_dataset_kwargs) -> None:
    """:func:`drcl.data.synthetic.make_dataset` into ``data`` unless it is already there, made
    once even with several benchmark workers racing for it: each writes a private copy and
    renames it into place; a loser's copy is identical (same seed) and is removed."""
    from drcl.data.synthetic import make_dataset

    if (data / "annotations" / "val.json").exists():
        return
    tmp = data.with_name(f"{data.name}.tmp-{os.getpid()}-{time.time_ns()}")
    make_dataset(tmp, progress=False, **make_dataset_kwargs)
    try:
        tmp.rename(data)
    except OSError:
        shutil.rmtree(tmp)
