"""The ``drcl`` command line.

Every command turns a :class:`~drcl.errors.DataError` into one line on stderr and exit code 2;
wrong arguments exit with 2 as argparse does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from drcl.errors import DataError


def _add_on_bad(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--on-bad",
        choices=("error", "skip"),
        default="error",
        help="bad records: stop with exit code 2 (default) or drop them and report how many",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drcl",
        description="2DRCL pre-training for long-tailed object detection.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("make-data", help="write a synthetic long-tailed dataset in LVIS v1 format")
    p.add_argument("out", help="output folder (annotations/ and images/ are created inside)")
    p.add_argument("--classes", type=int, default=60)
    p.add_argument("--train-images", type=int, default=1000)
    p.add_argument("--val-images", type=int, default=200)
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--imbalance", type=float, default=200.0, help="largest / smallest class instance count")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_data)

    p = sub.add_parser("stats", help="validate an annotation file and show its long-tail statistics")
    p.add_argument("annotations", help="COCO or LVIS v1 annotation JSON")
    p.add_argument("--images", help="image folder: also check every image file exists and decodes")
    p.add_argument("--json", dest="json_out", help="write per-category and per-group statistics here")
    p.add_argument("--plot", help="write the sorted class-frequency curve (PNG) here; with "
                   "--repeat-factors also the per-class sampling share under each sampler")
    p.add_argument("--repeat-factors", choices=("random", "rfs", "irfs", "dynamic"),
                   help="compute repeat factors with this mode and add them to --json")
    p.add_argument("--threshold", type=float, default=1e-3, help="repeat threshold t (default 1e-3, as on LVIS)")
    p.add_argument("--alpha", type=float, help="dynamic mode: weight a in [0, 1] (1 image-level, 0 instance-level)")
    _add_on_bad(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("pretrain", help="2DRCL pre-training (torchrun for several processes)")
    p.add_argument("--config", required=True, help="YAML config (see configs/ and docs/config.md)")
    p.add_argument("--out", required=True, help="run folder: config.yaml, metrics.jsonl, tb/, checkpoints/")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_iters=20 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("demo", help="the end-to-end demo on generated data")
    p.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except DataError as e:
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
    from drcl.data.stats import category_stats, format_table, plot_frequency

    ann = load_annotations(
        args.annotations,
        images_dir=args.images,
        on_bad=args.on_bad,
        check_images="decode" if args.images else "none",
        progress=True,
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
    stats["repeat_factors"] = {str(rec["id"]): float(r) for rec, r in zip(ann.images, img)}
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
    return sampling_shares(*arrays, threshold=args.threshold)


class _UsageError(Exception):
    """Bad combination of command-line options (exit 2)."""


def cmd_pretrain(args) -> int:
    from drcl.config import ConfigError, load_config
    from drcl.engine.pretrain import NonFiniteLoss, pretrain

    try:
        cfg = load_config(args.config, args.overrides)
        pretrain(cfg, args.out, resume=args.resume)
    except ConfigError as e:
        raise _UsageError(str(e)) from None
    except (FileExistsError, FileNotFoundError) as e:
        raise _UsageError(str(e)) from None
    except NonFiniteLoss as e:
        print(f"drcl pretrain: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


def cmd_demo(args) -> int:
    from drcl.data.annotations import load_annotations
    from drcl.data.stats import category_stats, format_table, plot_frequency
    from drcl.data.synthetic import make_dataset

    out = Path(args.out)
    data = out / "data"
    make_dataset(data, seed=0)
    ann = load_annotations(data / "annotations" / "train.json", data / "images" / "train", check_images="header")
    stats = category_stats(ann)
    print(format_table(stats))
    plot_frequency(stats, str(out / "class_frequency.png"))
    print(f"wrote {out / 'class_frequency.png'}")
    print(
        "drcl demo: pre-training, fine-tuning and evaluation are not yet available in this "
        "version; the demo stops after generating and checking the data."
    )
    return 0


def _report_skipped(ann) -> None:
    if ann.skipped:
        parts = ", ".join(f"{n} {what}" for what, n in sorted(ann.skipped.items()))
        print(f"{ann.path}: skipped {sum(ann.skipped.values())} bad records ({parts})", file=sys.stderr)


def _write_json(path: str, obj) -> None:
    """Write JSON atomically: a reader never sees half a file."""
    import os
    import tempfile

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
