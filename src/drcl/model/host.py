"""Small tensors made on the host for the training device, without waiting for it.

A copy from ordinary (pageable) host memory to a GPU makes the host wait until the GPU has
finished everything queued before it; at 800 px the 2DRCL step's small host-made tensors
(chosen boxes, their levels, ids, the patch mask's grid) were that many waits per step. From
pinned memory with ``non_blocking=True`` the copy is queued like a kernel instead.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` (on the host) on ``device``: queued from pinned memory on CUDA, unchanged on the CPU."""
    device = torch.device(device) if device is not None else t.device
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
