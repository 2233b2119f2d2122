"""Training-health signals against NumPy references, and the warnings they raise."""

import math

import numpy as np
import pytest
import torch

from drcl.engine.health import AT_CHANCE_GAP, WINDOW, Health, format_summary, spread


def test_spread_matches_numpy_formulas():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 5)) * [5, 3, 1, 0.5, 0.1] + 2.0
    got = spread(torch.tensor(x))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = unit @ unit.T
    assert got["cos"] == pytest.approx((cos.sum() - 12) / (12 * 11), rel=1e-9)
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    p = s / s.sum()
    assert got["erank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert got["norm"] == pytest.approx(np.linalg.norm(x, axis=1).mean(), rel=1e-9)


def test_spread_tells_collapse_from_spread():
    rng = np.random.default_rng(1)
    spread_out = spread(torch.tensor(rng.normal(size=(32, 16))))
    collapsed = spread(torch.tensor(rng.normal(size=(1, 16)) * 10 + rng.normal(size=(32, 16)) * 0.1))
    assert collapsed["cos"] > 0.95 > 0.2 > abs(spread_out["cos"])
    # centring: a shared offset does not count as rank
    assert spread(torch.tensor(rng.normal(size=(32, 2)) @ rng.normal(size=(2, 16)) + 100.0))["erank"] < 2.0


class _Model:  # Health only reads the model when measuring
    pass


def _rows(health, gaps, start=1):
    for i, g in enumerate(gaps):
        health.observe({"iter": start + i, "hcl": 5.0, "hcl_chance": 5.5, "hcl_batch_gap": g,
                        "lcl": 4.0, "lcl_chance": 6.0, "lcl_batch_gap": 0.4})


def test_at_chance_warns_once_after_warmup_only():
    said = []
    health = Health(_Model(), None, every=0, warmup=2, max_iters=50, say=said.append)
    _rows(health, [0.0] * 9)  # iterations 1-9: inside warm-up (max(2, 50 / 5) = 10)
    _rows(health, [0.0] * (WINDOW - 1), start=10)  # the window still holds warm-up rows
    assert said == []
    _rows(health, [0.0], start=10 + WINDOW - 1)  # a whole window after warm-up
    assert len(said) == 1 and said[0].startswith(f"warning: HCL is still at chance after {9 + WINDOW} iterations")
    assert f"< {AT_CHANCE_GAP}" in said[0]
    _rows(health, [0.0] * 3, start=10 + WINDOW)
    assert len(said) == 1  # once per run


def test_a_learning_term_does_not_warn():
    said = []
    health = Health(_Model(), None, every=0, warmup=0, max_iters=10, say=said.append)
    _rows(health, [0.01] * 2 + [0.3] * WINDOW)  # at chance early, then learning: the window decides
    assert said == []


def test_collapse_warns_on_cosine_rise_or_rank_loss():
    for latest, expected in (({"box_cos": 0.9, "box_erank": 40.0}, "mean cosine between boxes 0.90"),
                             ({"box_cos": 0.5, "box_erank": 10.0}, "effective rank 10")):
        said = []
        health = Health(_Model(), None, every=0, warmup=0, max_iters=10, say=said.append)
        health.reference = {"box_cos": 0.75, "box_erank": 44.0, "box_norm": 10.0}
        health.latest.update({"box_cos": 0.8, "box_erank": 40.0})  # within bounds
        health.observe({"iter": 1})
        assert said == []
        health.latest.update(latest)
        health.observe({"iter": 2})
        assert len(said) == 1 and expected in said[0], said


def test_state_dict_round_trip_keeps_window_and_warnings():
    said = []
    health = Health(_Model(), None, every=0, warmup=0, max_iters=10, say=said.append)
    _rows(health, [0.0] * WINDOW)
    other = Health(_Model(), None, every=0, warmup=0, max_iters=10, say=said.append)
    other.load_state_dict(health.state_dict())
    _rows(other, [0.0], start=WINDOW + 1)
    assert len(said) == 1  # the resumed run does not repeat the warning
    assert other.summary()["window"]["hcl_batch_gap"] == 0.0
    text = format_summary(other.summary())
    assert "hcl" in text and "warning: HCL is still at chance" in text


def test_grad_shares_are_the_weighted_gradient_energy_fractions():
    """share_t = |d(w_t L_t)/d encoder|^2 / sum_u ...: doubling w_hcl multiplies the HCL/LCL
    energy ratio by 4."""
    from drcl.model.drcl import DRCL, DRCLConfig

    s = 64
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, s, s, generator=g)
    boxes = torch.tensor([[4.0, 4, 30, 28], [20, 24, 60, 60], [34, 2, 62, 30]])
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2, 1])} for _ in range(2)]
    ratios = []
    for w in (1.0, 2.0):
        torch.manual_seed(0)
        model = DRCL(DRCLConfig(hcl_queue=8, lcl_queue=8, ar=False, sr=False, w_hcl=w))
        out = model(images, images.flip(-1), targets,
                    [{"boxes": torch.stack([s - boxes[:, 2], boxes[:, 1], s - boxes[:, 0], boxes[:, 3]], 1),
                      "labels": t["labels"]} for t in targets], generator=torch.Generator().manual_seed(0))
        shares = Health(model, None, every=1, warmup=0, max_iters=1).grad_shares(out, ["hcl", "lcl"])
        assert shares["hcl_grad_share"] + shares["lcl_grad_share"] == pytest.approx(1.0)
        ratios.append(shares["hcl_grad_share"] / shares["lcl_grad_share"])
    assert ratios[1] == pytest.approx(4 * ratios[0], rel=1e-4)


def _drcl_batch(s=64):
    g = torch.Generator().manual_seed(0)
    low = torch.rand(2, 3, 4, 4, generator=g)
    images = torch.nn.functional.interpolate(low, size=(s, s), mode="bilinear", align_corners=False)
    boxes = torch.tensor([[4.0, 4, 30, 28], [20, 24, 60, 60], [34, 2, 62, 30]])
    flipped = torch.stack([s - boxes[:, 2], boxes[:, 1], s - boxes[:, 0], boxes[:, 3]], 1)
    t1 = [{"boxes": boxes, "labels": torch.tensor([1, 2, 3])} for _ in range(2)]
    t2 = [{"boxes": flipped, "labels": torch.tensor([1, 2, 3])} for _ in range(2)]
    return images, images.flip(-1), t1, t2


def test_grad_shares_are_over_the_online_encoder_only():
    """Each term's share against its gradient on the online encoder's parameters, taken by a
    separate backward per term. The AR decoder's output layer is scaled down 100x and w_ar up
    100x: AR then sends little into the encoder while the decoder's own gradient is the largest
    of all, so shares over every parameter (heads and decoder included) would be another answer."""
    from drcl.model.drcl import DRCL, DRCLConfig

    torch.manual_seed(0)
    model = DRCL(DRCLConfig(norm="gn", hcl=False, sr=False, lcl_queue=16, w_ar=100.0))
    with torch.no_grad():
        model.decoder.body[3].weight.mul_(0.01)
    out = model(*_drcl_batch(), generator=torch.Generator().manual_seed(0))
    terms = ["lcl", "ar"]
    shares = Health(model, None, every=1, warmup=0, max_iters=1).grad_shares(out, terms)
    encoder = list(model.online.encoder.parameters())
    energy, energy_all = {}, {}
    for t in terms:
        model.zero_grad(set_to_none=True)
        (getattr(model.cfg, f"w_{t}") * out[t]).backward(retain_graph=True)
        energy[t] = sum(float((p.grad.double() ** 2).sum()) for p in encoder if p.grad is not None)
        energy_all[t] = sum(float((p.grad.double() ** 2).sum()) for p in model.parameters() if p.grad is not None)
    for t in terms:
        assert shares[f"{t}_grad_share"] == pytest.approx(energy[t] / sum(energy.values()), rel=1e-4, abs=1e-7), t
    # the case tells the two apart: AR's share is tiny on the encoder, large over every parameter
    assert shares["ar_grad_share"] < 0.2 and energy_all["ar"] / sum(energy_all.values()) > 0.8


def _orthogonal_to(queries: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n unit vectors orthogonal to every row of ``queries``."""
    basis, _ = torch.linalg.qr(queries.t().double())
    r = torch.randn(n, queries.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    r = r - (r @ basis) @ basis.t()
    return torch.nn.functional.normalize(r, dim=1).float()


def test_batch_gap_leaves_out_queue_negatives():
    """With both queues full of keys orthogonal to every query (cosine 0), the in-batch gap is
    the positives' mean cosine minus the mean over this step's other keys only, by hand from
    the encoders; the gap with the queue is pulled towards the positives' cosine alone."""
    from drcl.model.drcl import DRCL, DRCLConfig

    torch.manual_seed(0)
    model = DRCL(DRCLConfig(norm="gn", hcl_queue=8, lcl_queue=16, ar=False, sr=False, supervised=False))
    images1, images2, t1, t2 = _drcl_batch()
    x = (torch.cat([images1, images2]) - model.mean) / model.std
    boxes = [t["boxes"] for t in t1 + t2]  # all 3 boxes of each image are chosen (K = 8)
    with torch.no_grad():
        on, mom = model.online.encoder(x, boxes), model.momentum.encoder(x, boxes)
        by_term = {"hcl": (model.hcl_predictor(model.online.hcl_projector(on["c5"])),
                           model.momentum.hcl_projector(mom["c5"])),
                   "lcl": (model.lcl_predictor(model.online.lcl_projector(on["roi"])),
                           model.momentum.lcl_projector(mom["roi"]))}
    for i, t in enumerate(("hcl", "lcl")):
        q = torch.nn.functional.normalize(by_term[t][0], dim=1)
        queue = getattr(model, f"{t}_queue")
        queue.enqueue(_orthogonal_to(q, queue.size, seed=i))
        assert (q @ queue.valid()[0].t()).abs().max() < 1e-5
    out = model(images1, images2, t1, t2, generator=torch.Generator().manual_seed(0))
    for t, (q, k) in by_term.items():
        q, k = torch.nn.functional.normalize(q, dim=1).double(), torch.nn.functional.normalize(k, dim=1).double()
        n = q.shape[0] // 2
        size = getattr(model, f"{t}_queue").size
        pos, batch_neg, neg = [], [], []
        for qv, kv in ((q[:n], k[n:]), (q[n:], k[:n])):  # each view's queries against the other's keys
            sim = qv @ kv.t()
            off = sim[~torch.eye(n, dtype=torch.bool)]
            pos.append(sim.diagonal().mean())
            batch_neg.append(off.mean())
            neg.append(off.sum() / (off.numel() + n * size))  # the queue's n x size cosines are 0
        pos, batch_neg, neg = (float(sum(v)) / 2 for v in (pos, batch_neg, neg))
        assert out[f"{t}_batch_gap"] == pytest.approx(pos - batch_neg, abs=1e-5), t
        assert out[f"{t}_gap"] == pytest.approx(pos - neg, abs=1e-5), t
        assert abs(batch_neg - neg) > 1e-3, t  # the queue moves the plain gap: the two are told apart
        assert out[f"{t}_chance"] == pytest.approx(math.log(n + size), rel=1e-6), t


def test_fixed_batch_rescales_boxes_of_a_non_square_image():
    """A 120 x 80 image with a white rectangle exactly under its box: resized to 64 x 64 the
    box scales by 64/120 in x and 64/80 in y and still frames the rectangle."""
    from drcl.engine.health import fixed_batch

    def item(h, w, box):
        image = torch.zeros(3, h, w, dtype=torch.uint8)
        x0, y0, x1, y1 = box
        image[:, y0:y1, x0:x1] = 255
        return image, {"boxes": torch.tensor([box], dtype=torch.float32)}

    empty = (torch.zeros(3, 50, 50, dtype=torch.uint8), {"boxes": torch.zeros(0, 4)})
    dataset = [empty, item(80, 120, (30, 20, 90, 60)), item(40, 96, (12, 10, 60, 30))]
    images, boxes = fixed_batch(dataset, 64)
    assert images.shape == (2, 3, 64, 64) and len(boxes) == 2  # the image without boxes is left out
    torch.testing.assert_close(boxes[0], torch.tensor([[16.0, 16.0, 48.0, 48.0]]))
    torch.testing.assert_close(boxes[1], torch.tensor([[8.0, 16.0, 40.0, 48.0]]))
    for image, b in zip(images, boxes):
        x0, y0, x1, y1 = (int(v) for v in b[0])
        inside = image[:, y0 + 2:y1 - 2, x0 + 2:x1 - 2]
        assert inside.min() > 0.99  # the white rectangle fills the rescaled box ...
        outside = image.clone()
        outside[:, max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2] = 0
        assert outside.max() < 0.01  # ... and nothing outside it


def test_grad_shares_under_fp16_are_taken_on_the_scaled_losses():
    """fp16 activations: two terms whose gradients on the weights (2e-8 and 1e-8 per element)
    underflow in fp16 unless the losses are scaled as the step's are (GradScaler). Scaled, the
    shares equal the float64 ones (energy ratio 4: 0.8 / 0.2); unscaled both would read 0."""
    from types import SimpleNamespace

    from torch import nn

    torch.manual_seed(0)
    encoder = nn.Linear(8, 8, bias=False)
    model = SimpleNamespace(online=SimpleNamespace(encoder=encoder), cfg=SimpleNamespace(w_hcl=1.0, w_lcl=1.0))
    x = torch.full((1, 8), 1e-3)

    def result(dtype):
        h = x.to(dtype) @ encoder.weight.t().to(dtype)  # an activation in dtype, as under autocast
        return {"hcl": (h.float() * 2e-5).sum(), "lcl": (h.float() * 1e-5).sum()}

    health = Health(model, None, every=1, warmup=0, max_iters=1)
    exact = health.grad_shares(result(torch.float64), ["hcl", "lcl"])
    assert exact == {"hcl_grad_share": pytest.approx(0.8), "lcl_grad_share": pytest.approx(0.2)}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    got = health.grad_shares(result(torch.float16), ["hcl", "lcl"], scale=scaler.scale)
    assert got == {k: pytest.approx(v, rel=1e-2) for k, v in exact.items()}
    assert health.grad_shares(result(torch.float16), ["hcl", "lcl"]) == {"hcl_grad_share": 0.0, "lcl_grad_share": 0.0}
