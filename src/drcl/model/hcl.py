"""Holistic Contrastive Learning (HCL): image-level contrast, symmetric over two views.

Queries q_v = predictor(projector(pool(C5 of view v))) from the online encoder, keys
k_v = projector(pool(C5 of view v)) from the momentum encoder. The positive of q1_i is k2_i;
negatives are the other images' keys in the batch and the queue:

    L_HCL = ( NCE(q1; [k2, queue]) + NCE(q2; [k1, queue]) ) / 2,   temperature 0.2

with NCE the InfoNCE of :mod:`drcl.model.infonce`. Keys of the query's own image other than
its positive (an older key in the queue, or the same image drawn twice into one batch by the
repeat-factor sampler) are ignored rather than counted as negatives.
"""

from __future__ import annotations

import torch

from drcl.model.infonce import two_view_nce


def hcl_loss(q1, q2, k1, k2, queue: torch.Tensor, temperature: float = 0.2, ids: torch.Tensor | None = None,
             queue_ids: torch.Tensor | None = None):
    """q1, q2 (B, D) online queries; k1, k2 (B, D) momentum keys; queue (Q, D); ``ids`` (B,)
    image ids of the batch and ``queue_ids`` (Q,) of the queue's keys (-1: unknown)."""
    b = q1.shape[0]
    pos = torch.zeros(b, b + queue.shape[0], dtype=torch.bool, device=q1.device)
    pos[:, :b] = torch.eye(b, dtype=torch.bool, device=q1.device)
    return two_view_nce(q1, q2, k1, k2, queue, pos, temperature, ids, queue_ids)
