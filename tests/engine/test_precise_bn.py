"""PreciseBN: the BatchNorm statistics written to encoder.pt are those of the encoder's own
forward pass over clean views, computed here independently from the layers' inputs."""

import copy
from collections import defaultdict
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

from drcl.config import drcl_config, load_config
from drcl.engine.precise_bn import update_bn_stats
from drcl.model.detector import build_encoder
from drcl.model.drcl import DRCL, IMAGENET_MEAN, IMAGENET_STD
from drcl.pretrain import write_encoder


def _input_stats(encoder, batches):
    """Per BatchNorm layer (by name): the mean over batches of its input's per-channel mean and
    unbiased variance (what BatchNorm's running_var averages), from forward hooks, float64."""
    seen = defaultdict(list)
    hooks = [m.register_forward_hook(lambda m, args, out, name=name: seen[name].append(args[0].detach().double()))
             for name, m in encoder.named_modules() if isinstance(m, nn.BatchNorm2d)]
    encoder.train()
    with torch.no_grad():
        for x in batches:
            encoder(x, fpn=False)
    for h in hooks:
        h.remove()
    out = {}
    for name, xs in seen.items():
        per_channel = [x.transpose(0, 1).flatten(1) for x in xs]
        out[name] = (torch.stack([c.mean(1) for c in per_channel]).mean(0),
                     torch.stack([c.var(1, unbiased=True) for c in per_channel]).mean(0))
    return out


def test_encoder_file_carries_the_batchnorm_statistics_of_clean_views(tmp_path):
    """With SyncBatchNorm in a (one-process) process group, as under torchrun on CUDA: one
    process alone must be able to re-estimate them (plain BatchNorm on a copy)."""
    torch.manual_seed(0)
    encoder = build_encoder("tiny", norm="bn")
    model = SimpleNamespace(online=SimpleNamespace(encoder=encoder), mean=torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                            std=torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))  # what write_encoder reads of a DRCL
    g = torch.Generator().manual_seed(1)
    # three loader batches of 2 images (two views each) at 32 px; 4 images are asked for: the first two batches
    batches = [(torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g), None, None)
               for _ in range(3)]
    with torch.no_grad():  # training's statistics: masked views, momentum 0.1
        encoder.train()
        x = torch.cat(batches[0][:2])
        encoder((x - model.mean) / model.std * (torch.rand(4, 1, 32, 32, generator=g) > 0.5), fpn=False)
    online = {k: v.clone() for k, v in encoder.state_dict().items()}
    clean = [(torch.cat([x1, x2]) - model.mean) / model.std for x1, x2, _, _ in batches[:2]]
    expected = _input_stats(copy.deepcopy(encoder), clean)
    model.online.encoder = encoder = nn.SyncBatchNorm.convert_sync_batchnorm(encoder)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert write_encoder(model, tmp_path / "encoder.pt", batches, images=4) == 4
    finally:
        dist.destroy_process_group()
    saved = torch.load(tmp_path / "encoder.pt")
    assert len(expected) == 20  # every BatchNorm of the ResNet-18
    for name, (mean, var) in expected.items():
        assert torch.allclose(saved[f"{name}.running_mean"].double(), mean, rtol=1e-4, atol=1e-5), name
        assert torch.allclose(saved[f"{name}.running_var"].double(), var, rtol=1e-4, atol=1e-5), name
        assert not torch.allclose(online[f"{name}.running_mean"].double(), mean, rtol=1e-2, atol=1e-3), name
    for k, v in encoder.state_dict().items():  # the model keeps its own (a copy was re-estimated)
        assert torch.equal(v, online[k]), k
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(saved[k], v), k  # weights unchanged


def test_group_norm_has_nothing_to_re_estimate_and_no_batches_change_nothing(tmp_path):
    model = DRCL(drcl_config(load_config("tiny", ["model.hcl_queue=16", "model.lcl_queue=32"])))  # gn
    batches = [(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32), None, None)]
    assert write_encoder(model, tmp_path / "encoder.pt", batches, images=4) == 0
    bn = nn.BatchNorm2d(3)
    bn.running_mean.fill_(0.5)
    assert update_bn_stats(bn, []) == 0 and torch.all(bn.running_mean == 0.5) and bn.momentum == 0.1
