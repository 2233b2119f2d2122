"""PreciseBN: BatchNorm running statistics re-estimated on the inputs a model will be used on.

During 2DRCL pre-training the online encoder sees only masked views (``model.mask_ratio`` of
their patches set to the mean colour), so the running statistics its BatchNorm layers keep
describe masked images, and they are what ``encoder.pt`` carries into fine-tuning, where
detectron2's FrozenBN and mmdet's ``norm_eval=True`` freeze them. :func:`update_bn_stats`
replaces them by statistics over clean inputs, the way detectron2 / fvcore's
``update_bn_stats`` does (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"): no gradient,
train mode, and BatchNorm's cumulative average (``momentum=None``) over the batches, so each
layer's running mean is the mean over batches of its input's per-channel batch mean, and its
running variance the mean over batches of the unbiased per-channel batch variance.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

_BatchNorm = nn.modules.batchnorm._BatchNorm


def batchnorm_layers(module: nn.Module) -> list[_BatchNorm]:
    """The layers with running statistics (BatchNorm, SyncBatchNorm; not FrozenBatchNorm2d or
    GroupNorm)."""
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def without_sync_bn(module: nn.Module) -> nn.Module:
    """``module`` with every SyncBatchNorm replaced (in place) by a BatchNorm2d holding the same
    weights and statistics, so that one process can run it in train mode: SyncBatchNorm would
    wait for the other processes."""
    for name, child in module.named_children():
        if isinstance(child, nn.SyncBatchNorm):
            bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn.to(child.running_mean.device))
        else:
            without_sync_bn(child)
    return module


@torch.no_grad()
def update_bn_stats(module: nn.Module, batches: Iterable, forward: Callable | None = None) -> int:
    """Re-estimate the running statistics of every BatchNorm layer of ``module`` (in place)
    from ``forward(batch)`` (default ``module(batch)``) over ``batches``; see the module
    docstring. The module is in train mode meanwhile and returns to its mode after, with each
    layer's momentum restored. Returns the number of batches; with none, nothing changes."""
    layers = batchnorm_layers(module)
    if not layers:
        return 0
    forward = forward or module
    momenta = [bn.momentum for bn in layers]
    was_training = module.training
    module.train()
    n = 0
    try:
        for batch in batches:
            if n == 0:
                for bn in layers:
                    bn.reset_running_stats()
                    bn.momentum = None  # cumulative average: running = mean over the batches seen
            forward(batch)
            n += 1
    finally:
        for bn, m in zip(layers, momenta):
            bn.momentum = m
        module.train(was_training)
    return n
