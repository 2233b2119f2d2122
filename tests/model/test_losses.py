"""Each loss against a NumPy reference written from its docstring formula."""

import numpy as np
import pytest
import torch

from drcl.model.ar import ar_loss, patch_mask
from drcl.model.hcl import hcl_loss
from drcl.model.infonce import info_nce
from drcl.model.lcl import lcl_loss
from drcl.model.sr import sr_loss


def np_normalize(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def np_info_nce(q, k, pos, t):
    s = np_normalize(q) @ np_normalize(k).T / t
    log_p = s - np.log(np.exp(s - s.max(1, keepdims=True)).sum(1, keepdims=True)) - s.max(1, keepdims=True)
    rows = [-(log_p[i][pos[i]]).mean() for i in range(len(q)) if pos[i].any()]
    return float(np.mean(rows))


@pytest.mark.parametrize("seed", range(3))
def test_info_nce_single_positive_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    q, k = rng.normal(size=(6, 16)), rng.normal(size=(20, 16))
    pos = np.zeros((6, 20), bool)
    pos[np.arange(6), rng.permutation(20)[:6]] = True
    loss, stats = info_nce(torch.tensor(q), torch.tensor(k), torch.tensor(pos), 0.2)
    assert float(loss) == pytest.approx(np_info_nce(q, k, pos, 0.2), rel=1e-6)
    sim = np_normalize(q) @ np_normalize(k).T
    assert stats["pos_sim"] == pytest.approx(sim[pos].mean(), rel=1e-6)
    assert stats["neg_sim"] == pytest.approx(sim[~pos].mean(), rel=1e-6)


def test_info_nce_multi_positive_and_empty_rows():
    rng = np.random.default_rng(7)
    q, k = rng.normal(size=(5, 8)), rng.normal(size=(12, 8))
    pos = rng.random((5, 12)) < 0.3
    pos[2] = False  # a row without positives is left out
    loss, _ = info_nce(torch.tensor(q), torch.tensor(k), torch.tensor(pos), 0.5)
    assert float(loss) == pytest.approx(np_info_nce(q, k, pos, 0.5), rel=1e-6)


def test_info_nce_is_low_for_aligned_pairs():
    k = torch.eye(4)
    pos = torch.eye(4, dtype=torch.bool)
    good, _ = info_nce(k * 3, k, pos, 0.2)
    bad, _ = info_nce(k.roll(1, 0), k, pos, 0.2)
    assert float(good) < 0.05 < float(bad)  # log(1 + 3 exp(-5)) = 0.02


def test_hcl_is_symmetric_infonce_with_batch_and_queue_negatives():
    rng = np.random.default_rng(1)
    q1, q2, k1, k2 = (rng.normal(size=(4, 8)) for _ in range(4))
    queue = rng.normal(size=(10, 8))
    pos = np.zeros((4, 14), bool)
    pos[np.arange(4), np.arange(4)] = True
    expected = (np_info_nce(q1, np.vstack([k2, queue]), pos, 0.2) + np_info_nce(q2, np.vstack([k1, queue]), pos, 0.2)) / 2
    loss, _ = hcl_loss(*(torch.tensor(a) for a in (q1, q2, k1, k2, queue)))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("supervised", [False, True])
def test_lcl_positives(supervised):
    rng = np.random.default_rng(2)
    q1, q2, k1, k2 = (rng.normal(size=(6, 8)) for _ in range(4))
    labels = np.array([1, 2, 1, 3, 2, 2])
    queue, queue_labels = rng.normal(size=(5, 8)), np.array([1, -1, 3, 4, 2])
    key_labels = np.concatenate([labels, queue_labels])
    pos = np.zeros((6, 11), bool)
    pos[np.arange(6), np.arange(6)] = True
    if supervised:
        pos |= labels[:, None] == key_labels[None, :]
    expected = (np_info_nce(q1, np.vstack([k2, queue]), pos, 0.2) + np_info_nce(q2, np.vstack([k1, queue]), pos, 0.2)) / 2
    args = [torch.tensor(a) for a in (q1, q2, k1, k2, labels, queue, queue_labels)]
    loss, _ = lcl_loss(*args, temperature=0.2, supervised=supervised)
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_patch_mask_hides_the_ratio_in_whole_patches():
    g = torch.Generator().manual_seed(0)
    m = patch_mask(3, 64, 48, patch=16, ratio=0.5, generator=g)
    assert m.shape == (3, 1, 64, 48)
    grid = m[:, 0, ::16, ::16]  # one value per patch
    assert grid.shape == (3, 4, 3)
    assert (grid.sum(dim=(1, 2)) == 6).all()  # round(0.5 * 12)
    np.testing.assert_array_equal(m[:, 0].numpy(), np.kron(grid.numpy(), np.ones((1, 16, 16))))
    assert not torch.equal(m[0], m[1])


@pytest.mark.parametrize("kind", ["l1", "mse"])
def test_ar_loss_counts_masked_pixels_only(kind):
    rng = np.random.default_rng(3)
    pred, target = rng.normal(size=(2, 3, 8, 8)), rng.normal(size=(2, 3, 8, 8))
    mask = (rng.random((2, 1, 8, 8)) < 0.4).astype(float)
    err = np.abs(pred - target) if kind == "l1" else (pred - target) ** 2
    expected = (err * mask).sum() / (3 * mask.sum())
    loss = ar_loss(torch.tensor(pred), torch.tensor(target), torch.tensor(mask), kind)
    assert float(loss) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="'l1' or 'mse'"):
        ar_loss(torch.tensor(pred), torch.tensor(target), torch.tensor(mask), "huber")


def test_sr_loss_is_cosine_distance_with_stop_gradient():
    rng = np.random.default_rng(4)
    on = {k: torch.tensor(rng.normal(size=(2, 4, 3, 3)), requires_grad=True) for k in ("0", "1")}
    tg = {k: torch.tensor(rng.normal(size=(2, 4, 3, 3)), requires_grad=True) for k in ("0", "1")}
    r_on = torch.tensor(rng.normal(size=(5, 6)), requires_grad=True)
    r_tg = torch.tensor(rng.normal(size=(5, 6)), requires_grad=True)

    def np_cos_dist(a, b, axis):
        return 1 - (a * b).sum(axis) / (np.linalg.norm(a, axis=axis) * np.linalg.norm(b, axis=axis))

    fpn = np.mean([np_cos_dist(on[k].detach().numpy(), tg[k].detach().numpy(), 1).mean() for k in on])
    roi = np_cos_dist(r_on.detach().numpy(), r_tg.detach().numpy(), 1).mean()
    loss = sr_loss(on, tg, r_on, r_tg)
    assert loss.item() == pytest.approx(fpn + roi, rel=1e-9)
    loss.backward()
    assert on["0"].grad is not None and r_on.grad is not None
    assert tg["0"].grad is None and r_tg.grad is None
    assert sr_loss(on, {k: v * 2 for k, v in on.items()}).item() == pytest.approx(0.0, abs=1e-9)
