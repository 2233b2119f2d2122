"""How good are class-agnostic boxes? Recall of the ground-truth boxes at IoU 0.5 with the first 8
and 100 proposals per image (R@8, R@100), per frequency group, with time per image, for

* selective search, fast and quality modes (``drcl proposals --method selective-search``);
* a class-agnostic detector: ``drcl finetune --config tiny_finetune --set data.class_agnostic=true``
  on the train images for ``--finetune-iters`` iterations, its detections on the val images
  (``drcl proposals --method detector``);
* random boxes (``data.boxes: random``'s :class:`~drcl.data.boxes.RandomBoxes`: sides 10-50 % of
  the image's, seed 0);

on the demo's data (``drcl demo``'s sizes, :data:`drcl.demo.DEMO`), scored on its val set. One
process, one thread (``torch.set_num_threads(1)``, OpenCV on one thread).

    OMP_NUM_THREADS=1 python benchmarks/proposals.py --out runs/proposals

Prints a Markdown table (the recall function: :func:`drcl.evaluation.recall.proposal_recall`)
and writes OUT/results.json; the data and the detector run are kept in OUT and reused.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from drcl.config import load_config
from drcl.data.annotations import load_annotations
from drcl.data.boxes import RandomBoxes, load_proposals
from drcl.data.selective_search import FilterSettings
from drcl.data.synthetic import make_dataset, split_paths
from drcl.demo import DEMO
from drcl.evaluation.recall import format_recall, proposal_recall
from drcl.finetune import finetune
from drcl.proposals import detector_proposals, read_input, selective_search_proposals, write_proposals

KS = (8, 100)


def _score(name: str, val, path: Path, seconds: float) -> dict:
    result = proposal_recall(val, load_proposals(path, val, max_per_image=max(KS)), KS)
    result["ms_per_image"] = 1000 * seconds
    print(f"{name}: R@8 {100 * result['all'][8]:.1f}, R@100 {100 * result['all'][100]:.1f}, "
          f"{1000 * seconds:.0f} ms per image", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/proposals")
    p.add_argument("--finetune-iters", type=int, default=200)
    args = p.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)
    data = out / "data"
    val_json, val_images = split_paths(data, "val")
    if not val_json.exists():
        make_dataset(data, seed=0, progress=False, **DEMO["data"])
    val = load_annotations(val_json, val_images)
    rows, runs = {}, {}

    for mode in ("fast", "quality"):
        ann = read_input(val_json, val_images, progress=False)
        records, seconds = selective_search_proposals(ann, per_image=max(KS), mode=mode, progress=False)
        path = write_proposals(out / f"selective-search-{mode}.json", records)
        rows[f"selective search ({mode})"] = _score(f"selective search {mode}", val, path, seconds)

    run = out / "detector"
    train_json, train_images = split_paths(data, "train")
    overrides = [f"data.train_json={train_json}", f"data.train_images={train_images}",
                 f"data.image_size={DEMO['data']['image_size']}", "data.class_agnostic=true",
                 f"train.max_iters={args.finetune_iters}", f"train.checkpoint_every={args.finetune_iters}",
                 "train.threads=1"]
    cfg = load_config("tiny_finetune", overrides)
    if not (run / "checkpoints" / "last.pt").exists():
        start = time.perf_counter()
        finetune(cfg, run, evaluate=False)
        runs["finetune_seconds"] = time.perf_counter() - start
    cfg = load_config("tiny_finetune", overrides + ["eval.score_threshold=0.0"])
    ann = read_input(val_json, val_images, progress=False)
    records, seconds = detector_proposals(ann, run / "checkpoints" / "last.pt", cfg, per_image=max(KS), progress=False)
    path = write_proposals(out / "detector.json", records)
    rows[f"class-agnostic detector ({args.finetune_iters} it.)"] = _score("detector", val, path, seconds)

    torch.manual_seed(0)
    boxes = RandomBoxes(n=max(KS))
    start = time.perf_counter()
    records = []
    for img in val.images:
        _, target = boxes(torch.zeros(3, img["height"], img["width"]), {"image_id": img["id"]})
        b = target["boxes"].as_subclass(torch.Tensor)
        for k, box in enumerate(b.tolist()):  # random boxes have no ranking: score by draw order
            records.append({"image_id": img["id"], "category_id": 1, "score": 1.0 - k / len(b),
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    seconds = (time.perf_counter() - start) / val.num_images
    path = write_proposals(out / "random.json", records)
    rows["random boxes"] = _score("random", val, path, seconds)

    table = format_recall(rows, KS)
    print(table)
    meta = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}",
            "filter": FilterSettings().__dict__, "val_images": val.num_images, **runs}
    (out / "results.json").write_text(json.dumps({"rows": rows, "meta": meta, "table": table}, indent=2, default=str))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
