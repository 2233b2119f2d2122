import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from drcl.config import load_config
from drcl.data.synthetic import make_dataset

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


TINY_OVERRIDES = [
    "data.image_size=64", "data.workers=0", "train.batch_size=2", "train.threads=1",
    "train.max_iters=6", "train.checkpoint_every=2", "train.log_every=1", "train.warmup_iters=2",
    "model.hcl_queue=16", "model.lcl_queue=32", "sampler.threshold=0.2", "sampler.updates=3",
]


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-data")
    make_dataset(root, classes=8, train_images=24, val_images=8, image_size=64, imbalance=20, seed=1, progress=False)
    return root


@pytest.fixture
def tiny_args(small_data):
    """--set overrides for a seconds-long CPU run on the small generated set."""
    return TINY_OVERRIDES + [
        f"data.train_json={small_data / 'annotations' / 'train.json'}",
        f"data.train_images={small_data / 'images' / 'train'}",
    ]


@pytest.fixture
def tiny_cfg(tiny_args):
    return load_config("configs/tiny.yaml", tiny_args)
