"""Training health of contrastive pre-training: is each term learning, and does what we
export keep its spread?

A contrastive recipe is working only when each term's own signals say so (docs/method.md). Per
contrastive term t (HCL, LCL), from every step's statistics (:meth:`drcl.model.drcl.DRCL.forward`):

* ``t`` / ``t_chance``: the loss against its chance level, the loss of a query that cannot
  tell its keys apart (mean log of the number of keys it is contrasted with);
* ``t_gap``: mean cosine of positive pairs minus that of the negatives (queue included), and
  ``t_batch_gap``: the same against this step's in-batch negatives only. Only the batch gap is
  immune to a stale queue: keys computed by older momentum encoders can differ from the current
  ones in a direction every image shares, and a loss that learns that difference opens the
  queue gap while telling no two images apart (measured: queue gap 0.84 with every key of a
  fixed batch at cosine 0.999 to every other).

Every ``train.health_every`` iterations:

* each term's share of the gradient energy on the online encoder (what is exported),
  ``t_grad_share = |g_t|^2 / sum_u |g_u|^2`` with ``g_t = d(w_t L_t) / d(encoder)``;
* the exported box embeddings (box-head output) of a fixed batch (the first training images
  with boxes, resized, no augmentation, ground-truth boxes): ``box_cos``, the mean cosine
  between different boxes; ``box_erank``, the effective rank exp(-sum p_i log p_i),
  p_i = s_i / sum s of the singular values of the centred embedding matrix (Roy & Vetterli
  2007); ``box_norm``, their mean length. Iteration 0 (random init) is the reference.

The training loop adds ``grad_norm`` and ``clipped`` (fraction of clipped steps since the last
logged row). Warnings, one line each and once per run:

* a term is *at chance* when its batch gap averaged over the last :data:`WINDOW` logged rows,
  all logged after warm-up (``max(train.warmup_iters, max_iters / 5)`` iterations), is below
  :data:`AT_CHANCE_GAP`;
* the box embeddings *collapse* when their mean cosine rises more than
  :data:`COLLAPSE_COS_RISE` above the reference or their effective rank falls below
  :data:`COLLAPSE_RANK_FRACTION` of it. Learning lowers the rank too (features organise along
  fewer, more informative directions): healthy tiny runs went down to half of it (44 -> 22)
  while their cosine fell and their probe rose; the collapse this guards against went to 15 %
  (122 -> 18) with the cosine at 0.96.
"""

from __future__ import annotations

import math
from collections import deque

import torch
import torch.nn.functional as F

WINDOW = 5
AT_CHANCE_GAP = 0.05
COLLAPSE_COS_RISE = 0.1
COLLAPSE_RANK_FRACTION = 0.25
CONTRASTIVE = ("hcl", "lcl")


@torch.no_grad()
def spread(embeddings: torch.Tensor) -> dict:
    """``{"cos", "erank", "norm"}`` of (N, D) embeddings, N >= 2 (see the module docstring)."""
    x = embeddings.double()
    n = x.shape[0]
    unit = F.normalize(x, dim=1)
    cos = unit @ unit.t()
    mean_cos = (cos.sum() - cos.diagonal().sum()) / (n * (n - 1))
    s = torch.linalg.svdvals(x - x.mean(0))
    p = s / s.sum().clamp(min=1e-300)
    p = p[p > 0]
    erank = torch.exp(-(p * p.log()).sum())
    return {"cos": float(mean_cos), "erank": float(erank), "norm": float(x.norm(dim=1).mean())}


def fixed_batch(dataset, size: int, images: int = 16, boxes_per_image: int = 8):
    """(images (N, 3, size, size) float in [0, 1], list of (K_i, 4) XYXY boxes) of the first
    ``images`` items of ``dataset`` (a transform-free :class:`~drcl.data.dataset.DetectionDataset`)
    with boxes, each resized to ``size`` x ``size``; None when no image has a box."""
    pixels, boxes = [], []
    for i in range(len(dataset)):
        if len(pixels) == images:
            break
        image, target = dataset[i]
        b = target["boxes"].as_subclass(torch.Tensor).float()[:boxes_per_image]
        if len(b) == 0:
            continue
        h, w = image.shape[-2:]
        pixels.append(F.interpolate(image[None].float() / 255, size=(size, size), mode="bilinear",
                                    antialias=True, align_corners=False)[0])
        boxes.append(b * torch.tensor([size / w, size / h, size / w, size / h]))
    if not pixels or sum(len(b) for b in boxes) < 2:
        return None
    return torch.stack(pixels), boxes


class Health:
    """Computes, logs and judges the signals above for :func:`drcl.engine.trainer.train`.

    ``model`` is the :class:`~drcl.model.drcl.DRCL` module (unwrapped), ``batch`` the
    :func:`fixed_batch` (or None), ``say`` prints a line (rank 0 only).
    """

    def __init__(self, model, batch, *, every: int, warmup: int, max_iters: int, say=print):
        self.model, self.batch, self.every, self.say = model, batch, every, say
        self.warmup = max(warmup, max_iters // 5)
        self.reference: dict | None = None
        self.warned: dict[str, str] = {}
        self.rows: deque = deque(maxlen=WINDOW)
        self.latest: dict = {}

    # ---------------------------------------------------------------- state (for exact resume)

    def state_dict(self) -> dict:
        return {"reference": self.reference, "warned": dict(self.warned), "rows": list(self.rows),
                "latest": dict(self.latest)}

    def load_state_dict(self, state: dict) -> None:
        self.reference = state["reference"]
        self.warned = dict(state["warned"])
        self.rows = deque(state["rows"], maxlen=WINDOW)
        self.latest = dict(state["latest"])

    # ---------------------------------------------------------------- measurements

    def due(self, it: int) -> bool:
        """True at the iterations (counted from 1) whose step is measured."""
        return self.every > 0 and (it + 1) % self.every == 0

    @torch.no_grad()
    def box_spread(self) -> dict:
        if self.batch is None:
            return {}
        encoder = self.model.online.encoder
        device = next(encoder.parameters()).device
        images, boxes = self.batch
        x = (images.to(device) - self.model.mean) / self.model.std
        was_training = encoder.training
        encoder.eval()
        try:
            roi = encoder(x, [b.to(device) for b in boxes], fpn=True)["roi"]
        finally:
            encoder.train(was_training)
        s = spread(roi.float())
        return {"box_cos": s["cos"], "box_erank": s["erank"], "box_norm": s["norm"]}

    def start(self) -> dict:
        """The random-init reference, before the first step of a new run."""
        self.reference = self.box_spread()
        self.latest.update(self.reference)
        return dict(self.reference)

    def grad_shares(self, result: dict, terms, scale=None) -> dict:
        """Each term's share of the gradient energy on the online encoder (autograd.grad,
        the graph kept for the step's own backward).

        ``scale`` is the step's loss scaling (``GradScaler.scale``; None: none). Under fp16
        autocast a term's gradient flows through fp16 activations and, unscaled, small ones
        underflow to zero, as the step's own would without the scaler; so each term's loss is
        scaled as the step's is. The shares are ratios of energies, so the common factor
        cancels; energies are summed in float64. A scale that overflows (the scaler then skips
        the step and lowers it) gives no measurement: the previous shares stay."""
        params = [p for p in self.model.online.encoder.parameters() if p.requires_grad]
        energy = {}
        for t in terms:
            loss = getattr(self.model.cfg, f"w_{t}") * result[t]
            if not loss.requires_grad:
                energy[t] = 0.0
                continue
            if scale is not None:
                loss = scale(loss)
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            energy[t] = float(sum((g.double() ** 2).sum() for g in grads if g is not None))
        if not all(math.isfinite(e) for e in energy.values()):
            return {}
        total = sum(energy.values())
        return {f"{t}_grad_share": (e / total if total > 0 else 0.0) for t, e in energy.items()}

    def before_backward(self, it: int, result: dict, terms, scale=None) -> None:
        if self.due(it):
            self.latest.update(self.grad_shares(result, terms, scale))

    def after_step(self, it: int) -> None:
        if self.due(it):
            self.latest.update(self.box_spread())

    # ---------------------------------------------------------------- judging

    def observe(self, row: dict) -> dict:
        """Add the latest measurements to a logged row, keep it in the window, warn once."""
        row.update(self.latest)
        self.rows.append({k: v for k, v in row.items() if isinstance(v, (int, float))})
        # judged on a window of rows logged after warm-up only: early rows are at chance by nature
        if len(self.rows) == WINDOW and self.rows[0]["iter"] >= self.warmup:
            for t in CONTRASTIVE:
                gap = self._mean(f"{t}_batch_gap")
                if gap is not None and gap < AT_CHANCE_GAP:
                    self._warn(t, f"warning: {t.upper()} is still at chance after {row['iter']} iterations "
                                  f"(positive-minus-negative cosine {gap:.3f} < {AT_CHANCE_GAP} over the last "
                                  f"{WINDOW} logged rows, loss {self._mean(t):.2f} vs chance "
                                  f"{self._mean(f'{t}_chance'):.2f})")
        collapse = self.collapse()
        if collapse:
            self._warn("collapse", f"warning: the exported box embeddings are collapsing at iteration "
                                   f"{row['iter']}: {collapse}")
        return row

    def collapse(self) -> str | None:
        ref, now = self.reference or {}, self.latest
        if "box_cos" not in ref or "box_cos" not in now:
            return None
        if now["box_cos"] > ref["box_cos"] + COLLAPSE_COS_RISE:
            return f"mean cosine between boxes {now['box_cos']:.2f} (random init {ref['box_cos']:.2f})"
        if now["box_erank"] < COLLAPSE_RANK_FRACTION * ref["box_erank"]:
            return f"effective rank {now['box_erank']:.0f} (random init {ref['box_erank']:.0f})"
        return None

    def _warn(self, key: str, text: str) -> None:
        if key not in self.warned:
            self.warned[key] = text
            self.say(text)

    def _mean(self, key: str):
        values = [r[key] for r in self.rows if key in r and math.isfinite(r[key])]
        return sum(values) / len(values) if values else None

    def summary(self) -> dict:
        """Window means of every signal, the reference and the warnings given."""
        keys = sorted({k for r in self.rows for k in r if k != "iter"})
        out = {"window": {k: self._mean(k) for k in keys}, "reference": self.reference,
               "warnings": list(self.warned.values())}
        if self.rows:
            out["iter"] = self.rows[-1]["iter"]
        return out


def format_summary(summary: dict) -> str:
    """The end-of-run table: per term loss, chance, gaps, gradient share; clipping; box spread."""
    from drcl.model.drcl import TERMS

    w = summary["window"]
    terms = [t for t in TERMS if w.get(t) is not None]

    def f(key, fmt="{:.3f}"):
        v = w.get(key)
        return "-" if v is None else fmt.format(v)

    lines = [f"training health, mean of the last {WINDOW} logged rows (iteration {summary.get('iter', '-')}):",
             f"  {'term':<5}{'loss':>8}{'chance':>8}{'gap':>8}{'batch gap':>11}{'grad share':>12}"]
    for t in terms:
        lines.append(f"  {t:<5}{f(t):>8}{f(f'{t}_chance', '{:.2f}'):>8}{f(f'{t}_gap'):>8}"
                     f"{f(f'{t}_batch_gap'):>11}{f(f'{t}_grad_share', '{:.0%}'):>12}")
    lines.append(f"  gradient norm {f('grad_norm', '{:.2f}')}, clipped steps {f('clipped', '{:.0%}')}")
    ref = summary.get("reference") or {}
    if "box_cos" in w and ref:
        lines.append(f"  box embeddings: mean cosine {w['box_cos']:.2f} (random init {ref['box_cos']:.2f}), "
                     f"effective rank {w['box_erank']:.0f} ({ref['box_erank']:.0f}), "
                     f"norm {w['box_norm']:.1f} ({ref['box_norm']:.1f})")
    lines += [f"  {text}" for text in summary.get("warnings", [])]
    return "\n".join(lines)
