"""InfoNCE with any number of positives per query (shared by HCL and LCL).

For L2-normalised query q_i, keys k_1..k_M and positive set P_i (non-empty):

    loss_i = -1/|P_i| * sum_{p in P_i} log( exp(q_i . k_p / t) / sum_{m=1..M} exp(q_i . k_m / t) )

With one positive per query this is InfoNCE as in MoCo (van den Oord et al. 2018; He et al.
2020); with several it is the supervised contrastive loss "L_out" of Khosla et al. 2020, used
when LCL counts same-category boxes as extra positives. Rows without a positive are left out
of the mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(query: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, temperature: float = 0.2):
    """query (N, D), keys (M, D), positives (N, M) bool -> (loss, stats).

    ``stats``: mean cosine similarity of positive pairs (``pos_sim``) and of the rest
    (``neg_sim``), detached floats for logging.
    """
    q = F.normalize(query, dim=1)
    k = F.normalize(keys, dim=1)
    sim = q @ k.t()
    log_prob = F.log_softmax(sim / temperature, dim=1)
    pos = positives.to(sim.dtype)
    n_pos = pos.sum(1)
    rows = n_pos > 0
    per_row = -(log_prob * pos).sum(1)[rows] / n_pos[rows]
    loss = per_row.mean() if rows.any() else sim.sum() * 0.0
    with torch.no_grad():
        neg = 1.0 - pos
        stats = {
            "pos_sim": float((sim * pos).sum() / pos.sum().clamp(min=1)),
            "neg_sim": float((sim * neg).sum() / neg.sum().clamp(min=1)),
        }
    return loss, stats
