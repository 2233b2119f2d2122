import pytest

from drcl.engine.trainer import lr_factor


def test_lr_schedule():
    t = {"warmup_iters": 10, "max_iters": 110, "lr_schedule": "cosine", "lr_steps": [0.5], "lr_gamma": 0.1}
    assert lr_factor(0, t) == pytest.approx(0.001)
    assert lr_factor(10, t) == pytest.approx(1.0)
    assert lr_factor(60, t) == pytest.approx(0.5)
    assert lr_factor(110, t) == pytest.approx(0.0, abs=1e-12)
    t["lr_schedule"] = "step"
    assert lr_factor(54, t) == 1.0 and lr_factor(55, t) == pytest.approx(0.1)
