"""Do the box features get better with pre-training length? The probe after 0, 100, 300 and
1,000 iterations of the shipped tiny config, several seeds, on the demo's data.

A contrastive recipe is working only when its exported features improve with longer runs
(docs/method.md), not only when its losses fall. For each length L and seed S this runs
``drcl pretrain --config tiny --set train.max_iters=L --set seed=S`` (its own schedule: warm-up,
cosine learning rate and momentum over L iterations) and ``drcl probe`` on the encoder it
exports; length 0 is the random init of seed S. Each (L, S) keeps its run in
OUT/L<L>-seed<S>/ and its record in record.json; a rerun skips the finished ones, so several
processes may share OUT with different seeds (``--threads 1`` each on 2 cores), or ``--jobs N``
runs N of them at a time (each logs to OUT/L<L>-seed<S>.log). ``--set KEY=VALUE`` changes the
pre-training config of every run (a variant of the recipe; give it its own OUT).

    python benchmarks/probe_length.py --out runs/probe_length --seeds 0 1 2 --threads 1

Prints a markdown table (mean ± std over seeds) of the probe top-1 per frequency group and the
end-of-run health signals, and writes OUT/results.json and OUT/probe_vs_length.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

from drcl.config import load_config
from drcl.data.synthetic import config_overrides
from drcl.evaluation.probe import run_probe
from drcl.pretrain import pretrain

from common import in_processes, make_data_once  # benchmarks/common.py

HEALTH = ("hcl_gap", "hcl_batch_gap", "lcl_gap", "lcl_batch_gap", "box_cos", "box_erank")


def make_data(data: Path) -> None:
    """The demo's data (``drcl demo`` / ``drcl make-data`` defaults: 40 classes, 800 + 160 images
    at 160 px, imbalance 100, seed 0)."""
    make_data_once(data, classes=40, train_images=800, val_images=160, image_size=160, imbalance=100.0, seed=0)


def run_one(length: int, seed: int, data: Path, out: Path, threads: int | None, extra: tuple = ()) -> dict:
    run = out / f"L{length}-seed{seed}"
    record_path = run / "record.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    shutil.rmtree(run, ignore_errors=True)
    overrides = config_overrides(data) + [f"seed={seed}"]
    if threads:
        overrides.append(f"train.threads={threads}")
        torch.set_num_threads(threads)
    record = {"length": length, "seed": seed, "overrides": list(extra)}
    checkpoint = None
    start = time.time()
    if length > 0:
        cfg = load_config("tiny", overrides + [f"train.max_iters={length}", f"train.checkpoint_every={length}",
                                               *extra])
        pretrain(cfg, run / "pretrain")
        checkpoint = run / "pretrain" / "encoder.pt"
        health = json.loads((run / "pretrain" / "health.json").read_text())
        record["health"] = {k: health["window"].get(k) for k in HEALTH}
        record["health_reference"] = health["reference"]
        record["warnings"] = health["warnings"]
    record["pretrain_s"] = time.time() - start
    cfg = load_config("tiny", overrides)
    record["probe"] = run_probe(cfg, checkpoint, seed=seed)  # the seed matters only for the random init
    run.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=1))
    return record


def _cell(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.mean(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def table(records: list[dict]) -> str:
    lengths = sorted({r["length"] for r in records})
    lines = ["| iterations | seeds | probe top-1 | rare | common | frequent | HCL gap | HCL batch gap | LCL gap "
             "| box cosine | box eff. rank |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in lengths:
        rows = [r for r in records if r["length"] == n]
        probe = [{k: None if r["probe"][k] is None else 100 * r["probe"][k] for k in ("acc", "acc_r", "acc_c", "acc_f")} for r in rows]
        health = [r.get("health") or {} for r in rows]
        # random init (0 iterations) is every pre-training run's health reference
        ref = [r.get("health_reference") or {} for r in records if r.get("health_reference")]
        cos = [h.get("box_cos") for h in health] if n else [x.get("box_cos") for x in ref]
        erank = [h.get("box_erank") for h in health] if n else [x.get("box_erank") for x in ref]

        def hcell(key, scale=1.0):
            values = [h.get(key) * scale for h in health if h.get(key) is not None]
            return "-" if not values else f"{statistics.mean(values):.2f}"

        lines.append(f"| {n} | {len(rows)} | " + " | ".join(_cell([p[k] for p in probe]) for k in ("acc", "acc_r", "acc_c", "acc_f"))
                     + f" | {hcell('hcl_gap')} | {hcell('hcl_batch_gap')} | {hcell('lcl_gap')} | "
                     + (f"{statistics.mean([c for c in cos if c is not None]):.2f}" if any(c is not None for c in cos) else "-")
                     + " | " + (f"{statistics.mean([e for e in erank if e is not None]):.0f}" if any(e is not None for e in erank) else "-")
                     + " |")
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    from drcl.data.stats import pyplot

    plt = pyplot("the probe-vs-length plot")
    lengths = sorted({r["length"] for r in records})
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for key, name, color in (("acc", "all classes", "black"), ("acc_r", "rare", "tab:red"),
                             ("acc_c", "common", "tab:orange"), ("acc_f", "frequent", "tab:blue")):
        mine = [r for r in records if r["probe"][key] is not None]  # a group with no val boxes has none
        if not mine:
            continue
        xs, means, stds = [], [], []
        for n in lengths:
            v = [100 * r["probe"][key] for r in mine if r["length"] == n]
            if v:
                xs.append(n), means.append(statistics.mean(v)), stds.append(statistics.stdev(v) if len(v) > 1 else 0.0)
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=name, color=color)
        for r in mine:
            ax.scatter(r["length"], 100 * r["probe"][key], s=6, color=color, alpha=0.4)
    ax.set_xscale("symlog", linthresh=100)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("pre-training iterations (shipped tiny config, batch 4)")
    ax.set_ylabel("box-feature probe top-1 (%)")
    ax.set_title("Linear probe of frozen box features vs pre-training length\n(0 = random init; mean ± std over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/probe_length")
    ap.add_argument("--data", default=None, help="the demo's data (made here when missing; default OUT/data)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lengths", type=int, nargs="+", default=[0, 100, 300, 1000])
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process (default: the config's)")
    ap.add_argument("--report-only", action="store_true", help="tabulate the finished records, run nothing")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="pre-training config override for every run (repeatable)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else out / "data"
    if not args.report_only:
        make_data(data)
        todo = [(length, seed) for seed in args.seeds for length in args.lengths]
        calls = [(length, seed, data, out, args.threads, tuple(args.overrides)) for length, seed in todo]
        logs = [out / f"L{length}-seed{seed}.log" for length, seed in todo]
        for r in in_processes(run_one, calls, args.jobs, logs):
            print(f"L={r['length']} seed={r['seed']}: probe {100 * r['probe']['acc']:.1f} "
                  f"rare {100 * r['probe']['acc_r']:.1f}", flush=True)
    records = [json.loads(p.read_text()) for p in sorted(out.glob("L*-seed*/record.json"))]
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(table(records))
    (out / "results.json").write_text(json.dumps(records, indent=1))
    plot(records, out / "probe_vs_length.png")
    print(f"wrote {out / 'results.json'}, {out / 'probe_vs_length.png'}")


if __name__ == "__main__":
    main()
