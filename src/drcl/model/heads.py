"""Projectors and predictors: 2-layer MLPs, 256 hidden and 256 out (paper appendix).

    mlp(d, bn=True)                 Linear(d, 256) -> BatchNorm1d -> ReLU -> Linear(256, 256)
    mlp(d, bn=True, out_bn=True)    ... -> BatchNorm1d(256, affine=False)        (HCL projector)
    mlp(d, bn=False)                Linear(d, 256) -> ReLU -> Linear(256, 256)   (LCL heads)

The paper's arrangement is the first. Where we depart from it, and why (docs/method.md):

* HCL projector ends in a BatchNorm without affine parameters, as MoCo v3's does: keys and
  queries are centred over each batch, so a direction shared by every image cannot carry the
  loss. Without it, keys from the queue (computed by older momentum encoders) can be told
  from the current batch's keys by that shared direction alone: measured with LayerNorm or no
  normalisation in the heads, the training gap reached 0.84 while every key of a fixed batch
  had cosine 0.999 with every other.
* LCL projector and predictor have no BatchNorm: BatchNorm right after the first Linear makes
  the loss blind to the mean and scale of the box-head output that fine-tuning reuses, and its
  1 / std backward amplifies the gradient of near-identical box embeddings; the box head's
  output norm went 10 -> 200 and its mean pairwise cosine 0.77 -> 0.96 within 50 iterations.
"""

from torch import nn


def mlp(in_dim: int, hidden: int = 256, out: int = 256, *, bn: bool = True, out_bn: bool = False) -> nn.Sequential:
    layers = [nn.Linear(in_dim, hidden)]
    if bn:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.ReLU(inplace=True), nn.Linear(hidden, out)]
    if out_bn:
        layers.append(nn.BatchNorm1d(out, affine=False))
    return nn.Sequential(*layers)
