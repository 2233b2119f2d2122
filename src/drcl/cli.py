"""The ``drcl`` command line.

Every command turns a :class:`~drcl.errors.DataError` or a
:class:`~drcl.errors.MissingDependency` (an optional package the command needs) into one line on
stderr and exit code 2; wrong arguments exit with 2 as argparse does. Commands import what they
use when they run, so ``drcl --help`` and ``drcl --version`` need nothing beyond the standard
library. Output cut short by its reader (``drcl stats ... | head``) ends quietly with exit code
141 (128 + SIGPIPE), as for a command the pipe's signal ends, not with a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from drcl.errors import DataError, MissingDependency


def _add_on_bad(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--on-bad",
        choices=("error", "skip"),
        default="error",
        help="bad records: stop with exit code 2 (default) or drop them and report how many",
    )


INIT_HELP = ("start 2DRCL's encoder from these weights (overrides model.init): a torchvision ImageNet "
             "classifier file or 'imagenet' (the torch cache's), a drcl upstream / pretrain / finetune run "
             "or its file, or a torchvision, detectron2 or mmdet detector checkpoint; see OUT/init.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drcl",
        description="2DRCL pre-training for long-tailed object detection.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("make-data", help="write a synthetic long-tailed dataset in LVIS v1 format")
    p.add_argument("out", help="output folder (annotations/ and images/ are created inside)")
    p.add_argument("--classes", type=int, default=60)
    p.add_argument("--train-images", type=int, default=1000)
    p.add_argument("--val-images", type=int, default=200)
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--imbalance", type=float, default=200.0,
                   help="largest / smallest class instance count (1: balanced)")
    p.add_argument("--first-class", type=int, default=1,
                   help="first category id: ids FIRST..FIRST+CLASSES-1, each id always the same appearance, so "
                        "sets with non-overlapping id ranges share no class (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-objects", type=int, default=6,
                   help="objects per image are 1..N (default 6); more makes crowded scenes (smaller objects) "
                        "where instance-level rebalancing has boxes to choose between (LCL takes 8 per image)")
    p.add_argument("--processes", type=int, default=1,
                   help="render the images in N processes (the same files; default 1)")
    p.set_defaults(func=cmd_make_data)

    p = sub.add_parser("stats", help="validate an annotation file and show its long-tail statistics")
    p.add_argument("annotations", help="COCO or LVIS v1 annotation JSON")
    p.add_argument("--images", help="image folder: also check every image file exists and decodes")
    p.add_argument("--json", dest="json_out", help="write per-category and per-group statistics here")
    p.add_argument("--plot", help="write the sorted class-frequency curve (PNG) here; with "
                   "--repeat-factors also the per-class sampling share under each sampler")
    p.add_argument("--repeat-factors", choices=("random", "rfs", "irfs", "dynamic"),
                   help="compute repeat factors with this mode and add them to --json")
    p.add_argument("--threshold", type=float, default=1e-3,
                   help="repeat threshold t (default 1e-3: LVIS's, and sampler.threshold's default). It is "
                        "sized for LVIS's 100k images: on a small set every factor may stay 1.00, and the "
                        "output then suggests a t for this set's size (the tiny configs use 0.05)")
    p.add_argument("--alpha", type=float, help="dynamic mode: weight a in [0, 1] (1 image-level, 0 instance-level)")
    _add_on_bad(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("upstream", help="supervised classifier backbone on a dataset's box crops (an ImageNet "
                                        "stand-in that --init reads)")
    p.add_argument("--config", required=True, help="YAML config (e.g. configs/tiny_upstream.yaml)")
    p.add_argument("--out", required=True, help="run folder: config.yaml, metrics.jsonl, checkpoints/, classifier.pt")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    p.set_defaults(func=cmd_upstream)

    p = sub.add_parser("proposals", help="class-agnostic boxes for pre-training: selective search or a detector")
    p.add_argument("input", help="an image folder, or a COCO / LVIS annotation file (with --images)")
    p.add_argument("--out", required=True, help="proposals file to write (COCO results format, for data.proposals)")
    p.add_argument("--images", help="image folder of the annotation file")
    p.add_argument("--method", choices=("selective-search", "detector"), default="selective-search")
    p.add_argument("--per-image", type=int, default=8, metavar="K", help="boxes per image (default 8, the paper's)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes: selective search runs N at once; the detector gets N-1 image decoders")
    p.add_argument("--nms-iou", type=float, default=0.5, help="IoU of the non-maximum suppression (default 0.5)")
    ss = p.add_argument_group("selective search (docs/proposals.md)")
    ss.add_argument("--mode", choices=("fast", "quality"), default="fast", help="OpenCV's strategy (default fast)")
    ss.add_argument("--max-side", type=int, default=512, help="search a copy shrunk to this longest side (default 512)")
    ss.add_argument("--min-side", type=float, default=None, help="drop boxes with a side under this many pixels (16)")
    ss.add_argument("--min-size", type=float, default=None, help="drop boxes with sqrt(wh/WH) under this (0.1)")
    ss.add_argument("--max-size", type=float, default=None, help="drop boxes with sqrt(wh/WH) over this (0.8, SoCo's)")
    ss.add_argument("--max-aspect", type=float, default=None, help="drop boxes with w/h over this or under its inverse (3)")
    det = p.add_argument_group("detector")
    det.add_argument("--checkpoint", help="a drcl finetune checkpoint (train it with --set data.class_agnostic=true)")
    det.add_argument("--config", help="config for eval.batch_size, eval.score_threshold, train.device, train.threads")
    det.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _add_on_bad(p)
    p.set_defaults(func=cmd_proposals)

    p = sub.add_parser("pretrain", help="2DRCL pre-training (torchrun for several processes)")
    p.add_argument("--config", required=True, help="YAML config (see configs/ and docs/config.md)")
    p.add_argument("--out", required=True, help="run folder: config.yaml, metrics.jsonl, tb/, checkpoints/")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_iters=20 (repeatable)")
    p.add_argument("--init", metavar="WEIGHTS", help=INIT_HELP)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="train a Faster / Mask R-CNN (optionally from a 2DRCL run), then evaluate")
    p.add_argument("--config", required=True, help="YAML config (e.g. configs/tiny_finetune.yaml)")
    p.add_argument("--out", required=True, help="run folder: config.yaml, metrics.jsonl, checkpoints/, eval/")
    p.add_argument("--init", metavar="WEIGHTS", help=INIT_HELP.replace("2DRCL's encoder", "the detector"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation on the val set at the end")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="score detections (or a fine-tuned model) under LVIS rules")
    p.add_argument("--gt", help="ground-truth COCO / LVIS JSON (with --detections)")
    p.add_argument("--detections", help="detections in COCO results format (JSON list)")
    p.add_argument("--iou-type", choices=("bbox", "segm"), default="bbox")
    p.add_argument("--checkpoint", help="a drcl finetune checkpoint: run it on the config's val set first")
    p.add_argument("--config", help="config naming data.val_json and data.val_images (with --checkpoint)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", dest="json_out", help="write the metrics here (also per-category CSV and plot beside it)")
    p.add_argument("--train-gt", help="training annotation file: add its per-category image and instance counts "
                                      "to the CSV and plot AP against them (with --json, or --checkpoint, "
                                      "which writes them into its eval folder)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("visualize", help="draw ground truth and detections, a gallery of chosen categories "
                                         "and a confusion table of who takes their boxes")
    p.add_argument("--gt", required=True, help="ground-truth COCO / LVIS JSON")
    p.add_argument("--detections", required=True, help="detections in COCO results format (JSON list, bbox)")
    p.add_argument("--images", required=True, help="the ground truth's image folder")
    p.add_argument("--out", required=True, help="output folder: images/, gallery.png, confusion.csv, confusion.png")
    p.add_argument("--categories", default="rare",
                   help="rare (default), common, frequent, or category ids: 3,17,42")
    p.add_argument("--score", type=float, default=0.3, help="minimum score of a drawn or counted detection (default 0.3)")
    p.add_argument("--max-images", type=int, default=16, help="images drawn and in the gallery (default 16)")
    _add_on_bad(p)
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser("probe", help="linear probe of frozen box features: val top-1 per frequency group")
    p.add_argument("--checkpoint", help="weights in any layout --init reads: a pretrain run's encoder.pt, "
                                        "checkpoints/last.pt or folder, an upstream classifier, a detector "
                                        "checkpoint; parts it lacks keep the random init (omit: the random-init baseline)")
    p.add_argument("--config", required=True, help="config naming the train and val data and model.preset/norm")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--balanced", action="store_true", help="weigh classes by inverse frequency in the classifier")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", help="write the results here")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("export", help="write pre-trained weights for torchvision, detectron2 or mmdetection")
    p.add_argument("checkpoint", help="a pretrain run's encoder.pt, checkpoints/last.pt or run folder")
    p.add_argument("--format", required=True, choices=("torchvision", "detectron2", "mmdet"),
                   help="torchvision and mmdet write a torch.save file (.pth); detectron2 a pickle whose name "
                        "must end in .pkl (detectron2 loads only .pkl by exact key)")
    p.add_argument("--out", required=True, help="output file: NAME.pth, or NAME.pkl for detectron2")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="generate data, pre-train, fine-tune 2DRCL vs random init, write a report "
                                    "(about 10 minutes on 2 CPU cores)")
    p.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    p.set_defaults(func=cmd_demo)
    return parser


def version() -> str:
    """The installed distribution's version (package metadata), or ``drcl.__version__`` in a
    source tree run without installing (pyproject.toml reads its version from there)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("drcl")
    except PackageNotFoundError:
        from drcl import __version__

        return __version__


#: GNU OpenMP's idle threads spin before they sleep; two multi-threaded jobs on the same cores
#: then take turns spinning, and a tiny pre-training step went 4x slower beside another
#: 2-thread job (1.3x with PASSIVE; 11 % slower alone: BENCHMARKS.md, "A busy machine").
#: Read when OpenMP starts (the first ``import torch``), so set before any command imports it.
WAIT_POLICY = "PASSIVE"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)  # the user's own setting wins
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args) or 0
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit flush
        return code
    except BrokenPipeError:
        # The reader went away (``| head``). Point stdout at /dev/null so that the exit flush
        # of whatever is still buffered cannot fail again, and end as SIGPIPE would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE
    except (DataError, MissingDependency) as e:
        print(f"drcl {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except _UsageError as e:
        print(f"drcl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"drcl {args.command}: interrupted", file=sys.stderr)
        return 130


def cmd_make_data(args) -> int:
    from drcl.data.synthetic import make_dataset

    try:
        summary = make_dataset(
            args.out,
            classes=args.classes,
            train_images=args.train_images,
            val_images=args.val_images,
            image_size=args.image_size,
            imbalance=args.imbalance,
            seed=args.seed,
            max_objects=args.max_objects,
            first_class=args.first_class,
            processes=args.processes,
        )
    except ValueError as e:
        print(f"drcl make-data: error: {e}", file=sys.stderr)
        return 2
    f = summary["frequency"]
    for split in ("train", "val"):
        s = summary[split]
        print(f"{split}: {s['images']} images, {s['instances']} instances -> {s['annotations']}")
    print(f"{summary['categories']} categories: {f['r']} rare, {f['c']} common, {f['f']} frequent")
    print(f"next: drcl stats {summary['train']['annotations']} --images {summary['train']['images_dir']}")
    return 0


def cmd_stats(args) -> int:
    from drcl.data.annotations import load_annotations
    from drcl.data.stats import category_stats, format_table, plot_frequency, pyplot

    if args.plot:
        pyplot("--plot")  # before reading (and decoding) everything
    ann = load_annotations(
        args.annotations,
        images_dir=args.images,
        on_bad=args.on_bad,
        check_images="decode" if args.images else "none",
        progress=True,
        records=False,
    )
    _report_skipped(ann)
    stats = category_stats(ann)
    print(format_table(stats))
    shares = None
    if args.repeat_factors:
        shares = _add_repeat_factors(args, ann, stats)
    if args.json_out:
        _write_json(args.json_out, stats)
        print(f"wrote {args.json_out}")
    if args.plot:
        plot_frequency(stats, args.plot, shares)
        print(f"wrote {args.plot}")
    return 0


def _add_repeat_factors(args, ann, stats: dict) -> dict:
    """Add ``repeat_factors`` (image id -> factor) and per-category factors to ``stats``,
    print the expected per-group share; return the per-class shares of every sampler."""
    import numpy as np

    from drcl.sampling import expected_sampling_share, repeat_factors_for, sampling_shares

    if args.repeat_factors == "dynamic" and args.alpha is None:
        raise _UsageError("--repeat-factors dynamic needs --alpha A (1 = image-level, 0 = instance-level)")
    if args.repeat_factors != "dynamic" and args.alpha is not None:
        raise _UsageError("--alpha applies to --repeat-factors dynamic only")
    alpha = 1.0 if args.alpha is None else args.alpha
    arrays = (ann.image_index, ann.category_index, ann.num_images, ann.num_categories)
    try:
        cat, img = repeat_factors_for(*arrays, args.repeat_factors, args.threshold, alpha)
    except ValueError as e:
        raise _UsageError(str(e)) from None
    stats["repeat_factor_settings"] = {"mode": args.repeat_factors, "threshold": args.threshold,
                                       "alpha": args.alpha}
    stats["repeat_factors"] = {str(i): float(r) for i, r in zip(ann.image_ids.tolist(), img)}
    for entry, r in zip(stats["categories"], cat):
        entry["repeat_factor"] = float(r)
    share = expected_sampling_share(img, ann.image_index, ann.category_index, ann.num_categories)
    freq = np.array(ann.frequency)
    print(f"repeat factors ({args.repeat_factors}, t={args.threshold:g}"
          + (f", alpha={alpha:g}" if args.repeat_factors == "dynamic" else "")
          + f"): images drawn {img.sum():.0f} times per epoch (x{img.mean():.2f}), max factor {img.max():.2f}")
    print("expected instance share per group: " + ", ".join(
        f"{stats['groups'][g]['name']} {stats['groups'][g]['instance_share']:.1%} -> {share[freq == g].sum():.1%}"
        for g in ("r", "c", "f")))
    if args.repeat_factors != "random" and round(float(img.max()), 2) <= 1.0:
        print(_threshold_note(arrays, args.repeat_factors, args.threshold, alpha))
    return sampling_shares(*arrays, threshold=args.threshold)


#: LVIS v1 train: t = 1e-3 over its 100,170 images repeats the categories in fewer than ~100 images.
LVIS_THRESHOLD, LVIS_TRAIN_IMAGES = 1e-3, 100_170
TINY_THRESHOLD = 0.05  # configs/tiny.yaml and tiny_finetune.yaml


def _threshold_note(arrays, mode: str, threshold: float, alpha: float) -> str:
    """One line for a threshold that repeats nothing: the rarest category's score (a category
    is repeated only when its score is below t) and a t that would repeat something, from the
    data's size: LVIS's t scaled to this many images (the same absolute number of images)."""
    from drcl.sampling import category_frequencies, category_repeat_factors

    num_images = arrays[2]
    # With t = 1 and no square root the factor is max(1, 1 / s) = 1 / s (every score is <= 1).
    unit = category_repeat_factors(*category_frequencies(*arrays), mode, 1.0, alpha, sqrt=False)
    rarest = 1.0 / unit.max()
    scaled = LVIS_THRESHOLD * LVIS_TRAIN_IMAGES / max(num_images, 1)

    def repeats(t):  # the rarest category's factor at t shows above 1.00
        return round((t / rarest) ** 0.5, 2) > 1.0

    tries = []
    if repeats(scaled):
        tries.append(f"--threshold {scaled:.2g} (LVIS's 1e-3 scaled from its {LVIS_TRAIN_IMAGES:,} images "
                     f"to these {num_images:,})")
    if repeats(TINY_THRESHOLD) and f"{scaled:.2g}" != f"{TINY_THRESHOLD:.2g}":
        tries.append(f"{TINY_THRESHOLD:g} (the tiny configs')")
    advice = "try " + " or ".join(tries) if tries else f"any t above {rarest:.2g} repeats the rarest category"
    return (f"note: every repeat factor is 1.00, so {mode} changes nothing here: a category is repeated only "
            f"when its score is below t={threshold:g}, and the rarest's is {rarest:.2g}; {advice}")


class _UsageError(Exception):
    """Bad combination of command-line options (exit 2)."""


def _train_command(args, run) -> int:
    from drcl.config import ConfigError, load_config
    from drcl.engine.trainer import NonFiniteLoss, ResumeError

    try:
        cfg = load_config(args.config, args.overrides)
        if getattr(args, "init", None):
            cfg["model"]["init"] = args.init  # the flag overrides the config key
        run(cfg)
    except (ConfigError, ResumeError, FileExistsError, FileNotFoundError) as e:
        raise _UsageError(str(e)) from None
    except NonFiniteLoss as e:
        print(f"drcl {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


def cmd_upstream(args) -> int:
    from drcl.upstream import upstream

    return _train_command(args, lambda cfg: upstream(cfg, args.out, resume=args.resume))


def cmd_proposals(args) -> int:
    from drcl.data.selective_search import FilterSettings
    from drcl.proposals import (detector_proposals, read_input, selective_search_proposals, summary_line,
                                write_proposals)

    if args.per_image < 1 or args.workers < 1:
        raise _UsageError("--per-image and --workers must be at least 1")
    if not 0 < args.nms_iou <= 1:
        raise _UsageError(f"--nms-iou must lie in (0, 1], got {args.nms_iou}")
    if args.method == "detector":
        from drcl.config import ConfigError, load_config

        if not args.checkpoint:
            raise _UsageError("--method detector needs --checkpoint RUN/checkpoints/last.pt (a drcl finetune run)")
        try:
            cfg = load_config(args.config, args.overrides)
        except ConfigError as e:
            raise _UsageError(str(e)) from None
    else:
        if args.checkpoint or args.config or args.overrides:
            raise _UsageError("--checkpoint, --config and --set apply to --method detector only")
        try:
            given = {k: getattr(args, k) for k in ("min_side", "min_size", "max_size", "max_aspect")}
            settings = FilterSettings(**{k: v for k, v in given.items() if v is not None})
        except ValueError as e:
            raise _UsageError(str(e)) from None
        from drcl.data.selective_search import ximgproc

        ximgproc()  # a missing OpenCV now, not after reading every image
    ann = read_input(args.input, args.images, args.on_bad)
    if args.method == "detector":
        records, seconds = detector_proposals(ann, args.checkpoint, cfg, args.per_image, args.workers, args.nms_iou)
    else:
        records, seconds = selective_search_proposals(ann, args.per_image, args.workers, args.mode, args.max_side,
                                                      settings, args.nms_iou, args.on_bad)
    _report_skipped(ann)
    write_proposals(args.out, records)
    print(summary_line(ann, records, seconds))
    print(f"wrote {args.out}; pre-train on it with --set data.boxes=proposals --set data.proposals={args.out}")
    return 0


def cmd_pretrain(args) -> int:
    from drcl.pretrain import pretrain

    return _train_command(args, lambda cfg: pretrain(cfg, args.out, resume=args.resume))


def cmd_finetune(args) -> int:
    from drcl.finetune import finetune

    return _train_command(args, lambda cfg: finetune(cfg, args.out, resume=args.resume, evaluate=not args.no_eval))


def cmd_evaluate(args) -> int:
    from drcl.evaluation.lvis_eval import (add_train_counts, evaluate_detections, format_results, plot_ap_vs_frequency,
                                           write_per_category_csv)

    if args.checkpoint:
        if args.gt or args.detections or not args.config:
            raise _UsageError("use --checkpoint CKPT --config CFG, or --gt GT.json --detections DT.json")
        from drcl.config import ConfigError, load_config
        from drcl.engine.trainer import pick_device
        from drcl.finetune import evaluate_model, load_finetuned, load_val

        try:
            cfg = load_config(args.config, args.overrides)
        except ConfigError as e:
            raise _UsageError(str(e)) from None
        detector, meta = load_finetuned(args.checkpoint, cfg)
        try:
            val = load_val(cfg, meta.get("class_agnostic", False))
        except ConfigError as e:
            raise _UsageError(str(e)) from None
        train = _load_train_gt(args)
        if train is not None and meta.get("class_agnostic"):  # counted as the detector saw them: one "object"
            from drcl.data.annotations import merge_categories

            train = merge_categories(train)
        device = pick_device(cfg["train"]["device"])
        out = Path(args.json_out).parent if args.json_out else Path(args.checkpoint).parent.parent / "eval"
        results = evaluate_model(detector.to(device), cfg, device, out, train, meta["masks"], meta["category_ids"],
                                 val=val)
        if args.json_out:
            _write_json(args.json_out, {k: {m: v for m, v in r.items() if m != "per_category"} for k, r in results.items()})
            print(f"wrote {args.json_out} and the detections to {out / 'detections.json'}")
        return 0
    if not (args.gt and args.detections):
        raise _UsageError("use --gt GT.json --detections DT.json, or --checkpoint CKPT --config CFG")
    train = _load_train_gt(args)
    result = evaluate_detections(args.gt, args.detections, iou_type=args.iou_type)
    if train is not None:
        add_train_counts(result, train)
    print(format_results(result))
    if args.json_out:
        _write_json(args.json_out, {m: v for m, v in result.items() if m != "per_category"})
        stem = Path(args.json_out).with_suffix("")
        write_per_category_csv(result, f"{stem}_per_category.csv")
        try:
            plot_ap_vs_frequency(result, f"{stem}_ap_vs_frequency.png")
        except ValueError:
            pass
        except MissingDependency as e:
            print(f"skipped: {e}")
        print(f"wrote {args.json_out}, {stem}_per_category.csv")
    return 0


def _load_train_gt(args):
    """``--train-gt``'s annotations (validated), or ``None``."""
    if not args.train_gt:
        return None
    from drcl.data.annotations import load_annotations

    return load_annotations(args.train_gt)


def cmd_visualize(args) -> int:
    from drcl.evaluation.visualize import format_summary, visualize

    try:
        result = visualize(args.gt, args.detections, args.images, args.out, categories=args.categories,
                           min_score=args.score, max_images=args.max_images, on_bad=args.on_bad)
    except ValueError as e:
        raise _UsageError(str(e)) from None
    _report_skipped(result["gt"])
    skipped = result["skipped"]
    if skipped["detections"]:
        print(f"{args.detections}: skipped {skipped['detections']} bad detections", file=sys.stderr)
    if skipped["image files"]:
        print(f"{args.gt}: skipped {skipped['image files']} images whose file is missing or bad", file=sys.stderr)
    print(f"{args.categories} (score >= {args.score:g}): {format_summary(result['rows'])}")
    out = Path(args.out)
    drawn = f"{len(result['images'])} drawn images in {out / 'images'}, {out / 'gallery.png'}, " if result["images"] else ""
    print(f"wrote {drawn}{out / 'confusion.csv'}, {out / 'confusion.png'}")
    return 0


def cmd_probe(args) -> int:
    import torch

    from drcl.config import ConfigError, load_config
    from drcl.evaluation.probe import format_probe, run_probe

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise _UsageError(str(e)) from None
    if cfg["train"]["threads"]:
        torch.set_num_threads(cfg["train"]["threads"])
    try:
        result = run_probe(cfg, args.checkpoint, seed=args.seed, balanced=args.balanced)
    except ConfigError as e:
        raise _UsageError(str(e)) from None
    print(format_probe(result))
    if args.json_out:
        _write_json(args.json_out, result)
        print(f"wrote {args.json_out}")
    return 0


def cmd_export(args) -> int:
    from drcl.engine.checkpoint import encoder_weights
    from drcl.export import check_export_path, save_export

    try:
        check_export_path(args.format, args.out)  # before reading a checkpoint of maybe hundreds of MB
        path = save_export(encoder_weights(args.checkpoint), args.format, args.out)
    except ValueError as e:
        raise _UsageError(str(e)) from None
    print(f"wrote {path} ({args.format} layout; see docs/export.md)")
    return 0


def cmd_demo(args) -> int:
    from drcl.demo import run_demo

    out = Path(args.out)
    if (out / "pretrain" / "checkpoints" / "last.pt").exists():
        raise _UsageError(f"{out} holds an earlier demo: remove it or choose another --out")
    run_demo(out)
    return 0


def _report_skipped(ann) -> None:
    if ann.skipped:
        parts = ", ".join(f"{n} {what}" for what, n in sorted(ann.skipped.items()))
        print(f"{ann.path}: skipped {sum(ann.skipped.values())} bad records ({parts})", file=sys.stderr)


def _write_json(path: str, obj) -> None:
    from drcl.atomic import write_json

    write_json(path, obj)
