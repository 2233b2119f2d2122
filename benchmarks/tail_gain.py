"""Does 2DRCL pre-training raise AP on tail classes? Rows at matched total compute, several seeds.

Rows (docs/method.md and the paper's ablations):

    random      no pre-training; fine-tuning gets extra iterations worth the pre-training's counted FLOPs
    hcl         HCL only (image-level MoCo-style contrast)
    hcl_lcl     HCL + LCL
    full        2DRCL: HCL + LCL + DRB + AR + SR
    no_drb      full without dynamic rebalancing (random image sampling, uniform box choice)
    no_ar       full without appearance reconstruction
    no_sr       full without semantic reconstruction
    supervised  cross-entropy classification of ground-truth boxes (RoIAlign + box head +
                linear), same views, same iterations: the supervised reference

Diagnostic rows, not in the default set (``--rows`` names them):

    random_same_ft   random init with only the pre-trained rows' fine-tuning iterations: does
                     the pre-training help at all, leaving its compute aside?
    alpha_image      full, alpha held at 1 (image-level rebalancing, RFS) all through
    alpha_instance   full, alpha held at 0 (instance-level rebalancing) all through
    supervised_lcl   full, with same-category boxes as extra LCL positives
    no_hcl           full without HCL (image-level contrast alone hurt box features: benchmarks/HISTORY.md)
    boxes_random     full with random boxes instead of ground truth (LCL self-supervised)
    boxes_ss         full with 8 selective-search proposals per image (``drcl proposals``)
    boxes_detector   full with 8 proposals per image from a class-agnostic detector (``drcl
                     finetune --set data.class_agnostic=true``, ``--finetune-iters`` iterations
                     on the same train set; ``drcl proposals --method detector``)
A box-source row makes its seed's proposals first (its own, so rows do not wait on each other).

``--probe-only`` skips fine-tuning (the probe is minutes, detection AP is most of a row's time):
use it with its own ``--out`` for sweeps such as the alpha rows.

For each row and seed: pre-train (same iterations for every pre-trained row), linear probe of
the frozen encoder's box features (val top-1 per frequency group), fine-tune the tiny Faster
R-CNN and score bbox AP under LVIS rules. "Matched compute": the random row's fine-tuning gets
``ceil(pre-training iterations x counted FLOPs of a full pre-training step / counted FLOPs of a
fine-tuning step)`` extra iterations (each step's forward + backward counted by the trainer,
:mod:`drcl.engine.trainer`; one-iteration runs measure both), so the match does not depend on
what else the machine runs and rows may run in parallel processes. Data loading and
augmentation are not counted: in wall time pre-training costs more than its FLOPs say. "weights moved" is how far pre-training took the encoder from its init
(:func:`weight_change`).
Random init stands in for ImageNet init offline; ``--imagenet`` starts every row's backbone
from torchvision's ImageNet weights when they are in the local torch cache. ``--upstream`` is
the paper's setting at small scale: per seed, ``drcl upstream`` trains a supervised classifier
on a balanced generated set whose classes the target set does not have (``--upstream-classes``,
ids after the target's), and every row starts from it: 2DRCL rows pre-train with
``model.init`` = the classifier, the ``random`` rows become "upstream only" (fine-tuned from
the classifier, the paper's baseline; ``random_same_ft`` is the paper's same-schedule
comparison). Give it its own OUT; the ``supervised`` row is not defined there.

    python benchmarks/tail_gain.py --out runs/tail_gain --seeds 0 1 2 [--rows full random ...]

Each (row, seed) writes OUT/<row>-seed<seed>/record.json when it finishes; a rerun skips the
finished ones and starts unfinished ones over (a probe-only record counts as finished only
for ``--probe-only``). ``--jobs N`` runs N (row, seed) pairs at a time in their own processes
(each logs to OUT/<row>-seed<seed>/log.txt), e.g. ``--jobs 2 --threads 1`` on 2 cores or
``--jobs 12 --threads 1`` on a 16-core GPU machine; several invocations may also share one OUT,
each with different rows or seeds. ``--max-objects 16`` makes crowded scenes (``drcl make-data
--max-objects``), where instance-level rebalancing has boxes to choose between; give it its own
OUT. Prints a markdown table (mean ± std over seeds) of AP, APr,
APc, APf and probe top-1 per group from every record in OUT, and writes them all to
OUT/results.json. About 9 minutes per row and seed with 1 thread at the default sizes; the full
table takes hours on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from drcl.atomic import write_json
from drcl.config import load_config
from drcl.data.annotations import load_annotations
from drcl.data.dataset import DetectionDataset
from drcl.data.synthetic import config_overrides, split_paths
from drcl.engine.loader import SeededDataset, SeededSampler
from drcl.evaluation.probe import run_probe
from drcl.finetune import finetune
from drcl.model.detector import build_encoder
from drcl.pretrain import pretrain
from drcl.upstream import upstream
from drcl.weights import init_model

from common import in_processes, make_data_once  # benchmarks/common.py
from drcl.sampling import RepeatFactorSampler
from drcl.views import TwoViewTransform, collate_views

ROWS = {
    "random": None,
    "hcl": ["model.lcl=false", "model.ar=false", "model.sr=false"],
    "hcl_lcl": ["model.ar=false", "model.sr=false"],
    "full": [],
    "no_drb": ["model.drb=false", "sampler.mode=random"],
    "no_ar": ["model.ar=false"],
    "no_sr": ["model.sr=false"],
    "supervised": "supervised",
}
DIAGNOSTIC = {
    "random_same_ft": None,
    "alpha_image": ["sampler.alpha_end=1.0"],
    "alpha_instance": ["sampler.alpha_start=0.0"],
    "supervised_lcl": ["model.supervised=true"],
    "no_hcl": ["model.hcl=false"],
    "boxes_random": ["data.boxes=random"],
    "boxes_ss": "proposals",
    "boxes_detector": "proposals",
}
OVERRIDES = {**ROWS, **DIAGNOSTIC}
METRICS = ("AP", "APr", "APc", "APf")


def supervised_pretrain(cfg: dict, out: Path) -> dict:
    """Cross-entropy on ground-truth box crops (RoIAlign -> box head -> linear), through the
    same two-view pipeline (view 1 only), for ``train.max_iters`` iterations. Returns the
    trainer's kind of summary: ``encoder`` (path), ``iterations`` and ``flops_per_iter`` (the
    first step's forward + backward, counted as :mod:`drcl.engine.trainer` counts them)."""
    t, d = cfg["train"], cfg["data"]
    torch.manual_seed(cfg["seed"])
    ann = load_annotations(d["train_json"], d["train_images"])
    dataset = DetectionDataset(ann, transforms=TwoViewTransform(size=d["image_size"]), masks=False)
    sampler = RepeatFactorSampler(ann.image_index, ann.category_index, ann.num_images, ann.num_categories,
                                  mode="random", seed=cfg["seed"])
    loader = torch.utils.data.DataLoader(SeededDataset(dataset), batch_size=t["batch_size"], drop_last=True,
                                         sampler=SeededSampler(sampler, cfg["seed"]), collate_fn=collate_views)
    encoder = build_encoder(cfg["model"]["preset"], norm=cfg["model"]["norm"])
    head = nn.Linear(encoder.representation_size, ann.num_categories + 1)
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=t["lr"], momentum=0.9, weight_decay=t["weight_decay"])
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    it, epoch, flops = 0, 0, None
    while it < t["max_iters"]:
        sampler.set_epoch(epoch)
        for images, _, targets, _ in loader:
            if it >= t["max_iters"]:
                break
            boxes = [x["boxes"] for x in targets]
            labels = torch.cat([x["labels"] for x in targets])
            if labels.numel() == 0:
                continue
            lr = t["lr"] * min(1.0, (it + 1) / max(1, t["warmup_iters"]))
            for g in opt.param_groups:
                g["lr"] = lr
            with FlopCounterMode(display=False) if flops is None else contextlib.nullcontext() as counter:
                loss = nn.functional.cross_entropy(head(encoder((images - mean) / std, boxes)["roi"]), labels)
                opt.zero_grad()
                loss.backward()
            flops = counter.get_total_flops() if flops is None else flops
            nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            it += 1
        epoch += 1
    out.mkdir(parents=True, exist_ok=True)
    torch.save(encoder.state_dict(), out / "encoder.pt")
    return {"encoder": str(out / "encoder.pt"), "iterations": it, "flops_per_iter": flops}


def weight_change(weights: str, cfg: dict) -> float:
    """``||w - w0|| / ||w0||`` over the encoder's weight matrices and kernels, where ``w0`` is the
    init pre-training started from (``cfg``'s seed, preset, norm and imagenet switch rebuild it):
    how far pre-training moved it."""
    torch.manual_seed(cfg["seed"])
    m = cfg["model"]
    start = build_encoder(m["preset"], norm=m["norm"], imagenet=m["imagenet"])
    if m["init"]:
        init_model(start, m["init"], m["preset"], m["norm"])
    start = start.state_dict()
    end = torch.load(weights, map_location="cpu", weights_only=True)
    keys = [k for k, v in start.items() if v.dim() >= 2]
    moved = sum((end[k].float() - start[k].float()).pow(2).sum() for k in keys)
    return float((moved / sum(start[k].float().pow(2).sum() for k in keys)).sqrt())


def _threads(args) -> list[str]:
    return [f"train.threads={args.threads}"] if args.threads else []


def _upstream_file(data: Path) -> Path:
    return data.parent / f"upstream-{data.name}" / "run" / "classifier.pt"


def write_flops(run: Path, summary: dict) -> None:
    """Keep a made-once run's counted compute (the trainer's summary) beside it, in flops.json:
    ``benchmarks/convergence.py`` adds it to the pre-training's FLOPs."""
    write_json(run / "flops.json", {"iterations": summary["iterations"], "flops_per_iter": summary["flops_per_iter"]})


def read_flops(run: Path) -> float:
    """The counted FLOPs of a run that :func:`write_flops` recorded."""
    flops = json.loads((run / "flops.json").read_text())
    return flops["iterations"] * flops["flops_per_iter"]


def make_upstream(data: Path, args, seed: int) -> str:
    """The seed's ImageNet stand-in: a balanced generated set of classes the target lacks, and
    ``drcl upstream``'s classifier of its box crops (made once)."""
    classifier = _upstream_file(data)
    if classifier.exists():
        return str(classifier)
    up_data = classifier.parent.parent / "data"
    make_data_once(up_data, classes=args.upstream_classes, first_class=args.classes + 1, imbalance=1.0,
                   train_images=args.upstream_images, val_images=args.upstream_images // 5, image_size=160,
                   seed=seed)
    result = upstream(load_config("tiny_upstream", config_overrides(up_data) + _threads(args) + [
        f"seed={seed}", f"train.max_iters={args.upstream_iters}"]), classifier.parent)
    write_flops(classifier.parent, result)
    return f"{result['classifier']} (val top-1 {result['val_top1']:.3f})"


def _proposals_file(data: Path, row: str) -> Path:
    return data.parent / f"proposals-{data.name}" / f"{row.removeprefix('boxes_')}.json"


def proposal_overrides(data: Path, row: str) -> list[str]:
    """Pre-training overrides that read a box-source row's proposals."""
    return ["data.boxes=proposals", f"data.proposals={_proposals_file(data, row)}"]


def make_proposals(data: Path, args, seed: int, row: str) -> str:
    """The seed's proposals for a box-source row (made once): selective search on the train
    images, or a class-agnostic detector fine-tuned on them."""
    from drcl.proposals import detector_proposals, read_input, selective_search_proposals, write_proposals

    path = _proposals_file(data, row)
    if path.exists():
        return str(path)
    ann = read_input(*split_paths(data, "train"), progress=False)
    if row == "boxes_ss":
        records, seconds = selective_search_proposals(ann, progress=False)
    else:
        cfg = _finetune_cfg(data, seed, args, args.finetune_iters)
        cfg["data"]["class_agnostic"] = True
        run = path.parent / "detector"
        write_flops(run, finetune(cfg, run, evaluate=False))
        records, seconds = detector_proposals(ann, run / "checkpoints" / "last.pt", cfg, progress=False)
    write_proposals(path, records)
    return f"{path} ({seconds * 1000:.0f} ms per image)"


def _pretrain_base(data: Path, seed: int, args, iters: int) -> list[str]:
    init = [f"model.init={_upstream_file(data)}"] if args.upstream else []
    return config_overrides(data) + _threads(args) + init + [
        f"seed={seed}", f"train.max_iters={iters}", f"train.checkpoint_every={iters}", "train.warmup_iters=10",
        "sampler.updates=10"] + (["model.imagenet=true"] if args.imagenet else [])


def _finetune_cfg(data: Path, seed: int, args, iters: int) -> dict:
    return load_config("tiny_finetune", config_overrides(data) + _threads(args) + [
        f"seed={seed}", f"train.max_iters={iters}", f"train.checkpoint_every={iters}"]
        + (["model.imagenet=true"] if args.imagenet else []))


def matched_extra_iters(data: Path, seed: int, args, out: Path) -> dict:
    """Fine-tuning iterations worth the full row's pre-training in counted FLOPs, from a
    one-iteration run of each kind."""
    pre = pretrain(load_config("tiny", _pretrain_base(data, seed, args, 1)), out / "flops-pretrain")
    ft = finetune(_finetune_cfg(data, seed, args, 1), out / "flops-finetune", evaluate=False,
                  init=str(_upstream_file(data)) if args.upstream else None)
    shutil.rmtree(out / "flops-pretrain"), shutil.rmtree(out / "flops-finetune")
    extra = math.ceil(args.pretrain_iters * pre["flops_per_iter"] / ft["flops_per_iter"])
    return {"pretrain_flops_per_iter": pre["flops_per_iter"], "finetune_flops_per_iter": ft["flops_per_iter"],
            "extra_iters": extra}


def run_row(row: str, seed: int, data: Path, out: Path, args) -> dict:
    base = _pretrain_base(data, seed, args, args.pretrain_iters)
    record = {"row": row, "seed": seed, "init": "upstream" if args.upstream else "random"}
    extra_iters = 0
    if row == "random":
        record["matched"] = matched_extra_iters(data, seed, args, out)
        extra_iters = record["matched"]["extra_iters"]
    weights, start = (str(_upstream_file(data)) if args.upstream else None), time.perf_counter()
    if OVERRIDES[row] == "proposals":
        record["proposals"] = make_proposals(data, args, seed, row)
        start = time.perf_counter()
        pretrain(load_config("tiny", base + proposal_overrides(data, row)), out / "pretrain")
        weights = str(out / "pretrain" / "encoder.pt")
    elif OVERRIDES[row] == "supervised":
        if args.upstream:
            raise SystemExit("tail_gain: the supervised row is not defined with --upstream")
        weights = supervised_pretrain(load_config("tiny", base), out / "pretrain")["encoder"]
    elif OVERRIDES[row] is not None:
        pretrain(load_config("tiny", base + OVERRIDES[row]), out / "pretrain")
        weights = str(out / "pretrain" / "encoder.pt")
    record["pretrain_s"] = time.perf_counter() - start
    health = out / "pretrain" / "health.json"
    if health.exists():  # the end-of-run training-health window (gaps, box spread)
        window = json.loads(health.read_text())["window"]
        record["health"] = {k: window.get(k) for k in ("hcl_gap", "hcl_batch_gap", "lcl_gap", "lcl_batch_gap",
                                                       "box_cos", "box_erank")}
    probe_cfg = load_config("tiny", base)
    record["weight_change"] = weight_change(weights, probe_cfg) if weights and OVERRIDES[row] is not None else 0.0
    record["probe"] = run_probe(probe_cfg, weights, seed=seed, progress=False)
    record["threads"] = torch.get_num_threads()
    if args.probe_only:
        record["detection"] = None
        return record
    ft_iters = args.finetune_iters + extra_iters
    ft = _finetune_cfg(data, seed, args, ft_iters)
    start = time.perf_counter()
    result = finetune(ft, out / "finetune", init=weights)["eval"]["bbox"]
    record["finetune_s"] = time.perf_counter() - start
    record["finetune_iters"] = ft_iters
    record["detection"] = {m: result[m] for m in ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")}
    return record


def _cell(values: list[float]) -> str:
    """Mean ± sample std in percent; one value alone has no spread to show (not "± 0.0")."""
    values = [v for v in values if v is not None and v >= 0]
    if not values:
        return "n/a"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def table(records: list[dict]) -> str:
    rows = [r for r in OVERRIDES if any(x["row"] == r for x in records)]
    probe_keys = ("", "_r", "_c", "_f")
    lines = ["| row | seeds | fine-tuning its | " + " | ".join(METRICS)
             + " | probe all | probe r | probe c | probe f | weights moved |",
             "|---|---|---|" + "---|" * (len(METRICS) + 5)]
    for row in rows:
        mine = [x for x in records if x["row"] == row]
        its = sorted({x["finetune_iters"] for x in mine if x.get("finetune_iters")})
        its = "-" if not its else str(its[0]) if len(its) == 1 else f"{its[0]}-{its[-1]}"
        cells = [_cell([x["detection"][m] for x in mine if x["detection"]]) for m in METRICS]
        cells += [_cell([x["probe"][f"acc{g}"] for x in mine]) for g in probe_keys]
        moved = _cell([x.get("weight_change") for x in mine])
        cells.append(moved if moved == "n/a" else moved + " %")
        name = row
        if all(x.get("init") == "upstream" for x in mine):
            name = {"random": "upstream only", "random_same_ft": "upstream only, same fine-tuning"}.get(row, f"upstream + {row}")
        lines.append(f"| {name} | {len(mine)} | {its} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def make_data(data: Path, args, seed: int) -> None:
    """One seed's dataset (160 px, imbalance 100, val = train / 5 images)."""
    make_data_once(data, classes=args.classes, train_images=args.train_images, val_images=args.train_images // 5,
                   image_size=160, imbalance=100.0, seed=seed, max_objects=args.max_objects)


def run_and_record(row: str, seed: int, data: Path, run_dir: Path, args) -> str:
    """One (row, seed): start it over, write its record.json."""
    for path in run_dir.iterdir() if run_dir.exists() else []:  # what an interrupted or probe-only run left
        if path.name != "log.txt":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    print(f"== {row}, seed {seed}", flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    write_json(run_dir / "record.json", run_row(row, seed, data, run_dir, args))
    return f"{row}-seed{seed}"


def load_records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*-seed*/record.json"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/tail_gain")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(OVERRIDES))
    ap.add_argument("--pretrain-iters", type=int, default=90)
    ap.add_argument("--finetune-iters", type=int, default=220)
    ap.add_argument("--train-images", type=int, default=800)
    ap.add_argument("--classes", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process (default: the configs')")
    ap.add_argument("--probe-only", action="store_true", help="probe each encoder, skip fine-tuning and AP")
    ap.add_argument("--imagenet", action="store_true", help="start backbones from local ImageNet weights")
    ap.add_argument("--upstream", action="store_true",
                    help="every row starts from a supervised upstream classifier of disjoint generated classes")
    ap.add_argument("--upstream-classes", type=int, default=120)
    ap.add_argument("--upstream-images", type=int, default=1000)
    ap.add_argument("--upstream-iters", type=int, default=300)
    ap.add_argument("--max-objects", type=int, default=6, help="objects per generated image are 1..N (crowded: 16)")
    ap.add_argument("--jobs", type=int, default=1, help="(row, seed) pairs run at a time, each in its own process")
    ap.add_argument("--report-only", action="store_true", help="tabulate the finished records, run nothing")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    todo = []
    for seed in [] if args.report_only else args.seeds:
        make_data(out / f"data-seed{seed}", args, seed)
    for row in [] if args.report_only else args.rows:  # row-major: a cut-off run has whole rows
        for seed in args.seeds:
            data = out / f"data-seed{seed}"
            run_dir = out / f"{row}-seed{seed}"
            if (run_dir / "record.json").exists() and (
                    args.probe_only or json.loads((run_dir / "record.json").read_text())["detection"]):
                continue  # finished (a probe-only record does not count for a run that wants AP)
            todo.append((row, seed, data, run_dir))
    if args.upstream and todo:  # each seed's upstream classifier first, in parallel
        seeds = sorted({seed for _, seed, _, _ in todo})
        calls = [(out / f"data-seed{seed}", args, seed) for seed in seeds]
        logs = [out / f"upstream-data-seed{seed}.log" for seed in seeds]
        for made in in_processes(make_upstream, calls, min(args.jobs, len(seeds)), logs):
            print(f"upstream classifier: {made}", flush=True)
    logs = [job[3] / "log.txt" for job in todo]
    for name in in_processes(run_and_record, [(*job, args) for job in todo], args.jobs, logs):
        print(f"finished {name}", flush=True)
    records = load_records(out)
    write_json(out / "results.json", records)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(table(records))


if __name__ == "__main__":
    main()
