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

        def before_backward(self, it, result, terms, scale=None):
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


def test_logged_row_is_the_mean_of_its_interval(tmp_path, tiny_cfg):
    """A row logged every 3 steps reports the mean of the 3 steps' results, not the last one's;
    a key that some steps lack is averaged over the steps that have it; ``clipped`` is the
    fraction of clipped steps."""
    import json

    from torch import nn

    from drcl.engine.distributed import DistInfo
    from drcl.engine.trainer import Task, train
    from drcl.sampling import RepeatFactorSampler

    model = nn.Linear(2, 1, bias=False)
    step = {"n": 0}

    def forward(model, batch, generator, weights):
        step["n"] += 1
        n = step["n"]
        # loss n * w^2 / 2 at w = 1 has gradient norm n: steps 4, 5, 6 exceed the clip of 3.5
        with torch.no_grad():
            model.weight.fill_(1.0)
        out = {"loss": n * model.weight[0, 0] ** 2 / 2, "value": torch.tensor(float(n))}
        if n % 2 == 0:
            out["even_only"] = 10.0 * n
        return out

    sampler = RepeatFactorSampler([0, 1, 2, 3], [0, 0, 1, 1], 4, 2, mode="random", total_epochs=3)
    x = torch.zeros(1, 2)
    task = Task("test", model, _Ann(), sampler, [x] * 4, 2, forward, terms=lambda r: ["loss"])
    cfg = {**tiny_cfg, "train": {**tiny_cfg["train"], "max_iters": 6, "log_every": 3, "grad_clip": 3.5,
                                 "checkpoint_every": 6, "lr": 0.0, "warmup_iters": 0}}
    train(task, cfg, tmp_path, False, DistInfo(), torch.device("cpu"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [3, 6]
    assert [r["value"] for r in rows] == [pytest.approx(2.0), pytest.approx(5.0)]  # (1+2+3)/3, (4+5+6)/3
    assert [r["loss"] for r in rows] == [pytest.approx(1.0), pytest.approx(2.5)]
    assert [r["even_only"] for r in rows] == [pytest.approx(20.0), pytest.approx(50.0)]  # step 2; steps 4, 6
    assert [r["grad_norm"] for r in rows] == [pytest.approx(2.0), pytest.approx(5.0)]
    assert [r["clipped"] for r in rows] == [pytest.approx(0.0), pytest.approx(1.0)]


def test_lr_follows_the_global_batch_when_a_reference_batch_is_set():
    from drcl.config import load_config
    from drcl.engine.trainer import lr_line, scaled_lr

    t = {"lr": 0.02, "batch_size": 8, "reference_batch": 16}
    assert scaled_lr(t, 8) == pytest.approx(0.08) and scaled_lr(t, 4) == pytest.approx(0.04)
    assert lr_line(t, 4) == "global batch 32 (8 per process x 4 processes); peak lr 0.04 (train.lr 0.02 x 32 / " \
                            "train.reference_batch 16)"
    # the tiny configs' recipes were measured on one process at their own lr: unscaled
    for name in ("tiny", "tiny_finetune", "tiny_upstream"):
        train = load_config(name)["train"]
        assert train["reference_batch"] == 0 and scaled_lr(train, 1) == train["lr"], name
        assert lr_line(train, 1).endswith(f"peak lr {train['lr']:g} (train.lr, not scaled: train.reference_batch is 0)")


def test_training_runs_at_the_scaled_lr_and_says_so(tmp_path, tiny_cfg, capsys):
    import json

    from torch import nn

    from drcl.engine.distributed import DistInfo
    from drcl.engine.trainer import Task, train
    from drcl.sampling import RepeatFactorSampler

    model = nn.Linear(2, 1)
    sampler = RepeatFactorSampler([0, 1, 2, 3], [0, 0, 1, 1], 4, 2, mode="random", total_epochs=2)
    task = Task("test", model, _Ann(), sampler, [torch.zeros(1, 2)] * 4, 2,
                lambda model, batch, g, w: {"loss": model(batch).sum()}, terms=lambda r: ["loss"])
    cfg = {**tiny_cfg, "train": {**tiny_cfg["train"], "max_iters": 2, "log_every": 1, "checkpoint_every": 2,
                                 "warmup_iters": 0, "lr_schedule": "step", "lr_steps": [], "lr": 0.01, "batch_size": 2,
                                 "reference_batch": 8}}
    train(task, cfg, tmp_path, False, DistInfo(), torch.device("cpu"))
    assert "global batch 2 (2 per process x 1 process); peak lr 0.0025 (train.lr 0.01 x 2 / " \
           "train.reference_batch 8)" in capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == [pytest.approx(0.0025)] * 2
