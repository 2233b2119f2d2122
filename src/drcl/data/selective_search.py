"""Selective search (Uijlings et al., IJCV 2013) through OpenCV's contrib module, and the box
filter SoCo (Wei et al., NeurIPS 2021) applies to its output before pre-training on it.

OpenCV's ``cv2.ximgproc.segmentation.createSelectiveSearchSegmentation`` returns a few hundred
(fast mode) to a few thousand (quality mode) boxes per image, in its own ranking (hierarchical
grouping with a randomised level order, the paper's diversification). Most are tiny segments,
slivers or the whole image. SoCo keeps boxes whose sides are at least 32 pixels, whose aspect
ratio lies in [1/3, 3] and whose size sqrt(w h) / sqrt(W H) lies in [0.3, 0.8] (its filter
``ratio3size0308``, for object-centric ImageNet). :class:`FilterSettings` holds these knobs
with defaults for scene images, where objects are smaller (see ``docs/proposals.md``).

This module needs only NumPy, Pillow and OpenCV, so the processes that
``drcl proposals --workers N`` starts do not load torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from drcl.errors import MissingDependency

MODES = ("fast", "quality")

_INSTALL = "selective search needs OpenCV's contrib modules: pip install 'drcl[proposals]' (opencv-contrib-python-headless)"


def ximgproc():
    """OpenCV's ``cv2.ximgproc`` module, or a one-line :class:`MissingDependency` saying which
    extra to install (also when an OpenCV without the contrib modules is installed)."""
    try:
        import cv2
    except ModuleNotFoundError as e:
        if e.name != "cv2":
            raise
        raise MissingDependency(_INSTALL) from None
    if not hasattr(cv2, "ximgproc"):
        raise MissingDependency(_INSTALL + f"; the installed OpenCV {cv2.__version__} has no cv2.ximgproc")
    return cv2.ximgproc


@dataclass(frozen=True)
class FilterSettings:
    """Which selective-search boxes are kept (SoCo's filter, with scene-image defaults).

    ``min_side``: both sides at least this many pixels (SoCo: 32); ``min_size`` /
    ``max_size``: sqrt(w h) / sqrt(W H) in this range (SoCo: 0.3 / 0.8); ``max_aspect``:
    w / h in [1 / max_aspect, max_aspect] (SoCo: 3).
    """

    min_side: float = 16.0
    min_size: float = 0.1
    max_size: float = 0.8
    max_aspect: float = 3.0

    def __post_init__(self):
        if self.min_side < 0 or not 0 <= self.min_size <= self.max_size <= 1 or self.max_aspect < 1:
            raise ValueError(f"need min_side >= 0, 0 <= min_size <= max_size <= 1 and max_aspect >= 1, got {self}")


def keep_mask(boxes: np.ndarray, width: int, height: int, settings: FilterSettings = FilterSettings()) -> np.ndarray:
    """Boolean mask over (N, 4) XYXY ``boxes`` of those that pass ``settings``."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    size = np.sqrt(np.clip(w * h, 0, None) / float(width * height))
    aspect = w / np.maximum(h, 1e-9)
    return ((w >= settings.min_side) & (h >= settings.min_side)
            & (size >= settings.min_size) & (size <= settings.max_size)
            & (aspect >= 1 / settings.max_aspect) & (aspect <= settings.max_aspect))


def _seed_c_rand(seed: int = 0) -> None:
    """OpenCV ranks its boxes with ``level * std::rand()``, the C library's generator, which
    nothing in ``cv2`` seeds: without this an image's boxes would depend on what the process
    searched before it (and so on ``--workers``). Seeding it before each image makes them a
    function of the image alone."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c") or ctypes.util.find_library("msvcrt")
        _LIBC = ctypes.CDLL(name) if name else False
    if _LIBC:
        _LIBC.srand(seed)


_LIBC = None


def selective_search(pixels: np.ndarray, mode: str = "fast", max_side: int = 512) -> np.ndarray:
    """Selective-search boxes of an (H, W, 3) uint8 RGB image, (N, 4) float32 XYXY in its
    pixel coordinates, in OpenCV's ranking (best first; the same for the same image). Images larger than ``max_side`` are
    shrunk for the search (its time grows with the pixel count) and the boxes scaled back."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    x = ximgproc()
    import cv2

    h, w = pixels.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    image = np.ascontiguousarray(pixels[:, :, ::-1])  # OpenCV wants BGR
    if scale < 1.0:
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    search = x.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(image)
    _seed_c_rand()
    if mode == "fast":
        search.switchToSelectiveSearchFast()
    else:
        search.switchToSelectiveSearchQuality()
    rects = np.asarray(search.process(), dtype=np.float32).reshape(-1, 4)  # x, y, w, h
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1) / scale
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
    return boxes


def image_candidates(path, mode: str = "fast", max_side: int = 512, settings: FilterSettings = FilterSettings()):
    """The filtered selective-search boxes of the image file ``path``: ``(boxes (N, 4) XYXY,
    scores (N,))``, score ``1 - rank / n`` from OpenCV's ranking of its ``n`` boxes. Raises
    ``OSError`` / ``ValueError`` for a file that cannot be read."""
    from PIL import Image

    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    boxes = selective_search(pixels, mode, max_side)
    scores = 1.0 - np.arange(len(boxes), dtype=np.float32) / max(len(boxes), 1)
    keep = keep_mask(boxes, pixels.shape[1], pixels.shape[0], settings)
    return boxes[keep], scores[keep]


def one_thread() -> None:
    """Pool initialiser (and the single-process case): OpenCV on one thread per process, so
    ``--workers N`` uses N cores and time per image is a one-core figure."""
    try:
        import cv2
    except ModuleNotFoundError:
        return
    cv2.setNumThreads(1)


def search_task(task: tuple):
    """``(index, path, mode, max_side, settings)`` -> ``(index, boxes, scores, problem)``, for
    a process pool: a file that cannot be searched comes back as a one-line ``problem`` (None
    when all went well) instead of an exception."""
    index, path, mode, max_side, settings = task
    try:
        boxes, scores = image_candidates(path, mode, max_side, settings)
    except MissingDependency:
        raise
    except Exception as e:  # noqa: BLE001 - named and counted by the caller (--on-bad)
        return index, None, None, f"selective search failed on {path} ({type(e).__name__}: {e})"
    return index, boxes, scores, None
