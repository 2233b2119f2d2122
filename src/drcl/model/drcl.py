"""The 2DRCL pre-training module: HCL + LCL + AR + SR over one online and one momentum
encoder (docs/method.md, "One training step").

One training step, for a batch of two augmented views (x1, x2) with paired boxes:

1. choose up to K paired boxes per image (:func:`drcl.model.lcl.select_boxes`, weighted by
   the sampler's category repeat factors when DRB is on);
2. when AR or SR is on, hide random patches of both views (:func:`drcl.model.ar.patch_mask`);
3. momentum encoder, no gradients, on the clean views (x1 and x2 in one batch): HCL keys,
   LCL keys, and the SR targets (FPN features and box embeddings);
4. online encoder on the masked views (one pass over both): this single pass serves the HCL
   and LCL queries, the AR decoder input and the SR predictions;
5. L = w_hcl L_HCL + w_lcl L_LCL + w_ar L_AR + w_sr L_SR, each term switchable;
6. enqueue the momentum keys (gathered over ranks).

The momentum update is a separate call (:meth:`DRCL.momentum_update`) made by the training
loop after the optimiser step. With LCL, AR and SR off this is a symmetric MoCo v2 step on
the pooled last stage (with the projector/predictor of the paper), and the FPN is not run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from drcl.model.ar import Decoder, ar_loss, patch_mask
from drcl.model.detector import build_encoder
from drcl.model.hcl import hcl_loss
from drcl.model.heads import mlp
from drcl.model.host import to_device
from drcl.model.lcl import lcl_loss, select_boxes
from drcl.model.memory import KeyQueue, momentum_update
from drcl.model.sr import sr_loss

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TERMS = ("hcl", "lcl", "ar", "sr")
#: Where the online encoder's weights sit in a DRCL state dict.
ENCODER_PREFIX = "online.encoder."


@dataclass
class DRCLConfig:
    preset: str = "tiny"
    norm: str = "bn"
    imagenet: bool = False
    dim: int = 256
    temperature: float = 0.2
    hcl_queue: int = 4096
    lcl_queue: int = 8192
    boxes_per_image: int = 8
    supervised: bool = True
    predictor: bool = True
    mask_patch: int = 16
    mask_ratio: float = 0.5
    ar_loss: str = "l1"
    hcl: bool = True
    lcl: bool = True
    drb: bool = True
    ar: bool = True
    sr: bool = True
    w_hcl: float = 1.0
    w_lcl: float = 1.0
    w_ar: float = 1.0
    w_sr: float = 1.0

    def __post_init__(self):
        if not any(getattr(self, t) for t in TERMS):
            raise ValueError("at least one of hcl, lcl, ar, sr must be on")
        if self.ar_loss not in ("l1", "mse"):
            raise ValueError(f"ar_loss must be 'l1' or 'mse', not {self.ar_loss!r}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), not {self.mask_ratio}")


def _fewest_over_ranks(n: int) -> int:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return n
    t = torch.tensor([n], dtype=torch.long, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


class DRCL(nn.Module):
    def __init__(self, cfg: DRCLConfig):
        super().__init__()
        self.cfg = cfg
        encoder = build_encoder(cfg.preset, norm=cfg.norm, imagenet=cfg.imagenet)
        online = nn.Module()
        online.encoder = encoder
        if cfg.hcl:
            online.hcl_projector = mlp(encoder.last_channels, cfg.dim, cfg.dim, out_bn=True)
            self.hcl_predictor = mlp(cfg.dim, cfg.dim, cfg.dim) if cfg.predictor else nn.Identity()
            self.hcl_queue = KeyQueue(cfg.hcl_queue, cfg.dim)
        if cfg.lcl:
            online.lcl_projector = mlp(encoder.representation_size, cfg.dim, cfg.dim, bn=False)
            self.lcl_predictor = mlp(cfg.dim, cfg.dim, cfg.dim, bn=False) if cfg.predictor else nn.Identity()
            self.lcl_queue = KeyQueue(cfg.lcl_queue, cfg.dim)
        if cfg.ar:
            self.decoder = Decoder(encoder.fpn_channels)
        self.online = online
        self.momentum = copy.deepcopy(online)
        for p in self.momentum.parameters():
            p.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def needs_boxes(self) -> bool:
        return self.cfg.lcl or self.cfg.sr

    @property
    def needs_fpn(self) -> bool:
        return self.cfg.lcl or self.cfg.ar or self.cfg.sr

    @property
    def needs_mask(self) -> bool:
        return self.cfg.ar or self.cfg.sr

    def encoder_state_dict(self) -> dict:
        """The online encoder's weights under torchvision detector keys (``backbone.*``,
        ``roi_heads.box_head.*``): load with ``detector.load_state_dict(sd, strict=False)``."""
        return self.online.encoder.state_dict()

    @torch.no_grad()
    def reset_momentum(self) -> None:
        """Make the momentum branch an exact copy of the online one (weights and norm
        statistics), as at construction: after the online encoder was loaded from other weights."""
        self.momentum.load_state_dict(self.online.state_dict())

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        momentum_update(self.online, self.momentum, m)

    def forward(self, images1, images2, targets1, targets2, category_weights=None, generator=None):
        """images* (B, 3, S, S) float in [0, 1]; targets* lists of dicts with paired ``boxes``
        (K_i, 4) and ``labels`` (K_i,), optionally ``ann_ids`` (K_i,) and ``image_id`` (for the
        queues to ignore a query's own image or object); category_weights (C,) repeat factors
        for DRB box choice.

        Returns a dict: ``loss`` (weighted total), one entry per enabled term, and detached
        diagnostics per contrastive term t: ``t_pos_sim``, ``t_neg_sim``, ``t_gap`` (their
        difference), ``t_batch_gap`` (positive minus this step's in-batch negatives, no queue),
        ``t_chance`` (the loss of a query that cannot tell its keys apart) and
        ``t_queue_fill``; and ``boxes``.
        """
        cfg = self.cfg
        b = images1.shape[0]
        size = tuple(images1.shape[-2:])
        x = (torch.cat([images1, images2]) - self.mean) / self.std
        # random draws come first and do not depend on the switches, so turning one term off
        # leaves the others' values unchanged
        # boxes are chosen on the host (where the training loop keeps the targets) and cross to
        # the device in a few queued copies: nothing in a step waits for the device to learn a size
        weights = category_weights if cfg.drb else None
        boxes1, boxes2, labels, object_ids = select_boxes(targets1, targets2, cfg.boxes_per_image, weights, generator)
        labels, object_ids = to_device(labels, x.device), to_device(object_ids, x.device)
        image_ids = to_device(torch.tensor([int(t.get("image_id", -1)) for t in targets1], dtype=torch.long), x.device)
        mask = patch_mask(2 * b, *size, cfg.mask_patch, cfg.mask_ratio, generator, x.device)
        boxes = (boxes1 + boxes2) if self.needs_boxes else None
        n_boxes = labels.shape[0]
        if self.needs_boxes and _fewest_over_ranks(n_boxes) < 2:
            # too few boxes to contrast or to standardise SR's box targets: skip the box terms
            # this step, on every rank alike so that the queues' gathers and SyncBN stay in step
            boxes = None

        with torch.no_grad():
            mom = self.momentum.encoder(x, boxes, fpn=self.needs_fpn)
        online_in = x * (1.0 - mask) if self.needs_mask else x
        out = self.online.encoder(online_in, boxes, fpn=self.needs_fpn)

        losses, diag, new_keys = {}, {"boxes": float(n_boxes)}, {}
        zero = out["c5"].sum() * 0.0
        if cfg.hcl:
            q = self.hcl_predictor(self.online.hcl_projector(out["c5"]))
            with torch.no_grad():
                k = self.momentum.hcl_projector(mom["c5"])
            queue, _, queue_ids = self.hcl_queue.valid()
            losses["hcl"], s = hcl_loss(q[:b], q[b:], k[:b], k[b:], queue, cfg.temperature, image_ids, queue_ids)
            new_keys["hcl"] = (k, None, torch.cat([image_ids, image_ids]))
            diag.update(_contrast_stats("hcl", s))
        if cfg.lcl:
            if boxes is not None:
                q = self.lcl_predictor(self.online.lcl_projector(out["roi"]))
                with torch.no_grad():
                    k = self.momentum.lcl_projector(mom["roi"])
                qk, ql, qi = self.lcl_queue.valid()
                n = n_boxes
                losses["lcl"], s = lcl_loss(q[:n], q[n:], k[:n], k[n:], labels, qk, ql, cfg.temperature,
                                            cfg.supervised, object_ids, qi)
                new_keys["lcl"] = (k, torch.cat([labels, labels]), torch.cat([object_ids, object_ids]))
                diag.update(_contrast_stats("lcl", s))
            else:
                losses["lcl"] = zero
        if cfg.ar:
            pred = self.decoder(out["fpn"]["0"], size)
            losses["ar"] = ar_loss(pred, x, mask, cfg.ar_loss)
        if cfg.sr:
            losses["sr"] = sr_loss(out["fpn"], mom["fpn"], out.get("roi"), mom.get("roi"))

        losses["loss"] = sum(getattr(cfg, f"w_{t}") * losses[t] for t in TERMS if t in losses)
        for t, (keys, key_labels, key_ids) in new_keys.items():
            queue = getattr(self, f"{t}_queue")
            queue.enqueue(keys, key_labels, key_ids)
            diag[f"{t}_queue_fill"] = queue.fill / queue.size
        return {**losses, **diag}


def _contrast_stats(term: str, s: dict) -> dict:
    out = {f"{term}_{name}": v for name, v in s.items()}
    out[f"{term}_gap"] = s["pos_sim"] - s["neg_sim"]
    out[f"{term}_batch_gap"] = s["pos_sim"] - s["batch_neg_sim"]
    return out
