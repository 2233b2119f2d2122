"""How much slower is a drcl training step when another training job shares the cores, and
what keeps the slowdown proportional to the load?

Each scenario runs ``drcl pretrain --config tiny`` (the demo's kind of data, 160 px, batch 4)
for ``--iters`` iterations as a subprocess and reads its seconds per iteration from
``metrics.jsonl`` (every logged row after the first, which holds the start-up), alone or with
a competitor: another ``drcl pretrain`` with 2 threads started first and killed after. Both
jobs get the environment of the scenario: the number of threads (``train.threads``) and the
OpenMP wait policy (``OMP_WAIT_POLICY``: unset = GNU OpenMP's default, whose idle threads spin
before they sleep, or ``PASSIVE``, whose idle threads sleep at once).

    python benchmarks/busy_machine.py --out runs/busy [--iters 12]

Prints a table of seconds per iteration and the slowdown against the same setting alone. Run
it on an otherwise idle machine: the point is the competitor, not other load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import make_data_once  # benchmarks/common.py

ROOT = Path(__file__).resolve().parent.parent

# (name, our threads, our policy, competitor policy or None for alone)
SCENARIOS = (
    ("2 threads, default policy, alone", 2, None, False),
    ("2 threads, PASSIVE, alone", 2, "PASSIVE", False),
    ("1 thread, alone", 1, None, False),
    ("2 threads, default policy, beside a 2-thread job (default policy)", 2, None, True),
    ("2 threads, PASSIVE, beside a 2-thread job (PASSIVE)", 2, "PASSIVE", True),
    ("2 threads, PASSIVE, beside a 2-thread job (default policy)", 2, "PASSIVE", "default"),
    ("1 thread, beside a 2-thread job (default policy)", 1, None, True),
)


def command(data: Path, out: Path, iters: int, threads: int) -> list[str]:
    from drcl.data.synthetic import split_paths

    train_json, train_images = split_paths(data, "train")
    sets = [f"data.train_json={train_json}", f"data.train_images={train_images}",
            f"train.max_iters={iters}", f"train.checkpoint_every={iters}", "train.log_every=2",
            "train.health_every=0", f"train.threads={threads}"]
    return [sys.executable, "-m", "drcl", "pretrain", "--config", "configs/tiny.yaml", "--out", str(out),
            *(x for s in sets for x in ("--set", s))]


def environment(policy: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    return env


def seconds_per_iter(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows[1:]]
    return 4 / (sum(rates) / len(rates))  # batch 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/busy")
    ap.add_argument("--iters", type=int, default=12)
    args = ap.parse_args()
    out = Path(args.out)
    data = out / "data"
    make_data_once(data, classes=40, train_images=800, val_images=160, image_size=160, imbalance=100.0, seed=0)
    results = []
    for name, threads, policy, competitor in SCENARIOS:
        run = out / f"run-{len(results)}"
        shutil.rmtree(run, ignore_errors=True)
        other = None
        if competitor:
            other_policy = None if competitor == "default" else policy
            other = subprocess.Popen(command(data, out / "competitor", 100_000, 2), cwd=ROOT,
                                     env=environment(other_policy), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
            time.sleep(20)  # past its start-up, into its training steps
        try:
            subprocess.run(command(data, run, args.iters, threads), cwd=ROOT, env=environment(policy), check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            if other is not None:
                other.kill()
                other.wait()
                shutil.rmtree(out / "competitor", ignore_errors=True)
        results.append({"scenario": name, "threads": threads, "policy": policy or "default",
                        "competitor": bool(competitor), "s_per_iter": seconds_per_iter(run)})
        print(f"{name}: {results[-1]['s_per_iter']:.2f} s/iteration", flush=True)
    alone = {(r["threads"], r["policy"]): r["s_per_iter"] for r in results if not r["competitor"]}
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{args.iters} iterations of the tiny pre-training step per scenario")
    print("| scenario | s / iteration | x alone (same setting) |\n|---|---:|---:|")
    for r in results:
        base = alone.get((r["threads"], r["policy"]))
        print(f"| {r['scenario']} | {r['s_per_iter']:.2f} | {r['s_per_iter'] / base:.1f} |")
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
