import pytest

from drcl.config import ConfigError, load_config


def test_tiny_config_loads_with_the_documented_keys():
    cfg = load_config("configs/tiny.yaml")
    for key in ("seed",):
        assert key in cfg
    assert cfg["data"]["train_json"] and cfg["data"]["train_images"]
    assert cfg["train"]["max_iters"] > 0 and cfg["train"]["batch_size"] > 0 and cfg["train"]["checkpoint_every"] > 0
    assert cfg["model"]["preset"] == "tiny"


@pytest.mark.parametrize("path", ["configs/lvis_r50.yaml", "configs/lvis_r101.yaml"])
def test_paper_configs_load(path):
    assert load_config(path)["model"]["preset"] in ("r50-fpn", "r101-fpn")


def test_overrides_are_typed():
    cfg = load_config("configs/tiny.yaml", ["train.max_iters=20", "train.lr=0.5", "model.hcl=false",
                                            "train.lr_steps=[0.5, 0.9]", "data.proposals=props.json"])
    assert cfg["train"]["max_iters"] == 20 and cfg["train"]["lr"] == 0.5 and cfg["model"]["hcl"] is False
    assert cfg["train"]["lr_steps"] == [0.5, 0.9] and cfg["data"]["proposals"] == "props.json"
    assert load_config("configs/tiny.yaml", ["sampler.threshold=1e-3"])["sampler"]["threshold"] == 1e-3


@pytest.mark.parametrize("override,words", [
    ("train.max_iter=5", "unknown key 'train.max_iter' (did you mean 'train.max_iters'?)"),
    ("train.max_iters=ten", "key 'train.max_iters' must be an integer"),
    ("train.max_iters=0", "key 'train.max_iters' must be positive"),
    ("train.lr=fast", "key 'train.lr' must be a number"),
    ("model.norm=ln", "key 'model.norm' must be one of bn, gn, frozen_bn"),
    ("model.hcl=maybe", "key 'model.hcl' must be true or false"),
    ("sampler.mode=balanced", "key 'sampler.mode' must be one of"),
    ("train", "expected dotted.key=value"),
])
def test_bad_override_names_the_key(override, words):
    with pytest.raises(ConfigError, match=None) as e:
        load_config("configs/tiny.yaml", [override])
    assert words in str(e.value)


def test_bad_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'train\.batch_sise' \(did you mean 'train\.batch_size'\?\)"):
        load_config(bad)
    bad.write_text("train: 4\n")
    with pytest.raises(ConfigError, match="'train' must be a mapping"):
        load_config(bad)
    bad.write_text("train: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_whole_config_checks():
    with pytest.raises(ConfigError, match="at least one of hcl, lcl, ar, sr"):
        load_config("configs/tiny.yaml", ["model.hcl=false", "model.lcl=false", "model.ar=false", "model.sr=false"])
    with pytest.raises(ConfigError, match="data.proposals"):
        load_config("configs/tiny.yaml", ["data.boxes=proposals"])


LVIS_CONFIGS = ["configs/lvis_r50.yaml", "configs/lvis_r101.yaml", "configs/lvis_r50_finetune.yaml"]
PATHS = ("train_json:", "train_images:", "val_json:", "val_images:")


@pytest.mark.parametrize("path", LVIS_CONFIGS)
def test_every_value_in_the_lvis_configs_has_its_source_beside_it(path):
    import re

    for line in open(path):
        if re.match(r"\s+\w+:\s*\S", line) and not line.strip().startswith(PATHS):  # a value, not a section
            assert "#" in line, line


@pytest.mark.parametrize("path", LVIS_CONFIGS[:2])
def test_lvis_pretraining_starts_from_imagenet_with_queue_keys_younger_than_the_momentum_horizon(path):
    """On the configs' 8 GPUs (and on 4) a key is at most half the momentum encoder's
    averaging horizon old at the start, in both queues (LCL with as few as 4 boxes per image)."""
    from drcl.engine.trainer import scaled_lr
    from drcl.model.memory import staleness

    cfg = load_config(path)
    m, t = cfg["model"], cfg["train"]
    assert m["init"] == "imagenet"
    for gpus, limit in ((8, 0.3), (4, 0.55)):
        images = t["batch_size"] * gpus
        for queue, keys in ((m["hcl_queue"], 2 * images), (m["lcl_queue"], 2 * images * 8)):
            age, horizon = staleness(queue, keys, t["momentum_base"])
            assert age / horizon <= limit, (gpus, queue)
        age, horizon = staleness(m["lcl_queue"], 2 * images * 4, t["momentum_base"])
        assert age / horizon <= 2 * limit
    assert scaled_lr(t, 8) == pytest.approx(0.08) and scaled_lr(t, 4) == pytest.approx(0.04)
    assert t["health_every"] >= 250  # an estimated 1 % of the step time, not 10 %
