"""The 2DRCL pre-training loop behind ``drcl pretrain``.

Flow: annotations -> dataset with a box source and two views -> repeat-factor sampler
(dynamic: alpha goes from ``sampler.alpha_start`` to ``sampler.alpha_end``) -> DRCL ->
SGD/AdamW with warm-up and cosine/step decay -> momentum update -> logs and checkpoints.

The dynamic schedule needs the factors recomputed as training progresses, and a tiny run can
be shorter than one pass over the data, so the loop works in *rounds*: ``sampler.updates``
rounds of L iterations each (L is also capped so a round never needs more than one epoch of
draws). Round e uses the sampler's epoch e, whose alpha is ``schedule(e / (rounds - 1))``.

Exact resume: the checkpoint holds the model (online and momentum encoders, heads, queues),
optimiser, LR scheduler, AMP scaler, the round and the batches done in it, the sampler state
and all RNG states; augmentations are seeded from each sample's place in the run
(:mod:`drcl.engine.loader`) and the model's masks and box choices from the iteration number,
so a resumed run computes what an uninterrupted one does.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from drcl.config import dump_config, require
from drcl.data.annotations import load_annotations
from drcl.data.boxes import ProposalBoxes, RandomBoxes, load_proposals
from drcl.data.dataset import DetectionDataset
from drcl.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from drcl.engine.distributed import all_gather_objects, barrier, cleanup, init_distributed
from drcl.engine.loader import SeededDataset, SeededSampler
from drcl.model.drcl import DRCL, TERMS, DRCLConfig
from drcl.model.memory import momentum_at
from drcl.sampling import AlphaSchedule, RepeatFactorSampler
from drcl.views import TwoViewTransform, collate_views


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or infinite; the run stopped before the step."""

    exit_code = 3


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


class _Compose:
    def __init__(self, *fns):
        self.fns = [f for f in fns if f is not None]

    def __call__(self, image, target):
        for f in self.fns:
            out = f(image, target)
            if isinstance(out[0], tuple):  # the two views: the last step
                return out
            image, target = out
        return image, target


def build_data(cfg: dict, rank: int, world: int, main: bool):
    d, s, t = cfg["data"], cfg["sampler"], cfg["train"]
    ann = load_annotations(d["train_json"], d["train_images"], on_bad=d["on_bad"], check_images="header",
                           progress=main)
    if ann.skipped and main:
        print(f"{ann.path}: skipped {sum(ann.skipped.values())} bad records ({dict(ann.skipped)})")
    source = None
    if d["boxes"] == "proposals":
        source = ProposalBoxes(load_proposals(d["proposals"], ann))
    elif d["boxes"] == "random":
        source = RandomBoxes()
    views = TwoViewTransform(size=d["image_size"])
    dataset = DetectionDataset(ann, transforms=_Compose(source, views), masks=False)
    batch = t["batch_size"]
    per_rank_batches = ann.num_images // world // batch  # the smallest epoch (all factors 1)
    if per_rank_batches < 1:
        raise RuntimeError(f"{ann.num_images} training images are fewer than batch_size x ranks "
                           f"({batch} x {world})")
    round_iters = max(1, min(math.ceil(t["max_iters"] / s["updates"]), per_rank_batches))
    rounds = math.ceil(t["max_iters"] / round_iters)
    kwargs = {}
    if s["mode"] == "dynamic":
        kwargs = {"schedule": AlphaSchedule(s["schedule"], s["alpha_start"], s["alpha_end"], s["schedule_steps"]),
                  "total_epochs": rounds}
    sampler = RepeatFactorSampler(ann.image_index, ann.category_index, ann.num_images, ann.num_categories,
                                  mode=s["mode"], threshold=s["threshold"], seed=cfg["seed"], rank=rank,
                                  world_size=world, **kwargs)
    loader = DataLoader(SeededDataset(dataset), batch_size=batch, sampler=SeededSampler(sampler, cfg["seed"]),
                        collate_fn=collate_views, num_workers=d["workers"], persistent_workers=d["workers"] > 0,
                        drop_last=True)
    return ann, sampler, loader, round_iters


def build_optimizer(model, train: dict):
    params = [p for p in model.parameters() if p.requires_grad]
    if train["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=train["lr"], momentum=train["momentum"], weight_decay=train["weight_decay"])
    return torch.optim.AdamW(params, lr=train["lr"], weight_decay=train["weight_decay"])


def pretrain(cfg: dict, out_dir: str | os.PathLike, resume: bool = False) -> dict:
    """Run (or resume) pre-training; returns a summary dict. Writes ``out_dir/config.yaml``,
    ``metrics.jsonl``, ``tb/`` (TensorBoard), ``checkpoints/last.pt`` and, at the end,
    ``encoder.pt`` (the online encoder under torchvision detector keys)."""
    require(cfg, "data.train_json", "data.train_images")
    t = cfg["train"]
    out = Path(out_dir)
    ckpt_path = out / "checkpoints" / "last.pt"
    device = pick_device(t["device"])
    info = init_distributed(device)
    try:
        if t["threads"]:
            torch.set_num_threads(t["threads"])
        if resume and not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        if not resume and ckpt_path.exists():
            raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run or choose another --out")
        torch.manual_seed(cfg["seed"])
        ann, sampler, loader, round_iters = build_data(cfg, info.rank, info.world_size, info.is_main)
        model = DRCL(DRCLConfig(**cfg["model"])).to(device)
        cuda = device.type == "cuda"
        if cuda and t["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        if info.distributed and cuda and t["sync_bn"] and cfg["model"]["norm"] == "bn":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        core = model
        if info.distributed:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if cuda else None, find_unused_parameters=True)
        optimizer = build_optimizer(core, t)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, t))
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t["amp"]) if cuda else None
        if t["amp"] != "none" and not cuda and info.is_main:
            print(f"train.amp={t['amp']} applies on CUDA only; training in float32 on {device}")
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

        it, round_, done = 0, 0, 0
        if resume:
            state = load_checkpoint(ckpt_path)
            core.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            sampler.load_state_dict(state["sampler"])
            set_rng_state(state["rng"])
            it, round_, done = state["iteration"], state["round"], state["batches_done"]
        logger = _Logger(out, info.is_main, resume_at=it if resume else None)
        if info.is_main:
            (out / "config.yaml").write_text(dump_config(cfg))
            print(f"pre-training {t['max_iters']} iterations on {ann.num_images} images "
                  f"({info.world_size} process{'es' if info.world_size > 1 else ''}, {device}); "
                  f"sampler {cfg['sampler']['mode']}, {math.ceil(t['max_iters'] / round_iters)} rounds of "
                  f"{round_iters} iterations" + (f"; resuming at iteration {it}" if resume else ""))
        gen = torch.Generator()
        bar = tqdm(total=t["max_iters"], initial=it, desc="pretrain", unit="it", disable=not info.is_main,
                   dynamic_ncols=True)
        tick, images = time.perf_counter(), 0
        try:
            while it < t["max_iters"]:
                sampler.set_epoch(round_)
                weights = torch.tensor(sampler.category_factors, dtype=torch.float32, device=device)
                batches = iter(loader)
                while done < round_iters and it < t["max_iters"]:
                    images1, images2, targets1, targets2 = next(batches)
                    images1, images2 = images1.to(device), images2.to(device)
                    if cuda and t["channels_last"]:
                        images1 = images1.contiguous(memory_format=torch.channels_last)
                        images2 = images2.contiguous(memory_format=torch.channels_last)
                    targets1 = [{k: v.to(device) for k, v in x.items()} for x in targets1]
                    targets2 = [{k: v.to(device) for k, v in x.items()} for x in targets2]
                    gen.manual_seed(cfg["seed"] * 1_000_003 + it * 7919 + info.rank)
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        result = model(images1, images2, targets1, targets2, weights, gen)
                    _check_finite(result, it, ckpt_path)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(result["loss"]).backward()
                    if t["grad_clip"] > 0:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(core.parameters(), t["grad_clip"])
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    m = momentum_at(it / t["max_iters"], t["momentum_base"])
                    core.momentum_update(m)
                    it, done = it + 1, done + 1
                    images += images1.shape[0] * info.world_size
                    bar.update(1)
                    if it % t["log_every"] == 0 or it == t["max_iters"]:
                        now = time.perf_counter()
                        row = {"iter": it, "lr": optimizer.param_groups[0]["lr"], "momentum": m,
                               "alpha": sampler.alpha, "round": round_, "images_per_s": images / (now - tick)}
                        row.update({k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in result.items()})
                        if t["log_image_ids"]:
                            start = (done - 1) * t["batch_size"]  # this rank's batch in its epoch list
                            ids = [ann.images[i]["id"] for i in sampler.indices[start:start + t["batch_size"]]]
                            row["image_ids"] = all_gather_objects(ids, info)
                        logger.log(row)
                        bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.3g}", img_s=f"{row['images_per_s']:.1f}")
                        tick, images = now, 0
                    if it % t["checkpoint_every"] == 0 or it == t["max_iters"]:
                        _save(info, ckpt_path, core, optimizer, scheduler, scaler, sampler, it, round_, done,
                              t["batch_size"], cfg)
                if done >= round_iters:
                    round_, done = round_ + 1, 0
        finally:
            bar.close()
            logger.close()
        if info.is_main:
            torch.save(core.encoder_state_dict(), out / "encoder.pt")
            print(f"done: {it} iterations; checkpoint {ckpt_path}, encoder weights {out / 'encoder.pt'}")
        barrier(info)
        return {"iterations": it, "checkpoint": str(ckpt_path), "encoder": str(out / "encoder.pt")}
    finally:
        cleanup(info)


def _check_finite(result: dict, it: int, ckpt_path: Path) -> None:
    for term in TERMS:
        if term in result and not torch.isfinite(result[term]).all():
            last = f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written yet"
            raise NonFiniteLoss(f"iteration {it + 1}: loss term '{term}' is {float(result[term].detach())}; "
                                f"stopped before the update, {last}")


def _save(info, path, core, optimizer, scheduler, scaler, sampler, it, round_, done, batch, cfg) -> None:
    if not info.is_main:
        return
    save_checkpoint({
        "iteration": it, "round": round_, "batches_done": done,
        "model": core.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(), "sampler": sampler.state_dict(consumed=done * batch),
        "rng": rng_state(), "config": cfg,
    }, path)


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
        except ImportError:
            self.tb = None

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "iter":
                    self.tb.add_scalar(k, v, row["iter"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
