"""The training loop shared by ``drcl pretrain`` and ``drcl finetune``.

A :class:`Task` says what is trained (model, data, one forward step, what happens after the
optimiser step and at the end); :func:`train` does the rest the same way for both: SGD/AdamW
with warm-up then cosine or step decay, gradient clipping, AMP and channels_last on CUDA,
DDP through torchrun, a progress bar, ``metrics.jsonl`` and TensorBoard, atomic checkpoints
and exact resume.

Compute: the first step a process runs is counted with :class:`torch.utils.flop_counter.FlopCounterMode`
(forward and backward of the training loss; the training-health probes, data loading and
augmentation are not counted, nor are torchvision's custom ops such as RoIAlign and NMS). The
summary's ``flops_per_iter`` lets runs of different kinds be compared by counted compute
instead of wall time, which another job on the machine changes (``drcl demo``).

Rounds: the dynamic rebalancing schedule needs the repeat factors recomputed as training
progresses, and a small run can be shorter than one pass over the data, so the loop works in
``sampler.updates`` rounds of L iterations (L is capped so a round never needs more than one
epoch of draws). Round e is the sampler's epoch e, whose alpha is ``schedule(e / (rounds - 1))``.

Exact resume: a checkpoint holds the model, optimiser, LR scheduler, AMP scaler, the round and
the batches done in it, the sampler state and all RNG states; augmentations are seeded from
each sample's place in the run (:mod:`drcl.engine.loader`) and the step's own randomness from
the iteration number, so a resumed run computes what an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from drcl.config import dump_config, require
from drcl.data.annotations import Annotations, load_annotations, load_image_folder
from drcl.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from drcl.engine.distributed import (DistInfo, all_gather_objects, any_rank_max, barrier, cleanup, init_distributed,
                                     wrap_ddp)
from drcl.engine.loader import SeededDataset, SeededSampler
from drcl.sampling import AlphaSchedule, RepeatFactorSampler


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or infinite; the run stopped before the step."""

    exit_code = 3


class ResumeError(RuntimeError):
    """A checkpoint that this run cannot continue (other seed or number of processes)."""

    exit_code = 2


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def lr_factor(it: int, train: dict) -> float:
    """Linear warm-up from 0.001x over ``warmup_iters``, then cosine to 0 or steps of
    ``lr_gamma`` at the fractions ``lr_steps`` of ``max_iters``."""
    warm = train["warmup_iters"]
    if it < warm:
        return 0.001 + (1 - 0.001) * it / warm
    if train["lr_schedule"] == "cosine":
        p = (it - warm) / max(1, train["max_iters"] - warm)
        return 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))
    return train["lr_gamma"] ** sum(it >= f * train["max_iters"] for f in train["lr_steps"])


def scaled_lr(train: dict, world_size: int) -> float:
    """The peak learning rate in use: ``train.lr`` x global batch / ``train.reference_batch``
    (the linear scaling rule, Goyal et al. 2017), so that a config's rate follows the number of
    processes; ``train.lr`` as given when ``reference_batch`` is 0."""
    ref = train["reference_batch"]
    return train["lr"] * train["batch_size"] * world_size / ref if ref else train["lr"]


def lr_line(train: dict, world_size: int) -> str:
    """One line: the global batch and the peak learning rate in use, and where it comes from."""
    batch, ref = train["batch_size"], train["reference_batch"]
    how = (f"train.lr {train['lr']:g} x {batch * world_size} / train.reference_batch {ref}" if ref
           else "train.lr, not scaled: train.reference_batch is 0")
    return (f"global batch {batch * world_size} ({batch} per process x {world_size} "
            f"process{'es' if world_size > 1 else ''}); peak lr {scaled_lr(train, world_size):.6g} ({how})")


def build_optimizer(model: nn.Module, train: dict, lr: float | None = None):
    """SGD or AdamW over the trainable parameters at ``lr`` (``train.lr`` when None)."""
    params = [p for p in model.parameters() if p.requires_grad]
    lr = train["lr"] if lr is None else lr
    if train["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=train["momentum"], weight_decay=train["weight_decay"])
    return torch.optim.AdamW(params, lr=lr, weight_decay=train["weight_decay"])


def prepare_run(cfg: dict, out_dir, resume: bool, images_only: bool = False, segmentations: bool = False):
    """What every training command does first: check ``--resume`` against the run folder,
    pick the device, join the process group, set threads and seed, and read the training
    annotations. With ``images_only`` (pre-training) ``data.train_json`` may be left out: the
    images of the folder ``data.train_images`` are read instead
    (:func:`~drcl.data.annotations.load_image_folder`). The annotations are read as arrays,
    without the file's records (and with each annotation's segmentation when
    ``segmentations``): what DataLoader workers share after the fork stays small and is never
    copied. Returns ``(info, device, annotations)``; call
    :func:`~drcl.engine.distributed.cleanup` with ``info`` when done."""
    require(cfg, "data.train_images") if images_only else require(cfg, "data.train_json", "data.train_images")
    d, t = cfg["data"], cfg["train"]
    ckpt_path = Path(out_dir) / "checkpoints" / "last.pt"
    if resume and not ckpt_path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
    if not resume and ckpt_path.exists():
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run or choose another --out")
    device = pick_device(t["device"])
    info = init_distributed(device)
    try:
        if t["threads"]:
            torch.set_num_threads(t["threads"])
        torch.manual_seed(cfg["seed"])
        if d["train_json"]:
            ann = load_annotations(d["train_json"], d["train_images"], on_bad=d["on_bad"], check_images="header",
                                   progress=info.is_main, records=False, segmentations=segmentations)
        else:
            ann = load_image_folder(d["train_images"], on_bad=d["on_bad"], progress=info.is_main)
    except BaseException:
        cleanup(info)
        raise
    if ann.skipped and info.is_main:
        print(f"{ann.path}: skipped {sum(ann.skipped.values())} bad records ({dict(ann.skipped)})")
    return info, device, ann


def make_loader(cfg: dict, ann: Annotations, dataset, collate, info: DistInfo):
    """Repeat-factor sampler (per ``cfg["sampler"]``) and DataLoader; returns
    ``(sampler, loader, round_iters)``."""
    s, t, d = cfg["sampler"], cfg["train"], cfg["data"]
    batch, world = t["batch_size"], info.world_size
    per_rank_batches = ann.num_images // world // batch  # the smallest epoch (all factors 1)
    if per_rank_batches < 1:
        raise RuntimeError(f"{ann.num_images} training images are fewer than batch_size x ranks ({batch} x {world})")
    round_iters = max(1, min(math.ceil(t["max_iters"] / s["updates"]), per_rank_batches))
    rounds = math.ceil(t["max_iters"] / round_iters)
    mode = s["mode"]
    if mode != "random" and not ann.num_instances:
        mode = "random"
        if info.is_main:
            print(f"{ann.path} has no labelled boxes: repeat factors (sampler.mode {s['mode']}) need categories, "
                  "so images are drawn uniformly (random)")
    kwargs = {}
    if mode == "dynamic":
        kwargs = {"schedule": AlphaSchedule(s["schedule"], s["alpha_start"], s["alpha_end"], s["schedule_steps"]),
                  "total_epochs": rounds}
    sampler = RepeatFactorSampler(ann.image_index, ann.category_index, ann.num_images, ann.num_categories,
                                  mode=mode, threshold=s["threshold"], seed=cfg["seed"], rank=info.rank,
                                  world_size=world, **kwargs)
    # pinned batches cross to a GPU as queued copies (from pageable memory every copy waits).
    # The loader draws its workers' base seed from a generator of its own (the samples are seeded
    # by SeededSampler, so nothing reads it): from the global one, each iter(loader) would move
    # the stream the detector's RPN / RoI samplers draw from, and a resumed run, which makes its
    # iterator again mid-round, would not compute what the uninterrupted one does.
    loader = DataLoader(SeededDataset(dataset), batch_size=batch, sampler=SeededSampler(sampler, cfg["seed"]),
                        collate_fn=collate, num_workers=d["workers"], persistent_workers=d["workers"] > 0,
                        drop_last=True, pin_memory=pick_device(t["device"]).type == "cuda",
                        generator=torch.Generator().manual_seed(cfg["seed"]))
    return sampler, loader, round_iters


@dataclass
class Task:
    """What :func:`train` trains.

    ``forward(model, batch, generator, category_weights)`` returns a dict with ``loss`` (the
    total) and any floats to log; ``terms`` names the loss terms checked for NaN/inf;
    ``after_step(it)`` runs after each optimiser step and returns values to log;
    ``to_device(batch, device)`` moves a batch from the loader to the device (default: every
    tensor in it);
    ``finish(out_dir)`` runs on rank 0 at the end and returns a summary.
    """

    name: str
    model: nn.Module
    ann: Annotations
    sampler: RepeatFactorSampler
    loader: DataLoader
    round_iters: int
    forward: Callable
    terms: Callable[[dict], list]
    after_step: Callable[[int], dict] = lambda it: {}
    to_device: Callable = None  # default: to_device (every tensor of the batch)
    finish: Callable[[Path], dict] = lambda out: {}
    ddp_unused: bool = True
    meta: dict | None = None  # saved in every checkpoint (e.g. the category ids of the labels)
    health: object | None = None  # a drcl.engine.health.Health: training-health signals and warnings


def to_device(batch, device):
    """Every tensor in ``batch`` (nested lists, tuples, dicts) on ``device``; queued copies
    from pinned memory (the loader pins its batches when a GPU is there)."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def train(task: Task, cfg: dict, out_dir, resume: bool, info: DistInfo, device: torch.device) -> dict:
    t = cfg["train"]
    out = Path(out_dir)
    ckpt_path = out / "checkpoints" / "last.pt"
    core = task.model
    cuda = device.type == "cuda"
    if cuda and t["channels_last"]:
        core = core.to(memory_format=torch.channels_last)
    if info.distributed and cuda and t["sync_bn"] and cfg["model"]["norm"] == "bn":
        core = nn.SyncBatchNorm.convert_sync_batchnorm(core)
    model = core
    if info.distributed:
        model = wrap_ddp(core, device, task.ddp_unused)
    optimizer = build_optimizer(core, t, scaled_lr(t, info.world_size))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, t))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t["amp"]) if cuda else None
    if t["amp"] != "none" and not cuda and info.is_main:
        print(f"train.amp={t['amp']} applies on CUDA only; training in float32 on {device}")
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    sampler, batch = task.sampler, t["batch_size"]

    it, round_, done = 0, 0, 0
    if resume:
        state = load_checkpoint(ckpt_path)
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        try:
            sampler.load_state_dict(state["sampler"])
        except ValueError as e:
            raise ResumeError(f"{ckpt_path}: cannot resume with this setup: {e}") from None
        set_rng_state(state["rng"])
        it, round_, done = state["iteration"], state["round"], state["batches_done"]
        if task.health is not None and state.get("health") is not None:
            task.health.load_state_dict(state["health"])
    elif task.health is not None:
        task.health.start()
    logger = _Logger(out, info.is_main, resume_at=it if resume else None)
    if info.is_main:
        (out / "config.yaml").write_text(dump_config(cfg))
        rounds = math.ceil(t["max_iters"] / task.round_iters)
        print(f"{task.name}: {t['max_iters']} iterations on {task.ann.num_images} images "
              f"({info.world_size} process{'es' if info.world_size > 1 else ''}, {device}); sampler "
              f"{task.sampler.mode}, {rounds} rounds of {task.round_iters} iterations"
              + (f"; resuming at iteration {it}" if resume else ""))
        print(lr_line(t, info.world_size))

    def save(snapshot: bool = False):
        if info.is_main:
            save_checkpoint({
                "iteration": it, "round": round_, "batches_done": done,
                "model": core.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "sampler": sampler.state_dict(consumed=done * batch), "rng": rng_state(), "config": cfg,
                "meta": task.meta or {}, "health": task.health.state_dict() if task.health is not None else None,
            }, ckpt_path)
            if snapshot:
                shutil.copyfile(ckpt_path, ckpt_path.with_name(f"iter_{it:07d}.pt"))

    gen = torch.Generator()
    bar = tqdm(total=t["max_iters"], initial=it, desc=task.name, unit="it", disable=not info.is_main,
               dynamic_ncols=True)
    tick, images = time.perf_counter(), 0
    health, clip = task.health, t["grad_clip"]
    interval = IntervalMeans()  # what a logged row reports: the steps since the previous row
    flops = None  # counted on this process's first step
    try:
        while it < t["max_iters"]:
            sampler.set_epoch(round_)
            weights = torch.tensor(sampler.category_factors, dtype=torch.float32, device=device)
            batches = iter(task.loader)
            while done < task.round_iters and it < t["max_iters"]:
                data = (task.to_device or to_device)(next(batches), device)
                gen.manual_seed(cfg["seed"] * 1_000_003 + it * 7919 + info.rank)
                counting = [FlopCounterMode(display=False), FlopCounterMode(display=False)] if flops is None else None
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None), \
                        counting[0] if counting else contextlib.nullcontext():
                    result = task.forward(model, data, gen, weights)
                _check_finite(result, task.terms(result), it, ckpt_path, info)
                if health is not None:
                    with model.no_sync() if info.distributed else contextlib.nullcontext():
                        health.before_backward(it, result, task.terms(result), scale=scaler.scale)
                optimizer.zero_grad(set_to_none=True)
                with counting[1] if counting else contextlib.nullcontext():
                    scaler.scale(result["loss"]).backward()
                if counting:
                    flops = sum(c.get_total_flops() for c in counting)
                scaler.unscale_(optimizer)
                # the norm is logged whether or not it is clipped; clipping is a guard, not a throttle
                grad_norm = nn.utils.clip_grad_norm_(core.parameters(), clip if clip > 0 else math.inf)
                interval.add({**result, "grad_norm": grad_norm, "clipped": (grad_norm > clip) if clip > 0 else 0.0})
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                extra = task.after_step(it)
                if health is not None:
                    health.after_step(it)
                it, done = it + 1, done + 1
                images += batch * info.world_size
                bar.update(1)
                if it % t["log_every"] == 0 or it == t["max_iters"]:
                    now = time.perf_counter()
                    row = {"iter": it, "lr": optimizer.param_groups[0]["lr"], "alpha": sampler.alpha,
                           "round": round_, "images_per_s": images / (now - tick), **extra}
                    row.update(interval.pop())
                    if health is not None:
                        health.observe(row)
                    if t["log_image_ids"]:
                        start = (done - 1) * batch  # this rank's batch in its epoch list
                        ids = task.ann.image_ids[sampler.indices[start:start + batch]].tolist()
                        row["image_ids"] = all_gather_objects(ids, info)
                    logger.log(row)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.3g}", img_s=f"{row['images_per_s']:.1f}")
                    tick, images = now, 0
                snapshot = t["snapshot_every"] > 0 and it % t["snapshot_every"] == 0
                if it % t["checkpoint_every"] == 0 or it == t["max_iters"] or snapshot:
                    save(snapshot)
            if done >= task.round_iters:
                round_, done = round_ + 1, 0
    finally:
        bar.close()
        logger.close()
    summary = {"iterations": it, "checkpoint": str(ckpt_path), "flops_per_iter": flops}
    if info.is_main:
        if health is not None and health.rows:
            from drcl.engine.health import format_summary

            report = health.summary()
            (out / "health.json").write_text(json.dumps(report, indent=2) + "\n")
            tqdm.write(format_summary(report))
            summary["health"] = report
        summary.update(task.finish(out))
    barrier(info)
    return summary


class IntervalMeans:
    """Per-key means of the step results since the last logged row, so that a row stands for
    every step of its interval and not for the one that happened to land on it: at batch 4 one
    step's contrastive gap is a noisy sample (HCL's, logged every 5 iterations of a tiny run:
    -0.01, 0.42, 0.18, 0.11, 0.57 at iterations 100-120). A key missing from
    some steps (a box term skipped for too few boxes) is averaged over the steps that have it.
    ``clipped`` is then the fraction of clipped steps. Sums stay on the device until popped."""

    def __init__(self):
        self.sums: dict = {}
        self.counts: dict = {}

    def add(self, values: dict) -> None:
        for k, v in values.items():
            v = v.detach().float() if torch.is_tensor(v) else float(v)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1

    def pop(self) -> dict:
        means = {k: float(total) / self.counts[k] for k, total in self.sums.items()}
        self.sums, self.counts = {}, {}
        return means


def _check_finite(result: dict, terms, it: int, ckpt_path: Path, info: DistInfo | None = None) -> None:
    """Raise :class:`NonFiniteLoss` on every process when any process has a NaN or infinite
    loss term. The processes agree with one all-reduce of a flag per term (the highest rank
    that saw it), read with one host sync: a process that stopped alone would leave the others
    waiting in the next collective (DDP's gradient all-reduce) until the backend's timeout, and
    the exit code 3 would be lost."""
    if not terms:
        return
    rank = info.rank if info is not None else 0
    local = torch.stack([~torch.isfinite(result[t].detach()).all() for t in terms])
    seen = local.long() * (rank + 1)
    if info is not None:
        seen = any_rank_max(seen, info)
    seen = seen.tolist()
    if not any(seen):
        return
    i = next(i for i, who in enumerate(seen) if who)
    term = terms[i]
    last = f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written yet"
    if info is None or not info.distributed:
        raise NonFiniteLoss(f"iteration {it + 1}: loss term '{term}' is {float(result[term].detach())}; "
                            f"stopped before the update, {last}")
    where = (f"is {float(result[term].detach())} on this process (rank {rank})" if bool(local[i])
             else f"is not finite on rank {seen[i] - 1}")
    raise NonFiniteLoss(f"iteration {it + 1}: loss term '{term}' {where}; every process stopped before the update, "
                        f"{last}")


class _Logger:
    """``metrics.jsonl`` (one JSON object per logged iteration) and TensorBoard, rank 0 only.
    On resume, lines logged after the checkpoint's iteration are dropped first."""

    def __init__(self, out: Path, enabled: bool, resume_at: int | None):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        if resume_at is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["iter"] <= resume_at]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))
        except ImportError as e:  # tensorboard is optional: the run goes on without it
            print(f"TensorBoard logging is off: {e} (pip install tensorboard); metrics.jsonl has every row")

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and v is not None and k != "iter":
                    self.tb.add_scalar(k, v, row["iter"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
