"""A torch ``Dataset`` over a validated annotation file.

Each item is ``(image, target)``:

* ``image``: ``tv_tensors.Image``, uint8, shape (3, H, W), RGB;
* ``target``: a dict with
  ``boxes`` (``tv_tensors.BoundingBoxes``, XYXY, clipped to the image),
  ``labels`` (int64, contiguous 1..C in the order of the file's categories; 0 is background,
  as torchvision's detectors expect; ``dataset.category_ids[label - 1]`` gives the id back),
  ``ann_ids`` (int64, the annotation ids, so two views can pair boxes),
  ``image_id`` (int) and, when the file has segmentations and ``masks=True``,
  ``masks`` (``tv_tensors.Mask``, uint8, (N, H, W)).

Crowd annotations (COCO ``iscrowd=1``) are left out of the targets, as detectors train
without them. A file that cannot be read or decoded raises :class:`~drcl.errors.DataError`
naming the file and the image id.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors

from drcl.data.annotations import Annotations
from drcl.errors import DataError, import_optional


class DetectionDataset(Dataset):
    def __init__(self, annotations: Annotations, images_dir=None, transforms=None, masks: bool = True):
        self.ann = annotations
        self.images_dir = images_dir if images_dir is not None else annotations.images_dir
        if self.images_dir is None:
            raise ValueError("DetectionDataset needs images_dir")
        self.transforms = transforms
        self.category_ids = [c["id"] for c in annotations.categories]
        self.has_masks = masks and bool(annotations.has_segmentation.any())

    def __len__(self) -> int:
        return self.ann.num_images

    def load_image(self, i: int) -> tv_tensors.Image:
        path = self.ann.image_path(i, self.images_dir)
        where = f"{self.ann.path}: {self.ann.describe_image(i)}"
        try:
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB"))
        except FileNotFoundError:
            raise DataError(f"{where}: image file {path} not found") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{where}: image file {path} cannot be decoded ({e})") from None
        return tv_tensors.Image(torch.from_numpy(pixels.copy()).permute(2, 0, 1))

    def target(self, i: int, height: int, width: int) -> dict:
        ann = self.ann
        ks = ann.instances_of(i)
        ks = ks[~ann.iscrowd[ks]]
        boxes = torch.from_numpy(ann.boxes[ks]).to(torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": torch.from_numpy(ann.category_index[ks] + 1),
            "ann_ids": torch.from_numpy(ann.ann_ids[ks].copy()),
            "image_id": int(ann.image_ids[i]),
        }
        if self.has_masks:
            target["masks"] = tv_tensors.Mask(
                torch.from_numpy(np.stack([segmentation_mask(ann.segmentation(k), ann.boxes[k], height, width)
                                           for k in ks]))
                if len(ks)
                else torch.zeros((0, height, width), dtype=torch.uint8)
            )
        return target

    def __getitem__(self, i: int):
        image = self.load_image(i)
        height, width = image.shape[-2:]
        target = self.target(i, height, width)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def mask_api():
    """faster-coco-eval's mask module (polygons and RLE to masks and back), or a
    :class:`~drcl.errors.MissingDependency` when it is not installed."""
    return import_optional("faster_coco_eval.core.mask", "Mask R-CNN (model.masks=true)")


def segmentation_mask(seg, bbox, height: int, width: int) -> np.ndarray:
    """Binary (H, W) uint8 mask of a COCO/LVIS ``segmentation`` (polygons or RLE), rasterised
    with the same code the COCO evaluators use; the box ``bbox`` ([x, y, w, h]) when there is no
    segmentation."""
    if not seg:
        m = np.zeros((height, width), dtype=np.uint8)
        x, y, w, h = (float(v) for v in bbox)
        m[int(y) : int(np.ceil(y + h)), int(x) : int(np.ceil(x + w))] = 1
        return m
    mask_util = mask_api()
    if isinstance(seg, list):
        rle = mask_util.merge(mask_util.frPyObjects(seg, height, width))
    elif isinstance(seg.get("counts"), list):
        rle = mask_util.frPyObjects(seg, height, width)
    else:
        rle = seg
    return np.ascontiguousarray(mask_util.decode(rle), dtype=np.uint8)


def collate(batch):
    """Detection batches are lists: images differ in size and so do targets."""
    return tuple(zip(*batch))
