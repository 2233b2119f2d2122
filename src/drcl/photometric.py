"""The photometric half of a view, drawn per sample and applied to a whole batch on the
training device.

:class:`~drcl.views.TwoViewTransform` makes each view in two halves: the geometry (random
resized crop, flip, boxes) and the photometric recipe of MoCo v2, applied in this order with a
draw per view:

1. colour jitter with probability ``color_jitter_p``: brightness ``b``, contrast ``c`` and
   saturation ``s`` factors uniform in ``[max(0, 1 - j), 1 + j]``, hue shift ``h`` uniform in
   ``[-j_h, j_h]``, applied in a random order;

   * brightness: ``x' = clamp(b x, 0, 1)``
   * contrast: ``x' = clamp(c x + (1 - c) mean(gray(x)), 0, 1)``
   * saturation: ``x' = clamp(s x + (1 - s) gray(x), 0, 1)``
   * hue: ``x' = hsv2rgb(h(x) + h mod 1, s(x), v(x))``
   * ``gray(x) = 0.2989 R + 0.587 G + 0.114 B``

2. grayscale with probability ``grayscale_p``: ``x' = gray(x)`` on every channel;
3. Gaussian blur with probability ``blur_p``: sigma uniform in ``[0.1, 2]``, a ``k x k``
   kernel (``k`` odd), reflect padding;
4. solarize with probability ``solarize_p``: ``x' = 1 - x`` where ``x >= 0.5``.

These are torchvision.transforms.v2's ``ColorJitter``, ``RandomGrayscale``,
``GaussianBlur`` and ``RandomSolarize`` on float images in [0, 1], which run one image at a
time on the CPU in the DataLoader workers (``data.photometric: loader``, the reference). At
800 px that costs 0.3 s per view on a core, which starved a GPU (BENCHMARKS.md, "The GPU
run"). Here the same arithmetic runs on a batch on the training device
(``data.photometric: device``): :func:`draw` picks one view's parameters in the worker, from a
seed the view takes from the sample's RNG (so runs stay reproducible and resumable), and
:func:`apply` applies a batch of them, every draw with ``torch.where``, so nothing waits for
the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# one view's parameters, in a float vector
JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3, 4
ORDER = slice(5, 9)  # the jitter ops' order: a permutation of 0 (brightness) .. 3 (hue)
GRAY, BLUR, SIGMA, SOLARIZE = 9, 10, 11, 12
NUM_PARAMS = 13

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


@dataclass(frozen=True)
class PhotometricRecipe:
    """One view's photometric settings (see the module docstring)."""

    color_jitter: tuple = (0.4, 0.4, 0.4, 0.1)
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    solarize_p: float = 0.0
    blur_kernel: int = 17
    sigma: tuple = (0.1, 2.0)

    def draw(self, generator: torch.Generator) -> Tensor:
        """One view's parameters (a float32 vector of :data:`NUM_PARAMS`)."""
        u = torch.rand(9, generator=generator, dtype=torch.float64).tolist()
        b, c, s, h = self.color_jitter
        p = [0.0] * NUM_PARAMS
        p[JITTER] = float(u[0] < self.color_jitter_p)
        for k, (i, j) in enumerate(((BRIGHTNESS, b), (CONTRAST, c), (SATURATION, s))):
            lo = max(0.0, 1.0 - j)
            p[i] = lo + (1.0 + j - lo) * u[1 + k]
        p[HUE] = -h + 2 * h * u[4]
        p[ORDER] = torch.randperm(4, generator=generator).tolist()
        p[GRAY] = float(u[5] < self.grayscale_p)
        p[BLUR] = float(u[6] < self.blur_p)
        p[SIGMA] = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * u[7]
        p[SOLARIZE] = float(u[8] < self.solarize_p)
        return torch.tensor(p, dtype=torch.float32)


def gray(x: Tensor) -> Tensor:
    """(B, 1, H, W) luma of (B, 3, H, W) RGB."""
    r, g, b = x.unbind(1)
    return (r * _GRAY_WEIGHTS[0] + g * _GRAY_WEIGHTS[1] + b * _GRAY_WEIGHTS[2]).unsqueeze(1)


def _per_sample(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def _blend(x: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    ratio = _per_sample(ratio)
    return (x * ratio + other * (1.0 - ratio)).clamp_(0.0, 1.0)


def _rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    flat = maxc == minc
    span = maxc - minc
    ones = torch.ones_like(maxc)
    s = span / torch.where(flat, ones, maxc)
    span = torch.where(flat, ones, span)
    rc, gc, bc = (maxc - r) / span, (maxc - g) / span, (maxc - b) / span
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(flat, torch.zeros_like(h), h)
    h = (h / 6.0 + 1.0).fmod(1.0)
    return torch.stack((h, s, maxc), dim=1)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    h, s, v = x.unbind(1)
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.to(torch.int64).remainder(6)
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s + s * f)).clamp(0.0, 1.0)
    # the six sectors of the hue circle: which of v, p, q, t each of r, g, b takes (a table
    # on the device would be a host-to-device copy, and a wait, per call)
    sector = [i == k for k in range(5)]

    def pick(*values):
        out = values[5]
        for k in range(4, -1, -1):
            out = torch.where(sector[k], values[k], out)
        return out

    return torch.stack((pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)), dim=1)


def _hue(x: Tensor, shift: Tensor) -> Tensor:
    hsv = _rgb_to_hsv(x)
    h = (hsv[:, 0] + _per_sample(shift)[:, 0]).remainder(1.0)
    return _hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), dim=1))


def _jitter_op(op: int, x: Tensor, p: Tensor) -> Tensor:
    if op == 0:
        return (x * _per_sample(p[:, BRIGHTNESS])).clamp(0.0, 1.0)
    if op == 1:
        return _blend(x, gray(x).mean(dim=(1, 2, 3), keepdim=True), p[:, CONTRAST])
    if op == 2:
        return _blend(x, gray(x), p[:, SATURATION])
    return _hue(x, p[:, HUE])


def gaussian_blur(x: Tensor, sigma: Tensor, kernel: int) -> Tensor:
    """Blur each image of ``x`` (B, C, H, W) with its own ``sigma`` (B,): a separable
    ``kernel``-tap Gaussian, reflect padding (torchvision's ``gaussian_blur`` per image)."""
    b, c, height, width = x.shape
    half = (kernel - 1) / (2.0 * 2.0**0.5)
    t = torch.linspace(-half, half, kernel, device=x.device, dtype=x.dtype)
    k1 = torch.softmax(-(t[None] / sigma[:, None].to(x.dtype)) ** 2, dim=1)  # (B, k)
    weights = k1.repeat_interleave(c, dim=0)  # (B*C, k): one per channel of each image
    pad = kernel // 2
    y = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect").reshape(1, b * c, height + 2 * pad,
                                                                                    width + 2 * pad)
    y = torch.nn.functional.conv2d(y, weights[:, None, :, None], groups=b * c)
    y = torch.nn.functional.conv2d(y, weights[:, None, None, :], groups=b * c)
    return y.reshape(b, c, height, width)


def apply(images: Tensor, params: Tensor, blur_kernel: int) -> Tensor:
    """The photometric half of a batch of views: ``images`` (B, 3, H, W) uint8 (or float in
    [0, 1]), ``params`` (B, :data:`NUM_PARAMS`) from :meth:`PhotometricRecipe.draw`; returns
    float32 in [0, 1]. Runs in float32 whatever autocast says."""
    with torch.autocast(images.device.type, enabled=False):
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        p = params.to(device=x.device, dtype=torch.float32)
        jitter = p[:, JITTER] > 0.5
        order = p[:, ORDER].round().long()
        for position in range(4):
            for op in range(4):
                chosen = jitter & (order[:, position] == op)
                x = torch.where(_per_sample(chosen), _jitter_op(op, x, p), x)
        x = torch.where(_per_sample(p[:, GRAY] > 0.5), gray(x).expand_as(x), x)
        x = torch.where(_per_sample(p[:, BLUR] > 0.5), gaussian_blur(x, p[:, SIGMA], blur_kernel), x)
        x = torch.where(_per_sample(p[:, SOLARIZE] > 0.5) & (x >= 0.5), 1.0 - x, x)
    return x
