"""Configs are data: YAML files merged over the defaults below, then ``--set`` overrides.

Every key a YAML file or ``--set`` may hold appears in :data:`DEFAULTS`; an unknown key, a
value of the wrong type or a value outside a key's choices is a :class:`ConfigError` naming
the key (and the file). ``docs/config.md`` describes each key.

    cfg = load_config("configs/tiny.yaml", ["train.max_iters=20", "model.norm=gn"])
    cfg["train"]["max_iters"]  # 20
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import fields
from pathlib import Path

import yaml

from drcl.model.drcl import DRCLConfig


class ConfigError(Exception):
    """A config file or override the user has to fix; the CLI prints it and exits 2."""

    exit_code = 2


DEFAULTS: dict = {
    "seed": 0,
    "data": {
        "train_json": None,
        "train_images": None,
        "val_json": None,
        "val_images": None,
        "on_bad": "error",
        "boxes": "gt",
        "proposals": None,
        "class_agnostic": False,
        "image_size": 160,
        "crop_scale": [0.3, 1.0],
        "photometric": "auto",
        "workers": 2,
    },
    "sampler": {
        "mode": "dynamic",
        "threshold": 1e-3,
        "schedule": "linear",
        "alpha_start": 1.0,
        "alpha_end": 0.0,
        "schedule_steps": 4,
        "updates": 20,
    },
    "model": {**{f.name: f.default for f in fields(DRCLConfig)}, "masks": False, "init": None, "init_style": "auto"},
    "train": {
        "max_iters": 250,
        "batch_size": 4,
        "checkpoint_every": 50,
        "snapshot_every": 0,
        "log_every": 10,
        "health_every": 25,
        "precise_bn_images": 512,
        "optimizer": "sgd",
        "lr": 0.03,
        "reference_batch": 0,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "warmup_iters": 20,
        "lr_schedule": "cosine",
        "lr_steps": [0.67, 0.89],
        "lr_gamma": 0.1,
        "grad_clip": 0.0,
        "momentum_base": 0.99,
        "amp": "none",
        "channels_last": False,
        "sync_bn": True,
        "device": "auto",
        "threads": 0,
        "log_image_ids": False,
    },
    "eval": {
        "batch_size": 8,
        "score_threshold": 0.0001,
        "max_dets": 300,
    },
}

CHOICES = {
    "data.on_bad": ("error", "skip"),
    "data.boxes": ("gt", "proposals", "random"),
    "data.photometric": ("auto", "loader", "device"),
    "sampler.mode": ("random", "rfs", "irfs", "dynamic"),
    "sampler.schedule": ("linear", "cosine", "step"),
    "model.preset": ("tiny", "r50-fpn", "r101-fpn"),
    "model.norm": ("bn", "gn", "frozen_bn"),
    "model.ar_loss": ("l1", "mse"),
    "model.init_style": ("auto", "pytorch"),
    "train.optimizer": ("sgd", "adamw"),
    "train.lr_schedule": ("cosine", "step"),
    "train.amp": ("none", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
}

POSITIVE = {"eval.batch_size", "eval.max_dets", "data.image_size", "model.dim", "model.temperature",
            "model.hcl_queue", "model.lcl_queue", "model.boxes_per_image", "model.mask_patch", "train.max_iters", "train.batch_size", "train.checkpoint_every", "train.log_every",
            "sampler.updates", "sampler.threshold", "train.lr"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _set(cfg: dict, dotted: str, value, source: str) -> None:
    flat_defaults = _flatten(DEFAULTS)
    if dotted not in flat_defaults:
        hint = difflib.get_close_matches(dotted, flat_defaults, n=1)
        raise ConfigError(f"{source}: unknown key '{dotted}'" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    node = cfg
    *parents, last = dotted.split(".")
    for p in parents:
        node = node[p]
    node[last] = _check_value(dotted, value, flat_defaults[dotted], source)


def _check_value(key: str, value, default, source: str):
    def bad(expected: str):
        return ConfigError(f"{source}: key '{key}' must be {expected}, got {value!r}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
    elif isinstance(default, list):
        if not isinstance(value, list):
            raise bad("a list")
    elif default is None or isinstance(default, str):
        if value is not None and not isinstance(value, str):
            raise bad("a string")
    if key in CHOICES and value not in CHOICES[key]:
        raise bad("one of " + ", ".join(CHOICES[key]))
    if key in POSITIVE and value <= 0:
        raise bad("positive")
    return value


def _merge(cfg: dict, data, source: str, prefix: str = "") -> None:
    flat = _flatten(DEFAULTS)
    for k, v in data.items():
        key = f"{prefix}{k}"
        is_section = key not in flat and any(f.startswith(key + ".") for f in flat)
        if is_section and not isinstance(v, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping of keys to values, got {v!r}")
        if is_section:
            _merge(cfg, v, source, key + ".")
        else:
            _set(cfg, key, v, source)


def parse_override(text: str) -> tuple[str, object]:
    """``"train.lr=0.1"`` -> ``("train.lr", 0.1)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


#: The configs shipped with the package (``configs/`` in the repository links here).
PACKAGED = Path(__file__).parent / "configs"


def resolve(path: str | Path) -> Path:
    """``path`` itself, else the packaged config of that name (``tiny`` or ``tiny.yaml``)."""
    path = Path(path)
    if path.exists():
        return path
    for candidate in (PACKAGED / path.name, PACKAGED / f"{path.name}.yaml"):
        if candidate.exists():
            return candidate
    return path


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> dict:
    """Defaults, then the YAML file (a path, or the name of a packaged config such as
    ``tiny``), then each ``key=value`` override; validated."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = str(resolve(path))
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
        _merge(cfg, data, path)
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value, f"--set {text}")
    _check_whole(cfg, path or "config")
    return cfg


def drcl_config(cfg: dict) -> DRCLConfig:
    """The pre-training module's settings from the ``model`` section."""
    names = {f.name for f in fields(DRCLConfig)}
    return DRCLConfig(**{k: v for k, v in cfg["model"].items() if k in names})


def _check_whole(cfg: dict, source: str) -> None:
    try:
        drcl_config(cfg)
    except ValueError as e:
        raise ConfigError(f"{source}: model: {e}") from None
    if cfg["data"]["boxes"] == "proposals" and not cfg["data"]["proposals"]:
        raise ConfigError(f"{source}: key 'data.proposals' must name a proposals file when data.boxes is 'proposals'")
    if cfg["sampler"]["schedule_steps"] < 2:
        raise ConfigError(f"{source}: key 'sampler.schedule_steps' must be at least 2, got {cfg['sampler']['schedule_steps']}")
    scale = cfg["data"]["crop_scale"]
    if not (len(scale) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scale)
            and 0.0 < scale[0] <= scale[1] <= 1.0):
        raise ConfigError(f"{source}: key 'data.crop_scale' must be [low, high] with 0 < low <= high <= 1, got {scale!r}")
    if cfg["train"]["reference_batch"] < 0:
        raise ConfigError(f"{source}: key 'train.reference_batch' must be >= 0 (0: train.lr as given), got "
                          f"{cfg['train']['reference_batch']}")
    if cfg["train"]["precise_bn_images"] < 0:
        raise ConfigError(f"{source}: key 'train.precise_bn_images' must be >= 0 (0: off), got "
                          f"{cfg['train']['precise_bn_images']}")
    if cfg["train"]["health_every"] < 0:
        raise ConfigError(f"{source}: key 'train.health_every' must be >= 0 (0: off), got {cfg['train']['health_every']}")
    if not 0.0 <= cfg["sampler"]["alpha_start"] <= 1.0 or not 0.0 <= cfg["sampler"]["alpha_end"] <= 1.0:
        raise ConfigError(f"{source}: keys 'sampler.alpha_start' and 'sampler.alpha_end' must lie in [0, 1]")


def require(cfg: dict, *keys: str) -> None:
    """Keys a command needs that have no default (e.g. ``data.train_json``)."""
    flat = _flatten(cfg)
    for key in keys:
        if flat.get(key) in (None, ""):
            raise ConfigError(f"key '{key}' is not set: give it in the config file or with --set {key}=...")


def dump_config(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
