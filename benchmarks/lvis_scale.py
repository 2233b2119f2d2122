"""Benchmark: an annotation file of LVIS v1 train's size through drcl's data layer.

``write`` makes the file (once; about 3 minutes): LVIS v1 train's counts and long tail
(100,170 images, 1,270,141 instances, 1,203 categories: 337 rare, 461 common, 405 frequent;
the category draw of ``repeat_factors.simulate_lvis``), LVIS v1's record layout (images with
``coco_url`` and no ``file_name``, ``neg_category_ids``, ``not_exhaustive_category_ids``;
categories with ``frequency``, ``image_count``, ``instance_count``, ``synonyms``, ``def``; the
top-level keys in the published file's order) and polygons of about the published file's length
(about 1.1 GB in all). The images are hard links to a few small JPEG files of COCO's sizes
(at most 50,000 links to a file).

Then it measures, each in a fresh process:

* ``load``: :func:`drcl.data.annotations.load_annotations` as pre-training calls it, and as
  ``drcl stats`` / evaluation call it (with the file's records): wall time and peak resident
  memory (``ru_maxrss``);
* ``evaluate``: ``drcl evaluate`` on a file of LVIS v1 val's size cut from it (19,809 images)
  with ~0.2M generated detections: wall time, peak memory and the metrics, which a before /
  after pair must print equal;
* ``pretrain`` / ``finetune``: ``drcl pretrain`` (tiny preset, small images so that each of
  the 4 DataLoader workers loads thousands of images in minutes) and ``drcl finetune`` with
  masks, sampled every few seconds: total PSS of the process and its workers, and each
  worker's private memory (``Private_Clean + Private_Dirty`` of ``/proc/PID/smaps_rollup``:
  what forking did not share), against the images each worker has loaded;
* ``loaders``: the same two DataLoaders alone (no model), 500 batches of 16, so that each
  worker loads 2,000 images in a few minutes. Their workers are judged by their private
  anonymous memory (``heap``: private pages of the anonymous mappings in ``smaps``): a
  worker's private total also counts the batches it has in flight in shared memory, which
  come and go by ~100 MB with masks and hide a slow growth.

    PYTHONPATH=src python benchmarks/lvis_scale.py --label after                    # all
    PYTHONPATH=src python benchmarks/lvis_scale.py --only load --label after
    PYTHONPATH=src python benchmarks/lvis_scale.py --only load pretrain finetune loaders \
        --label before --src ../drcl-before/src      # another checkout's code, same file
    PYTHONPATH=src python benchmarks/lvis_scale.py --report   # the Markdown tables

Results go to ``ROOT/results.json`` (default ``runs/lvis_scale``), under ``--label``, saved
after every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from repeat_factors import LVIS_V1_TRAIN, simulate_lvis  # benchmarks/repeat_factors.py

#: COCO's commonest image sizes (width, height); every image record gets one of them
SIZES = [(640, 480), (480, 640), (640, 427), (427, 640), (640, 426), (500, 375)]
MAX_LINKS = 50_000
#: points per polygon: log-normal around LVIS's (the published file is ~1.1 GB)
POINTS_MEDIAN, POINTS_SIGMA = 40, 0.6


# ----------------------------------------------------------------------------- the file
def _jpeg(path: Path, size: tuple[int, int], seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    Image.fromarray(small).resize((w, h), Image.BILINEAR).save(path, quality=85)


def _polygon_text(rng, x, y, w, h, n: int) -> str:
    """One polygon of ``n`` points on a jittered ellipse inside the box, 2 decimals."""
    t = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = rng.uniform(0.7, 1.0, n)
    px = x + w / 2 + np.cos(t) * r * w / 2
    py = y + h / 2 + np.sin(t) * r * h / 2
    xy = np.empty(2 * n)
    xy[0::2], xy[1::2] = px, py
    return "[" + ",".join(["%.2f" % v for v in xy.tolist()]) + "]"


def write_file(root: Path, seed: int = 0) -> Path:
    """``ROOT/annotations/lvis_v1_train.json`` and ``ROOT/images/train2017/`` (made once)."""
    path = root / "annotations" / "lvis_v1_train.json"
    if path.exists():
        return path
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    image_index, category_index, n_img, n_cat = simulate_lvis(seed)
    sizes = rng.integers(0, len(SIZES), n_img)
    ids = np.sort(rng.choice(600_000, n_img, replace=False)) + 1  # COCO-like sparse ids

    images_dir = root / "images" / "train2017"
    images_dir.mkdir(parents=True, exist_ok=True)
    sources, links = {}, {}
    for i in tqdm(range(n_img), desc="linking images", unit="img"):
        s = int(sizes[i])
        if links.get(s, MAX_LINKS) >= MAX_LINKS:  # a new source file of this size
            sources[s] = root / "images" / f"source-{s}-{len(sources)}.jpg"
            _jpeg(sources[s], SIZES[s], seed * 100 + len(sources))
            links[s] = 0
        target = images_dir / f"{ids[i]:012d}.jpg"
        if not target.exists():
            os.link(sources[s], target)
        links[s] += 1

    image_counts = np.bincount(
        np.unique(image_index * n_cat + category_index) % n_cat, minlength=n_cat)
    instance_counts = np.bincount(category_index, minlength=n_cat)
    categories = [{
        "frequency": "r" if image_counts[c] <= 10 else "c" if image_counts[c] <= 100 else "f",
        "id": c + 1, "synset": f"thing_{c + 1}.n.01", "image_count": int(image_counts[c]),
        "instance_count": int(instance_counts[c]), "synonyms": [f"thing_{c + 1}", f"object {c + 1}"],
        "def": f"a generated category number {c + 1}, standing in for an LVIS synset", "name": f"thing_{c + 1}",
    } for c in range(n_cat)]

    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    order = np.argsort(image_index, kind="stable")  # boxes placed image by image
    with open(tmp, "w") as f:
        f.write('{"info": {"description": "LVIS v1-sized file generated by benchmarks/lvis_scale.py", '
                '"version": "1.0", "year": 2026}, "annotations": [')
        for k, a in enumerate(tqdm(order, desc="writing annotations", unit="ann", mininterval=2)):
            i = image_index[a]
            W, H = SIZES[sizes[i]]
            w = float(min(W - 1, rng.lognormal(np.log(W / 6), 0.8)) + 1)
            h = float(min(H - 1, rng.lognormal(np.log(H / 6), 0.8)) + 1)
            x, y = float(rng.uniform(0, W - w)), float(rng.uniform(0, H - h))
            polys = [_polygon_text(rng, x, y, w, h, int(np.clip(rng.lognormal(np.log(POINTS_MEDIAN), POINTS_SIGMA), 3, 400)))
                     for _ in range(2 if rng.random() < 0.1 else 1)]
            f.write(("," if k else "") + f'{{"area": {w * h * 0.7:.2f}, "id": {a + 1}, "segmentation": '
                    f'[{",".join(polys)}], "image_id": {ids[i]}, "bbox": [{x:.2f}, {y:.2f}, {w:.2f}, {h:.2f}], '
                    f'"category_id": {category_index[a] + 1}}}')
        f.write('], "images": [')
        present = [set() for _ in range(n_img)]
        for i, c in zip(image_index.tolist(), category_index.tolist()):
            present[i].add(c + 1)
        for i in tqdm(range(n_img), desc="writing images", unit="img", mininterval=2):
            W, H = SIZES[sizes[i]]
            name = f"{ids[i]:012d}.jpg"
            neg = [int(c) for c in rng.choice(n_cat, rng.integers(0, 15), replace=False) + 1 if c not in present[i]]
            not_exh = sorted(rng.choice(sorted(present[i]), min(len(present[i]), rng.integers(0, 3)), replace=False).tolist())
            f.write(("," if i else "") + json.dumps({
                "date_captured": "2013-11-14 11:18:45", "neg_category_ids": neg, "id": int(ids[i]), "license": 1,
                "height": H, "width": W, "flickr_url": f"http://farm4.staticflickr.com/1/{name}",
                "coco_url": f"http://images.cocodataset.org/train2017/{name}",
                "not_exhaustive_category_ids": [int(c) for c in not_exh]}))
        f.write('], "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, '
                '"name": "Attribution-NonCommercial-ShareAlike License"}], "categories": ')
        f.write(json.dumps(categories) + "}")
    tmp.rename(path)
    return path


#: LVIS v1 val's number of images: the evaluation measures on a file this size
VAL_IMAGES = 19_809


def write_val(root: Path, train: Path, seed: int = 0) -> tuple[Path, Path]:
    """``ROOT/annotations/lvis_v1_val.json`` (the train file's first 19,809 images and their
    annotations: LVIS v1 val's size) and ``ROOT/val_detections.json`` (made once): for a
    random 60 % of the annotations a detection with its box shifted by up to a tenth of its
    size, half as many boxes of random categories, scores at random."""
    path, dets = root / "annotations" / "lvis_v1_val.json", root / "val_detections.json"
    if path.exists() and dets.exists():
        return path, dets
    data = json.loads(train.read_text())
    images = data["images"][:VAL_IMAGES]
    keep = {img["id"] for img in images}
    annotations = [a for a in data["annotations"] if a["image_id"] in keep]
    cat_ids = [c["id"] for c in data["categories"]]
    path.write_text(json.dumps({**data, "images": images, "annotations": annotations}))
    del data
    rng = np.random.default_rng(seed)
    out = []
    for a in annotations:
        x, y, w, h = a["bbox"]
        if rng.random() < 0.6:
            dx, dy = rng.uniform(-0.1, 0.1, 2) * (w, h)
            out.append({"image_id": a["image_id"], "category_id": a["category_id"],
                        "bbox": [round(x + dx, 2), round(y + dy, 2), w, h], "score": round(float(rng.random()), 4)})
        if rng.random() < 0.3:
            out.append({"image_id": a["image_id"], "category_id": int(rng.choice(cat_ids)),
                        "bbox": [x, y, w, h], "score": round(float(rng.random()), 4)})
    dets.write_text(json.dumps(out))
    return path, dets


# ----------------------------------------------------------------------------- measurements
_LOAD = """
import json, resource, sys, time
start = time.perf_counter()
from drcl.data.annotations import load_annotations
import inspect
params = inspect.signature(load_annotations).parameters
kw = {"records": sys.argv[2] == "records"} if "records" in params else {}
if sys.argv[2] == "segmentations" and "segmentations" in params:
    kw["segmentations"] = True
ann = load_annotations(sys.argv[1], **kw)  # (before the compact layout every load kept the records)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "images": ann.num_images, "instances": len(ann.category_index), "categories": ann.num_categories}))
"""


_EVALUATE = """
import json, resource, sys, time
start = time.perf_counter()
from drcl.cli import main
code = main(["evaluate", "--gt", sys.argv[1], "--detections", sys.argv[2], "--json", sys.argv[3]])
seconds = time.perf_counter() - start
r = json.load(open(sys.argv[3]))
print(json.dumps({"seconds": seconds, "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "exit": code, **{k: r[k] for k in ("AP", "APr", "APc", "APf", "num_images", "num_detections")}}))
"""


def measure_evaluate(gt: Path, detections: Path, out: Path, src: Path) -> dict:
    """``drcl evaluate`` of ``detections`` against ``gt`` in one fresh process: wall time, peak
    memory and the metrics it printed (a before / after pair must agree on them)."""
    proc = subprocess.run([sys.executable, "-c", _EVALUATE, str(gt), str(detections), str(out)],
                          env=_env(src), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"drcl evaluate failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _env(src: Path) -> dict:
    """A child's environment: one thread, drcl from ``src``."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(src.resolve())}


def measure_load(path: Path, mode: str, src: Path) -> dict:
    """Load time and peak memory of one fresh process (one thread); ``mode``: ``arrays``
    (training), ``segmentations`` (Mask R-CNN training) or ``records`` (evaluation)."""
    env = _env(src)
    out = subprocess.run([sys.executable, "-c", _LOAD, str(path), mode],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _smaps(pid: int) -> dict:
    """PSS, private memory and private heap (GB) of one process, from ``/proc/PID/smaps``. A
    DataLoader worker's private memory includes the shared-memory batches it has made and the
    main process has not mapped yet (with masks, tens of MB that come and go); its private heap
    (private pages of anonymous mappings) leaves them out, and is where copied records would be."""
    values, heap, anonymous = {}, 0.0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts[0].endswith(":") and "-" in parts[0]:  # a mapping: address range ... [path]
                path = parts[5] if len(parts) > 5 else ""
                anonymous = path == "" or path.startswith("[heap") or path.startswith("[anon")
            elif len(parts) == 3 and parts[2] == "kB":
                key, kb = parts[0].rstrip(":"), int(parts[1]) / 2**20
                values[key] = values.get(key, 0.0) + kb
                if anonymous and key in ("Private_Clean", "Private_Dirty"):
                    heap += kb
    return {"pss": values.get("Pss", 0.0), "private": values.get("Private_Clean", 0.0) + values.get("Private_Dirty", 0.0),
            "heap": heap, "rss": values.get("Rss", 0.0)}


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def _progress(out_dir: Path, log: Path) -> int:
    """Iterations done: the training log's last row, or the loader script's last line."""
    try:
        lines = (out_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1]).get("iter", 0) if lines else 0
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    try:
        done = [line for line in log.read_text().splitlines() if line.startswith("batches ")]
        return int(done[-1].split()[1]) if done else 0
    except FileNotFoundError:
        return 0


def measure_run(command: list[str], out_dir: Path, batch: int, workers: int, every: float, src: Path) -> dict:
    """Run ``command``, sampling the memory of it and its DataLoader workers every ``every``
    s: PSS of all of them, and each worker's private memory against the images it loaded."""
    env = _env(src)
    log_path = out_dir.with_suffix(".log")
    log = open(log_path, "w")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    samples, peak_main = [], 0.0
    start = time.time()
    while proc.poll() is None:
        time.sleep(every)
        try:
            main = _smaps(proc.pid)
            workers_now = [_smaps(p) for p in _children(proc.pid)]
        except (FileNotFoundError, ProcessLookupError):
            continue
        peak_main = max(peak_main, main["rss"])
        it = _progress(out_dir, log_path)
        samples.append({"t": round(time.time() - start, 1), "iter": it,
                        "images_per_worker": it * batch / max(1, workers),
                        "main": main, "workers": workers_now,
                        "total_pss": main["pss"] + sum(w["pss"] for w in workers_now)})
    log.close()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command))} failed (exit {proc.returncode}); see {log_path}")
    return {"command": " ".join(map(str, command)), "samples": samples, "seconds": round(time.time() - start, 1),
            "peak_main_rss_gb": peak_main, "workers": workers, **summary(samples, workers)}


def summary(samples: list[dict], workers: int) -> dict:
    """What a run's samples say: total PSS at its highest, and each worker's private memory
    from when it settled to the end. A worker's own start (imports, decoder buffers, the
    allocator's pools for the largest images it meets) takes its first few hundred images:
    growth is counted from a quarter of the run, at most 500 images a worker, in."""
    full = [s for s in samples if len(s["workers"]) == workers]
    last = full[-1]
    settled = min(500.0, 0.25 * last["images_per_worker"])
    first = next(s for s in full if s["images_per_worker"] >= settled)
    kind = "heap" if "heap" in last["workers"][0] else "private"  # (runs measured before "heap" was recorded)
    growth = [b[kind] - a[kind] for a, b in zip(first["workers"], last["workers"])]
    return {"images_per_worker": {"first": first["images_per_worker"], "last": last["images_per_worker"]},
            "total_pss_gb": max(s["total_pss"] for s in full), "worker_memory": kind,
            "worker_private_gb": {"start": [w[kind] for w in full[0]["workers"]],
                                  "first": [w[kind] for w in first["workers"]],
                                  "last": [w[kind] for w in last["workers"]]},
            "worker_growth_mb": [g * 1024 for g in growth],
            "worker_private_all_gb": {"first": [w["private"] for w in first["workers"]],
                                      "last": [w["private"] for w in last["workers"]]}}


def report(results: dict) -> str:
    """Markdown rows of every measurement in ``results.json``, each run summarised alike."""
    lines = ["| label | load, arrays: s / peak GB | with segmentations | with records |", "|---|---|---|---|"]
    for label, r in results.items():
        cells = [f"{r[k]['seconds']:.1f} / {r[k]['peak_gb']:.2f}" if k in r else "-"
                 for k in ("load", "load_segmentations", "load_records")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| label | `drcl evaluate`, val-sized file: s / peak GB | AP / APr / APc / APf |", "|---|---|---|"]
    for label, r in results.items():
        if "evaluate" in r:
            e = r["evaluate"]
            lines.append(f"| {label} | {e['seconds']:.1f} / {e['peak_gb']:.2f} | "
                         + " / ".join(f"{e[k]:.4f}" for k in ("AP", "APr", "APc", "APf")) + " |")
    lines += ["", "| label | run | images per worker (settled -> end) | main peak RSS GB | total PSS GB | "
              "worker memory | GB at start / settled / end | growth MB |", "|---|---|---|---:|---:|---|---|---|"]
    for label, r in results.items():
        for name in ("pretrain", "finetune", "loader_pretrain", "loader_finetune"):
            if name not in r:
                continue
            run = r[name]
            s = summary(run["samples"], run.get("workers", 4))
            private = s["worker_private_gb"]
            lines.append(f"| {label} | {name} | {s['images_per_worker']['first']:.0f} -> "
                         f"{s['images_per_worker']['last']:.0f} | {run['peak_main_rss_gb']:.2f} | "
                         f"{s['total_pss_gb']:.2f} | {s['worker_memory']} | "
                         + " / ".join(f"{min(private[k]):.3f}-{max(private[k]):.3f}" for k in ("start", "first", "last"))
                         + " | " + ", ".join(f"{g:.0f}" for g in s["worker_growth_mb"]) + " |")
    return "\n".join(lines)


def _sets(kind: str, path: Path, images: Path, iters: int, batch: int, workers: int) -> list[str]:
    sets = [f"data.train_json={path}", f"data.train_images={images}", f"data.workers={workers}",
            f"train.max_iters={iters}", f"train.batch_size={batch}", "train.threads=1", "train.log_every=5",
            f"train.checkpoint_every={iters}", "sampler.threshold=0.001"]
    return sets + (["data.image_size=64", "train.health_every=0"] if kind == "pretrain" else ["model.masks=true"])


def run_command(kind: str, path: Path, images: Path, out: Path, iters: int, batch: int, workers: int) -> list[str]:
    """``drcl pretrain`` (tiny, 64 px views) or ``drcl finetune`` (tiny, Mask R-CNN) on the file."""
    cmd = [sys.executable, "-m", "drcl", kind, "--config", "tiny" if kind == "pretrain" else "tiny_finetune",
           "--out", str(out)] + (["--no-eval"] if kind == "finetune" else [])
    for s in _sets(kind, path, images, iters, batch, workers):
        cmd += ["--set", s]
    return cmd


#: The DataLoader a training command builds (through the same functions), iterated without the
#: model: the workers' memory over thousands of images in minutes instead of hours (a Mask R-CNN
#: step with 1,203 classes takes about a minute on these cores).
_LOADER = """
import inspect, json, sys
from drcl.config import load_config
from drcl.data.dataset import DetectionDataset, collate
from drcl.engine.trainer import make_loader, prepare_run
kind, out, batches = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = load_config("tiny" if kind == "pretrain" else "tiny_finetune", json.loads(sys.argv[4]))
kw = {"segmentations": True} if kind == "finetune" and "segmentations" in inspect.signature(prepare_run).parameters else {}
info, device, ann = prepare_run(cfg, out, False, **kw)
if kind == "pretrain":
    from drcl.pretrain import _Compose
    from drcl.views import TwoViewTransform, collate_views
    dataset = DetectionDataset(ann, transforms=_Compose(None, TwoViewTransform(size=cfg["data"]["image_size"])),
                               masks=False)
    collate_fn = collate_views
else:
    import torch
    from torchvision.transforms import v2
    dataset = DetectionDataset(ann, transforms=v2.Compose([v2.RandomHorizontalFlip(0.5),
                                                           v2.ToDtype(torch.float32, scale=True)]), masks=True)
    collate_fn = collate
    assert dataset.has_masks
sampler, loader, _ = make_loader(cfg, ann, dataset, collate_fn, info)
done, epoch = 0, 0
while done < batches:
    sampler.set_epoch(epoch)
    for _ in loader:
        done += 1
        if done % 5 == 0:
            print(f"batches {done}", flush=True)
        if done == batches:
            break
    epoch += 1
print(f"batches {done}", flush=True)
"""


def loader_command(kind: str, path: Path, images: Path, out: Path, batches: int, batch: int, workers: int) -> list[str]:
    sets = _sets(kind, path, images, batches, batch, workers)
    return [sys.executable, "-c", _LOADER, kind, str(out), str(batches), json.dumps(sets)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=Path("runs/lvis_scale"))
    p.add_argument("--only", choices=["write", "load", "evaluate", "pretrain", "finetune", "loaders"], nargs="*")
    p.add_argument("--report", action="store_true", help="print the Markdown rows of ROOT/results.json and stop")
    p.add_argument("--iters", type=int, default=500, help="iterations of the drcl pretrain run")
    p.add_argument("--finetune-iters", type=int, default=12, help="iterations of the drcl finetune run (masks)")
    p.add_argument("--loader-batches", type=int, default=500,
                   help="batches of each loader-only run (4 workers, batch 16: 2,000 images a worker)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--every", type=float, default=5.0, help="seconds between memory samples")
    p.add_argument("--label", default="", help="name of this measurement in results.json (e.g. before / after)")
    p.add_argument("--src", type=Path, default=Path(__file__).resolve().parent.parent / "src",
                   help="the drcl source tree to measure (another checkout's src/ for a before / after table)")
    args = p.parse_args()
    if args.report:
        print(report(json.loads((args.root / "results.json").read_text())))
        return
    parts = args.only or ["write", "load", "evaluate", "pretrain", "finetune", "loaders"]
    path = write_file(args.root)
    images = args.root / "images" / "train2017"
    print(f"{path}: {path.stat().st_size / 2**20:,.0f} MiB")
    results_path = args.root / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    mine = results.setdefault(args.label or "latest", {})
    mine["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    mine["file_mib"] = path.stat().st_size / 2**20

    def save():  # after every measurement: a long run cut short keeps what it measured
        results_path.write_text(json.dumps(results, indent=1))

    if "load" in parts:
        for mode, key in (("arrays", "load"), ("segmentations", "load_segmentations"), ("records", "load_records")):
            r = measure_load(path, mode, args.src)
            mine[key] = r
            print(f"load ({mode}): {r['seconds']:.1f} s, peak {r['peak_gb']:.2f} GB", flush=True)
            save()
    if "evaluate" in parts:
        val, dets = write_val(args.root, path)
        r = measure_evaluate(val, dets, args.root / f"eval-{args.label or 'latest'}.json", args.src)
        mine["evaluate"] = r
        save()
        print(f"evaluate ({r['num_images']:,} images, {r['num_detections']:,} detections): {r['seconds']:.1f} s, "
              f"peak {r['peak_gb']:.2f} GB; AP {r['AP']:.4f} APr {r['APr']:.4f}", flush=True)
    runs = [(kind, kind, run_command, args.iters if kind == "pretrain" else args.finetune_iters,
             args.batch if kind == "pretrain" else 4) for kind in ("pretrain", "finetune") if kind in parts]
    if "loaders" in parts:
        runs += [(f"loader_{kind}", kind, loader_command, args.loader_batches, args.batch) for kind in ("pretrain", "finetune")]
    for name, kind, command, n, batch in runs:
        out = args.root / f"run-{name}-{args.label or 'latest'}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        r = measure_run(command(kind, path, images, out, n, batch, args.workers), out, batch, args.workers,
                        args.every, args.src)
        mine[name] = r
        save()
        print(f"{name}: {r['images_per_worker']['first']:.0f} -> {r['images_per_worker']['last']:.0f} images per "
              f"worker in {r['seconds']:.0f} s; main peak RSS {r['peak_main_rss_gb']:.2f} GB; total PSS "
              f"{r['total_pss_gb']:.2f} GB; worker private "
              + ", ".join(f"{a:.3f}->{b:.3f}" for a, b in zip(r["worker_private_gb"]["first"], r["worker_private_gb"]["last"]))
              + " GB; growth " + ", ".join(f"{g:.0f}" for g in r["worker_growth_mb"]) + " MB", flush=True)


if __name__ == "__main__":
    main()
