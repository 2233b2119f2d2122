"""InfoNCE with any number of positives per query (shared by HCL and LCL).

For L2-normalised query q_i, keys k_1..k_M, positive set P_i (non-empty) and the keys K_i
that query i is contrasted with (all keys but those it ignores):

    loss_i = -1/|P_i| * sum_{p in P_i} log( exp(q_i . k_p / t) / sum_{m in K_i} exp(q_i . k_m / t) )

With one positive per query this is InfoNCE as in MoCo (van den Oord et al. 2018; He et al.
2020); with several it is the supervised contrastive loss "L_out" of Khosla et al. 2020, used
when LCL counts same-category boxes as extra positives. Rows without a positive are left out
of the mean. Ignored keys are neither positive nor negative: older keys of the query's own
image or object waiting in a queue are not evidence against it.

Chance level: a query that cannot tell its keys apart gives every key of K_i the same
probability, so loss_i = log |K_i|; the ``chance`` statistic is its mean over the rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(query: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, temperature: float = 0.2,
             ignore: torch.Tensor | None = None, n_batch: int | None = None):
    """query (N, D), keys (M, D), positives (N, M) bool, ignore (N, M) bool or None (a
    positive is never ignored) -> (loss, stats).

    ``stats`` (detached 0-d tensors, for logging): mean cosine similarity of the positive
    pairs (``pos_sim``), of the negatives (``neg_sim``), of the negatives among the first
    ``n_batch`` keys (``batch_neg_sim``: this step's own keys, none from a queue; only when
    ``n_batch`` is given) and the chance level ``chance`` (mean log |K_i|).
    """
    q = F.normalize(query, dim=1)
    k = F.normalize(keys, dim=1)
    sim = q @ k.t()
    pos = positives
    contrasted = torch.ones_like(pos) if ignore is None else pos | ~ignore
    logits = (sim / temperature).masked_fill(~contrasted, float("-inf"))
    log_prob = F.log_softmax(logits, dim=1)
    n_pos = pos.sum(1)
    rows = n_pos > 0
    # means over the rows with a positive by masks, not by selecting them: selecting would make the
    # host wait for the device to learn how many there are (and a step does this 4 times)
    per_row = -torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(1) / n_pos.clamp(min=1)
    loss = _masked_mean(per_row, rows)
    with torch.no_grad():
        neg = contrasted & ~pos
        stats = {
            "pos_sim": _masked_mean(sim, pos),
            "neg_sim": _masked_mean(sim, neg),
            "chance": _masked_mean(torch.log(contrasted.sum(1).clamp(min=1).to(sim.dtype)), rows),
        }
        if n_batch is not None:
            stats["batch_neg_sim"] = _masked_mean(sim[:, :n_batch], neg[:, :n_batch])
    return loss, stats


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def same_id(query_ids: torch.Tensor | None, key_ids: torch.Tensor | None) -> torch.Tensor | None:
    """(N, M) bool: query i and key j carry the same known id (ids < 0 are unknown)."""
    if query_ids is None or key_ids is None:
        return None
    return (query_ids[:, None] == key_ids[None, :]) & (query_ids[:, None] >= 0)


def two_view_nce(q1, q2, k1, k2, queue: torch.Tensor, positives: torch.Tensor, temperature: float,
                 ids: torch.Tensor | None = None, queue_ids: torch.Tensor | None = None):
    """The symmetric two-view form HCL and LCL share:

        ( NCE(q1; [k2, queue]) + NCE(q2; [k1, queue]) ) / 2

    q*, k* (N, D) for the same N items in order; queue (Q, D); positives (N, N + Q) over
    [batch keys, queue]; ``ids`` (N,) and ``queue_ids`` (Q,) say which keys belong to the same
    image or object as a query (-1: unknown), and those that are not positives are ignored.
    Returns (loss, stats averaged over the two directions)."""
    n = q1.shape[0]
    ignore = None
    if ids is not None:
        unknown = ids.new_full((queue.shape[0],), -1)
        ignore = same_id(ids, torch.cat([ids, queue_ids if queue_ids is not None else unknown]))
    loss1, s1 = info_nce(q1, torch.cat([k2, queue]), positives, temperature, ignore, n_batch=n)
    loss2, s2 = info_nce(q2, torch.cat([k1, queue]), positives, temperature, ignore, n_batch=n)
    return (loss1 + loss2) / 2, {k: (s1[k] + s2[k]) / 2 for k in s1}
