"""Projector and predictor: 2-layer MLPs, linear -> BN -> ReLU -> linear (paper appendix:
256 hidden, 256 out)."""

from torch import nn


def mlp(in_dim: int, hidden: int = 256, out: int = 256) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))
