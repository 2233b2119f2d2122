"""The GPU run (issue 12): one prepared command that measures drcl where it is meant to run.

    PYTHONPATH=src python benchmarks/gpu.py --out DIR            # about 8 minutes on one H100 / H200
    PYTHONPATH=src python benchmarks/gpu.py --out DIR --smoke    # every part at toy sizes on the CPU
    PYTHONPATH=src python benchmarks/gpu.py --out DIR --parts 4 --budget-s 500   # the long run alone, longer

Writes DIR/gpu.json and DIR/gpu.md (Markdown tables), both rewritten after every measured
configuration, so a run cut off by a time limit still leaves what it measured. A rerun with
``--parts`` into the same DIR replaces only those parts. Each part has its own share of
``--budget-s`` (unused time passes on to the next part) and stops its loop when the share is
used, reporting how many steps it measured.

1. Pre-training step of the full 2DRCL module (``configs/lvis_r50.yaml``: r50-fpn, BatchNorm,
   batch 8 per GPU at 800 px, 8 boxes per image, full queues) and of the HCL-only (MoCo v2-like)
   step, on synthetic images and boxes already on the device: images/s, peak memory, model FLOPs
   per step (``torch.utils.flop_counter``: forward of both encoders + backward, counted once per
   model and batch; they do not depend on dtype or memory format) and MFU against the GPU's
   dense bf16 peak, in fp32, bf16 autocast and bf16 + channels_last (the config's setting); that
   setting with the batch copied from pinned host memory each step as the training loop does,
   with and without the views' photometric half applied in the step (``data.photometric:
   device``); what could raise MFU: fused SGD, twice the batch; and the training-health probe
   (:class:`drcl.engine.health.Health`: one extra backward per term, the box-embedding spread of
   16 images) on every step: its cost per probe, and so the overhead at ``train.health_every`` 25
   and 250. Each step is the training
   loop's (:func:`drcl.engine.trainer.train`): the views finished on the device, autocast
   forward, the NaN check, backward, gradient norm, SGD step, LR schedule, momentum update; the
   targets stay on the host, as the loop keeps them. On CUDA one extra step runs under
   ``torch.cuda.set_sync_debug_mode`` to count host-device syncs per step.
2. Fine-tuning step of Mask R-CNN r50-fpn (``configs/lvis_r50_finetune.yaml``: BatchNorm, bf16
   autocast, 1,203 LVIS classes + background) on 800 x 1066 synthetic images with boxes and
   masks, batch 2 and 8.
3. Input pipeline of pre-training (decode + the two box-aware views at 800 px + collate, through
   the training loop's seeded dataset) on the machine's CPUs, per number of DataLoader workers, on
   both photometric paths (``loader``: all of a view in the worker; ``device``: the worker decodes,
   crops and flips in uint8); then the fed rate: the full 2DRCL step taking its batches from real
   JPEG files through that many workers on the device path, against part 1's synthetic-batch rate
   of the same step (the goal: 90 % of it with at most 12 workers on a 16-core host).
4. The long run: the shipped ``tiny`` config on generated data (5,000 train images, 160 px, the
   photometric half on the device) at a GPU-sized batch for as many iterations as the part's
   budget allows (decided before the run from a timed warm-up; the schedules depend on it; it
   says when the 100 epochs wanted do not fit), the box probe at a snapshot every quarter of the
   run (``train.snapshot_every``) and at the end, then a short fine-tune from the result and from
   random init with the same fine-tuning iterations. AP only when faster-coco-eval is importable
   (the GPU machine has no package registry: bring its wheel); otherwise the probe and the
   fine-tuning loss, and AP is reported as not measured.

The generated data of parts 3 and 4 is made in the background (several processes) while parts 1
and 2 use the GPU, and finished before part 3 measures the CPUs. Bulky files live in ``--work``
(a temporary folder, removed at the end); DIR gets only the JSON, the tables and part 4's small
logs (configs, metrics.jsonl, health.json).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from drcl.atomic import atomic_write, write_json

# --------------------------------------------------------------------------- sizes

FULL = {
    "preset": "r50-fpn", "size": 800, "batch": 8, "boxes": 8, "warmup": 3, "steps": 10, "probe_images": 16,
    "probe_steps": 10,
    "ft_size": (800, 1066), "ft_batches": (2, 8), "ft_classes": 1203,
    "p3_images": 64, "p3_size": 800, "p3_batch": 1, "p3_workers": (1, 12, 4), "p3_fed_workers": (12, 8, 4),
    "p3_fed_warmup": 6,
    "p4_train": 5000, "p4_val": 1000, "p4_classes": 40, "p4_size": 160, "p4_batch": 64,
    "p4_workers": max(1, min(14, (os.cpu_count() or 1) - 2)),
    "p4_warm_iters": 30, "p4_min_iters": 50, "p4_max_iters": 100_000, "p4_ft_iters": 300, "p4_ft_batch": 16,
    "budget": 420.0, "p4_epochs": 100, "p4_probes": 4,
}
SMOKE = {
    "preset": "tiny", "size": 64, "batch": 2, "boxes": 8, "warmup": 0, "steps": 2, "probe_images": 2,
    "probe_steps": 1,
    "ft_size": (64, 80), "ft_batches": (1, 2), "ft_classes": 8,
    "p3_images": 16, "p3_size": 64, "p3_batch": 4, "p3_workers": (0, 1), "p3_fed_workers": (1,),
    "p3_fed_warmup": 1,
    "p4_train": 32, "p4_val": 16, "p4_classes": 8, "p4_size": 64, "p4_batch": 4, "p4_workers": 0,
    "p4_warm_iters": 2, "p4_min_iters": 2, "p4_max_iters": 4, "p4_ft_iters": 2, "p4_ft_batch": 2,
    "budget": 70.0, "p4_epochs": 1, "p4_probes": 2,
}
#: Share of the budget per part (normalised over the parts run).
WEIGHTS = {1: 65, 2: 25, 3: 110, 4: 220}

#: Dense (no sparsity) bf16 tensor-core peak in FLOP/s, by a substring of the device name; first match wins.
BF16_PEAK = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12),
    ("GH200", 989.4e12), ("H200", 989.4e12), ("H100", 989.4e12),
    ("A100", 312e12), ("L40S", 362e12), ("B200", 2250e12),
)

#: Part 4 learning rates at the GPU batch sizes (the tiny configs' are for batch 4). Pre-training at
#: batch 64: 0.01, between MoCo v2's linear rule (0.03 x 64 / 256 = 0.0075) and square-root scaling
#: of tiny's 0.005 at batch 4 (0.02), whose batch-4 counterpart grew the box embeddings. Fine-tuning
#: at batch 16: 0.02, Detectron's; the linear rule from tiny_finetune's 0.01 at 4 (0.04) invites the
#: from-scratch GroupNorm spikes its grad_clip guards against.
P4_LR = 0.01
P4_FT_LR = 0.02


def say(text: str) -> None:
    print(text, flush=True)


def bf16_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def shm_free() -> int | None:
    try:
        st = os.statvfs("/dev/shm")
        return st.f_bavail * st.f_frsize
    except OSError:
        return None


def workers_that_fit(workers: int, batch_bytes: int) -> int:
    """As many of ``workers`` as /dev/shm holds (each keeps 2 batches in flight, plus a margin):
    a container's small /dev/shm kills DataLoader workers with a bus error."""
    free_bytes = shm_free()
    if free_bytes is None or workers == 0:
        return workers
    return max(0, min(workers, int(free_bytes / (2.5 * batch_bytes))))


def error_record(e: BaseException) -> dict:
    return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            "traceback": traceback.format_exc(limit=8)[-3000:]}


# --------------------------------------------------------------------------- generated data (background)

def _make_all(jobs, processes: int) -> None:
    from drcl.data.synthetic import make_dataset

    for root, kw in jobs:
        start = time.perf_counter()
        make_dataset(root, progress=False, processes=processes, **kw)
        (Path(root) / "done.json").write_text(json.dumps({"seconds": time.perf_counter() - start, **kw}))


class Background:
    """The datasets of parts 3 and 4, made in a forked process (before CUDA starts); a dataset
    whose ``done.json`` exists (``--work`` of an earlier run) is not made again."""

    def __init__(self, jobs, processes: int):
        self.jobs = jobs
        self.proc = None
        todo = [(root, kw) for root, kw in jobs if not (Path(root) / "done.json").exists()]
        if todo:
            self.proc = mp.get_context("fork").Process(target=_make_all, args=(todo, processes), daemon=False)
            self.proc.start()

    def wait(self, deadline: float) -> dict:
        if self.proc is not None:
            self.proc.join(timeout=max(1.0, deadline - time.perf_counter()))
            if self.proc.is_alive():
                raise TimeoutError("the generated data was not ready within the part's budget")
            if self.proc.exitcode != 0:
                raise RuntimeError(f"generating the data failed (exit code {self.proc.exitcode}); see stderr")
        return {Path(root).name: json.loads((Path(root) / "done.json").read_text()) for root, _ in self.jobs}

    def stop(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


# --------------------------------------------------------------------------- part 1: pre-training step

def views_batch(b: int, size: int, boxes: int, seed: int = 0):
    """Two views and paired targets as the loader's collate gives them (CPU)."""
    from step_time import make_batch  # benchmarks/step_time.py

    x1, x2, targets = make_batch(b, size, boxes, seed)
    for i, t in enumerate(targets):
        t["ann_ids"] = torch.arange(len(t["labels"])) + 100 * i
        t["image_id"] = i + 1
    return x1, x2, targets, [dict(t) for t in targets]


def fill_queues(model) -> None:
    """Full queues of random keys: the steady state of a long run."""
    g = torch.Generator().manual_seed(1)
    for name in ("hcl_queue", "lcl_queue"):
        q = getattr(model, name, None)
        if q is None:
            continue
        keys = F.normalize(torch.randn(q.keys.shape, generator=g), dim=1)
        q.keys.copy_(keys.to(q.keys.device))
        q.labels.copy_(torch.randint(1, 20, q.labels.shape, generator=g).to(q.labels.device))
        q.ids.copy_(torch.randint(10**6, 10**9, q.ids.shape, generator=g).to(q.ids.device))
        q.filled.fill_(q.size)


def count_syncs(fn) -> dict:
    """Host-device synchronisations during ``fn()`` (CUDA's sync debug mode), by Python line."""
    where = Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            path = w.filename
            for marker in ("/src/", "/site-packages/"):
                if marker in path:
                    path = path.split(marker, 1)[1]
            where[f"{path}:{w.lineno}"] += 1
    return {"count": sum(where.values()), "where": where.most_common(12)}


def device_views(x1, x2, targets1, targets2, size: int, seed: int = 0):
    """The same batch as the device path's loader gives it: uint8 views and each view's
    photometric parameters (drawn as the workers draw them)."""
    from drcl.views import TwoViewTransform

    recipes = TwoViewTransform(size=size, photometric="device").recipes
    g = torch.Generator().manual_seed(seed)
    params = [torch.stack([recipes[v].draw(g) for _ in range(x1.shape[0])]) for v in (0, 1)]
    as_uint8 = [(x * 255).round().clamp(0, 255).to(torch.uint8) for x in (x1, x2)]
    return as_uint8[0], as_uint8[1], targets1, targets2, params[0], params[1]


class PretrainStep:
    """The training loop's 2DRCL step (:func:`drcl.engine.trainer.train`): the views finished on
    the device (their photometric half, on the device path), autocast forward, the NaN check,
    backward, gradient norm, SGD step, LR schedule, momentum update. Batches come as the loader
    gives them: pixels to move (pinned, queued copies), targets that stay on the host."""

    def __init__(self, cfg: dict, device: torch.device, amp_dtype, channels_last: bool, fused: bool = False,
                 size: int = 800, probe=None):
        from drcl.config import drcl_config
        from drcl.engine.trainer import build_optimizer, lr_factor
        from drcl.model.drcl import DRCL
        from drcl.views import TwoViewTransform

        self.t, self.device, self.amp_dtype = cfg["train"], device, amp_dtype
        torch.manual_seed(0)
        self.model = DRCL(drcl_config(cfg)).to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        fill_queues(self.model)
        if fused:
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.SGD(params, lr=self.t["lr"], momentum=self.t["momentum"],
                                             weight_decay=self.t["weight_decay"], fused=True)
        else:
            self.optimizer = build_optimizer(self.model, self.t)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda it: lr_factor(it, self.t))
        self.views = TwoViewTransform(size=size, photometric="device")  # finish() leaves float views as they are
        self.weights = torch.linspace(1, 5, 19, device=device)
        self.gen = torch.Generator()
        self.health = None
        if probe is not None:  # (images, boxes): the training-health probe on every step, as train.health_every 1
            from drcl.engine.health import Health

            self.health = Health(self.model, probe, every=1, warmup=0, max_iters=self.t["max_iters"],
                                 say=lambda text: None)

    def to_device(self, batch):
        from drcl.pretrain import _images_to_device

        return _images_to_device(batch, self.device)

    def forward_backward(self, batch, it: int):
        from drcl.engine.trainer import _check_finite
        from drcl.model.drcl import TERMS

        x1, x2, t1, t2 = self.views.finish(batch)
        self.gen.manual_seed(it)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            result = self.model(x1, x2, t1, t2, self.weights, self.gen)
        terms = [k for k in TERMS if k in result]
        _check_finite(result, terms, it, Path("no-checkpoint"))
        if self.health is not None:
            self.health.before_backward(it, result, terms)
        self.optimizer.zero_grad(set_to_none=True)
        result["loss"].backward()
        return result

    def __call__(self, batch, it: int) -> None:
        from drcl.model.memory import momentum_at

        self.forward_backward(batch, it)
        nn.utils.clip_grad_norm_(self.model.parameters(), math.inf)
        self.optimizer.step()
        self.scheduler.step()
        self.model.momentum_update(momentum_at(it / self.t["max_iters"], self.t["momentum_base"]))
        if self.health is not None:
            self.health.after_step(it)


def pretrain_step_config(cfg: dict, device: torch.device, s: dict, setting: dict, deadline: float, count_flops: bool,
                         syncs: bool) -> dict:
    """Build the step, then warm-up and timed steps on one batch; see the module docstring."""
    free(device)
    batch = setting.get("batch") or s["batch"]
    probe = None
    if setting.get("probe"):
        x, _, targets, _ = views_batch(s["probe_images"], s["size"], s["boxes"], seed=2)  # training's: 16 images
        probe = (x.to(device), [t["boxes"] for t in targets])
    step = PretrainStep(cfg, device, setting["amp"], setting["channels_last"], setting.get("fused", False), s["size"],
                        probe)
    host = views_batch(batch, s["size"], s["boxes"])
    if setting.get("photometric"):
        host = device_views(*host, size=s["size"])
    if device.type == "cuda":
        host = tuple(x.pin_memory() if torch.is_tensor(x) else x for x in host)
    on_device = step.to_device(host)
    record = {"amp": str(setting["amp"]).replace("torch.", "") if setting["amp"] else "none",
              "channels_last": setting["channels_last"], "batch_from_host": setting["host"],
              "photometric_on_device": bool(setting.get("photometric")), "fused_sgd": bool(setting.get("fused")),
              "health_probe": bool(setting.get("probe")), "batch": batch}

    def batch_for_step():
        return step.to_device(host) if setting["host"] else on_device

    it = 0
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step.forward_backward(batch_for_step(), it)
        step.optimizer.zero_grad(set_to_none=True)
        record["flops_per_step"] = int(counter.get_total_flops())
        it += 1
    start = time.perf_counter()
    for _ in range(s["warmup"]):
        step(batch_for_step(), it)
        it += 1
    sync(device)
    record["warmup_s"] = time.perf_counter() - start
    n, start, steps = 0, time.perf_counter(), s["probe_steps"] if setting.get("probe") else s["steps"]
    while n < steps and (n == 0 or time.perf_counter() < deadline):
        step(batch_for_step(), it)
        it, n = it + 1, n + 1
    sync(device)
    elapsed = time.perf_counter() - start
    record.update(steps=n, s_per_step=elapsed / n, images_per_s=batch * n / elapsed, peak_gib=peak_gib(device))
    if syncs and device.type == "cuda":
        try:
            record["syncs_per_step"] = count_syncs(lambda: step(batch_for_step(), it))
            sync(device)
        except Exception as e:  # a diagnostic only
            record["syncs_per_step"] = error_record(e)
    return record


#: Part 1's settings: the config's own (bf16 + channels_last) first, so that a short budget
#: still measures it; the last rows are what could raise MFU.
BF16 = torch.bfloat16
PART1_SETTINGS = [
    {"model": "2DRCL", "setting": "bf16+channels_last", "amp": BF16, "channels_last": True, "host": False},
    {"model": "HCL only", "setting": "bf16+channels_last", "amp": BF16, "channels_last": True, "host": False},
    {"model": "2DRCL", "setting": "bf16+channels_last, batch from host, photometric on the device", "amp": BF16,
     "channels_last": True, "host": True, "photometric": True},
    {"model": "2DRCL", "setting": "bf16+channels_last, batch from host", "amp": BF16, "channels_last": True,
     "host": True},
    {"model": "2DRCL", "setting": "bf16", "amp": BF16, "channels_last": False, "host": False},
    {"model": "HCL only", "setting": "bf16", "amp": BF16, "channels_last": False, "host": False},
    {"model": "2DRCL", "setting": "fp32", "amp": None, "channels_last": False, "host": False},
    {"model": "2DRCL", "setting": "bf16+channels_last, fused SGD", "amp": BF16, "channels_last": True, "host": False,
     "fused": True},
    {"model": "2DRCL", "setting": "bf16+channels_last, twice the batch", "amp": BF16, "channels_last": True,
     "host": False, "batch_factor": 2},
]
#: Part 1's row with the training-health probe on every step.
HEALTH_SETTING = "bf16+channels_last, health probe every step"
PART1_SETTINGS.append({"model": "2DRCL", "setting": HEALTH_SETTING, "amp": BF16, "channels_last": True, "host": False,
                       "probe": True})
#: The synthetic-batch rate that part 3's fed rate is compared with: the same step, fed from host memory
FED_REFERENCE = "bf16+channels_last, batch from host, photometric on the device"


def part1(ctx, res: dict, deadline: float) -> None:
    from drcl.config import load_config

    s, device = ctx.s, ctx.device
    over = [f"model.preset={s['preset']}"]
    if ctx.smoke:
        over += ["model.hcl_queue=256", "model.lcl_queue=256"]
    hcl_only = ["model.lcl=false", "model.ar=false", "model.sr=false"]
    models = {"2DRCL": load_config("lvis_r50", over), "HCL only": load_config("lvis_r50", over + hcl_only)}
    configs = PART1_SETTINGS
    m = models["2DRCL"]["model"]
    res.update(preset=s["preset"], norm=m["norm"], image_size=s["size"], batch=s["batch"], boxes_per_image=s["boxes"],
               hcl_queue=m["hcl_queue"], lcl_queue=m["lcl_queue"], bf16_peak_flops=bf16_peak(device),
               note=("images/s counts images (each is two views); steps reuse one batch already on the device except "
                     "the 'batch from host' rows (pinned pixels copied each step, targets on the host as the loop "
                     "keeps them); 'photometric on the device' applies the views' colour jitter, grayscale, blur and "
                     "solarize in the step (data.photometric: device); FLOPs (torch.utils.flop_counter) cover the "
                     "momentum forward and the online forward + backward, once per model and batch; MFU is against "
                     "the dense bf16 peak for every row"),
               rows=[])
    flops = {}
    for k, setting in enumerate(configs):
        setting = {**setting, "batch": s["batch"] * setting.get("batch_factor", 1)}
        name, label = setting["model"], setting["setting"]
        left = deadline - time.perf_counter()
        if left <= 0 and not ctx.smoke:  # the smoke run measures every configuration
            res["rows"].append({"model": name, "setting": label, "skipped": "budget used"})
            continue
        share = time.perf_counter() + left / (len(configs) - k)
        key = (name, setting["batch"])
        say(f"part 1: {name}, {label} ...")
        try:
            row = pretrain_step_config(models[name], device, s, setting, share, key not in flops, k == 0)
        except Exception as e:
            row = error_record(e)
            say(f"part 1: {name}, {label}: {row['error']}")
        finally:
            free(device)
        row = {"model": name, "setting": label, **row}
        if "flops_per_step" in row:
            flops[key] = row["flops_per_step"]
        if "images_per_s" in row:
            f = flops.get(key)
            row["flops_per_step"] = f
            row["mfu"] = (f / row["s_per_step"] / res["bf16_peak_flops"]) if f and res["bf16_peak_flops"] else None
            say(f"part 1: {name}, {label}: {row['images_per_s']:.1f} images/s ({row['steps']} steps), "
                f"peak {_fmt(row['peak_gib'], '{:.1f}')} GiB, MFU {_fmt(row['mfu'], '{:.1%}')}")
            if "syncs_per_step" in row and "count" in row["syncs_per_step"]:
                say(f"part 1: {row['syncs_per_step']['count']} host-device syncs per step")
        res["rows"].append(row)
        ctx.save()
    rate = {(r["model"], r["setting"]): r.get("images_per_s") for r in res["rows"]}
    res["2drcl_over_hcl_time"] = {c["setting"]: rate[("HCL only", c["setting"])] / rate[("2DRCL", c["setting"])]
                                  for c in configs if c["model"] == "HCL only"
                                  and rate.get(("HCL only", c["setting"])) and rate.get(("2DRCL", c["setting"]))}
    if flops.get(("2DRCL", s["batch"])) and flops.get(("HCL only", s["batch"])):
        res["2drcl_over_hcl_flops"] = flops[("2DRCL", s["batch"])] / flops[("HCL only", s["batch"])]
    base, probed = (next((r for r in res["rows"] if r.get("setting") == st and "s_per_step" in r), None)
                    for st in ("bf16+channels_last", HEALTH_SETTING))
    if base and probed:  # a probe's own cost, and what it adds at the configs' intervals
        per_probe = probed["s_per_step"] - base["s_per_step"]
        res["health_probe"] = {"s_per_probe": per_probe,
                               "overhead_at": {n: per_probe / n / base["s_per_step"] for n in (25, 250)}}


# --------------------------------------------------------------------------- part 2: fine-tuning step

def detection_batch(b: int, hw: tuple[int, int], boxes: int, classes: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    images, targets = [], []
    for _ in range(b):
        images.append(torch.rand(3, h, w, generator=g).to(device))
        xy = torch.rand(boxes, 2, generator=g) * torch.tensor([w, h]) * 0.7
        wh = 8 + torch.rand(boxes, 2, generator=g) * torch.tensor([w, h]) * 0.3
        xyxy = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w, h]))], 1)
        masks = torch.zeros(boxes, h, w, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(xyxy.round().long().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        labels = torch.randint(1, classes + 1, (boxes,), generator=g)
        targets.append({"boxes": xyxy.to(device), "labels": labels.to(device), "masks": masks.to(device)})
    return images, targets


def finetune_step_config(cfg: dict, device, s: dict, batch: int, deadline: float, smoke: bool) -> dict:
    from drcl.engine.trainer import _check_finite, build_optimizer, lr_factor
    from drcl.finetune import _Forward
    from drcl.model.detector import build_detector

    t, m = cfg["train"], cfg["model"]
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t["amp"])
    free(device)
    torch.manual_seed(0)
    # smoke: toy images, and fewer sampled RoIs (the mask head on 128 RoIs dominates a CPU step)
    size = {"min_size": s["ft_size"][0], "max_size": max(s["ft_size"]), "box_batch_size_per_image": 16,
            "rpn_batch_size_per_image": 32} if smoke else {}  # r50-fpn: 800 / 1333, torchvision's sampling
    model = build_detector(m["preset"], num_classes=s["ft_classes"] + 1, norm=m["norm"], masks=True, **size).to(device)
    model.train()
    optimizer = build_optimizer(model, t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, t))
    images, targets = detection_batch(batch, s["ft_size"], s["boxes"], s["ft_classes"], device)
    forward = _Forward()

    def step(it):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            result = forward(model, (images, targets), None, None)
        _check_finite(result, [k for k in result if k.startswith("loss_")], it, Path("no-checkpoint"))
        optimizer.zero_grad(set_to_none=True)
        result["loss"].backward()
        nn.utils.clip_grad_norm_(model.parameters(), math.inf)
        optimizer.step()
        scheduler.step()

    start = time.perf_counter()
    for it in range(s["warmup"]):
        step(it)
    sync(device)
    warm = time.perf_counter() - start
    n, start = 0, time.perf_counter()
    while n < s["steps"] and (n == 0 or time.perf_counter() < deadline):
        step(s["warmup"] + n)
        n += 1
    sync(device)
    elapsed = time.perf_counter() - start
    return {"batch": batch, "amp": t["amp"], "warmup_s": warm, "steps": n, "s_per_step": elapsed / n,
            "images_per_s": batch * n / elapsed, "peak_gib": peak_gib(device)}


def part2(ctx, res: dict, deadline: float) -> None:
    from drcl.config import load_config

    s, device = ctx.s, ctx.device
    cfg = load_config("lvis_r50_finetune", [f"model.preset={s['preset']}"])
    res.update(model=f"Mask R-CNN {s['preset']}", norm=cfg["model"]["norm"], image_size=list(s["ft_size"]),
               classes=s["ft_classes"], boxes_per_image=s["boxes"], amp=cfg["train"]["amp"],
               note=f"the fine-tuning config's bf16 autocast (train.amp={cfg['train']['amp']}), no channels_last; "
                    "batch already on the device", rows=[])
    batches = s["ft_batches"]
    for k, batch in enumerate(batches):
        left = deadline - time.perf_counter()
        if left <= 0 and not ctx.smoke:  # the smoke run measures every configuration
            res["rows"].append({"batch": batch, "skipped": "budget used"})
            continue
        say(f"part 2: batch {batch} ...")
        try:
            share = time.perf_counter() + left / (len(batches) - k)
            row = finetune_step_config(cfg, device, s, batch, share, ctx.smoke)
            say(f"part 2: batch {batch}: {row['images_per_s']:.1f} images/s ({row['steps']} steps), "
                f"peak {_fmt(row['peak_gib'], '{:.1f}')} GiB")
        except Exception as e:
            row = {"batch": batch, **error_record(e)}
            say(f"part 2: batch {batch}: {row['error']}")
        finally:
            free(device)
        res["rows"].append(row)
        ctx.save()


# --------------------------------------------------------------------------- part 3: input pipeline

class Pairs(torch.utils.data.Sampler):
    """``n`` ``(index, seed)`` pairs for :class:`~drcl.engine.loader.SeededDataset`, cycling over a
    dataset of ``size`` items."""

    def __init__(self, size: int, n: int):
        self.size, self.n = size, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return ((k % self.size, k) for k in range(self.n))


def measure_loader(dataset, batch: int, workers: int, window: float) -> dict:
    """Images/s of a DataLoader over ``dataset``. One round (a batch per worker) first, which
    includes starting the workers; when it took under half of ``window``, a second loader runs
    1 + R rounds (R of them fitting ``window`` at the first round's pace) and only its last R
    rounds are timed. Each loader runs to its end, so no busy worker is waited for or killed; a
    very slow pipeline costs one round."""
    from drcl.engine.loader import SeededDataset
    from drcl.views import collate_views

    per_round = max(1, workers)

    def run(batches: int) -> list[float]:
        loader = torch.utils.data.DataLoader(SeededDataset(dataset), batch_size=batch,
                                             sampler=Pairs(len(dataset), batches * batch), collate_fn=collate_views,
                                             num_workers=workers)
        arrived, start = [], time.perf_counter()
        for _ in loader:
            arrived.append(time.perf_counter() - start)
        return arrived

    threads = torch.get_num_threads()
    if workers == 0:
        torch.set_num_threads(1)  # one process on one core, as a worker runs
    try:
        first = run(per_round)[-1]
        rounds = int(window / first) if first < window / 2 else 0
        row = {"workers": workers, "batch": batch, "first_round_s": first}
        if rounds >= 2:
            arrived = run(per_round * (1 + rounds))
            seconds = arrived[-1] - arrived[per_round - 1]
            row.update(batches_timed=per_round * rounds, seconds=seconds,
                       images_per_s=per_round * rounds * batch / seconds)
        else:
            row.update(batches_timed=per_round, seconds=first, images_per_s=per_round * batch / first,
                       timing="first round only, worker start-up included (slow pipeline)")
    finally:
        torch.set_num_threads(threads)
    row["images_per_s_per_worker"] = row["images_per_s"] / per_round
    return row


def stage_times(raw, views) -> dict:
    """Seconds of each step of one view of image 0, on one thread, and the expected seconds per
    image (two views) from the views' probabilities: where the pipeline's time goes, and what
    the workers keep of it when the photometric half runs on the device."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timings = {}

        def timed(name, fn, *a):
            start = time.perf_counter()
            out = fn(*a)
            timings[name] = time.perf_counter() - start
            return out

        image = timed("decode", raw.load_image, 0)
        target = raw.target(0, *image.shape[-2:])
        boxes = tv_tensors.BoundingBoxes(target["boxes"].as_subclass(torch.Tensor), format="XYXY",
                                         canvas_size=tuple(image.shape[-2:]))
        x, _ = timed("crop_flip", views.geometric, tv_tensors.Image(image), boxes)
        timed("draw_photometric", views.recipes[0].draw, torch.Generator().manual_seed(0))
        to_float, jitter, gray, blur, solarize = views.reference[0].transforms
        x = timed("to_float", to_float, x.as_subclass(torch.Tensor))
        timed("color_jitter", jitter.transforms[0], x)
        timed("grayscale", v2.functional.rgb_to_grayscale, x, 3)
        kernel = blur.transforms[0].kernel_size
        timed(f"gaussian_blur_{kernel[0]}", blur.transforms[0], x)
        timed("solarize", v2.functional.solarize, x, 0.5)
        p = [[r.color_jitter_p, r.grayscale_p, r.blur_p, r.solarize_p] for r in views.recipes]
        photometric = [timings["to_float"] + q[0] * timings["color_jitter"] + q[1] * timings["grayscale"]
                       + q[2] * timings[f"gaussian_blur_{kernel[0]}"] + q[3] * timings["solarize"] for q in p]
        loader = timings["decode"] + 2 * timings["crop_flip"] + sum(photometric)
        device = timings["decode"] + 2 * (timings["crop_flip"] + timings["draw_photometric"])
        return {"seconds": timings, "expected_s_per_image": loader, "expected_s_per_image_device_path": device,
                "photometric_share": sum(photometric) / loader,
                "probabilities": {"color_jitter": p[0][0], "grayscale": p[0][1], "blur": [q[2] for q in p],
                                  "solarize": [q[3] for q in p]}}
    finally:
        torch.set_num_threads(threads)


def fed_rate(step: PretrainStep, dataset, batch: int, workers: int, window: float, warmup: int) -> dict:
    """Images/s of the full 2DRCL step fed by a DataLoader over ``dataset`` with ``workers``
    workers (pinned batches, as the training loop's): ``warmup`` steps first (workers start,
    the loader fills), then steps for ``window`` seconds."""
    from drcl.engine.loader import SeededDataset
    from drcl.views import collate_views

    cuda = step.device.type == "cuda"
    total = 10**7  # more than a window takes; the loader is dropped after it
    loader = torch.utils.data.DataLoader(SeededDataset(dataset), batch_size=batch, sampler=Pairs(len(dataset), total),
                                         collate_fn=collate_views, num_workers=workers, pin_memory=cuda)
    it, n = 0, 0
    source = iter(loader)
    try:
        for _ in range(warmup):
            step(step.to_device(next(source)), it)
            it += 1
        sync(step.device)
        start = time.perf_counter()
        while n == 0 or time.perf_counter() - start < window:
            step(step.to_device(next(source)), it)
            it, n = it + 1, n + 1
        sync(step.device)
        elapsed = time.perf_counter() - start
    finally:
        del source, loader
    return {"workers": workers, "batch": batch, "steps": n, "seconds": elapsed, "images_per_s": n * batch / elapsed}


def part3(ctx, res: dict, deadline: float) -> None:
    """The input pipeline at 800 px: per DataLoader worker count, the loader alone on each
    photometric path, then the full 2DRCL step fed by it (device path) against part 1's
    synthetic-batch rate of the same step."""
    from drcl.config import load_config
    from drcl.data.annotations import load_annotations
    from drcl.data.dataset import DetectionDataset
    from drcl.data.synthetic import split_paths
    from drcl.pretrain import _Compose
    from drcl.views import TwoViewTransform

    s, device = ctx.s, ctx.device
    res["data"] = ctx.background.wait(deadline)  # also keeps part 4's generation off the measured CPUs
    root = ctx.work / "p3-data"
    over = [f"model.preset={s['preset']}"] + (["model.hcl_queue=256", "model.lcl_queue=256"] if ctx.smoke else [])
    cfg = load_config("lvis_r50", over)
    size = s["p3_size"]
    ann = load_annotations(*split_paths(root, "train"), records=False)
    views = {path: TwoViewTransform(size=size, scale=tuple(cfg["data"]["crop_scale"]), photometric=path)
             for path in ("loader", "device")}
    datasets = {path: DetectionDataset(ann, transforms=_Compose(None, v), masks=False) for path, v in views.items()}
    batch = s["p3_batch"]
    batch_bytes = batch * 2 * 3 * size * size * 4
    res.update(image_size=size, batch=batch, fed_batch=s["batch"], images=ann.num_images,
               crop_scale=cfg["data"]["crop_scale"], cpu_count=os.cpu_count(),
               shm_free_gib=None if shm_free() is None else shm_free() / 2**30,
               note="JPEG decode + two box-aware views + collate through the seeded dataset, per DataLoader worker "
                    "count and photometric path (loader: all of a view in the worker; device: the worker decodes, "
                    "crops and flips in uint8 and draws the photometric parameters); workers=0 runs in the main "
                    "process on one thread. Fed: the full 2DRCL step (bf16 + channels_last) taking its batches from "
                    "such a loader on the device path, against part 1's step on a pinned host batch", rows=[],
               fed=[])
    say("part 3: time per step of one view ...")
    try:
        res["stages"] = stage_times(DetectionDataset(ann, masks=False), views["loader"])
        st = res["stages"]
        say(f"part 3: {st['expected_s_per_image']:.3f} s per image on one core, {st['photometric_share']:.0%} of "
            f"it photometric; {st['expected_s_per_image_device_path']:.3f} s on the device path: "
            + ", ".join(f"{k} {v:.4f} s" for k, v in st["seconds"].items()))
    except Exception as e:
        res["stages"] = error_record(e)
    ctx.save()
    loader_deadline = time.perf_counter() + 0.4 * (deadline - time.perf_counter())
    plan = [(path, w) for w in s["p3_workers"] for path in ("device", "loader")]
    for k, (path, w) in enumerate(plan):
        left = loader_deadline - time.perf_counter()
        if left <= 0 and not ctx.smoke:  # the smoke run measures every configuration
            res["rows"].append({"path": path, "workers": w, "skipped": "budget used"})
            continue
        if workers_that_fit(w, batch_bytes) < w:
            res["rows"].append({"path": path, "workers": w, "skipped": "/dev/shm too small for this many workers"})
            continue
        say(f"part 3: loader alone, {path} path, {w} workers ...")
        try:
            row = {"path": path, **measure_loader(datasets[path], batch, w, window=0.6 * left / (len(plan) - k))}
            say(f"part 3: {path} path, {w} workers: {row['images_per_s']:.2f} images/s "
                f"({row['images_per_s_per_worker']:.2f} per worker)")
        except Exception as e:
            row = {"path": path, "workers": w, **error_record(e)}
            say(f"part 3: {path} path, {w} workers: {row['error']}")
        res["rows"].append(row)
        ctx.save()
    p1 = {r["setting"]: r for r in ctx.results["parts"].get("1", {}).get("rows", []) if r.get("model") == "2DRCL"}
    synthetic = (p1.get(FED_REFERENCE) or {}).get("images_per_s")
    res["synthetic_images_per_s"] = synthetic
    step = None
    try:
        fed_workers = [w for w in s["p3_fed_workers"] if workers_that_fit(w, s["batch"] * 2 * 3 * size * size) >= w]
        for k, w in enumerate(fed_workers):
            left = deadline - time.perf_counter()
            if left <= 0 and not ctx.smoke:
                res["fed"].append({"workers": w, "skipped": "budget used"})
                continue
            if step is None:
                step = PretrainStep(cfg, device, torch.bfloat16 if device.type == "cuda" else None,
                                    device.type == "cuda", size=size)
            say(f"part 3: the 2DRCL step fed by {w} workers ...")
            try:
                row = fed_rate(step, datasets["device"], s["batch"], w, window=0.5 * left / (len(fed_workers) - k),
                               warmup=s["p3_fed_warmup"])
                row["of_synthetic"] = row["images_per_s"] / synthetic if synthetic else None
                say(f"part 3: fed by {w} workers: {row['images_per_s']:.1f} images/s"
                    + (f" ({row['of_synthetic']:.0%} of the synthetic-batch rate)" if synthetic else ""))
            except Exception as e:
                row = {"workers": w, **error_record(e)}
                say(f"part 3: fed by {w} workers: {row['error']}")
            res["fed"].append(row)
            ctx.save()
    finally:
        del step
        free(device)
    res["workers_needed"] = {}
    for path in ("loader", "device"):
        one = min((r for r in res["rows"] if r.get("images_per_s") and r["path"] == path), key=lambda r: r["workers"],
                  default=None)
        if one and synthetic:
            res["workers_needed"][path] = {
                "gpu_images_per_s": synthetic, "per_worker_images_per_s": one["images_per_s_per_worker"],
                "from_workers": one["workers"], "workers": math.ceil(synthetic / one["images_per_s_per_worker"])}


# --------------------------------------------------------------------------- part 4: the long run

def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def _keep(run: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "metrics.jsonl", "health.json"):
        if (run / name).exists():
            shutil.copy(run / name, dest / name)
    if (run / "eval" / "metrics.json").exists():
        shutil.copy(run / "eval" / "metrics.json", dest / "eval_metrics.json")


PROBE_KEYS = ("acc", "acc_r", "acc_c", "acc_f", "class_acc", "class_acc_r", "class_acc_c", "class_acc_f",
              "train_boxes", "val_boxes", "seconds")
HEALTH_KEYS = ("loss", "hcl", "lcl", "ar", "sr", "hcl_gap", "hcl_batch_gap", "lcl_gap", "lcl_batch_gap",
               "box_cos", "box_erank", "box_norm", "grad_norm", "clipped")


def part4(ctx, res: dict, deadline: float) -> None:
    from drcl.config import load_config
    from drcl.data.synthetic import config_overrides
    from drcl.evaluation.probe import run_probe
    from drcl.finetune import finetune
    from drcl.pretrain import pretrain

    s, device, work = ctx.s, ctx.device, ctx.work / "p4"
    res["data"] = ctx.background.wait(deadline)
    data = ctx.work / "p4-data"
    common = config_overrides(data) + [f"train.device={device.type}", f"train.threads={1 if ctx.smoke else 0}"]
    batch = s["p4_batch"]
    workers = workers_that_fit(s["p4_workers"], batch * 2 * 3 * s["p4_size"] ** 2 * 4)
    pre = common + [f"data.image_size={s['p4_size']}", f"train.batch_size={batch}", f"train.lr={P4_LR}",
                    f"data.workers={workers}", "data.photometric=device"]
    ft_iters = s["p4_ft_iters"]
    ft = load_config("tiny_finetune", common + [
        f"train.batch_size={s['p4_ft_batch']}", f"train.lr={P4_FT_LR}", f"train.max_iters={ft_iters}",
        f"train.checkpoint_every={ft_iters}", f"train.log_every={max(1, ft_iters // 30)}",
        f"data.workers={workers_that_fit(min(8, s['p4_workers']), s['p4_ft_batch'] * 3 * s['p4_size'] ** 2 * 4)}"])
    have_ap = importlib.util.find_spec("faster_coco_eval") is not None and not ctx.args.no_ap
    shipped = load_config("tiny")
    res.update(train_images=s["p4_train"], val_images=s["p4_val"], classes=s["p4_classes"], image_size=s["p4_size"],
               batch=batch, lr=P4_LR, workers=workers, finetune_iters=ft_iters, finetune_batch=s["p4_ft_batch"],
               finetune_lr=P4_FT_LR, amp=shipped["train"]["amp"], norm=shipped["model"]["norm"],
               ap_measured=have_ap,
               note=("the shipped tiny config with the batch, lr, workers, iterations and logging intervals "
                     f"overridden (lr {P4_LR}: between MoCo v2's linear rule at batch {batch} and square-root "
                     "scaling of tiny's batch-4 lr); epochs = images drawn / train images"))
    if not have_ap:
        why = "--no-ap" if ctx.args.no_ap else "faster-coco-eval is not importable here"
        res["ap_note"] = f"AP not measured: {why}"
    (ctx.out / "part4").mkdir(parents=True, exist_ok=True)
    log = open(ctx.out / "part4" / "log.txt", "a")
    quiet = contextlib.redirect_stderr(log)  # progress bars and warnings go to OUT/part4/log.txt

    def probe(weights, name, iteration=None):
        start = time.perf_counter()
        with quiet:
            r = run_probe(load_config("tiny", common), weights, seed=0, progress=False)
        rec = {k: r.get(k) for k in PROBE_KEYS}
        if iteration is None:
            res[f"probe_{name}"] = rec
        else:
            res.setdefault("probe_by_epoch", []).append(
                {"iteration": iteration, "epochs": iteration * batch / s["p4_train"], **rec})
        say(f"part 4: probe ({name}): top-1 {100 * r['acc']:.1f} %, rare {_fmt(r['acc_r'], '{:.1%}')}")
        ctx.save()
        return time.perf_counter() - start

    def tune(init, name):
        start = time.perf_counter()
        run = work / f"ft-{name}"
        shutil.rmtree(run, ignore_errors=True)  # a --work of an earlier run
        with quiet:
            summary = finetune(ft, run, init=init, evaluate=have_ap)
        rows = _rows(run)
        last = [r["loss"] for r in rows[-5:]]
        rec = {"iterations": summary["iterations"], "final_loss": statistics.fmean(last) if last else None,
               "final_loss_rows": len(last), "seconds": time.perf_counter() - start}
        if have_ap:
            bbox = (summary.get("eval") or {}).get("bbox") or {}
            rec["ap"] = {k: bbox.get(k) for k in ("AP", "AP50", "APr", "APc", "APf")}
        res[f"finetune_{name}"] = rec
        _keep(run, ctx.out / "part4" / f"ft-{name}")
        say(f"part 4: fine-tune ({name}, {ft_iters} iterations): final loss {_fmt(rec['final_loss'], '{:.3f}')}"
            + (f", AP {_fmt(rec['ap'].get('AP'), '{:.3f}')}" if have_ap else ""))
        ctx.save()
        return rec["seconds"]

    try:
        say("part 4: probe and fine-tune from random init (their times set aside for the pretrained ones) ...")
        t_probe = probe(None, "random")
        t_ft = tune(None, "random")

        warm = s["p4_warm_iters"]
        say(f"part 4: timing {warm} pre-training iterations ...")
        shutil.rmtree(work / "pre-warm", ignore_errors=True)
        start = time.perf_counter()
        with quiet:
            # two sampler rounds: every round restarts the loader's iterator (all workers refill), which
            # the real run pays once per round; the rows' median is the step, their excess the restart
            pretrain(load_config("tiny", pre + [f"train.max_iters={warm}", f"train.checkpoint_every={warm}",
                                                f"train.log_every={max(1, warm // 6)}", "train.health_every=0",
                                                "sampler.updates=2"]),
                     work / "pre-warm")
        wall = time.perf_counter() - start
        spans, prev = [], 0  # (iterations, seconds) of each logged row
        for r in _rows(work / "pre-warm"):
            spans.append((r["iter"] - prev, (r["iter"] - prev) * batch / r["images_per_s"]))
            prev = r["iter"]
        steady = spans[1:] or spans  # the first row holds the workers' start
        it_s = statistics.median(t / n for n, t in steady)
        # the steady rows hold the second round's restart of the loader (every worker refills)
        restart = max(0.0, sum(t for _, t in steady) - sum(n for n, _ in steady) * it_s) if len(spans) > 1 else 0.0
        overhead = max(0.0, wall - warm * it_s - restart)
        updates, epoch_batches = load_config("tiny")["sampler"]["updates"], s["p4_train"] // batch

        def health_every(n):  # about 15 measurements in the run
            return 2 if ctx.smoke else max(25, n // 15)

        def predicted(n):  # steps, loader restarts (one per sampler round), health measurements (~3 steps each)
            round_iters = max(1, min(math.ceil(n / updates), epoch_batches))
            return (n + 3 * (n // health_every(n))) * it_s + math.ceil(n / round_iters) * restart

        # the probes of the snapshots (every 1 / p4_probes of the run) and of the result, one fine-tune
        left = deadline - time.perf_counter() - s["p4_probes"] * t_probe - t_ft - overhead - 5.0
        iters = max(0, int(left / it_s))
        while iters > 0 and predicted(iters) > left:
            iters = int(iters * 0.97)
        iters = max(s["p4_min_iters"], min(s["p4_max_iters"], iters))
        res["estimate"] = {"warmup_iters": warm, "s_per_iter": it_s, "loader_restart_s": restart,
                           "startup_s": overhead, "planned_iters": iters, "predicted_s": predicted(iters) + overhead,
                           "epochs_wanted": s["p4_epochs"], "iters_wanted": math.ceil(s["p4_epochs"] * s["p4_train"] / batch)}
        if iters * batch / s["p4_train"] < s["p4_epochs"]:
            say(f"part 4: {s['p4_epochs']} epochs do not fit this budget (give part 4 alone more: --parts 4 --budget-s N)")
        say(f"part 4: {it_s * 1000:.0f} ms per iteration, {restart:.1f} s per loader restart, {overhead:.0f} s "
            f"startup: pre-training {iters} iterations ({iters * batch / s['p4_train']:.1f} epochs)")
        ctx.save()
        run = work / "pretrain"
        shutil.rmtree(run, ignore_errors=True)
        start = time.perf_counter()
        with quiet:
            summary = pretrain(load_config("tiny", pre + [
                f"train.max_iters={iters}", f"train.checkpoint_every={iters}",
                f"train.log_every={max(1, min(25, iters // 20))}",
                f"train.snapshot_every={max(1, iters // s['p4_probes'])}",
                f"train.health_every={health_every(iters)}"]), run)
        rows = _rows(run)
        health = summary.get("health") or {}
        res["pretrain"] = {
            "iterations": summary["iterations"], "epochs": summary["iterations"] * batch / s["p4_train"],
            "seconds": time.perf_counter() - start,
            "images_per_s": statistics.median(r["images_per_s"] for r in (rows[1:] or rows)),
            "health": {k: (health.get("window") or {}).get(k) for k in HEALTH_KEYS},
            "health_reference": health.get("reference"), "warnings": health.get("warnings")}
        _keep(run, ctx.out / "part4" / "pretrain")
        say(f"part 4: pre-trained {res['pretrain']['iterations']} iterations = {res['pretrain']['epochs']:.1f} epochs "
            f"in {res['pretrain']['seconds']:.0f} s ({res['pretrain']['images_per_s']:.0f} images/s)")
        ctx.save()
        for snap in sorted((run / "checkpoints").glob("iter_*.pt")):
            n = int(snap.stem.split("_")[1])
            if n < summary["iterations"]:  # the last one is the result, probed next
                probe(snap, f"{n * batch / s['p4_train']:.1f} epochs", iteration=n)
        probe(run / "encoder.pt", "pretrained")
        tune(str(run / "encoder.pt"), "pretrained")
    finally:
        log.close()


# --------------------------------------------------------------------------- report

def _fmt(v, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown(results: dict) -> str:
    meta, parts = results["meta"], results["parts"]
    lines = [f"# drcl GPU run: {meta.get('device_name')}", "",
             f"`{meta.get('command')}`; torch {meta.get('torch')}, torchvision {meta.get('torchvision')}, "
             f"CUDA {meta.get('cuda')}, cuDNN {meta.get('cudnn')}, {meta.get('cpu_count')} CPUs, "
             f"started {meta.get('started')}" + (" (smoke: toy sizes)" if meta.get("smoke") else ""), ""]
    p = parts.get("1")
    if p:
        lines += [f"## 1. Pre-training step ({p.get('preset')}, {p.get('norm')}, batch {p.get('batch')} at "
                  f"{p.get('image_size')} px, {p.get('boxes_per_image')} boxes/image)", "",
                  "| step | setting | images/s | s/step | steps | peak GiB | TFLOP/step | MFU |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in p.get("rows", []):
            if "images_per_s" in r:
                lines.append(f"| {r['model']} | {r['setting']} | {r['images_per_s']:.1f} | {r['s_per_step']:.3f} | "
                             f"{r['steps']} | {_fmt(r.get('peak_gib'))} | "
                             f"{_fmt(r['flops_per_step'] / 1e12 if r.get('flops_per_step') else None, '{:.2f}')} | "
                             f"{_fmt(r.get('mfu'), '{:.1%}')} |")
            else:
                lines.append(f"| {r.get('model')} | {r.get('setting')} | {r.get('error') or r.get('skipped')} |||||| ")
        ratio = p.get("2drcl_over_hcl_time") or {}
        if ratio:
            lines += ["", "2DRCL step time / HCL-only step time: "
                      + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items())
                      + (f"; FLOPs {p['2drcl_over_hcl_flops']:.2f}x" if p.get("2drcl_over_hcl_flops") else "")]
        probe = p.get("health_probe")
        if probe:
            lines += ["", f"Health probe: {probe['s_per_probe']:.3f} s each; step-time overhead "
                      + ", ".join(f"{v:.1%} at train.health_every {n}" for n, v in probe["overhead_at"].items())]
        syncs = next((r["syncs_per_step"] for r in p.get("rows", []) if "syncs_per_step" in r), None)
        if syncs and "count" in syncs:
            lines += ["", f"Host-device syncs in one 2DRCL step: {syncs['count']} ("
                      + ", ".join(f"{w} x{n}" for w, n in syncs["where"][:6]) + ")"]
        lines += ["", p.get("note", ""), ""]
    p = parts.get("2")
    if p:
        lines += [f"## 2. Fine-tuning step ({p.get('model')}, {p.get('norm')}, {p.get('amp')} autocast, "
                  f"{p.get('image_size')} px, {p.get('classes')} classes)", "",
                  "| batch | images/s | s/step | steps | peak GiB |", "|---:|---:|---:|---:|---:|"]
        for r in p.get("rows", []):
            if "images_per_s" in r:
                lines.append(f"| {r['batch']} | {r['images_per_s']:.1f} | {r['s_per_step']:.3f} | {r['steps']} | "
                             f"{_fmt(r.get('peak_gib'))} |")
            else:
                lines.append(f"| {r.get('batch')} | {r.get('error') or r.get('skipped')} ||||")
        lines += [""]
    p = parts.get("3")
    if p:
        lines += [f"## 3. Pre-training input pipeline ({p.get('image_size')} px, {p.get('cpu_count')} CPUs)", "",
                  f"The loader alone (batch {p.get('batch')}):", "",
                  "| photometric path | workers | images/s | per worker | batches timed |", "|---|---:|---:|---:|---:|"]
        for r in p.get("rows", []):
            if "images_per_s" in r:
                lines.append(f"| {r.get('path')} | {r['workers']} | {r['images_per_s']:.2f} | "
                             f"{r['images_per_s_per_worker']:.2f} | {r['batches_timed']}"
                             + (" (first round)" if r.get("timing") else "") + " |")
            else:
                lines.append(f"| {r.get('path')} | {r.get('workers')} | {r.get('error') or r.get('skipped')} |||")
        lines += ["", f"The 2DRCL step fed by the loader (device path, batch {p.get('fed_batch')}), against the same step "
                  f"on a pinned host batch ({_fmt(p.get('synthetic_images_per_s'))} images/s, part 1):", "",
                  "| workers | images/s | of the synthetic-batch rate | steps |", "|---:|---:|---:|---:|"]
        for r in p.get("fed", []):
            if "images_per_s" in r:
                lines.append(f"| {r['workers']} | {r['images_per_s']:.1f} | {_fmt(r.get('of_synthetic'), '{:.0%}')} | "
                             f"{r['steps']} |")
            else:
                lines.append(f"| {r.get('workers')} | {r.get('error') or r.get('skipped')} |||")
        lines.append("")
        for path, need in (p.get("workers_needed") or {}).items():
            lines.append(f"- one GPU at the synthetic-batch rate ({need['gpu_images_per_s']:.1f} images/s) needs "
                         f"{need['workers']} workers on the {path} path at {need['per_worker_images_per_s']:.2f} "
                         "images/s each")
        st = p.get("stages") or {}
        if "seconds" in st:
            lines.append("- one view of one image on one core: "
                         + ", ".join(f"{k} {v:.4f} s" for k, v in st["seconds"].items())
                         + f"; expected {st['expected_s_per_image']:.3f} s per image (two views) on the loader path, "
                         f"{st['photometric_share']:.0%} of it photometric; "
                         f"{st['expected_s_per_image_device_path']:.3f} s on the device path")
        lines += ["", p.get("note", ""), ""]
    p = parts.get("4")
    if p:
        pre = p.get("pretrain") or {}
        lines += [f"## 4. Long run: tiny config, {p.get('train_images')} generated images at {p.get('image_size')} px, "
                  f"batch {p.get('batch')}, lr {p.get('lr')}", ""]
        if pre:
            lines += [f"Pre-training: {pre['iterations']} iterations = {pre['epochs']:.1f} epochs in "
                      f"{pre['seconds']:.0f} s ({pre['images_per_s']:.0f} images/s). Health (last logged rows): "
                      + ", ".join(f"{k} {_fmt(v, '{:.3f}')}" for k, v in (pre.get("health") or {}).items()
                                  if v is not None), ""]
            if pre.get("warnings"):
                lines += ["Warnings: " + " ".join(pre["warnings"]), ""]
        lines += ["| init | probe top-1 | rare | common | frequent | fine-tune iterations | final loss | AP | APr |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name in ("random", "pretrained"):
            pr, ft = p.get(f"probe_{name}"), p.get(f"finetune_{name}")
            if not (pr or ft):
                continue
            pr, ft = pr or {}, ft or {}
            ap = ft.get("ap") or {}
            lines.append(f"| {name} | "
                         + " | ".join(_fmt(pr.get(k), "{:.1%}") for k in ("acc", "acc_r", "acc_c", "acc_f"))
                         + f" | {ft.get('iterations', '-')} | {_fmt(ft.get('final_loss'), '{:.3f}')} | "
                         f"{_fmt(ap.get('AP'), '{:.3f}')} | {_fmt(ap.get('APr'), '{:.3f}')} |")
        if p.get("probe_by_epoch"):
            final = p.get("probe_pretrained") or {}
            lines += ["", "Box probe against pre-training length (top-1, percent):", "",
                      "| epochs | iteration | all | rare | common | frequent |", "|---:|---:|---:|---:|---:|---:|"]
            random = p.get("probe_random") or {}
            lines.append("| 0 (random init) | 0 | " + " | ".join(_fmt(random.get(k), "{:.1%}")
                                                             for k in ("acc", "acc_r", "acc_c", "acc_f")) + " |")
            for r in p["probe_by_epoch"] + ([{"epochs": pre.get("epochs"), "iteration": pre.get("iterations"), **final}]
                                            if final and pre else []):
                lines.append(f"| {_fmt(r.get('epochs'))} | {r.get('iteration')} | "
                             + " | ".join(_fmt(r.get(k), "{:.1%}") for k in ("acc", "acc_r", "acc_c", "acc_f")) + " |")
        if p.get("ap_note"):
            lines += ["", p["ap_note"]]
        lines += ["", p.get("note", ""), ""]
    for k, part in sorted(parts.items()):
        if "error" in part:
            lines += [f"Part {k} failed: {part['error']}", ""]
    return "\n".join(lines) + "\n"


class Context:
    def __init__(self, args, s, device, out, work, background, results):
        self.args, self.s, self.device, self.out, self.work = args, s, device, out, work
        self.smoke, self.background, self.results = args.smoke, background, results

    def save(self) -> None:
        self.results["meta"]["elapsed_s"] = time.perf_counter() - _T0
        write_json(self.out / "gpu.json", self.results)
        atomic_write(self.out / "gpu.md", lambda f: f.write(markdown(self.results).encode()))


_T0 = time.perf_counter()


def meta(args, device: torch.device) -> dict:
    import torchvision

    m = {"command": "python benchmarks/gpu.py " + " ".join(sys.argv[1:]), "smoke": args.smoke,
         "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(),
         "torch": torch.__version__, "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
         "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
         "cpu_count": os.cpu_count(), "device": str(device),
         "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                         else platform.processor() or platform.machine()),
         "bf16_peak_flops": bf16_peak(device),
         "faster_coco_eval": importlib.util.find_spec("faster_coco_eval") is not None,
         "shm_free_gib": None if shm_free() is None else shm_free() / 2**30}
    for key, get in (("cudnn_benchmark", lambda: torch.backends.cudnn.benchmark),
                     ("cudnn_allow_tf32", lambda: torch.backends.cudnn.allow_tf32),
                     ("matmul_allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32),
                     ("matmul_fp32_precision", lambda: torch.backends.cuda.matmul.fp32_precision)):
        try:
            m[key] = get()
        except Exception:  # a setting this torch does not have
            m[key] = None
    if device.type == "cuda":
        m["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="writes OUT/gpu.json, OUT/gpu.md (and OUT/part4/)")
    ap.add_argument("--smoke", action="store_true", help="every part at toy sizes on the CPU (a test runs it)")
    ap.add_argument("--budget-s", type=float, default=None, help="seconds for all parts (default 400; smoke 70)")
    ap.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3, 4], choices=[1, 2, 3, 4])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: cuda when available (cpu for --smoke)")
    ap.add_argument("--work", default=None,
                    help="bulky files (generated data, checkpoints); default a temporary folder, removed at the end")
    ap.add_argument("--keep-work", action="store_true", help="leave --work in place at the end")
    ap.add_argument("--no-ap", action="store_true", help="skip AP in part 4 even when faster-coco-eval is installed")
    args = ap.parse_args()
    s = dict(SMOKE if args.smoke else FULL)
    budget = args.budget_s or s["budget"]
    parts = sorted(set(args.parts))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="drcl-gpu-"))
    work.mkdir(parents=True, exist_ok=True)

    # the generated data first, in a forked process, before CUDA starts in this one
    jobs = []
    if 3 in parts:
        jobs.append((str(work / "p3-data"), dict(classes=8, train_images=s["p3_images"], val_images=8,
                                                   image_size=s["p3_size"], imbalance=10.0, seed=0)))
    if 4 in parts:
        jobs.append((str(work / "p4-data"), dict(classes=s["p4_classes"], train_images=s["p4_train"],
                                                   val_images=s["p4_val"], image_size=s["p4_size"], imbalance=100.0,
                                                   seed=0)))
    processes = 1 if args.smoke else max(1, min(12, (os.cpu_count() or 1) - 3))
    background = Background(jobs, processes)

    name = args.device if args.device != "auto" else ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    device = torch.device(name)
    if device.type == "cpu" and not args.smoke:
        say("no CUDA device: the full sizes on the CPU will take far longer than the budget")
    if args.smoke:
        torch.set_num_threads(1)

    results = {"meta": {}, "parts": {}}
    old = out / "gpu.json"
    if old.exists():
        with contextlib.suppress(ValueError, KeyError):
            results["parts"] = {k: v for k, v in json.loads(old.read_text())["parts"].items() if int(k) not in parts}
    results["meta"] = meta(args, device)
    total = sum(WEIGHTS[k] for k in parts)
    budgets = {k: budget * WEIGHTS[k] / total for k in parts}
    results["meta"].update(budget_s=budget, part_budgets_s=budgets, data_processes=processes)
    ctx = Context(args, s, device, out, work, background, results)
    say(f"drcl GPU run on {results['meta']['device_name']} ({device}), torch {torch.__version__}; parts {parts}, "
        f"budget {budget:.0f} s: " + ", ".join(f"part {k} {b:.0f} s" for k, b in budgets.items()))
    ctx.save()
    functions = {1: part1, 2: part2, 3: part3, 4: part4}
    planned_end = time.perf_counter()
    try:
        for k in parts:
            planned_end += budgets[k]
            # unused time passes on; an overrun eats into the next part, but not below half its share
            deadline = max(planned_end, time.perf_counter() + 0.5 * budgets[k])
            start = time.perf_counter()
            say(f"== part {k} (until +{deadline - _T0:.0f} s)")
            results["parts"][str(k)] = res = {}
            try:
                functions[k](ctx, res, deadline)
            except Exception as e:
                res.update(error_record(e))
                say(f"part {k} failed: {res['error']}\n{res['traceback']}")
            finally:
                res["seconds"] = time.perf_counter() - start
                res["budget_s"] = budgets[k]
                free(device)
                ctx.save()
            say(f"== part {k} done in {res['seconds']:.0f} s")
    finally:
        background.stop()
        if not args.keep_work and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    say(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'} ({time.perf_counter() - _T0:.0f} s)")
    say(markdown(results))


if __name__ == "__main__":
    main()
