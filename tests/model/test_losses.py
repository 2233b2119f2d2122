"""Each loss against a NumPy reference written from its docstring formula."""

import numpy as np
import pytest
import torch

from drcl.model.ar import ar_loss, patch_mask
from drcl.model.hcl import hcl_loss
from drcl.model.infonce import info_nce, same_id
from drcl.model.lcl import OBJECT_STRIDE, lcl_loss, select_boxes
from drcl.model.sr import sr_loss


def np_normalize(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def np_info_nce(q, k, pos, t, ignore=None):
    """Written from the formula: each row's softmax runs over the keys it does not ignore."""
    s = np_normalize(q) @ np_normalize(k).T / t
    rows = []
    for i in range(len(q)):
        if not pos[i].any():
            continue
        kept = pos[i] | (~ignore[i] if ignore is not None else True)
        log_z = np.log(np.exp(s[i][kept]).sum())
        rows.append(-(s[i][pos[i]] - log_z).mean())
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
    assert float(stats["pos_sim"]) == pytest.approx(sim[pos].mean(), rel=1e-6)
    assert float(stats["neg_sim"]) == pytest.approx(sim[~pos].mean(), rel=1e-6)
    assert float(stats["chance"]) == pytest.approx(np.log(20), rel=1e-6)


def test_info_nce_ignored_keys_leave_the_softmax_and_the_stats():
    rng = np.random.default_rng(11)
    q, k = rng.normal(size=(4, 8)), rng.normal(size=(9, 8))
    pos = np.zeros((4, 9), bool)
    pos[np.arange(4), np.arange(4)] = True
    ignore = rng.random((4, 9)) < 0.4
    ignore[0, 0] = True  # a positive is never ignored
    loss, stats = info_nce(torch.tensor(q), torch.tensor(k), torch.tensor(pos), 0.3, torch.tensor(ignore), n_batch=4)
    assert float(loss) == pytest.approx(np_info_nce(q, k, pos, 0.3, ignore), rel=1e-6)
    contrasted = pos | ~ignore
    neg = contrasted & ~pos
    sim = np_normalize(q) @ np_normalize(k).T
    assert float(stats["neg_sim"]) == pytest.approx(sim[neg].mean(), rel=1e-6)
    assert float(stats["batch_neg_sim"]) == pytest.approx(sim[:, :4][neg[:, :4]].mean(), rel=1e-6)
    assert float(stats["chance"]) == pytest.approx(np.log(contrasted.sum(1)).mean(), rel=1e-6)
    # the loss of a query that cannot tell its keys apart is the chance level
    flat, flat_stats = info_nce(torch.ones(4, 8), torch.ones(9, 8), torch.tensor(pos), 0.3, torch.tensor(ignore))
    assert float(flat) == pytest.approx(float(flat_stats["chance"]), rel=1e-6)


def test_same_id_marks_known_equal_ids_only():
    m = same_id(torch.tensor([3, -1, 5]), torch.tensor([3, 5, -1, 3]))
    expected = [[True, False, False, True], [False, False, False, False], [False, True, False, False]]
    assert m.tolist() == expected
    assert same_id(None, torch.tensor([1])) is None


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


def test_hcl_ignores_other_keys_of_the_querys_own_image():
    rng = np.random.default_rng(5)
    q1, q2, k1, k2 = (rng.normal(size=(4, 8)) for _ in range(4))
    queue = rng.normal(size=(6, 8))
    ids, queue_ids = np.array([7, 8, 7, 9]), np.array([7, -1, 9, 3, 8, 7])  # image 7 drawn twice
    key_ids = np.concatenate([ids, queue_ids])
    pos = np.zeros((4, 10), bool)
    pos[np.arange(4), np.arange(4)] = True
    ignore = ids[:, None] == key_ids[None, :]
    assert ignore[0, 2] and ignore[0, 4] and ignore[0, 9] and not ignore[1, 5]
    expected = (np_info_nce(q1, np.vstack([k2, queue]), pos, 0.2, ignore)
                + np_info_nce(q2, np.vstack([k1, queue]), pos, 0.2, ignore)) / 2
    args = [torch.tensor(a) for a in (q1, q2, k1, k2, queue)]
    loss, _ = hcl_loss(*args, 0.2, torch.tensor(ids), torch.tensor(queue_ids))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    plain, _ = hcl_loss(*args, 0.2)
    assert float(plain) > float(loss)  # the ignored keys were in the denominator before


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
    # an older key of the same object in the queue is ignored unless it is a positive
    ids, queue_ids = np.arange(6) + 100, np.array([100, -1, 103, 7, 104])
    ignore = ids[:, None] == np.concatenate([ids, queue_ids])[None, :]
    expected = (np_info_nce(q1, np.vstack([k2, queue]), pos, 0.2, ignore)
                + np_info_nce(q2, np.vstack([k1, queue]), pos, 0.2, ignore)) / 2
    loss, _ = lcl_loss(*args, temperature=0.2, supervised=supervised, ids=torch.tensor(ids), queue_ids=torch.tensor(queue_ids))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_supervised_lcl_never_pairs_label_0_boxes():
    """Label 0 is a box of unknown category (a proposal, a random box): it is its own object's
    positive only, never a same-category positive of another label-0 box in the batch or the
    queue. The NumPy mask below is written from that rule."""
    rng = np.random.default_rng(9)
    q1, q2, k1, k2 = (rng.normal(size=(6, 8)) for _ in range(4))
    labels = np.array([0, 2, 0, 3, 2, 0])
    queue, queue_labels = rng.normal(size=(5, 8)), np.array([0, 2, -1, 0, 3])
    key_labels = np.concatenate([labels, queue_labels])
    pos = np.zeros((6, 11), bool)
    pos[np.arange(6), np.arange(6)] = True
    pos |= (labels[:, None] == key_labels[None, :]) & (labels[:, None] > 0)
    assert pos[0].sum() == 1 and pos[1].sum() == 3  # label 0: itself only; label 2: itself, box 4, queue 1
    expected = (np_info_nce(q1, np.vstack([k2, queue]), pos, 0.2) + np_info_nce(q2, np.vstack([k1, queue]), pos, 0.2)) / 2
    # with label-0 boxes counted as one category the loss is another number: the rule matters here
    same = pos | (labels[:, None] == key_labels[None, :])
    wrong = (np_info_nce(q1, np.vstack([k2, queue]), same, 0.2) + np_info_nce(q2, np.vstack([k1, queue]), same, 0.2)) / 2
    assert abs(wrong - expected) > 0.1
    args = [torch.tensor(a) for a in (q1, q2, k1, k2, labels, queue, queue_labels)]
    loss, stats = lcl_loss(*args, temperature=0.2, supervised=True)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    sim = np_normalize(q1) @ np_normalize(np.vstack([k2, queue])).T
    assert float(stats["pos_sim"]) == pytest.approx(
        (sim[pos].mean() + (np_normalize(q2) @ np_normalize(np.vstack([k1, queue])).T)[pos].mean()) / 2, rel=1e-6)


def test_patch_mask_at_sizes_that_are_not_multiples_of_the_patch():
    """70 x 50 with 16-px patches: a 5 x 4 grid whose last row and column are cut to 6 and 2 px;
    round(0.5 * 20) = 10 patches hidden, each whole (cut ones included), every pixel covered."""
    g = torch.Generator().manual_seed(3)
    m = patch_mask(4, 70, 50, patch=16, ratio=0.5, generator=g)
    assert m.shape == (4, 1, 70, 50)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    rows = [(0, 16), (16, 32), (32, 48), (48, 64), (64, 70)]
    cols = [(0, 16), (16, 32), (32, 48), (48, 50)]
    for n in range(4):
        hidden = 0
        for r0, r1 in rows:
            for c0, c1 in cols:
                cell = m[n, 0, r0:r1, c0:c1]
                assert cell.min() == cell.max(), (n, r0, c0)  # a patch is hidden whole or not at all
                hidden += int(cell[0, 0])
        assert hidden == 10, n
    # the cut patches on the right and bottom edges are drawn like the others, not always kept
    edge = m[:, 0, 64:, :].amax(dim=(1, 2)) + m[:, 0, :, 48:].amax(dim=(1, 2))
    assert edge.sum() > 0


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


def test_sr_loss_is_cosine_distance_to_standardised_targets_with_stop_gradient():
    rng = np.random.default_rng(4)
    shapes = {"0": (2, 4, 3, 3), "1": (2, 4, 2, 2), "pool": (2, 4, 1, 1)}  # a 1x1 level is left out
    on = {k: torch.tensor(rng.normal(size=s), requires_grad=True) for k, s in shapes.items()}
    tg = {k: torch.tensor(rng.normal(size=s) * 3 + 2, requires_grad=True) for k, s in shapes.items()}
    r_on = torch.tensor(rng.normal(size=(5, 6)), requires_grad=True)
    r_tg = torch.tensor(rng.normal(size=(5, 6)) + 4, requires_grad=True)

    def np_cos_dist(a, b, axis):
        return 1 - (a * b).sum(axis) / (np.linalg.norm(a, axis=axis) * np.linalg.norm(b, axis=axis))

    def np_standardize(x, axes):
        return (x - x.mean(axes, keepdims=True)) / (x.std(axes, keepdims=True) + 1e-5)

    fpn = np.mean([np_cos_dist(on[k].detach().numpy(), np_standardize(tg[k].detach().numpy(), (2, 3)), 1).mean()
                   for k in ("0", "1")])
    roi = np_cos_dist(r_on.detach().numpy(), np_standardize(r_tg.detach().numpy(), 0), 1).mean()
    loss = sr_loss(on, tg, r_on, r_tg)
    assert loss.item() == pytest.approx(fpn + roi, rel=1e-9)
    loss.backward()
    assert on["0"].grad is not None and r_on.grad is not None
    assert tg["0"].grad is None and r_tg.grad is None
    # constant features cannot match standardised targets: the collapse that raw targets rewarded
    const = {k: torch.ones(s, dtype=torch.float64) for k, s in shapes.items()}
    assert sr_loss(const, const).item() > 0.9
    assert sr_loss(tg, tg, r_tg, r_tg).item() > 0.0
    standard = {k: torch.tensor(np_standardize(v.detach().numpy(), (2, 3))) for k, v in tg.items()}
    assert sr_loss(standard, tg).item() == pytest.approx(0.0, abs=1e-9)


def test_select_boxes_keeps_boxes_labels_and_object_ids_together():
    """Each chosen box comes with the same box of the other view, its own label and the object
    id image_id * 2**31 + annotation id (so equal annotation ids of two images differ)."""
    def target(n, first, labels, ann_ids, image_id=None):
        boxes = torch.tensor([[float(first + i), 0.0, first + i + 5.0, 5.0] for i in range(n)])
        t = {"boxes": boxes, "labels": torch.tensor(labels), "ann_ids": torch.tensor(ann_ids)}
        if image_id is not None:
            t["image_id"] = torch.tensor(image_id)
        return t

    t1 = [target(5, 0, [1, 2, 3, 0, 2], [5, 6, 7, 8, 9], 3), target(4, 10, [2, 2, 1, 3], [5, 11, 12, 13], 4),
          target(3, 20, [1, 1, 2], [1, 2, 3])]  # the third image has no id
    t2 = [{**t, "boxes": t["boxes"] + 100} for t in t1]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        b1, b2, labels, ids = select_boxes(t1, t2, 3, torch.tensor([1.0, 2.0, 4.0]), g)
        assert [len(b) for b in b1] == [3, 3, 3] and len(labels) == len(ids) == 9
        boxes = torch.cat(b1)
        torch.testing.assert_close(torch.cat(b2), boxes + 100)
        pos = boxes[:, 0].long()  # first + index of the box within its image
        for j, (p, lab, obj) in enumerate(zip(pos.tolist(), labels.tolist(), ids.tolist())):
            image, i = divmod(p, 10)
            assert lab == int(t1[image]["labels"][i])
            if image < 2:
                assert obj == [3, 4][image] * OBJECT_STRIDE + int(t1[image]["ann_ids"][i])
            else:
                assert obj == -1
        assert len(set(ids[:6].tolist())) == 6


def test_patch_mask_rounds_the_number_of_hidden_patches():
    """round(ratio * #patches): 0.75 of a 3 x 3 grid is 6.75 -> 7 patches, not 6."""
    m = patch_mask(2, 48, 48, patch=16, ratio=0.75, generator=torch.Generator().manual_seed(1))
    assert (m[:, 0, ::16, ::16].sum(dim=(1, 2)) == 7).all()


def test_sr_box_term_counts_from_two_boxes():
    """With 2 boxes the box term is there (each dimension standardised over the 2 boxes is
    +-1); with 1 box it is left out."""
    rng = np.random.default_rng(8)
    on = {"0": torch.tensor(rng.normal(size=(1, 4, 2, 2)))}
    tg = {"0": torch.tensor(rng.normal(size=(1, 4, 2, 2)))}
    r_on, r_tg = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    fpn = sr_loss(on, tg).item()
    signs = np.where(r_tg >= r_tg.mean(0), 1.0, -1.0)  # (x - mean) / std over 2 boxes
    roi = np.mean(1 - (r_on * signs).sum(1) / (np.linalg.norm(r_on, axis=1) * np.sqrt(3)))
    got = sr_loss(on, tg, torch.tensor(r_on), torch.tensor(r_tg)).item()
    assert got == pytest.approx(fpn + roi, rel=1e-4)
    assert sr_loss(on, tg, torch.tensor(r_on[:1]), torch.tensor(r_tg[:1])).item() == pytest.approx(fpn, rel=1e-12)
