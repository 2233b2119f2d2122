import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)

FIXTURES = Path(__file__).parent / "data" / "fixtures"


@pytest.fixture
def lvis_dict():
    """The hand-written LVIS v1-style fixture as a fresh dict (tests may edit it)."""
    return copy.deepcopy(json.loads((FIXTURES / "lvis_v1_tiny.json").read_text()))


def write_images(data: dict, root: Path, layout: str = "coco") -> None:
    """Write a JPEG of the record's size for every image. ``layout="coco"`` puts image 1 and 3
    under ``root/train2017`` (found through the coco_url folder) and the others flat."""
    for img in data["images"]:
        name = img.get("file_name") or img["coco_url"].split("/")[-1]
        sub = root / img["coco_url"].split("/")[-2] if layout == "coco" and img["id"] in (1, 3) else root
        sub.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(img["id"])
        pixels = rng.integers(0, 255, size=(img["height"], img["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / name, quality=95)


@pytest.fixture
def lvis_files(tmp_path, lvis_dict):
    """(json path, images dir) for the fixture, images written to disk."""
    images = tmp_path / "images"
    write_images(lvis_dict, images)
    path = tmp_path / "train.json"
    path.write_text(json.dumps(lvis_dict))
    return path, images
