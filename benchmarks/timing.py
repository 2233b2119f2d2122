"""Shared by the benchmark scripts (run as ``python benchmarks/NAME.py``, which puts this
folder on the import path)."""

import time


def best_of(fn, repeats: int):
    """(fastest wall time of ``repeats`` calls, the last call's result)."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result
