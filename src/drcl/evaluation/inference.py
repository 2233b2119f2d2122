"""Run a detector over a dataset and write COCO-results-format detections.

Each detection is ``{"image_id", "category_id", "score", "bbox": [x, y, w, h]}`` and, for a
Mask R-CNN, ``"segmentation"`` (compressed RLE of the mask thresholded at 0.5, as
torchvision's and detectron2's evaluators do). Labels map back to category ids through
``category_ids[label - 1]`` (the label order of :class:`~drcl.data.dataset.DetectionDataset`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from drcl.data.dataset import DetectionDataset, collate, mask_api


def _image_only(image, target):
    return image.float() / 255.0, target


@torch.no_grad()
def predict(detector, dataset: DetectionDataset, category_ids: list, batch_size: int = 8,
            device: torch.device | str = "cpu", progress: bool = True, workers: int = 0) -> list[dict]:
    """Detections for every image of ``dataset`` (its own transforms are replaced by a plain
    conversion to float; the detector resizes and normalises); ``workers`` data loader
    processes decode the images."""
    dataset = DetectionDataset(dataset.ann, dataset.images_dir, transforms=_image_only, masks=False)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=workers)
    was_training = detector.training
    detector.eval()
    results = []
    try:
        for images, targets in tqdm(loader, desc="detecting", unit="batch", disable=not progress, dynamic_ncols=True):
            outputs = detector([im.to(device) for im in images])
            for target, out in zip(targets, outputs):
                boxes = out["boxes"].cpu()
                xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
                scores, labels = out["scores"].cpu().tolist(), out["labels"].cpu().tolist()
                rles = None
                if "masks" in out:
                    mask_util = mask_api()
                    binary = (out["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
                    rles = [mask_util.encode(np.asfortranarray(m)) for m in binary]
                for k, (box, score, label) in enumerate(zip(xywh, scores, labels)):
                    det = {"image_id": target["image_id"], "category_id": category_ids[label - 1],
                           "score": round(float(score), 6), "bbox": [round(v, 2) for v in box]}
                    if rles is not None:
                        rle = rles[k]
                        det["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"].decode()
                                               if isinstance(rle["counts"], bytes) else rle["counts"]}
                    results.append(det)
    finally:
        detector.train(was_training)
    return results
