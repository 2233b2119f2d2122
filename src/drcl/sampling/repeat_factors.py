"""Repeat factors for long-tailed detection data: RFS, IRFS and 2DRCL's dynamic rebalancing.

Every function here is pure and vectorised with NumPy. A dataset is described by its M
annotations only, decoupled from any file format:

* ``image_index[a]``    in ``[0, N)``: the image annotation ``a`` belongs to,
* ``category_index[a]`` in ``[0, C)``: its category,
* ``num_images`` N (images without annotations count too) and ``num_categories`` C.

For category c over the training set:

* image-level frequency     ``f_img(c) = #images containing c / N``
* instance-level frequency  ``f_ins(c) = #instances of c / M``
* a score ``s(c)`` per mode (``t`` is the repeat threshold, 1e-3 on LVIS):

  ===========  ====================================================================
  ``rfs``      ``s = f_img``  (LVIS repeat factor sampling, Gupta et al. 2019)
  ``irfs``     ``s = sqrt(f_img * f_ins)``  (Yaman et al. 2023)
  ``dynamic``  ``s_a = 1 / (a / f_img + (1 - a) / f_ins)``, a in [0, 1]  (2DRCL DRB)
  ``random``   no rebalancing: every factor is 1
  ===========  ====================================================================

* category repeat factor ``r(c) = max(1, sqrt(t / s(c)))``, or ``max(1, t / s(c))`` with
  ``sqrt=False``,
* image repeat factor ``r(I) = max_{c in I} r(c)``, 1 for an image without annotations.

``dynamic`` with ``a = 1`` is ``rfs`` and with ``a = 0`` is RFS on instance frequencies;
both endpoints are computed from the plain frequency so that they match bit for bit.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from drcl.data.annotations import distinct_pairs

__all__ = [
    "MODES",
    "Mode",
    "box_weights",
    "category_frequencies",
    "category_repeat_factors",
    "choose_boxes",
    "expected_sampling_share",
    "image_repeat_factors",
]

Mode = Literal["random", "rfs", "irfs", "dynamic"]
MODES: tuple[str, ...] = ("random", "rfs", "irfs", "dynamic")


# ----------------------------------------------------------------------------- validation
def _as_index_array(values, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_annotations(
    image_index, category_index, num_images: int, num_categories: int
) -> tuple[np.ndarray, np.ndarray]:
    """Validate the annotation arrays; return them as int64 arrays."""
    image_index = _as_index_array(image_index, "image_index")
    category_index = _as_index_array(category_index, "category_index")
    if image_index.shape != category_index.shape:
        raise ValueError(
            f"image_index and category_index must have the same length, got "
            f"{image_index.size} and {category_index.size}"
        )
    if int(num_images) != num_images or num_images < 0:
        raise ValueError(f"num_images must be a non-negative integer, got {num_images!r}")
    if image_index.size:
        lo, hi = int(image_index.min()), int(image_index.max())
        if lo < 0 or hi >= num_images:
            bad = lo if lo < 0 else hi
            raise ValueError(f"image_index holds {bad}, outside [0, num_images={num_images})")
    if int(num_categories) != num_categories or num_categories < 0:
        raise ValueError(f"num_categories must be a non-negative integer, got {num_categories!r}")
    if category_index.size:
        lo, hi = int(category_index.min()), int(category_index.max())
        if lo < 0 or hi >= num_categories:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"category_index holds {bad}, outside [0, num_categories={num_categories})"
            )
    return image_index, category_index


def _check_factors(category_factors, name: str = "category_factors") -> np.ndarray:
    arr = np.asarray(category_factors, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or (arr.size and arr.min() < 0):
        raise ValueError(f"{name} must be finite and non-negative")
    return arr


# ----------------------------------------------------------------------------- frequencies
def category_frequencies(
    image_index, category_index, num_images: int, num_categories: int
) -> tuple[np.ndarray, np.ndarray]:
    """Image- and instance-level frequency of every category.

    ``f_img(c) = #images containing c / N`` and ``f_ins(c) = #instances of c / M``, where
    an image containing several instances of c counts once in ``f_img``.

    Args:
        image_index: int array (M,), image of each annotation, in ``[0, num_images)``.
        category_index: int array (M,), category of each annotation, in
            ``[0, num_categories)``.
        num_images: N, including images without annotations.
        num_categories: C.

    Returns:
        ``(f_img, f_ins)``, two float64 arrays of shape (C,). Both are 0 for a category
        absent from the data (and everywhere when N or M is 0).
    """
    image_index, category_index = _check_annotations(
        image_index, category_index, num_images, num_categories
    )
    _, pair_categories = distinct_pairs(image_index, category_index, num_categories)
    images_with = np.bincount(pair_categories, minlength=num_categories).astype(np.float64)
    instances = np.bincount(category_index, minlength=num_categories).astype(np.float64)
    num_instances = category_index.size
    f_img = images_with / num_images if num_images else images_with
    f_ins = instances / num_instances if num_instances else instances
    return f_img, f_ins


# ----------------------------------------------------------------------------- factors
def category_repeat_factors(
    f_img,
    f_ins,
    mode: Mode = "rfs",
    threshold: float = 1e-3,
    alpha: float = 1.0,
    sqrt: bool = True,
) -> np.ndarray:
    """Per-category repeat factor ``r(c) = max(1, sqrt(t / s(c)))``.

    ``s(c)`` depends on ``mode`` (see the module docstring):

    * ``"rfs"``: ``s = f_img``, i.e. detectron2's ``RepeatFactorTrainingSampler``
      (``repeat_factors_from_category_frequency``), LVIS paper appendix B.2;
    * ``"irfs"``: ``s = sqrt(f_img * f_ins)``, instance-aware RFS (Yaman et al. 2023);
    * ``"dynamic"``: ``s_a = 1 / (alpha / f_img + (1 - alpha) / f_ins)``, the weighted
      harmonic mean of 2DRCL's dynamic rebalancing. ``alpha = 1`` uses ``s = f_img`` and
      ``alpha = 0`` uses ``s = f_ins`` directly, so ``alpha = 1`` equals ``"rfs"`` exactly;
    * ``"random"``: all ones (plain uniform sampling, for baselines and plots).

    With ``sqrt=False`` the factor is ``max(1, t / s(c))``.

    A category whose frequency is 0 (absent from the data) gets factor 1: it belongs to no
    image, so it never changes an image factor. No division by zero happens.

    Args:
        f_img, f_ins: float arrays (C,) from :func:`category_frequencies`, in ``[0, 1]``;
            they must agree on which categories are present (non-zero).
        mode: ``"random" | "rfs" | "irfs" | "dynamic"``.
        threshold: ``t > 0``.
        alpha: ``a`` in ``[0, 1]``; only ``"dynamic"`` uses it (it is validated always).
        sqrt: take the square root (detectron2's default) or not.

    Returns:
        float64 array (C,), every entry ``>= 1``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown repeat-factor mode {mode!r}; expected one of {MODES}")
    threshold = float(threshold)
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a finite number > 0, got {threshold!r}")
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:  # also rejects NaN
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    f_img = np.asarray(f_img, dtype=np.float64)
    f_ins = np.asarray(f_ins, dtype=np.float64)
    if f_img.ndim != 1 or f_img.shape != f_ins.shape:
        raise ValueError(
            f"f_img and f_ins must be 1-D of the same length, got {f_img.shape} and {f_ins.shape}"
        )
    for name, f in (("f_img", f_img), ("f_ins", f_ins)):
        if not np.all((f >= 0) & (f <= 1)):  # also rejects NaN
            raise ValueError(f"{name} must hold frequencies in [0, 1]")
    present = f_img > 0
    if not np.array_equal(present, f_ins > 0):
        c = int(np.flatnonzero(present != (f_ins > 0))[0])
        raise ValueError(
            f"f_img and f_ins disagree on whether category {c} is present "
            f"(f_img={f_img[c]}, f_ins={f_ins[c]})"
        )

    factors = np.ones(f_img.shape, dtype=np.float64)
    if mode == "random" or not present.any():
        return factors
    fi, fn = f_img[present], f_ins[present]
    if mode == "rfs" or (mode == "dynamic" and alpha == 1.0):
        score = fi
    elif mode == "dynamic" and alpha == 0.0:
        score = fn
    elif mode == "dynamic":
        score = 1.0 / (alpha / fi + (1.0 - alpha) / fn)
    else:  # irfs
        score = np.sqrt(fi * fn)
    ratio = threshold / score
    factors[present] = np.maximum(1.0, np.sqrt(ratio) if sqrt else ratio)
    return factors


def image_repeat_factors(
    category_factors, image_index, category_index, num_images: int
) -> np.ndarray:
    """Per-image repeat factor ``r(I) = max_{c in I} r(c)``, 1 for images without annotations.

    The maximum starts at 1, so this is ``max(1, max_{c in I} r(c))``; the two agree for
    factors from :func:`category_repeat_factors`, which are all ``>= 1``.

    Args:
        category_factors: float array (C,).
        image_index, category_index: int arrays (M,), as for :func:`category_frequencies`.
        num_images: N.

    Returns:
        float64 array (N,).
    """
    category_factors = _check_factors(category_factors)
    image_index, category_index = _check_annotations(
        image_index, category_index, num_images, category_factors.size
    )
    factors = np.ones(int(num_images), dtype=np.float64)
    np.maximum.at(factors, image_index, category_factors[category_index])
    return factors


def expected_sampling_share(
    image_factors, image_index, category_index, num_categories: int
) -> np.ndarray:
    """Expected share of sampled instances per category.

    When image I is drawn ``r(I)`` times in expectation per epoch, category c is seen
    ``E_c = sum_{a: cat(a) = c} r(I(a))`` times in expectation and its share is
    ``E_c / sum_c' E_c'``. With all factors 1 this is ``f_ins``.

    Args:
        image_factors: float array (N,).
        image_index, category_index: int arrays (M,).
        num_categories: C.

    Returns:
        float64 array (C,) summing to 1 (all zeros when there are no annotations).
    """
    image_factors = _check_factors(image_factors, "image_factors")
    image_index, category_index = _check_annotations(
        image_index, category_index, image_factors.size, num_categories
    )
    expected = np.bincount(
        category_index, weights=image_factors[image_index], minlength=num_categories
    )
    total = expected.sum()
    return expected / total if total > 0 else expected


# ----------------------------------------------------------------------------- boxes
def box_weights(category_factors, category_index) -> np.ndarray:
    """Per-annotation weight ``w_a = r(c_a)``, the repeat factor of the box's category.

    Local contrast draws its boxes from an image without replacement with probability
    proportional to these weights (:func:`choose_boxes`), so tail instances in a crowded
    image are not drowned by head instances.

    Args:
        category_factors: float array (C,), e.g. the sampler's current category factors.
        category_index: int array (m,), the categories of the boxes (of one image or all).

    Returns:
        float64 array (m,).
    """
    category_factors = _check_factors(category_factors)
    category_index = _as_index_array(category_index, "category_index")
    if category_index.size and (
        category_index.min() < 0 or category_index.max() >= category_factors.size
    ):
        raise ValueError(
            f"category_index must lie in [0, {category_factors.size}) for "
            f"{category_factors.size} category factors"
        )
    return category_factors[category_index]


def choose_boxes(weights, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw up to ``k`` distinct box indices, each draw proportional to the remaining weights.

    Successive sampling without replacement (``torch.multinomial(..., replacement=False)``):
    the first index is drawn with probability ``w_i / sum(w)``, the next from the rest
    renormalised, and so on. Boxes with weight 0 are never chosen, so the result has
    ``min(k, number of positive weights)`` indices, in draw order.

    Uses a :class:`torch.Generator` (``None``: torch's global generator) because it runs per
    image inside the data pipeline / model, next to the other torch random transforms.

    Args:
        weights: 1-D array or tensor of non-negative finite weights (e.g. :func:`box_weights`).
        k: maximum number of boxes, ``>= 0``.
        generator: optional ``torch.Generator``.

    Returns:
        int64 tensor of distinct indices into ``weights``.
    """
    if int(k) != k or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    w = torch.as_tensor(np.asarray(weights) if not torch.is_tensor(weights) else weights)
    w = w.detach().to(device="cpu", dtype=torch.float64)
    if w.ndim != 1:
        raise ValueError(f"weights must be 1-D, got shape {tuple(w.shape)}")
    if w.numel() and (not torch.isfinite(w).all() or (w < 0).any()):
        raise ValueError("weights must be finite and non-negative")
    n = min(int(k), int((w > 0).sum()))
    if n == 0:
        return torch.empty(0, dtype=torch.int64)
    return torch.multinomial(w, n, replacement=False, generator=generator)


# ----------------------------------------------------------------------------- reports
#: The settings compared in ``drcl stats --repeat-factors ... --plot``.
SHARE_SETTINGS: tuple[tuple[str, str, float], ...] = (
    ("random", "random", 1.0),
    ("rfs", "rfs", 1.0),
    ("irfs", "irfs", 1.0),
    ("dynamic a=1", "dynamic", 1.0),
    ("dynamic a=0.5", "dynamic", 0.5),
    ("dynamic a=0", "dynamic", 0.0),
)


def repeat_factors_for(
    image_index, category_index, num_images: int, num_categories: int,
    mode: Mode = "rfs", threshold: float = 1e-3, alpha: float = 1.0, sqrt: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(category factors (C,), image factors (N,)) of a dataset in one call."""
    f_img, f_ins = category_frequencies(image_index, category_index, num_images, num_categories)
    cat = category_repeat_factors(f_img, f_ins, mode, threshold, alpha, sqrt)
    return cat, image_repeat_factors(cat, image_index, category_index, num_images)


def sampling_shares(
    image_index, category_index, num_images: int, num_categories: int, threshold: float = 1e-3
) -> dict[str, np.ndarray]:
    """Expected per-category instance share under each of :data:`SHARE_SETTINGS`
    (``random`` is the raw instance distribution)."""
    shares = {}
    for label, mode, alpha in SHARE_SETTINGS:
        _, img = repeat_factors_for(image_index, category_index, num_images, num_categories, mode, threshold, alpha)
        shares[label] = expected_sampling_share(img, image_index, category_index, num_categories)
    return shares
