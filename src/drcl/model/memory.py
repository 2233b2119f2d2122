"""The momentum (EMA) encoder update and the key queues, MoCo style (He et al. 2020).

Momentum update, with m going from ``base`` (0.99) to 1 on a cosine schedule over training
progress p in [0, 1]:

    m(p) = 1 - (1 - base) * (cos(pi p) + 1) / 2
    theta_momentum <- m * theta_momentum + (1 - m) * theta_online

Staleness: the momentum encoder averages the online one over about ``1 / (1 - m)`` steps (its
horizon: 100 at m = 0.99, 250 at 0.996, 1,000 at MoCo v2's 0.999), and the oldest key of a full
queue was computed ``queue size / keys per step`` steps ago. A key older than the horizon comes
from an encoder the current one no longer resembles, and a loss can then tell queue keys from
fresh ones by their age alone (:func:`staleness`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn


def momentum_at(progress: float, base: float = 0.99) -> float:
    p = min(max(progress, 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * p) + 1.0) / 2.0


def staleness(queue: int, keys_per_step: float, base: float) -> tuple[float, float]:
    """``(age, horizon)`` in steps: the age of a full queue's oldest key, ``queue /
    keys_per_step``, and the momentum encoder's averaging horizon at the start of training,
    ``1 / (1 - base)`` (it only grows as m rises to 1). MoCo v2: 65,536 / 256 = 256 against
    1,000 (ratio 0.26)."""
    return queue / keys_per_step, (math.inf if base >= 1 else 1.0 / (1.0 - base))


@torch.no_grad()
def momentum_update(online: nn.Module, momentum: nn.Module, m: float) -> None:
    """EMA of the online parameters into the momentum copy (buffers such as BN running
    statistics are the momentum encoder's own, as in MoCo)."""
    online_params = [p.detach() for p in online.parameters()]
    momentum_params = list(momentum.parameters())
    torch._foreach_mul_(momentum_params, m)  # one kernel per group of tensors, not two per tensor
    torch._foreach_add_(momentum_params, online_params, alpha=1.0 - m)


@torch.no_grad()
def gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank (rank order; ranks may hold different numbers of
    rows); ``t`` itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], device=t.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest,) + t.shape[1:], dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


class KeyQueue(nn.Module):
    """A FIFO of ``size`` keys, with their labels and ids (image or object ids; -1 for
    unknown), kept as buffers, so it is saved with the model. Only the filled part is used as
    negatives, so early training does not contrast against random vectors; the ids let a query
    ignore older keys of its own image or object."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", torch.zeros(size, dim))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        # ptr and filled as Python ints: the buffers are saved with the model, these are what
        # a step reads (reading a buffer on a GPU makes the host wait for it); None after
        # loading a state, until first read
        self._host: tuple[int, int] | None = (0, 0)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host = None

    def _counters(self) -> tuple[int, int]:
        if self._host is None:
            self._host = (int(self.ptr), int(self.filled))
        return self._host

    @property
    def fill(self) -> int:
        """How many keys the queue holds."""
        return self._counters()[1]

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    def valid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, labels, ids) of the filled part."""
        n = self.fill
        return self.keys[:n], self.labels[:n], self.ids[:n]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor | None = None, ids: torch.Tensor | None = None) -> None:
        """Write keys (gathered from all ranks) after the newest, wrapping around."""
        unknown = torch.full((keys.shape[0],), -1, dtype=torch.long, device=keys.device)
        labels = unknown if labels is None else labels
        ids = unknown if ids is None else ids
        keys, labels, ids = gather(keys.detach()), gather(labels), gather(ids)
        keys, labels, ids = keys[-self.size :], labels[-self.size :], ids[-self.size :]
        n = keys.shape[0]
        ptr, filled = self._counters()
        idx = (ptr + torch.arange(n, device=keys.device)) % self.size
        self.keys[idx] = keys.to(self.keys.dtype)
        self.labels[idx] = labels
        self.ids[idx] = ids
        self._host = ((ptr + n) % self.size, min(filled + n, self.size))
        self.ptr.fill_(self._host[0])
        self.filled.fill_(self._host[1])
