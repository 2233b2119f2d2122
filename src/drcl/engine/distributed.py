"""torch.distributed through ``torchrun``: gloo on CPU, nccl on GPU; rank 0 writes."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from drcl.model.memory import KeyQueue


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1);
    a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # collectives (queue gathers, logging) address this rank's GPU
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_objects(obj, info: DistInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def any_rank_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Element-wise maximum of ``t`` over all processes (``t`` itself in one process)."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def same_on_every_rank(module: nn.Module) -> list[str]:
    """Names of the buffers that every process holds identically by construction: the key
    queues (:class:`~drcl.model.memory.KeyQueue`), which every process fills with the same keys
    gathered from all processes."""
    return [f"{name}.{b}" if name else b for name, m in module.named_modules() if isinstance(m, KeyQueue)
            for b, _ in m.named_buffers(recurse=False)]


def wrap_ddp(module: nn.Module, device: torch.device, find_unused_parameters: bool) -> nn.Module:
    """``DistributedDataParallel`` around ``module``, with the buffers of
    :func:`same_on_every_rank` left out of DDP's buffer broadcasts. DDP broadcasts rank 0's
    buffers before every forward; with 65,536-key queues that is some 80 MiB a step (the LVIS configs' two queues) of
    copies of what every process already has. The other buffers (BatchNorm statistics) are
    still broadcast, so ranks without SyncBN agree on them as before.

    ``device_ids`` stays None: with it DDP copies every tensor of a batch to the device,
    the targets the 2DRCL step keeps on the host among them (the training loop places the
    inputs itself)."""
    DDP = nn.parallel.DistributedDataParallel
    DDP._set_params_and_buffers_to_ignore_for_model(module, same_on_every_rank(module))
    return DDP(module, device_ids=None, find_unused_parameters=find_unused_parameters)
