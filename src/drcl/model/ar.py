"""Appearance Reconstruction (AR): rebuild the pixels hidden by patch masking.

The online view is perturbed by random patch masking: the image is cut into P x P patches
(P = 16) and round(ratio * #patches) of them (ratio 0.5), chosen uniformly per image, are set
to 0 in normalised space (the mean colour). A light decoder on the finest FPN level (stride 4)
-- 3x3 conv, GroupNorm, ReLU, 1x1 conv to 3 * 4 * 4 channels, pixel shuffle x4 -- predicts the clean
view's normalised pixels x. The loss is taken over the masked pixels M, as in MAE:

    L_AR = 1 / (3 |M|) * sum_{pixels in M} sum_{channels} |x_hat - x|      (L1, default)
    L_AR = 1 / (3 |M|) * sum_{pixels in M} sum_{channels} (x_hat - x)^2    (MSE)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from drcl.model.host import to_device


def patch_mask(n: int, height: int, width: int, patch: int = 16, ratio: float = 0.5,
               generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(n, 1, height, width) float mask, 1 where a pixel is hidden."""
    gh, gw = math.ceil(height / patch), math.ceil(width / patch)
    hidden = round(ratio * gh * gw)
    order = torch.rand(n, gh * gw, generator=generator).argsort(dim=1)
    grid = torch.zeros(n, gh * gw)
    grid.scatter_(1, order[:, :hidden], 1.0)
    device = device if device is not None else "cpu"
    # the draws stay on the CPU generator; only the small patch grid crosses to ``device`` and is
    # expanded to pixels there (building the full mask on the CPU took ~40 ms per step at 800 px)
    grid = to_device(grid, device).view(n, 1, gh, 1, gw, 1)
    mask = grid.expand(n, 1, gh, patch, gw, patch).reshape(n, 1, gh * patch, gw * patch)
    return mask[:, :, :height, :width]


class Decoder(nn.Module):
    def __init__(self, in_channels: int = 256, hidden: int = 64, stride: int = 4):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False),
            nn.GroupNorm(8, hidden),  # keeps the hidden ReLUs alive at high learning rates
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 3 * stride * stride, 1),
            nn.PixelShuffle(stride),
        )

    def forward(self, p2: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        out = self.body(p2)
        if out.shape[-2:] != size:
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out


def ar_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """pred, target (B, 3, H, W); mask (B, 1, H, W), 1 = hidden."""
    if kind == "l1":
        err = (pred - target).abs()
    elif kind == "mse":
        err = (pred - target) ** 2
    else:
        raise ValueError(f"AR loss must be 'l1' or 'mse', not {kind!r}")
    return (err * mask).sum() / (mask.sum() * 3).clamp(min=1)
