import math
import dataclasses

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


def test_hcl_only_is_moco_on_unmasked_views_with_a_queue():
    """With the other terms off, the loss is MoCo's, computed here by hand from the parts:
    queries from the online encoder's C5 through the projector, keys from the momentum
    encoder, negatives from the other image and the queue; then the keys are enqueued."""
    model = _model(lcl=False, ar=False, sr=False, predictor=False, hcl_queue=16)
    images1, images2, t1, t2 = _batch()
    for i, t in enumerate(t1 + t2):
        t["image_id"] = i % 2
    queue = torch.nn.functional.normalize(torch.randn(5, 256), dim=1)
    model.hcl_queue.enqueue(queue, None, torch.tensor([0, 7, 7, 1, 9]))  # slots 0 and 3: the batch's own images
    out = model(images1, images2, t1, t2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = (torch.cat([images1, images2]) - model.mean) / model.std  # no patch masking in HCL-only runs
        q = model.online.hcl_projector(model.online.encoder(x, None, fpn=False)["c5"])
        k = model.momentum.hcl_projector(model.momentum.encoder(x, None, fpn=False)["c5"])
    q, k = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1)

    def nce(qs, ks):
        losses = []
        for i in range(2):
            keys = [ks[i], ks[1 - i]] + [queue[j] for j in range(5) if j != (0 if i == 0 else 3)]
            logits = torch.stack([qs[i] @ key for key in keys]) / 0.2
            losses.append(-torch.log_softmax(logits, 0)[0])
        return sum(losses) / 2

    expected = (nce(q[:2], k[2:]) + nce(q[2:], k[:2])) / 2
    torch.testing.assert_close(out["hcl"], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["loss"], model.cfg.w_hcl * expected, rtol=1e-4, atol=1e-5)
    newest, _, ids = model.hcl_queue.valid()
    torch.testing.assert_close(torch.nn.functional.normalize(newest[5:9], dim=1), k)
    assert ids[5:9].tolist() == [0, 1, 0, 1]


def test_each_weight_scales_its_terms_gradient():
    """w_t multiplies the gradient that term t sends into the parts only it trains."""
    batch = _batch()
    grads = []
    for w_hcl, w_ar in ((1.0, 1.0), (0.5, 3.0)):
        model = _model(w_hcl=w_hcl, w_ar=w_ar)
        model(*batch, generator=torch.Generator().manual_seed(2))["loss"].backward()
        grads.append((model.online.hcl_projector[0].weight.grad, model.decoder.body[0].weight.grad))
    torch.testing.assert_close(grads[1][0], 0.5 * grads[0][0])
    torch.testing.assert_close(grads[1][1], 3.0 * grads[0][1])


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


def test_every_loss_falls_when_overfitting_two_images_with_the_shipped_recipe():
    """The tiny config's model switches and optimiser (SGD, its learning rate, no clipping
    needed), on a model small enough for a test."""
    from drcl.config import drcl_config, load_config
    from drcl.engine.trainer import build_optimizer

    cfg = load_config("tiny")
    torch.manual_seed(0)
    # 8 px patches: at 64 px, 16 px patches hide whole quarters of the objects
    model = DRCL(dataclasses.replace(drcl_config(cfg), hcl_queue=4, lcl_queue=12, mask_patch=8))
    batch = _batch()
    for i, t in enumerate(batch[2] + batch[3]):
        t["image_id"] = i % 2
    opt = build_optimizer(model, cfg["train"])
    history = []
    for step in range(30):
        out = model(*batch, generator=torch.Generator().manual_seed(step % 2))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        model.momentum_update(0.9)
        history.append({k: float(v.detach()) if torch.is_tensor(v) else v for k, v in out.items() if k in TRACKED})
    late = {k: sum(h[k] for h in history[-4:]) / 4 for k in TRACKED}
    # queues are full after step 2; compare the first full-queue steps to the last ones
    early = {k: sum(h[k] for h in history[2:6]) / 4 for k in TRACKED}
    assert all(math.isfinite(h[k]) for h in history for k in TRACKED)
    # contrast: positives pulled away from negatives, the loss far below chance
    assert late["hcl_gap"] > 0.5 and late["lcl_gap"] > 0.5, late
    assert late["hcl"] < 0.2 * late["hcl_chance"], late
    assert late["lcl"] < 0.85 * early["lcl"], (early, late)  # supervised: several positives, its floor is above 0
    assert late["ar"] < 0.9 * early["ar"] and late["sr"] < 0.8 * early["sr"], (early, late)


TRACKED = ("hcl", "lcl", "ar", "sr", "hcl_gap", "lcl_gap", "hcl_chance")


def test_drb_box_choice_prefers_rare_categories_and_keeps_pairs():
    from drcl.model.lcl import select_boxes

    boxes = torch.tensor([[float(i), 0, i + 5.0, 5] for i in range(10)])
    labels = torch.tensor([1] * 8 + [2, 0])  # eight head boxes, one tail box, one proposal (label 0)
    t1 = [{"boxes": boxes, "labels": labels}]
    t2 = [{"boxes": boxes + 100, "labels": labels}]
    g = torch.Generator().manual_seed(0)
    picked = []
    for _ in range(300):
        b1, b2, lab, _ = select_boxes(t1, t2, 1, torch.tensor([1.0, 40.0]), g)
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


# --------------------------------------------------------------------------- host-device waits

#: Ops that make the host wait for a GPU when their tensors live there: they return a Python
#: value, or an output whose size depends on the data.
_WAITING = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "equal", "unique_dim", "_unique2",
            "unique_consecutive", "argwhere", "masked_scatter_"}
#: The step's host-side work: the targets stay on the host and these functions compute on them
#: (choosing boxes, their pyramid levels, the mask's patch draws) before anything crosses.
_HOST_SIDE = ("drcl/model/lcl.py:select_boxes", "drcl/sampling/", "drcl/model/detector.py:pool_boxes",
              "drcl/model/ar.py:patch_mask")


def _waiting_ops(fn) -> list[str]:
    """Where ``fn`` runs ops that would wait for a GPU, outside the step's host-side work."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    found = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func.overloadpacket.__name__
            indices = args[1] if name in ("index", "index_put", "index_put_", "_index_put_impl_") else ()
            boolean = any(torch.is_tensor(i) and i.dtype == torch.bool for i in indices or ())
            if name in _WAITING or boolean:
                frames = [f"{f.filename.split('/src/')[-1]}:{f.name} line {f.lineno}"
                          for f in traceback.extract_stack() if "/src/drcl/" in f.filename]
                if not any(h in f for f in frames for h in _HOST_SIDE):
                    found.append(f"{name} in {frames[-1] if frames else 'torch (backward)'}")
            return func(*args, **kwargs)

    with Count():
        fn()
    return found


def test_a_step_never_waits_for_the_device_outside_the_host_side_work():
    """On a GPU each such op is a host-device sync: 52 in a step before (BENCHMARKS.md, "The
    GPU run"), from the InfoNCE row selection, the queue pointers, torchvision's RoIAlign level
    split and the queue fill. CPU tensors cannot wait, so the ops are counted where they run."""
    from drcl.engine.trainer import build_optimizer

    model = _model()
    optimizer = build_optimizer(model, {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4})
    images1, images2, t1, t2 = _batch(b=3)
    for t in t1 + t2:
        t["ann_ids"] = torch.arange(len(t["labels"]))
    for i, t in enumerate(t1):
        t["image_id"] = t2[i]["image_id"] = i + 1
    weights = torch.tensor([1.0, 2.0, 3.0])

    def step(seed):
        out = model(images1, images2, t1, t2, weights, torch.Generator().manual_seed(seed))
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 20.0)
        optimizer.step()
        model.momentum_update(0.99)
        return out

    assert _waiting_ops(lambda: step(0)) == []
    assert _waiting_ops(lambda: step(1)) == []  # with keys in the queues
    for queue, added in ((model.hcl_queue, 2 * 2 * 3), (model.lcl_queue, None)):
        # the host's counters are the saved buffers'
        assert 0 < queue.fill == int(queue.filled) and int(queue.ptr) == queue._counters()[0]
        if added is not None:
            assert queue.fill == min(added, queue.size) and int(queue.ptr) == added % queue.size


def test_online_sees_the_masked_views_and_the_targets_are_clean(monkeypatch):
    """AR regresses the clean views' normalised pixels from the online encoder's stride-4 FPN
    level of the masked views, scored on the hidden pixels; SR's targets are the momentum
    encoder's FPN features and box embeddings of the clean views, its predictions the online
    encoder's of the masked views. Computed here by hand from the mask and boxes the step drew
    (recorded by spies, not recomputed through forward)."""
    import drcl.model.drcl as module

    model = _model(norm="gn", lcl=False, hcl=False)
    with torch.no_grad():  # an online encoder that differs from the momentum one, so the two cannot be swapped unseen
        for p in model.online.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    seen = {}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            seen[name] = (args, out)
            return out
        monkeypatch.setattr(module, name, wrapped)

    for name in ("patch_mask", "select_boxes", "sr_loss"):
        spy(name, getattr(module, name))
    images1, images2, t1, t2 = _batch()
    out = model(images1, images2, t1, t2, generator=torch.Generator().manual_seed(5))

    mask = seen["patch_mask"][1]
    assert mask.shape == (4, 1, S, S) and torch.equal(mask.mean(dim=(1, 2, 3)), torch.full((4,), 0.5))
    boxes1, boxes2, _, _ = seen["select_boxes"][1]
    boxes = boxes1 + boxes2
    clean = (torch.cat([images1, images2]) - model.mean) / model.std
    with torch.no_grad():
        online = model.online.encoder(clean * (1 - mask), boxes)
        target = model.momentum.encoder(clean, boxes)
        pred = model.decoder(online["fpn"]["0"], (S, S))
    ar = ((pred - clean).abs() * mask).sum() / (3 * mask.sum())
    torch.testing.assert_close(out["ar"].detach(), ar, rtol=1e-5, atol=1e-6)
    # the clean image matters: with the masked view as target the number is another one
    assert abs(float(((pred - clean * (1 - mask)).abs() * mask).sum() / (3 * mask.sum())) - float(ar)) > 0.05

    online_fpn, target_fpn, online_roi, target_roi = seen["sr_loss"][0]
    assert list(target_fpn) == list(target["fpn"])
    for level in target["fpn"]:
        torch.testing.assert_close(target_fpn[level], target["fpn"][level], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(online_fpn[level].detach(), online["fpn"][level], rtol=1e-5, atol=1e-5)
        assert not target_fpn[level].requires_grad and online_fpn[level].requires_grad
    torch.testing.assert_close(target_roi, target["roi"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(online_roi.detach(), online["roi"], rtol=1e-5, atol=1e-5)
    # and the momentum encoder's output on the masked views is not what SR was given
    with torch.no_grad():
        masked_target = model.momentum.encoder(clean * (1 - mask), boxes)["fpn"]["0"]
    assert (masked_target - target_fpn["0"]).abs().max() > 1e-2
