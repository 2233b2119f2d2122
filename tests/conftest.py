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


def pytest_collection_modifyitems(items):
    """Tests marked slow first (stable otherwise). pytest-xdist hands each file to a worker in
    collection order: a long file reached last keeps one core busy after the other has finished."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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


class FirstSteps:
    """Spies on the training steps of 2DRCL (``DRCL.forward``) and of torchvision detectors
    (``GeneralizedRCNN.forward`` in training mode), for tests that check what the training loop
    hands a model and what it counts.

    ``calls``: one dict per call, in order: ``model`` (the instance), ``weights`` (a copy of
    the category weights, DRCL only) and ``image_ids`` (DRCL only). For the first ``keep``
    calls of each instance the dict also holds ``copy``: a deep copy of the model, its inputs
    and the generator / global RNG states at the call, from which :meth:`flops` and
    :meth:`rerun` redo that step independently of the training loop."""

    def __init__(self, mp, keep: int = 1):
        from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

        from drcl.model.drcl import DRCL

        self.calls, self.keep, self._count = [], keep, {}
        for cls in (DRCL, GeneralizedRCNN):
            mp.setattr(cls, "forward", self._wrap(cls.forward))

    def _wrap(self, forward):
        def spy(model, *args, **kwargs):
            if not model.training:
                return forward(model, *args, **kwargs)
            call = {"model": model}
            if "generator" in kwargs or len(args) > 4:  # DRCL(images1, images2, targets1, targets2, weights, generator)
                args = list(args) + [kwargs.pop(k) for k in ("category_weights", "generator") if k in kwargs]
                call["weights"] = None if args[4] is None else args[4].detach().clone()
                call["image_ids"] = [int(t["image_id"]) for t in args[2] if "image_id" in t]
            n = self._count[id(model)] = self._count.get(id(model), 0) + 1
            if n <= self.keep:
                gen = args[5] if len(args) > 5 else None
                call["copy"] = {"model": copy.deepcopy(model), "rng": torch.get_rng_state(),
                                "args": copy.deepcopy([a for a in args[:5]]),
                                "gen": None if gen is None else gen.get_state()}
            self.calls.append(call)
            return forward(model, *args, **kwargs)

        return spy

    def first(self, kind: str) -> list[dict]:
        """The kept calls of models of ``kind`` ("DRCL" or a detector class name), in order."""
        return [c for c in self.calls if "copy" in c and type(c["model"]).__name__ == kind]

    @staticmethod
    def rerun(call: dict):
        """(model copy, result) of the recorded step done again on a copy."""
        saved = call["copy"]
        model = copy.deepcopy(saved["model"])
        args = copy.deepcopy(saved["args"])
        if saved["gen"] is not None:
            args.append(torch.Generator().set_state(saved["gen"]))
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(saved["rng"])
            out = model(*args)
        return model, out

    @classmethod
    def flops(cls, call: dict) -> int:
        """FLOPs of the recorded step, counted here: one forward of the model (for 2DRCL both
        views and the momentum pass) and the backward of its training loss, in one counter."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            _, out = cls.rerun(call)
            loss = out["loss"] if "loss" in out else sum(out.values())
            loss.backward()
        return counter.get_total_flops()


@pytest.fixture(scope="session")
def first_steps():
    """The :class:`FirstSteps` class (use it with a ``pytest.MonkeyPatch``)."""
    return FirstSteps
