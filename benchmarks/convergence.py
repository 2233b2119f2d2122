"""Does 2DRCL's gain survive longer fine-tuning? AP against fine-tuning length and total compute (issue 28).

The protocol of "Rethinking ImageNet Pre-training" (He, Girshick and Dollar, ICCV 2019) at
the tail-gain benchmark's scale: every initialisation is fine-tuned (``tiny_finetune``, batch 4)
for a doubling series of lengths, each length its own run with its own schedule (warm-up and
learning-rate steps at 75 % and 90 % of that length), not snapshots of one run, and scored with
LVIS rules (AP, APr, APc, APf). Pre-training that only speeds convergence gives curves that meet;
one that helps leaves a gap at the end, and on long-tailed data the place to look is APr.
Initialisations (``--inits``):

    random         no pre-training
    drcl_short     2DRCL from random init, ``--pretrain-iters`` SHORT (300) iterations
    drcl_long      the same, LONG (1,000) iterations
    upstream       the upstream stand-in, the ImageNet-like start (``tail_gain.py --upstream``:
                   ``drcl upstream`` on a balanced generated set of classes the target lacks)
    up_drcl_short  2DRCL from the upstream stand-in, SHORT iterations
    up_drcl_long   the same, LONG iterations
    labels         the labels-only control: ``tail_gain.py``'s supervised row (cross-entropy on
                   ground-truth box crops of the target set) for as many counted FLOPs as
                   drcl_long's pre-training (its iterations are worked out per seed from
                   one-step counts; the record's ``matched_to`` keeps the target)
    paper          the paper's own form at LONG iterations: self-supervised LCL
                   (``model.supervised=false``) on 8 boxes per image from a class-agnostic
                   detector (``tail_gain.py``'s boxes_detector row, ``--detector-iters``);
                   fine-tuned at the longest length only

The data, the upstream stand-in, the proposals and the pre-training are ``tail_gain.py``'s
(one generated set per seed: 40 classes, 800 / 160 images at 160 px, imbalance 100), so its
tables and these curves describe the same runs at 220 iterations. One pre-training per
(init, seed), in OUT/<init>-seed<S>/ (record pretrain.json), serves every length; each
(init, seed, length) writes OUT/<init>-seed<S>/L<length>/record.json (AP, APr, APc, APf and the
rest of the LVIS-rule bbox metrics, fine-tuning and pre-training iterations, counted FLOPs).
A rerun skips what is finished, goes on with an unfinished fine-tuning from its last checkpoint
(every ``--checkpoint-every`` 200 iterations; resume is exact, so a long cell can span several
sittings) and starts an unfinished pre-training over; the fine-tuning checkpoints are deleted
once scored (the pre-training keeps its encoder.pt).

Compute is counted as ``drcl demo`` counts it: the trainer's FLOPs of one step (forward +
backward, :mod:`drcl.engine.trainer`) times the iterations. A cell's pre-training FLOPs are
everything its start cost: the upstream classifier (for the three upstream inits), the
class-agnostic detector that made the proposals (paper), and the pre-training itself; the
record keeps the parts (``pretrain_flops_parts``). Data loading, augmentation, proposal
inference and evaluation are not counted.

Lengths: ``--lengths`` (default 220 440 880 1760 3520) run in order, every init at one length
before the next. With ``--until-converged`` the series stops at the first length where random
init gains under ``--min-gain`` (1) AP, mean over seeds, from the length before (the issue's
definition of converged), and goes on doubling past the list up to ``--max-length`` while it
has not. The paper init runs at the longest length of the call.

Outputs, from every record in OUT (``--report-only`` remakes them without running anything):
OUT/ap_vs_iters.png and OUT/ap_vs_flops.png (AP and APr against fine-tuning iterations and
against total counted compute, one line per init: mean over seeds, min-max band),
OUT/table.md (mean ± std over seeds at the longest length random init ran with every seed, and
at the longest if fewer seeds ran there; also printed) and OUT/results.json.

    # the 2-core CPU VM: two single-thread processes
    python benchmarks/convergence.py --out runs/convergence --until-converged --threads 1 --jobs 2
    # a 16-core GPU machine, all runs on the one GPU side by side (see benchmarks/gpu_tables.sh
    # for carrying faster-coco-eval's wheel there)
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/convergence.py --out /tmp/convergence \\
        --until-converged --threads 1 --jobs 14
    # the toy version (seconds of training; what tests/test_convergence_benchmark.py runs)
    python benchmarks/convergence.py --out /tmp/conv-smoke --smoke

Cost on the 2-core VM with 1 thread per process (BENCHMARKS.md's tail-gain runs: fine-tuning
about 1 s per iteration plus half a minute of evaluation, pre-training about 1.4 s per
iteration): a cell is about 4 minutes at 220 iterations, 8 at 440, 15 at 880, 30 at 1,760 and
an hour at 3,520; the five default lengths are about 2 hours per (init, seed). Pre-training
per seed: about 7 minutes for 300 iterations and 25 for 1,000, so about 2 hours for the six
pre-trainings of a seed (with the upstream classifier and the detector). The default grid
(8 inits, 3 seeds, 5 lengths) is about 50 process-hours, a day on the two cores; each further
doubling (7,040) adds about 40.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import torch

from drcl.atomic import write_json
from drcl.config import load_config
from drcl.engine.checkpoint import load_checkpoint
from drcl.evaluation.curves import (
    break_even_shares,
    converged_length,
    n_seeds,
    paired_gain,
    plot_curves,
    reduce,
    seeds_run,
    total_flops,
    well_seeded,
)
from drcl.evaluation.lvis_eval import METRICS as BBOX_METRICS
from drcl.finetune import finetune
from drcl.pretrain import pretrain

import tail_gain as tg  # benchmarks/tail_gain.py: data, upstream stand-in, proposals, configs
from common import in_processes  # benchmarks/common.py


class Init(NamedTuple):
    upstream: bool  # starts from the upstream stand-in
    kind: str | None  # pre-training: None, "2drcl", "supervised" or "paper"
    long: bool = False  # the LONG pre-training length (else SHORT)
    label: str = ""  # the figures' legend; {it} is the pre-training iterations


INITS = {
    "random": Init(False, None, label="random init"),
    "drcl_short": Init(False, "2drcl", False, "2DRCL {it}"),
    "drcl_long": Init(False, "2drcl", True, "2DRCL {it}"),
    "upstream": Init(True, None, label="upstream stand-in"),
    "up_drcl_short": Init(True, "2drcl", False, "upstream + 2DRCL {it}"),
    "up_drcl_long": Init(True, "2drcl", True, "upstream + 2DRCL {it}"),
    "labels": Init(False, "supervised", True, "labels only (supervised {it})"),
    "paper": Init(False, "paper", True, "paper's form {it} (self-sup. LCL, detector boxes)"),
}
LONGEST_ONLY = {"paper"}
METRICS = ("AP", "APr", "APc", "APf")
SMOKE = {"train_images": 40, "classes": 8, "pretrain_iters": [1, 2], "lengths": [1, 2], "seeds": [0],
         "upstream_classes": 10, "upstream_images": 40, "upstream_iters": 1, "detector_iters": 1, "threads": 1,
         "until_converged": True, "max_length": 2}


# ----------------------------------------------------------------------------- runs


def _tail_gain_args(args, **kw) -> argparse.Namespace:
    """What tail_gain.py's functions read from their ``args``."""
    return argparse.Namespace(**{**vars(args), "imagenet": False, "upstream": False,
                                 "finetune_iters": args.detector_iters, **kw})


def _clear(run: Path, keep: str) -> None:
    """Remove what an interrupted run left in ``run``, except its log ``keep``."""
    for path in run.iterdir() if run.exists() else []:
        if path.name != keep:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def pretrain_init(name: str, seed: int, data: Path, run: Path, args) -> dict:
    """One (init, seed)'s pre-training, made once for every length: its weights, iterations and
    counted FLOPs (with the upstream classifier's and the proposal detector's), as pretrain.json."""
    _clear(run, "pretrain.log")  # a pre-training started over makes its old cells stale too
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = INITS[name]
    iters = args.pretrain_iters[spec.long] if spec.kind else 0
    ns = _tail_gain_args(args, upstream=spec.upstream, pretrain_iters=iters)
    record = {"init": name, "seed": seed, "weights": None, "pretrain_iters": iters}
    parts = {}
    if spec.upstream:
        record["weights"] = str(tg._upstream_file(data))
        record["upstream_iters"] = args.upstream_iters
        parts["upstream"] = tg.read_flops(tg._upstream_file(data).parent)
    start = time.perf_counter()
    if spec.kind == "supervised":  # as many counted FLOPs as drcl_long's pre-training
        step = tg.matched_extra_iters(data, seed, ns, run)["pretrain_flops_per_iter"]
        probe = tg.supervised_pretrain(load_config("tiny", tg._pretrain_base(data, seed, ns, 1)), run / "flops-sup")
        shutil.rmtree(run / "flops-sup")
        record["matched_to"] = {"2drcl_iters": iters, "2drcl_flops_per_iter": step}
        iters = record["pretrain_iters"] = math.ceil(iters * step / probe["flops_per_iter"])
        summary = tg.supervised_pretrain(load_config("tiny", tg._pretrain_base(data, seed, ns, iters)), run / "pretrain")
        record["weights"] = summary["encoder"]
    elif spec.kind:
        extra = []
        if spec.kind == "paper":
            record["proposals"] = tg.make_proposals(data, ns, seed, "boxes_detector")
            record["detector_iters"] = args.detector_iters
            parts["proposals"] = tg.read_flops(tg._proposals_file(data, "boxes_detector").parent / "detector")
            extra = tg.proposal_overrides(data, "boxes_detector") + ["model.supervised=false"]
        summary = pretrain(load_config("tiny", tg._pretrain_base(data, seed, ns, iters) + extra), run / "pretrain")
        record["weights"] = str(run / "pretrain" / "encoder.pt")
        shutil.rmtree(run / "pretrain" / "checkpoints", ignore_errors=True)
    if spec.kind:
        parts["pretrain"] = summary["iterations"] * summary["flops_per_iter"]
    record.update(pretrain_flops=sum(parts.values()), pretrain_flops_parts=parts,
                  pretrain_s=time.perf_counter() - start)
    write_json(run / "pretrain.json", record)
    return record


def finetune_cell(name: str, seed: int, length: int, data: Path, run: Path, args) -> dict:
    """One (init, seed, length): fine-tune from the init's pre-training for ``length``
    iterations on its own schedule, score it, write L<length>/record.json. A cell that an
    earlier call left unfinished goes on from its last checkpoint (``--checkpoint-every``), as
    ``drcl finetune --resume`` does; the record's ``resumed_from`` says from which iteration
    (its ``finetune_s`` is then this call's part only)."""
    cell = run / f"L{length}"
    last = cell / "finetune" / "checkpoints" / "last.pt"
    resumed_from = load_checkpoint(last)["iteration"] if last.exists() else None
    if resumed_from is None:
        _clear(cell, "log.txt")
    if args.threads:
        torch.set_num_threads(args.threads)
    pre = json.loads((run / "pretrain.json").read_text())
    cfg = tg._finetune_cfg(data, seed, _tail_gain_args(args), length)
    cfg["train"]["checkpoint_every"] = min(length, args.checkpoint_every)
    start = time.perf_counter()
    result = finetune(cfg, cell / "finetune", init=pre["weights"], resume=resumed_from is not None)
    shutil.rmtree(cell / "finetune" / "checkpoints", ignore_errors=True)  # ~100 MB a cell
    bbox = result["eval"]["bbox"]
    record = {**pre, "finetune_iters": result["iterations"], "finetune_flops_per_iter": result["flops_per_iter"],
              "finetune_flops": result["iterations"] * result["flops_per_iter"],
              "finetune_s": time.perf_counter() - start, "threads": torch.get_num_threads(),
              "resumed_from": resumed_from, "detection": {m: bbox[m] for m in BBOX_METRICS}}
    write_json(cell / "record.json", record)
    return record


def load_records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*-seed*/L*/record.json"))]


# ----------------------------------------------------------------------------- pure: stop rule, curves, table


def next_length(lengths: list[int], done: list[int], records: list[dict], until_converged: bool,
                max_length: int, min_gain: float = 1.0) -> int | None:
    """The fine-tuning length to run after ``done`` (``records``: the cells run at those): the
    next of ``lengths``; with ``until_converged`` none once random init has converged
    (:func:`converged_length`), and double the last one past the list (up to ``max_length``)
    while it has not."""
    if until_converged and converged_length(records, min_gain) is not None:
        return None
    rest = [n for n in lengths if n not in done]
    if rest:
        return rest[0]
    if until_converged and done and 2 * done[-1] <= max_length:
        return 2 * done[-1]
    return None


def label(init: str, records: list[dict]) -> str:
    its = sorted({r["pretrain_iters"] for r in records if r["init"] == init})
    return INITS[init].label.format(it="/".join(map(str, its)))


def table(records: list[dict], min_gain: float = 1.0) -> str:
    """Mean ± std over seeds per init at the longest fine-tuning length random init ran with
    every seed (:func:`well_seeded`), and again at each init's own longest, where that differs
    (every init's row at the longest length it ran); then what sharing each pre-training takes
    to pay, and where random init stands against the stop rule."""
    ends = {max(r["finetune_iters"] for r in records if r["init"] == init) for init in {r["init"] for r in records}}
    counts = seeds_run(records)
    well = well_seeded(counts) if counts else max(ends)
    lines = []
    for length in sorted(ends | {well}):
        random_seeds = ("" if length == well else " (random init not run there)" if length not in counts
                        else f" ({n_seeds(counts[length])} of random init)")
        lines += [f"At {length} fine-tuning iterations{random_seeds}"
                  + "; mean ± std over seeds (one seed: its value), in percent; compute counted as the trainer counts it "
                  "(pre-training: everything the start cost).", "",
                  "| init | pre-training its | seeds | " + " | ".join(METRICS) + " | pre-training TFLOP | total TFLOP |",
                  "|---|---:|---:|" + "---|" * len(METRICS) + "---:|---:|"]
        for init in INITS:
            at = [r for r in records if r["init"] == init and r["finetune_iters"] == length]
            if not at:
                continue
            its = "/".join(str(n) for n in sorted({r["pretrain_iters"] for r in at}))
            cells = [tg._cell([r["detection"].get(m) for r in at]) for m in METRICS]
            pre = statistics.fmean(r["pretrain_flops"] for r in at) / 1e12
            total = statistics.fmean(total_flops(r) for r in at) / 1e12
            lines.append(f"| {label(init, records)} | {its} | {len(at)} | " + " | ".join(cells)
                         + f" | {pre:,.1f} | {total:,.1f} |")
        lines.append("")
    lines.pop()
    for init in ("drcl_short", "drcl_long", "labels"):  # pre-trained from random init: random init is the baseline
        if any(r["init"] == init for r in records):
            rows = break_even_shares(records, init)
            if not rows:  # no random-init run at its fine-tuning compute
                continue
            # k rounded up; rounded to 6 places first, so that float noise (4.000000000000004) is not a 5th
            said = [f"{r['length']}: " + ("never (not ahead)" if r["shares"] == math.inf else
                                          "unknown (above every random-init run)" if r["shares"] is None else
                                          f"k = {math.ceil(round(r['shares'], 6))}") for r in rows]
            lines += ["", f"{label(init, records)}: one pre-training pays (AP) when shared by at least k "
                      "fine-tunings of the same length: " + "; ".join(said) + "."]
    if len(counts) > 1:
        lengths = sorted(counts)
        gain, seeds = paired_gain(records, "random", lengths[-2], lengths[-1])
        stop = converged_length(records, min_gain)
        said = (f"{gain:+.1f} AP from {lengths[-2]} to {lengths[-1]} iterations ({n_seeds(seeds)} run at both)"
                if seeds else f"no seed run at both {lengths[-2]} and {lengths[-1]} iterations")
        lines += ["", f"Random init: {said}; "
                  + (f"converged (under {min_gain:g} AP) at {stop}." if stop else "not converged yet.")]
    return "\n".join(lines)


def labelled(records: list[dict]) -> list[dict]:
    """The records in INITS order, each with its legend (:func:`label`)."""
    order = list(INITS)
    return [{**r, "label": label(r["init"], records)}
            for r in sorted(records, key=lambda r: (order.index(r["init"]), r["seed"], r["finetune_iters"]))]


def plot(records: list[dict], out: Path) -> list[Path]:
    """ap_vs_iters.png and ap_vs_flops.png: AP and APr per init, mean over seeds with the
    min-max band (a single length: error bars)."""
    return [plot_curves(labelled(records), out / name, axis)
            for axis, name in (("iters", "ap_vs_iters.png"), ("flops", "ap_vs_flops.png"))]


# ----------------------------------------------------------------------------- main


def run_grid(args, out: Path) -> None:
    """Data, upstream classifiers and pre-trainings first (each in parallel), then the lengths
    in order, every cell of one length before the next."""
    for seed in args.seeds:
        tg.make_data(out / f"data-seed{seed}", args, seed)
    data = {seed: out / f"data-seed{seed}" for seed in args.seeds}
    runs = {(init, seed): out / f"{init}-seed{seed}" for init in args.inits for seed in args.seeds}
    todo = [(init, seed) for (init, seed), run in runs.items() if not (run / "pretrain.json").exists()]
    up_seeds = sorted({seed for init, seed in todo if INITS[init].upstream
                       and not (tg._upstream_file(data[seed]).parent / "flops.json").exists()})
    calls = [(data[seed], _tail_gain_args(args), seed) for seed in up_seeds]
    for made in in_processes(tg.make_upstream, calls, args.jobs, [out / f"upstream-data-seed{s}.log" for s in up_seeds]):
        print(f"upstream classifier: {made}", flush=True)
    calls = [(init, seed, data[seed], runs[init, seed], args) for init, seed in todo]
    for pre in in_processes(pretrain_init, calls, args.jobs, [runs[job] / "pretrain.log" for job in todo]):
        print(f"pre-trained {pre['init']}, seed {pre['seed']}: {pre['pretrain_iters']} iterations, "
              f"{pre['pretrain_flops'] / 1e12:,.1f} TFLOP", flush=True)
    ready = [job for job in runs if (runs[job] / "pretrain.json").exists()]

    def cells(inits, length):
        jobs = [(init, seed) for init, seed in ready if init in inits
                and not (runs[init, seed] / f"L{length}" / "record.json").exists()]
        calls = [(init, seed, length, data[seed], runs[init, seed], args) for init, seed in jobs]
        logs = [runs[job] / f"L{length}" / "log.txt" for job in jobs]
        for r in in_processes(finetune_cell, calls, args.jobs, logs):
            print(f"{r['init']}, seed {r['seed']}, {r['finetune_iters']} iterations: "
                  + ", ".join(f"{m} {100 * r['detection'][m]:.1f}" if r["detection"][m] >= 0 else f"{m} n/a"
                              for m in METRICS), flush=True)

    done = []  # a rerun walks the lengths again (finished cells are skipped), so the rule reads these only
    while (length := next_length(args.lengths, done, [r for r in load_records(out) if r["finetune_iters"] in done],
                                 args.until_converged, args.max_length, args.min_gain)) is not None:
        print(f"== fine-tuning for {length} iterations", flush=True)
        cells([i for i in args.inits if i not in LONGEST_ONLY], length)
        done.append(length)
    if done:
        cells(LONGEST_ONLY, done[-1])


def report(out: Path, min_gain: float) -> None:
    records = load_records(out)
    if not records:
        print(f"no records in {out}")
        return
    write_json(out / "results.json", records)
    # what drcl demo draws (src/drcl/evaluation/convergence.json is a copy of the committed one)
    write_json(out / "curves.json", {"records": reduce(labelled(records))})
    text = table(records, min_gain)
    (out / "table.md").write_text(text + "\n")
    figures = plot(records, out)
    threads = sorted({r.get("threads") for r in records if r.get("threads")})
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"fine-tuning threads per process: {', '.join(map(str, threads)) or 'not recorded'}")
    print(text)
    print("wrote " + ", ".join(str(p) for p in [out / "table.md", out / "results.json", *figures]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/convergence")
    ap.add_argument("--inits", nargs="+", default=list(INITS), choices=list(INITS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lengths", type=int, nargs="+", default=[220, 440, 880, 1760, 3520],
                    help="fine-tuning iterations, run in this order")
    ap.add_argument("--until-converged", action="store_true",
                    help="stop once random init gains under --min-gain AP; double past --lengths until then")
    ap.add_argument("--min-gain", type=float, default=1.0, help="AP points (default 1)")
    ap.add_argument("--max-length", type=int, default=14080, help="the longest --until-converged doubles to")
    ap.add_argument("--pretrain-iters", type=int, nargs=2, default=[300, 1000], metavar=("SHORT", "LONG"))
    ap.add_argument("--detector-iters", type=int, default=220, help="the paper init's class-agnostic detector")
    ap.add_argument("--train-images", type=int, default=800)
    ap.add_argument("--classes", type=int, default=40)
    ap.add_argument("--max-objects", type=int, default=6, help="objects per generated image are 1..N")
    ap.add_argument("--upstream-classes", type=int, default=120)
    ap.add_argument("--upstream-images", type=int, default=1000)
    ap.add_argument("--upstream-iters", type=int, default=300)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process (default: the configs')")
    ap.add_argument("--checkpoint-every", type=int, default=200,
                    help="fine-tuning iterations between checkpoints; a rerun goes on from the last one")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    ap.add_argument("--report-only", action="store_true", help="figures and table from the records, run nothing")
    ap.add_argument("--smoke", action="store_true",
                    help="toy sizes (40 images, 1 and 2 iterations, one seed): checks the tool in about a minute")
    if ap.parse_known_args(argv)[0].smoke:
        ap.set_defaults(**SMOKE)  # what the command line gives still wins
    args = ap.parse_args(argv)
    if args.until_converged and "random" not in args.inits:
        ap.error("--until-converged reads random init's curve: keep 'random' in --inits")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        run_grid(args, out)
    report(out, args.min_gain)


if __name__ == "__main__":
    main()
