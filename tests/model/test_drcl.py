import pytest
import torch

from drcl.model.drcl import DRCL, DRCLConfig

S = 64


def _batch(b=2, seed=0):
    # smooth random colour fields: hidden patches are predictable from their surroundings
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, 4, 4, generator=g)
    images1 = torch.nn.functional.interpolate(low, size=(S, S), mode="bilinear", align_corners=False)
    images2 = images1.flip(-1)
    t1, t2 = [], []
    for i in range(b):
        boxes = torch.tensor([[4.0, 4, 30, 28], [20, 24, 60, 60], [34, 2, 62, 30]])
        flipped = torch.stack([S - boxes[:, 2], boxes[:, 1], S - boxes[:, 0], boxes[:, 3]], 1)
        labels = torch.tensor([1, 2, 1 + i])
        t1.append({"boxes": boxes, "labels": labels})
        t2.append({"boxes": flipped, "labels": labels})
    return images1, images2, t1, t2


def _model(**kw):
    torch.manual_seed(0)
    kw = {"hcl_queue": 8, "lcl_queue": 16, **kw}
    return DRCL(DRCLConfig(**kw))


def test_gradients_reach_every_trained_part_and_never_the_momentum_encoder():
    model = _model()
    out = model(*_batch(), category_weights=torch.tensor([1.0, 2.0, 3.0]), generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    enc = model.online.encoder
    parts = {
        "backbone": enc.backbone.body.conv1.weight,
        "backbone last stage": enc.backbone.body.layer4[-1].conv2.weight,
        "fpn": enc.backbone.fpn.inner_blocks[0][0].weight,
        "box head": enc.roi_heads.box_head.fc6.weight,
        "hcl projector": model.online.hcl_projector[0].weight,
        "hcl predictor": model.hcl_predictor[0].weight,
        "lcl projector": model.online.lcl_projector[0].weight,
        "lcl predictor": model.lcl_predictor[0].weight,
        "decoder": model.decoder.body[0].weight,
    }
    for name, p in parts.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in model.momentum.named_parameters():
        assert not p.requires_grad and p.grad is None, name


@pytest.mark.parametrize("term", ["hcl", "lcl", "ar", "sr"])
def test_each_switch_removes_exactly_its_term(term):
    batch = _batch()
    w = torch.tensor([1.0, 2.0, 3.0])
    full_model, part_model = _model(), _model(**{term: False})
    # same weights for the parts both have
    part_model.load_state_dict({k: v for k, v in full_model.state_dict().items() if k in part_model.state_dict()})
    full = full_model(*batch, category_weights=w, generator=torch.Generator().manual_seed(1))
    part = part_model(*batch, category_weights=w, generator=torch.Generator().manual_seed(1))
    assert term in full and term not in part
    others = [t for t in ("hcl", "lcl", "ar", "sr") if t != term]
    for t in others:
        torch.testing.assert_close(part[t], full[t], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(part["loss"], sum(part[t] for t in others))


def test_hcl_only_is_plain_moco_without_masking():
    model = _model(lcl=False, ar=False, sr=False)
    assert not model.needs_mask and not model.needs_boxes
    assert not hasattr(model, "decoder") and not hasattr(model.online, "lcl_projector")


def test_weights_scale_their_terms():
    batch = _model()
    out = batch(*_batch(), generator=torch.Generator().manual_seed(2))
    other = _model(w_ar=3.0, w_hcl=0.5)(*_batch(), generator=torch.Generator().manual_seed(2))
    expected = 0.5 * other["hcl"] + other["lcl"] + 3.0 * other["ar"] + other["sr"]
    torch.testing.assert_close(other["loss"], expected)
    torch.testing.assert_close(other["hcl"], out["hcl"])


def test_too_few_boxes_skips_box_terms():
    images1, images2, t1, t2 = _batch()
    for t in t1 + t2:
        t["boxes"], t["labels"] = t["boxes"][:0], t["labels"][:0]
    out = _model()(images1, images2, t1, t2, generator=torch.Generator().manual_seed(0))
    assert out["lcl"].item() == 0.0 and out["boxes"] == 0.0
    out["loss"].backward()


def test_config_validation():
    with pytest.raises(ValueError, match="at least one"):
        DRCLConfig(hcl=False, lcl=False, ar=False, sr=False)
    with pytest.raises(ValueError, match="ar_loss"):
        DRCLConfig(ar_loss="l2")


def test_every_loss_falls_when_overfitting_two_images():
    # 8 px patches: at 64 px, 16 px patches hide whole quarters of the objects
    model = _model(norm="gn", hcl_queue=4, lcl_queue=12, mask_patch=8)
    batch = _batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    history = []
    for step in range(30):
        out = model(*batch, generator=torch.Generator().manual_seed(step % 2))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        model.momentum_update(0.9)
        history.append({t: out[t].item() for t in ("hcl", "lcl", "ar", "sr")})
    for t in ("hcl", "lcl", "ar", "sr"):
        values = [h[t] for h in history]
        assert all(torch.isfinite(torch.tensor(values))), t
        # queues are full after step 2; compare the first full-queue steps to the last ones
        early, late = sum(values[2:6]) / 4, sum(values[-4:]) / 4
        assert late < 0.8 * early, (t, early, late)


def test_drb_box_choice_prefers_rare_categories_and_keeps_pairs():
    from drcl.model.lcl import select_boxes

    boxes = torch.tensor([[float(i), 0, i + 5.0, 5] for i in range(10)])
    labels = torch.tensor([1] * 8 + [2, 0])  # eight head boxes, one tail box, one proposal (label 0)
    t1 = [{"boxes": boxes, "labels": labels}]
    t2 = [{"boxes": boxes + 100, "labels": labels}]
    g = torch.Generator().manual_seed(0)
    picked = []
    for _ in range(300):
        b1, b2, lab = select_boxes(t1, t2, 1, torch.tensor([1.0, 40.0]), g)
        assert torch.equal(b2[0] - b1[0], torch.full_like(b1[0], 100.0))  # same boxes in both views
        picked.append(int(lab[0]))
    # weights 8 x 1 (head), 40 (tail), 1 (unknown): tail expected 40/49 of the time
    assert 0.7 < picked.count(2) / 300 < 0.9
    uniform = [int(select_boxes(t1, t2, 1, None, g)[2][0]) for _ in range(300)]
    assert uniform.count(2) / 300 < 0.25


def test_hcl_only_skips_the_fpn(monkeypatch):
    model = _model(lcl=False, ar=False, sr=False)
    calls = []
    fpn = model.online.encoder.backbone.fpn
    monkeypatch.setattr(fpn, "forward", lambda *a, **k: calls.append(1))
    out = model(*_batch(), generator=torch.Generator().manual_seed(0))
    assert set(k for k in out if k in ("hcl", "lcl", "ar", "sr")) == {"hcl"} and calls == []
