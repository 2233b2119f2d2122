import pytest

from drcl.config import load_config
from drcl.data.synthetic import make_dataset

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
