import pytest
import torch

from drcl.engine.trainer import lr_factor


def test_lr_schedule():
    t = {"warmup_iters": 10, "max_iters": 110, "lr_schedule": "cosine", "lr_steps": [0.5], "lr_gamma": 0.1}
    assert lr_factor(0, t) == pytest.approx(0.001)
    assert lr_factor(10, t) == pytest.approx(1.0)
    assert lr_factor(60, t) == pytest.approx(0.5)
    assert lr_factor(110, t) == pytest.approx(0.0, abs=1e-12)
    t["lr_schedule"] = "step"
    assert lr_factor(54, t) == 1.0 and lr_factor(55, t) == pytest.approx(0.1)


class _Ann:
    num_images = 4
    images = [{"id": i} for i in range(1, 5)]


def test_flops_per_iter_counts_one_forward_and_backward(tmp_path, tiny_cfg):
    """A linear model on a fixed batch: forward 2*B*I*O multiply-adds (x2), backward the weight
    gradient only (the input needs none), so 4*B*I*O in all; health probes are not counted."""
    from torch import nn

    from drcl.engine.distributed import DistInfo
    from drcl.engine.trainer import Task, train
    from drcl.sampling import RepeatFactorSampler

    B, I, O = 3, 12, 5
    model = nn.Linear(I, O)
    x = torch.randn(B, I)

    def forward(model, batch, generator, weights):
        return {"loss": model(batch).pow(2).mean()}

    class Probe:  # a health object whose probes run extra matmuls that must not be counted
        rows = []

        def start(self):
            pass

        def before_backward(self, it, result, terms):
            torch.randn(50, 50, requires_grad=True).matmul(torch.randn(50, 50)).sum().backward()

        def after_step(self, it):
            torch.randn(50, 50) @ torch.randn(50, 50)

        def observe(self, row):
            pass

        def state_dict(self):
            return {}

    sampler = RepeatFactorSampler([0, 1, 2, 3], [0, 0, 1, 1], 4, 2, mode="random", total_epochs=2)
    task = Task("test", model, _Ann(), sampler, [x] * 4, 2, forward, terms=lambda r: ["loss"], health=Probe())
    summary = train(task, tiny_cfg, tmp_path, False, DistInfo(), torch.device("cpu"))
    assert summary["flops_per_iter"] == 4 * B * I * O
