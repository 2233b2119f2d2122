"""Semantic Reconstruction (SR): the masked view's online features must rebuild the momentum
encoder's features of the clean view (stop-gradient target), with cosine distance d(a, b) =
1 - a.b / (|a| |b|):

    L_SR = mean over FPN levels l of mean over locations of d(F_l(masked), sg(N_loc(F'_l(clean))))
         + mean over boxes b of d(roi_b(masked), sg(N_box(roi'_b(clean))))

where F are online and F' momentum FPN features, roi the box-head embeddings of the same boxes
(the second term only when there are at least 2 boxes), and the targets are standardised:
N_loc makes each image's channel zero-mean and unit-variance over the level's locations (a
level with a single location is left out), N_box each embedding dimension over the step's
boxes. Standardised targets are data2vec's guard against collapse (Baevski et al. 2022): with
raw targets the loss is minimised by making every location and every box the same vector, and
it did just that here (box embeddings' mean pairwise cosine 0.77 -> 0.95 within 50 iterations).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-5


def cosine_distance(a: torch.Tensor, b: torch.Tensor, dim: int = 1) -> torch.Tensor:
    return 1.0 - F.cosine_similarity(a, b.detach(), dim=dim)


def standardize(x: torch.Tensor, dims) -> torch.Tensor:
    """(x - mean) / (std + EPS) over ``dims`` (population std)."""
    mean = x.mean(dim=dims, keepdim=True)
    std = x.var(dim=dims, keepdim=True, unbiased=False).sqrt()
    return (x - mean) / (std + EPS)


def sr_loss(online_fpn: dict, target_fpn: dict, online_roi=None, target_roi=None) -> torch.Tensor:
    terms = [cosine_distance(online_fpn[k], standardize(target_fpn[k].detach(), (2, 3))).mean()
             for k in online_fpn if online_fpn[k].shape[-1] * online_fpn[k].shape[-2] > 1]
    loss = torch.stack(terms).mean()
    if online_roi is not None and online_roi.shape[0] > 1:
        loss = loss + cosine_distance(online_roi, standardize(target_roi.detach(), 0)).mean()
    return loss
