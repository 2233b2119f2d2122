"""Time one pre-training step: full 2DRCL vs HCL only vs a plain symmetric MoCo v2 step.

All three use the same backbone, batch and image size, and a full step each (forward, backward,
optimiser step, momentum update, enqueue). MoCo v2 here is the recipe of Chen et al. 2020 on
the detector's ResNet body alone: global pool -> MLP projector (2048 hidden, 128 out), no predictor, no FPN,
InfoNCE (t = 0.2) with a queue, symmetric over the two views. Steps of the three models are
interleaved so machine noise hits them alike; the median of the timed steps is reported.

    python benchmarks/step_time.py [--preset tiny] [--batch 4] [--size 160] [--steps 10]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from torch import nn

from drcl.model.detector import build_encoder
from drcl.model.drcl import DRCL, DRCLConfig
from drcl.model.hcl import hcl_loss
from drcl.model.memory import KeyQueue, momentum_update


class MoCoV2(nn.Module):
    def __init__(self, preset: str, norm: str, dim: int = 128, queue: int = 4096):
        super().__init__()
        body = build_encoder(preset, norm=norm).backbone.body
        width = body.layer4[-1].conv1.in_channels
        projector = nn.Sequential(nn.Linear(width, 2048), nn.ReLU(inplace=True), nn.Linear(2048, dim))
        self.online = nn.ModuleDict({"body": body, "projector": projector})
        self.momentum = copy.deepcopy(self.online).requires_grad_(False)
        self.queue = KeyQueue(queue, dim)

    @staticmethod
    def _embed(branch, x):
        return branch["projector"](branch["body"](x)["3"].mean(dim=(2, 3)))

    def forward(self, x1, x2):
        b = x1.shape[0]
        q = self._embed(self.online, torch.cat([x1, x2]))
        with torch.no_grad():
            k = self._embed(self.momentum, torch.cat([x1, x2]))
        loss, _ = hcl_loss(q[:b], q[b:], k[:b], k[b:], self.queue.valid()[0])
        self.queue.enqueue(k)
        return {"loss": loss}

    def momentum_update(self, m):
        momentum_update(self.online, self.momentum, m)


def make_batch(b: int, size: int, boxes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x1, x2 = torch.rand(b, 3, size, size, generator=g), torch.rand(b, 3, size, size, generator=g)
    targets = []
    for _ in range(b):
        xy = torch.rand(boxes, 2, generator=g) * size * 0.6
        wh = 8 + torch.rand(boxes, 2, generator=g) * size * 0.3
        targets.append({"boxes": torch.cat([xy, (xy + wh).clamp(max=size)], 1),
                        "labels": torch.randint(1, 20, (boxes,), generator=g)})
    return x1, x2, targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--norm", default="bn")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--boxes", type=int, default=6, help="ground-truth boxes per image (LCL uses up to 8)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x1, x2, targets = make_batch(args.batch, args.size, args.boxes)
    weights = torch.linspace(1, 5, 19)
    models = {
        "2DRCL (HCL+LCL+AR+SR)": DRCL(DRCLConfig(preset=args.preset, norm=args.norm)),
        "HCL only": DRCL(DRCLConfig(preset=args.preset, norm=args.norm, lcl=False, ar=False, sr=False)),
        "MoCo v2": MoCoV2(args.preset, args.norm),
    }
    opts = {n: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
            for n, m in models.items()}
    times = {n: [] for n in models}
    gen = torch.Generator().manual_seed(0)
    for step in range(args.warmup + args.steps):
        for name, model in models.items():
            t0 = time.perf_counter()
            if isinstance(model, MoCoV2):
                out = model(x1, x2)
            else:
                out = model(x1, x2, targets, targets, weights, gen)
            opts[name].zero_grad(set_to_none=True)
            out["loss"].backward()
            opts[name].step()
            model.momentum_update(0.99)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["MoCo v2"])
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"preset {args.preset}, norm {args.norm}, batch {args.batch} x 2 views at {args.size}px, "
          f"{args.boxes} boxes/image; median of {args.steps} steps")
    print(f"{'step':<24}{'s/step':>9}{'vs MoCo v2':>12}")
    for name, t in times.items():
        print(f"{name:<24}{statistics.median(t):>9.3f}{statistics.median(t) / base:>11.2f}x")
    full = statistics.median(times["2DRCL (HCL+LCL+AR+SR)"])
    hcl = statistics.median(times["HCL only"])
    print(f"\n| {args.preset}, batch {args.batch}, {args.size}px | {full:.3f} s | {hcl:.3f} s | {base:.3f} s | "
          f"{full / base:.2f}x | {hcl / base:.2f}x |")


if __name__ == "__main__":
    main()
