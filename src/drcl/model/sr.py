"""Semantic Reconstruction (SR): the masked view's online features must rebuild the momentum
encoder's features of the clean view (stop-gradient target), with cosine distance d(a, b) =
1 - a.b / (|a| |b|):

    L_SR = mean over FPN levels l of mean over locations of d(F_l(masked), sg(F'_l(clean)))
         + mean over boxes b of d(roi_b(masked), sg(roi'_b(clean)))

where F are online and F' momentum FPN features, and roi the box-head embeddings of the same
boxes (the second term only when boxes are given).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_distance(a: torch.Tensor, b: torch.Tensor, dim: int = 1) -> torch.Tensor:
    return 1.0 - F.cosine_similarity(a, b.detach(), dim=dim)


def sr_loss(online_fpn: dict, target_fpn: dict, online_roi=None, target_roi=None) -> torch.Tensor:
    loss = torch.stack([cosine_distance(online_fpn[k], target_fpn[k]).mean() for k in online_fpn]).mean()
    if online_roi is not None and online_roi.shape[0] > 0:
        loss = loss + cosine_distance(online_roi, target_roi).mean()
    return loss
