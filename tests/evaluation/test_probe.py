import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from drcl.config import load_config
from drcl.data.synthetic import config_overrides, make_dataset
from drcl.errors import DataError
from drcl.evaluation.probe import (
    ACCURACY_KEYS,
    _label_map,
    _resize,
    embed_boxes,
    fit_linear,
    format_probe,
    group_accuracy,
    load_encoder,
    run_probe,
)
from drcl.model.detector import build_encoder
from drcl.model.drcl import IMAGENET_MEAN, IMAGENET_STD

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a 2-core machine shared with other jobs, two threads spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def probe_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe-data")
    make_dataset(root, classes=6, train_images=30, val_images=12, image_size=64, imbalance=5, seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def probe_cfg(probe_data):
    overrides = [
        *config_overrides(probe_data),
        "data.image_size=64",
        "train.device=cpu",
    ]
    return load_config(REPO / "configs" / "tiny.yaml", overrides)


@pytest.fixture(scope="session")
def random_result(probe_cfg):
    return run_probe(probe_cfg, None, epochs=30, seed=0, progress=False, batch_size=8)


def _blobs(n, classes, dim, seed, shuffle=False):
    g = np.random.default_rng(seed)
    centres = g.normal(size=(classes, dim)) * 4
    y = g.integers(0, classes, size=n)
    x = centres[y] + g.normal(size=(n, dim)) * 0.5
    if shuffle:
        y = g.permutation(y)
    return x.astype(np.float32), y


# ---------------------------------------------------------------- classifier


def test_classifier_separable_features():
    x, y = _blobs(600, 5, 16, seed=0)
    probe = fit_linear(x[:400], y[:400], 5, epochs=50)
    assert (probe.predict(x[400:]).numpy() == y[400:]).mean() > 0.99
    assert (probe.predict(x[:400]).numpy() == y[:400]).mean() == 1.0


def test_classifier_shuffled_labels_is_chance():
    classes = 5
    x, y = _blobs(2000, classes, 16, seed=1, shuffle=True)
    probe = fit_linear(x[:1000], y[:1000], classes, epochs=50)
    acc = (probe.predict(x[1000:]).numpy() == y[1000:]).mean()
    assert abs(acc - 1 / classes) < 0.06


def test_classifier_is_deterministic_and_handles_constant_features():
    x, y = _blobs(200, 3, 8, seed=2)
    x[:, 0] = 0.0  # a dead ReLU unit: zero variance must not produce NaN
    a, b = fit_linear(x, y, 4, epochs=20), fit_linear(x, y, 4, epochs=20)  # class 3 has no boxes
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert torch.isfinite(a.weight).all()
    assert (a.predict(x).numpy() != 3).all()


def test_classifier_balanced_helps_a_rare_class():
    g = np.random.default_rng(3)
    x = np.concatenate([g.normal(0, 1, (500, 2)), g.normal(1.5, 1, (10, 2))])
    y = np.array([0] * 500 + [1] * 10)
    plain = fit_linear(x, y, 2, epochs=50)
    balanced = fit_linear(x, y, 2, epochs=50, balanced=True)
    assert (balanced.predict(x[y == 1]).numpy() == 1).sum() > (plain.predict(x[y == 1]).numpy() == 1).sum()


def test_classifier_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels"):
        fit_linear(np.zeros((3, 2)), np.array([0, 1, 5]), 3)


# ---------------------------------------------------------------- group arithmetic


def test_group_accuracy_by_hand():
    frequency = ["r", "c", "f", "f"]  # class 3 has no val boxes
    target = [0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
    pred = [0, 1, 1, 0, 0, 2, 2, 2, 2, 3]
    out = group_accuracy(pred, target, frequency)
    assert out["acc_r"] == pytest.approx(1 / 2)
    assert out["acc_c"] == pytest.approx(1 / 3)
    assert out["acc_f"] == pytest.approx(4 / 5)
    assert out["acc"] == pytest.approx(6 / 10)  # box-weighted mean of the groups
    assert out["acc"] == pytest.approx((2 * 0.5 + 3 / 3 + 5 * 0.8) / 10)
    assert out["class_acc_f"] == pytest.approx(4 / 5)  # class 3 (no boxes) is not averaged in
    assert out["class_acc"] == pytest.approx((1 / 2 + 1 / 3 + 4 / 5) / 3)
    assert (out["boxes_r"], out["boxes_c"], out["boxes_f"]) == (2, 3, 5)
    assert (out["classes_r"], out["classes_c"], out["classes_f"]) == (1, 1, 1)
    assert out["per_class_acc"] == [pytest.approx(0.5), pytest.approx(1 / 3), pytest.approx(0.8), None]


def test_group_accuracy_empty_group_is_none():
    out = group_accuracy([1, 1], [1, 1], ["r", "f"])
    assert out["acc_r"] is None and out["class_acc_r"] is None and out["acc_c"] is None
    assert out["acc_f"] == 1.0 and out["acc"] == 1.0


# ---------------------------------------------------------------- end to end


def test_run_probe_random_init(random_result, probe_data):
    r = random_result
    json.dumps(r)  # JSON-ready
    for key in ACCURACY_KEYS + ("train_boxes", "val_boxes", "seconds", "train_acc", "per_class", "num_classes"):
        assert key in r
    for key in ACCURACY_KEYS:
        assert r[key] is None or 0.0 <= r[key] <= 1.0
    assert r["acc"] is not None and r["weights"] is None and r["num_classes"] == 6
    for split in ("train", "val"):
        anns = json.loads((probe_data / "annotations" / f"{split}.json").read_text())["annotations"]
        assert r[f"{split}_boxes"] == len(anns)
    assert sum(r[f"boxes_{g}"] for g in "rcf") == r["val_boxes"]
    assert sum(c["val_boxes"] for c in r["per_class"]) == r["val_boxes"]
    assert sum(c["train_boxes"] for c in r["per_class"]) == r["train_boxes"]
    table = format_probe(r)
    assert "rare" in table and "frequent" in table and "random init" in table


def test_run_probe_same_seed_same_result(probe_cfg, random_result):
    again = run_probe(probe_cfg, None, epochs=30, seed=0, progress=False, batch_size=8)
    for key in ACCURACY_KEYS + ("train_acc", "train_loss"):
        assert again[key] == random_result[key], key
    other = run_probe(probe_cfg, None, epochs=30, seed=1, progress=False, batch_size=8)
    assert other["train_loss"] != random_result["train_loss"]  # the seed does pick the init


def test_run_probe_loads_saved_encoder(probe_cfg, random_result, tmp_path):
    # the random-init encoder for seed 0, saved: must give the random-init result back
    path = tmp_path / "encoder.pt"
    torch.save(load_encoder("tiny", "gn", None, seed=0).state_dict(), path)
    r = run_probe(probe_cfg, path, epochs=30, seed=123, progress=False, batch_size=8)
    assert r["weights"] == str(path)
    for key in ACCURACY_KEYS:
        assert r[key] == pytest.approx(random_result[key], abs=1e-9), key


def test_run_probe_rejects_wrong_norm_and_preset(probe_cfg, tmp_path):
    bn = tmp_path / "bn.pt"
    torch.save(build_encoder("tiny", "bn").state_dict(), bn)
    with pytest.raises(DataError, match="normalisation mismatch"):
        run_probe(probe_cfg, bn, progress=False)  # probe_cfg has norm gn

    loaded = load_encoder("tiny", "bn", bn, seed=5)  # BatchNorm running stats load as well
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    saved = torch.load(bn)
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())

    gn = tmp_path / "gn.pt"
    torch.save(build_encoder("tiny", "gn").state_dict(), gn)
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["model.preset=r50-fpn"])
    with pytest.raises(DataError, match="shape mismatch"):
        run_probe(cfg | {"data": probe_cfg["data"]}, gn, progress=False)

    # weights without a box head (a backbone + FPN file): those load, the box head keeps the
    # seeded random init, as with --init
    partial = tmp_path / "partial.pt"
    sd = torch.load(gn)
    torch.save({k: v for k, v in sd.items() if not k.startswith("roi_heads.")}, partial)
    loaded = load_encoder("tiny", "gn", partial, seed=5).state_dict()
    fresh = load_encoder("tiny", "gn", None, seed=5).state_dict()
    for k, v in loaded.items():
        assert torch.equal(v, fresh[k] if k.startswith("roi_heads.") else sd[k]), k
    assert not torch.equal(loaded["backbone.fpn.layer_blocks.0.0.weight"], fresh["backbone.fpn.layer_blocks.0.0.weight"])


class _MixedSizes:
    """Five images of two sizes, one box each, box k labelled k + 1."""

    sizes = ((48, 64), (64, 64), (48, 64), (64, 64), (48, 64))

    def __len__(self):
        return len(self.sizes)

    def load_image(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randint(0, 256, (3, *self.sizes[i]), dtype=torch.uint8, generator=g)

    def target(self, i, height, width):
        return {"boxes": torch.tensor([[4.0 + i, 6.0, 30.0, 40.0]]), "labels": torch.tensor([i + 1])}


def test_embed_boxes_groups_mixed_sizes():
    encoder = load_encoder("tiny", "gn", None, seed=0)
    label_map = np.arange(5)
    grouped, labels = embed_boxes(encoder, _MixedSizes(), label_map, batch_size=4, progress=False)
    single, single_labels = embed_boxes(encoder, _MixedSizes(), label_map, batch_size=1, progress=False)
    assert single_labels.tolist() == [0, 1, 2, 3, 4] and sorted(labels.tolist()) == [0, 1, 2, 3, 4]
    torch.testing.assert_close(grouped[labels.argsort()], single, rtol=1e-4, atol=1e-5)
    resized, _ = embed_boxes(encoder, _MixedSizes(), label_map, image_size=32, progress=False)
    assert resized.shape == (5, encoder.representation_size)


def test_probe_command(tmp_path, capsys):
    from drcl.cli import main

    data = tmp_path / "d"
    make_dataset(data, classes=4, train_images=16, val_images=8, image_size=64, imbalance=4, seed=2, progress=False)
    sets = config_overrides(data) + ["train.threads=1"]
    out = tmp_path / "probe.json"
    args = ["probe", "--config", str(REPO / "configs" / "tiny.yaml"), "--json", str(out)]
    assert main(args + sum((["--set", s] for s in sets), [])) == 0
    result = json.loads(out.read_text())
    assert 0.0 <= result["acc"] <= 1.0 and result["weights"] is None
    assert main(args + ["--checkpoint", str(tmp_path / "none.pt")] + sum((["--set", s] for s in sets), [])) == 2
    assert "none.pt" in capsys.readouterr().err


# ---------------------------------------------------------------- against the documented formulas


def _np_objective_and_grad(x, y, num_classes, weight, bias, weight_decay, balanced):
    """Mean (optionally class-weighted) cross-entropy of standardised features (population
    std) + weight_decay / 2 * ||W||^2, and its gradient, written from fit_linear's docstring."""
    z = (x - x.mean(0)) / x.std(0)
    logits = z @ weight.T + bias
    logits = logits - logits.max(1, keepdims=True)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    n = len(y)
    w = np.ones(n)
    if balanced:
        counts = np.bincount(y, minlength=num_classes)
        w = n / (num_classes * counts[y])  # sklearn's "balanced"
    ce = -(w * np.log(p[np.arange(n), y])).sum() / n
    onehot = np.eye(num_classes)[y]
    d = (p - onehot) * w[:, None] / n
    return ce + 0.5 * weight_decay * (weight**2).sum(), d.T @ z + weight_decay * weight, d.sum(0), z


@pytest.mark.parametrize("balanced, num_classes", [(False, 3), (True, 3), (True, 4)])
def test_fit_linear_reaches_the_minimum_of_the_documented_objective(balanced, num_classes):
    """At the fitted weights the gradient of mean CE + wd/2 ||W||^2 (bias not decayed) is 0;
    with 4 classes the last has no boxes (balanced: the weighted sum is still divided by N)."""
    g = np.random.default_rng(5)
    y = np.array([0] * 150 + [1] * 40 + [2] * 10)
    x = g.normal(size=(200, 3)) + np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]])[y] * 1.5
    x = x * [1.0, 3.0, 0.2] + [5.0, -2.0, 1.0]  # scales and offsets the standardisation removes
    wd = 0.1
    probe = fit_linear(x, y, num_classes, epochs=200, weight_decay=wd, balanced=balanced)
    weight, bias = probe.weight.numpy(), probe.bias.numpy()
    value, grad_w, grad_b, z = _np_objective_and_grad(x, y, num_classes, weight, bias, wd, balanced)
    assert np.abs(grad_w).max() < 1e-6 and np.abs(grad_b).max() < 1e-6
    assert probe.loss == pytest.approx(value, rel=1e-9)
    # predictions are argmax of the standardised features' logits
    np.testing.assert_allclose(probe.logits(x).numpy(), z @ weight.T + bias, rtol=1e-9, atol=1e-9)


def test_resize_scales_boxes_by_width_and_height():
    image = torch.rand(3, 48, 64)  # h = 48, w = 64: the longer side (w) becomes 32
    boxes = torch.tensor([[8.0, 6.0, 40.0, 30.0]])
    out, scaled = _resize(image, boxes, 32)
    assert out.shape == (3, 24, 32)
    torch.testing.assert_close(scaled, torch.tensor([[4.0, 3.0, 20.0, 15.0]]))
    tall, scaled = _resize(torch.rand(3, 50, 20), torch.tensor([[2.0, 10.0, 12.0, 40.0]]), 25)
    assert tall.shape == (3, 25, 10)  # round(20 * 0.5)
    torch.testing.assert_close(scaled, torch.tensor([[1.0, 5.0, 6.0, 20.0]]))
    # 45 x 64 -> 22 x 32 (22.5 rounds to 22): y scales by 22 / 45, x by 32 / 64
    odd, scaled = _resize(torch.rand(3, 45, 64), torch.tensor([[8.0, 9.0, 40.0, 45.0]]), 32)
    assert odd.shape == (3, 22, 32)
    torch.testing.assert_close(scaled, torch.tensor([[4.0, 9 * 22 / 45, 20.0, 22.0]]))


def test_embed_boxes_feeds_the_encoder_imagenet_normalised_pixels():
    """The probe embeds boxes the way DRCL sees images: uint8 -> [0, 1] -> ImageNet mean / std."""
    encoder = load_encoder("tiny", "gn", None, seed=0)
    data = _MixedSizes()
    feats, labels = embed_boxes(encoder, data, np.arange(5), batch_size=1, max_images=2, progress=False)
    assert labels.tolist() == [0, 1]
    for i in range(2):
        image = data.load_image(i).float() / 255.0
        image = (image - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
        expected = encoder(image[None], [data.target(i, 0, 0)["boxes"]])["roi"]
        torch.testing.assert_close(feats[i : i + 1], expected, rtol=1e-4, atol=1e-5)


def test_label_map_matches_val_categories_to_train_by_id():
    """A val file listing the categories in another order (or a subset) maps them by id."""
    def ann(ids):
        cats = [{"id": i, "name": f"c{i}"} for i in ids]
        return SimpleNamespace(categories=cats, num_categories=len(cats), path="x.json",
                               category_pos={c["id"]: k for k, c in enumerate(cats)})

    train = ann([10, 20, 30])
    assert _label_map(train, ann([30, 10])).tolist() == [2, 0]
    assert _label_map(train, ann([10, 20, 30])).tolist() == [0, 1, 2]
    with pytest.raises(DataError, match="40"):
        _label_map(train, ann([10, 40]))
