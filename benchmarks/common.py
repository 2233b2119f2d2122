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
    from drcl.data.synthetic import make_dataset, split_paths

    if split_paths(data, "val")[0].exists():
        return
    tmp = data.with_name(f"{data.name}.tmp-{os.getpid()}-{time.time_ns()}")
    make_dataset(tmp, progress=False, **make_dataset_kwargs)
    try:
        tmp.rename(data)
    except OSError:
        shutil.rmtree(tmp)


def _logged(log: Path | None, fn, args):
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1), os.dup2(fd, 2)
    try:
        return fn(*args)
    except BaseException:
        import traceback

        traceback.print_exc()  # into the log; the parent prints one line
        raise


def in_processes(fn, calls: list[tuple], jobs: int, logs: list[Path] | None = None):
    """Yield ``fn(*args)`` for each ``args`` in ``calls``: in order in this process when ``jobs``
    is 1, else ``jobs`` at a time in spawned processes (CUDA cannot be forked) as they finish,
    each with its output sent to its entry of ``logs``. There a call that fails is reported in
    one line (its log has the traceback) and the others go on."""
    if jobs <= 1:
        for args in calls:
            yield fn(*args)
        return
    import concurrent.futures
    import multiprocessing

    logs = logs or [None] * len(calls)
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_logged, log, fn, args) for log, args in zip(logs, calls)]
        for done in concurrent.futures.as_completed(futures):
            try:
                yield done.result()
            except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
                where = logs[futures.index(done)]
                print(f"a run failed ({type(e).__name__}: {e}); see {where}", flush=True)
