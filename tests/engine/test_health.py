"""Training-health signals against NumPy references, and the warnings they raise."""

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
