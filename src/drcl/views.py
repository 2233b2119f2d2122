"""Two box-aware views of one image for contrastive pre-training (docs/method.md).

The recipe is MoCo v2's, applied to boxes as well as pixels with ``torchvision.transforms.v2``.
Each view, independently:

1. ``RandomResizedCrop`` to ``size x size`` (area ``scale``, aspect ``ratio``) and horizontal
   flip (``flip_p``); boxes follow the geometry and are clipped to the view;
2. conversion to float32 in [0, 1] (no normalisation: the model normalises);
3. colour jitter (brightness, contrast, saturation, hue = ``color_jitter``) with probability
   ``color_jitter_p``, grayscale with probability ``grayscale_p``;
4. gaussian blur (sigma in [0.1, 2.0]; kernel about 10% of ``size`` as in MoCo v2, capped at
   :data:`MAX_BLUR_KERNEL` = 17 px, which spans +-4 sigma at the largest sigma) with
   probability ``blur_p[view]`` and solarize (threshold 0.5) with probability
   ``solarize_p[view]``.

The cap leaves every size up to 179 px unchanged and costs nothing measurable elsewhere (a
Gaussian's mass beyond 4 sigma is 6e-5); at 800 px the uncapped 81 x 81 kernel took 98 % of the
input pipeline's time, 6.8 s per view on one core (BENCHMARKS.md, "The GPU run").

Blur and solarize are asymmetric across the views, as in BYOL and MoCo v3: view 1 is always
blurred and never solarized, view 2 is rarely blurred (0.1) and sometimes solarized (0.2).
MoCo v2 itself blurs both views with p = 0.5 and never solarizes; pass ``blur_p=(0.5, 0.5)``,
``solarize_p=(0.0, 0.0)`` for that.

Pairing rule: boxes keep their input order, ``labels`` and ``ann_ids``. A box whose clipped
width or height in a view is below ``min_box_size`` pixels is cropped out of that view, and a
box cropped out of *either* view is dropped from *both*, so the two targets list the same
boxes in the same order: ``target1["ann_ids"]`` equals ``target2["ann_ids"]`` and row ``k`` of
``target1["boxes"]`` and of ``target2["boxes"]`` is the same object.

Where the photometric half runs (``photometric``): ``"loader"`` (the reference) applies
torchvision's transforms here, one image at a time, in the DataLoader workers; ``"device"``
returns the view as uint8 with its photometric parameters (:mod:`drcl.photometric`), and
:meth:`TwoViewTransform.finish` applies them to the whole batch on the training device. The
geometry is the same code and the same draws in both, so the boxes are identical; the
photometric draws come from a seed per view taken from the sample's RNG first, so that they do
not move the geometric ones.

Randomness comes from torch's global RNG (as for every v2 transform), so a fixed
``torch.manual_seed`` gives the same views. In a ``DataLoader`` each worker's torch RNG is
seeded with ``base_seed + worker_id``, where ``base_seed`` is drawn from the main process's
RNG, so a seeded main process (or a seeded ``generator=``) makes the views reproducible for a
fixed number of workers.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from drcl.photometric import PhotometricRecipe, apply

#: Largest gaussian-blur kernel side: 2 * ceil(4 * sigma_max) + 1 for sigma_max = 2.
MAX_BLUR_KERNEL = 17


class TwoViewTransform:
    """``(image, target) -> ((image1, target1), (image2, target2))``.

    ``image``: uint8 (3, H, W) tensor (``tv_tensors.Image`` or plain); ``target``: a dict with
    ``boxes`` (XYXY, pixels), ``labels``, ``ann_ids`` and ``image_id`` as
    :class:`DetectionDataset` yields (missing ``ann_ids`` default to ``0..N-1``; masks and other
    keys are dropped). Each view
    is a float32 (3, size, size) plain tensor in [0, 1] (with ``photometric="device"``: uint8,
    and the target has ``photometric``, the view's parameters); each target has ``boxes``
    (float32 (K, 4) XYXY in the view's pixels), ``labels`` (int64 (K,)), ``ann_ids`` (int64
    (K,)) and, when the input target has one, ``image_id``.
    """

    def __init__(
        self,
        size: int = 160,
        scale=(0.3, 1.0),
        ratio=(3 / 4, 4 / 3),
        flip_p: float = 0.5,
        color_jitter=(0.4, 0.4, 0.4, 0.1),
        color_jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p=(1.0, 0.1),
        solarize_p=(0.0, 0.2),
        min_box_size: float = 4.0,
        photometric: str = "loader",
    ):
        if photometric not in ("loader", "device"):
            raise ValueError(f"photometric must be 'loader' or 'device', not {photometric!r}")
        self.size = size
        self.min_box_size = float(min_box_size)
        self.on_device = photometric == "device"
        self.geometric = v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=scale, ratio=ratio, antialias=True),
                v2.RandomHorizontalFlip(flip_p),
                v2.ClampBoundingBoxes(),
            ]
        )
        self.kernel = min(max(3, int(0.1 * size) // 2 * 2 + 1), MAX_BLUR_KERNEL)
        self.recipes = [PhotometricRecipe(tuple(color_jitter), color_jitter_p, grayscale_p, blur, solarize, self.kernel)
                        for blur, solarize in zip(blur_p, solarize_p)]
        self.reference = [
            v2.Compose(
                [
                    v2.ToDtype(torch.float32, scale=True),
                    v2.RandomApply([v2.ColorJitter(*color_jitter)], p=color_jitter_p),
                    v2.RandomGrayscale(grayscale_p),
                    v2.RandomApply([v2.GaussianBlur(self.kernel, sigma=(0.1, 2.0))], p=blur),
                    v2.RandomSolarize(0.5, p=solarize),
                ]
            )
            for blur, solarize in zip(blur_p, solarize_p)
        ]

    def view(self, i: int, image: tv_tensors.Image, boxes: tv_tensors.BoundingBoxes, seed: int):
        """View ``i`` (0 or 1): the image (float, or uint8 and its photometric parameters on
        the device path) and the view's clipped boxes, all of them. ``seed`` drives the
        photometric draws."""
        image, boxes = self.geometric(image, boxes)
        boxes = boxes.as_subclass(Tensor).to(torch.float32)
        if self.on_device:
            params = self.recipes[i].draw(torch.Generator().manual_seed(seed))
            return image.as_subclass(Tensor), boxes, params
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU's only: torch.manual_seed also queues CUDA's, 8 ms here
            image = self.reference[i](image)
        return image.as_subclass(Tensor), boxes, None

    def __call__(self, image, target: dict) -> tuple[tuple[Tensor, dict], tuple[Tensor, dict]]:
        image = tv_tensors.Image(image)
        boxes = target["boxes"]
        if not isinstance(boxes, tv_tensors.BoundingBoxes):
            boxes = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image.shape[-2:]))
        boxes = v2.ConvertBoundingBoxFormat("XYXY")(boxes)
        labels = torch.as_tensor(target["labels"], dtype=torch.int64)
        ann_ids = torch.as_tensor(target.get("ann_ids", torch.arange(len(labels))), dtype=torch.int64)

        seeds = torch.randint(0, 2**62, (2,)).tolist()  # first: the geometric draws are the same on both paths
        views = [self.view(i, image, boxes, seeds[i]) for i in (0, 1)]
        keep = torch.ones(len(labels), dtype=torch.bool)
        for _, b, _ in views:
            keep &= ((b[:, 2:] - b[:, :2]) >= self.min_box_size).all(dim=1)
        extra = {"image_id": target["image_id"]} if "image_id" in target else {}
        return tuple(
            (img, {"boxes": b[keep], "labels": labels[keep], "ann_ids": ann_ids[keep], **extra,
                   **({} if params is None else {"photometric": params})})
            for img, b, params in views
        )

    def finish(self, batch):
        """A batch from :func:`collate_views` as the model takes it: on the device path the
        photometric half applied to the (device-resident) uint8 views; unchanged otherwise."""
        if len(batch) == 4:
            return batch
        images1, images2, targets1, targets2, params1, params2 = batch
        return apply(images1, params1, self.kernel), apply(images2, params2, self.kernel), targets1, targets2


def collate_views(batch):
    """DataLoader ``collate_fn`` for :class:`TwoViewTransform` items:
    ``(images1 (B, 3, S, S), images2 (B, 3, S, S), targets1 list, targets2 list)``, and on the
    device path the views' photometric parameters ``params1, params2`` (B, P) after them."""
    (view1, view2) = zip(*batch)
    images1, targets1 = zip(*view1)
    images2, targets2 = zip(*view2)
    out = [torch.stack(images1), torch.stack(images2), list(targets1), list(targets2)]
    if "photometric" in targets1[0]:
        out += [torch.stack([t.pop("photometric") for t in targets]) for targets in (out[2], out[3])]
    return tuple(out)
