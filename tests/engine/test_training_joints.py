"""The joints of a real pre-training run: what the training loop hands the model each round
(dynamic rebalancing), what it counts (FLOPs per iteration) and what the health monitor logs,
each checked against a computation that does not go through the loop.

One tiny run (6 iterations, 3 rounds of 2) serves every test of the module; spies record each
step's inputs (:class:`conftest.FirstSteps`)."""

import json
import math

import numpy as np
import pytest
import torch

from drcl.config import load_config
from drcl.pretrain import pretrain

ROUNDS, ROUND_ITERS, BATCH, THRESHOLD, SEED = 3, 2, 2, 0.2, 0


def _args(data):
    return [
        "data.image_size=64", "data.workers=0", f"train.batch_size={BATCH}", "train.threads=1",
        f"train.max_iters={ROUNDS * ROUND_ITERS}", "train.checkpoint_every=100", "train.log_every=1",
        "train.warmup_iters=2", "train.health_every=2", "model.hcl_queue=16", "model.lcl_queue=32",
        f"sampler.threshold={THRESHOLD}", f"sampler.updates={ROUNDS}", "sampler.mode=dynamic",
        "sampler.schedule=linear", "sampler.alpha_start=1.0", "sampler.alpha_end=0.0", f"seed={SEED}",
        f"data.train_json={data / 'annotations' / 'train.json'}", f"data.train_images={data / 'images' / 'train'}",
    ]


@pytest.fixture(scope="module")
def run(small_data, tmp_path_factory, first_steps):
    cfg = load_config("tiny", _args(small_data))
    out = tmp_path_factory.mktemp("joints") / "run"
    with pytest.MonkeyPatch.context() as mp:
        spy = first_steps(mp, keep=2)
        summary = pretrain(cfg, out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"cfg": cfg, "out": out, "summary": summary, "spy": spy, "rows": rows,
            "train": json.loads((small_data / "annotations" / "train.json").read_text())}


def _alpha(round_):
    return 1.0 - round_ / (ROUNDS - 1)  # linear from 1 to 0 over rounds 0 .. ROUNDS - 1


def _category_factors(data: dict, alpha: float) -> np.ndarray:
    """r(c) = max(1, sqrt(t / s_a(c))), s_a = 1 / (a / f_img + (1 - a) / f_ins), from the JSON
    by hand (docs/method.md, DRB), in the file's category order (labels 1..C)."""
    cats = [c["id"] for c in data["categories"]]
    images = {}
    for a in data["annotations"]:
        images.setdefault(a["category_id"], set()).add(a["image_id"])
    n_images, n_instances = len(data["images"]), len(data["annotations"])
    factors = []
    for c in cats:
        f_img = len(images.get(c, ())) / n_images
        f_ins = sum(a["category_id"] == c for a in data["annotations"]) / n_instances
        if f_img == 0:
            factors.append(1.0)
            continue
        s = 1.0 / (alpha / f_img + (1.0 - alpha) / f_ins)
        factors.append(max(1.0, math.sqrt(THRESHOLD / s)))
    return np.array(factors)


def test_logged_alpha_follows_the_schedule_every_iteration(run):
    rows = run["rows"]
    assert [r["iter"] for r in rows] == list(range(1, ROUNDS * ROUND_ITERS + 1))
    for r in rows:
        round_ = (r["iter"] - 1) // ROUND_ITERS
        assert r["round"] == round_
        assert r["alpha"] == _alpha(round_), r["iter"]  # exactly 1, 0.5, 0


def test_model_gets_each_rounds_category_factors(run):
    """The weights DRCL.forward receives (recorded by a spy) are the category repeat factors at
    the round's alpha, computed by hand from the annotation file."""
    from drcl.data.annotations import load_annotations

    data = run["train"]
    ann = load_annotations(run["cfg"]["data"]["train_json"])
    assert [c["id"] for c in ann.categories] == [c["id"] for c in data["categories"]]  # labels 1..C in file order
    calls = [c for c in run["spy"].calls if "weights" in c]
    assert len(calls) == ROUNDS * ROUND_ITERS
    expected = [_category_factors(data, _alpha(e)) for e in range(ROUNDS)]
    assert not np.allclose(expected[0], expected[-1])  # the schedule changes the factors on this data
    for i, call in enumerate(calls):
        np.testing.assert_allclose(call["weights"].double().numpy(), expected[i // ROUND_ITERS], rtol=1e-6,
                                   err_msg=f"iteration {i + 1}")


def test_each_round_draws_its_own_epoch(run):
    """Round e's batches are the start of the sampler's epoch e: the image ids of each step
    (recorded by the spy) against a sampler built here and set to that epoch."""
    from drcl.data.annotations import load_annotations
    from drcl.sampling import AlphaSchedule, RepeatFactorSampler

    ann = load_annotations(run["cfg"]["data"]["train_json"])
    sampler = RepeatFactorSampler(ann.image_index, ann.category_index, ann.num_images, ann.num_categories,
                                  mode="dynamic", threshold=THRESHOLD, seed=SEED, schedule=AlphaSchedule("linear"),
                                  total_epochs=ROUNDS)
    seen = [c["image_ids"] for c in run["spy"].calls if "image_ids" in c]
    epochs = []
    for e in range(ROUNDS):
        sampler.set_epoch(e)
        ids = [ann.images[i]["id"] for i in sampler.indices[:ROUND_ITERS * BATCH]]
        epochs.append([ids[k:k + BATCH] for k in range(0, len(ids), BATCH)])
        assert seen[e * ROUND_ITERS:(e + 1) * ROUND_ITERS] == epochs[e], f"round {e}"
    assert epochs[0] != epochs[1] != epochs[2]  # epochs differ: a loop stuck on one would fail


def test_flops_per_iter_is_one_step_counted_independently(run):
    """The summary's FLOPs per iteration equal a FlopCounterMode count, made here, of one
    forward (both views, the momentum pass included) and the backward of the loss, on the
    first step's batch and weights."""
    first = run["spy"].first("DRCL")[0]
    counted = run["spy"].flops(first)
    assert run["summary"]["flops_per_iter"] == counted
    # the momentum pass is part of it: the key encoder's forward alone is a sizeable share
    from torch.utils.flop_counter import FlopCounterMode

    model = first["copy"]["model"]
    images1, images2 = first["copy"]["args"][:2]
    x = (torch.cat([images1, images2]) - model.mean) / model.std
    with FlopCounterMode(display=False) as momentum, torch.no_grad():
        model.momentum.encoder(x, None, fpn=True)
    assert 0.1 * counted < momentum.get_total_flops() < 0.5 * counted


def test_logged_health_values(run):
    """End to end, values and not only keys: the random-init reference and the last measured
    box spread against the encoders' box embeddings of the fixed batch computed here; the
    gradient shares of step 2 against a rerun of that step; health.json's window against the
    logged rows."""
    from drcl.data.dataset import DetectionDataset
    from drcl.data.annotations import load_annotations
    from drcl.engine.health import WINDOW, fixed_batch, spread
    from drcl.model.detector import build_encoder

    cfg, out, rows = run["cfg"], run["out"], run["rows"]
    ann = load_annotations(cfg["data"]["train_json"], cfg["data"]["train_images"])
    images, boxes = fixed_batch(DetectionDataset(ann, masks=False), cfg["data"]["image_size"])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def box_spread(encoder):
        encoder.eval()
        with torch.no_grad():
            return spread(encoder((images - mean) / std, boxes, fpn=True)["roi"])

    health = json.loads((out / "health.json").read_text())
    first = run["spy"].first("DRCL")
    start = box_spread(first[0]["copy"]["model"].online.encoder)  # the weights the run started from
    for k in ("cos", "erank", "norm"):
        assert health["reference"][f"box_{k}"] == pytest.approx(start[k], rel=1e-5), k
    final = build_encoder(cfg["model"]["preset"], norm=cfg["model"]["norm"])
    final.load_state_dict(torch.load(out / "encoder.pt"))
    end = box_spread(final)  # measured after the last step (health_every=2 divides 6)
    for k in ("cos", "erank", "norm"):
        assert rows[-1][f"box_{k}"] == pytest.approx(end[k], rel=1e-5), k
    assert abs(end["cos"] - start["cos"]) > 1e-3  # the two measurements are of different weights

    # step 2 (iteration index 1) is the first measured one: its shares, from a rerun of it
    model, result = run["spy"].rerun(first[1])
    encoder = [p for p in model.online.encoder.parameters() if p.requires_grad]
    terms = [t for t in ("hcl", "lcl", "ar", "sr") if t in result]
    energy = {}
    for t in terms:
        grads = torch.autograd.grad(getattr(model.cfg, f"w_{t}") * result[t], encoder, retain_graph=True,
                                    allow_unused=True)
        energy[t] = sum(float((g.double() ** 2).sum()) for g in grads if g is not None)
    assert not any(k.endswith("_grad_share") for k in rows[0])
    for t in terms:
        assert rows[1][f"{t}_grad_share"] == pytest.approx(energy[t] / sum(energy.values()), rel=1e-4, abs=1e-6), t
    # the summary's window is the mean of the last WINDOW logged rows
    for key in ("hcl", "hcl_batch_gap", "lcl_gap", "grad_norm", "box_cos", "sr_grad_share"):
        assert health["window"][key] == pytest.approx(np.mean([r[key] for r in rows[-WINDOW:]]), rel=1e-9), key


def test_finetune_flops_per_iter_is_one_step_counted_independently(small_data, tmp_path, first_steps, monkeypatch):
    """The same for fine-tuning: the Faster R-CNN's forward (RPN and RoI heads, losses) and
    backward on the first step's batch, counted here from a copy of the detector and the
    global RNG state the step saw (the RoI sampler draws from it)."""
    from drcl.finetune import finetune

    cfg = load_config("tiny_finetune", _args(small_data) + ["train.max_iters=1", "sampler.mode=rfs"])
    spy = first_steps(monkeypatch)
    summary = finetune(cfg, tmp_path / "ft", evaluate=False)
    (first,) = spy.first("FasterRCNN")
    assert summary["flops_per_iter"] == spy.flops(first)
