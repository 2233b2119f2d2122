"""How good class-agnostic boxes are: the recall of the ground-truth boxes, per frequency group.

For a set G of ground-truth boxes (all of them, or those of one LVIS frequency group), each in
image I_g, and proposals ranked best first per image, the recall at K proposals and IoU
threshold tau is

    R@K(tau) = (1 / |G|) * sum_{g in G} 1[ max_{p in P_K(I_g)} IoU(g, p) >= tau ]

where P_K(I) is the first K proposals of image I (none: the max is 0). A proposal may cover
several ground-truth boxes (no one-to-one matching, as in Hosang et al., "What makes for
effective detection proposals?", PAMI 2016). Crowd boxes (COCO ``iscrowd=1``) are left out of G.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_iou

from drcl.data.annotations import GROUP_NAMES, GROUPS, Annotations


def best_iou(gt: torch.Tensor, proposals: torch.Tensor, k: int) -> torch.Tensor:
    """(G,) largest IoU of each XYXY ground-truth box with the first ``k`` XYXY proposals
    (0 where there are none)."""
    proposals = proposals[:k]
    if len(gt) == 0 or len(proposals) == 0:
        return torch.zeros(len(gt))
    return box_iou(gt.float(), proposals.float()).max(dim=1).values


def proposal_recall(ann: Annotations, proposals: dict, ks=(8, 100), iou: float = 0.5) -> dict:
    """R@K(``iou``) of ``proposals`` (image id -> (P, 4) XYXY tensor, best first, as
    :func:`drcl.data.boxes.load_proposals` returns them) over ``ann``'s ground-truth boxes.

    Returns ``{"all": {K: recall}, "r" / "c" / "f": {K: recall or None when the group has no
    box}, "boxes": {"all": n, "r": n, ...}}``.
    """
    best = {k: [] for k in ks}
    groups = []
    for i, image_id in enumerate(ann.image_ids.tolist()):
        mine = ann.instances_of(i)
        mine = mine[~ann.iscrowd[mine]]
        if not mine.size:
            continue
        xywh = torch.from_numpy(ann.boxes[mine]).to(torch.float32)
        gt = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        props = proposals.get(image_id, torch.zeros(0, 4))
        for k in ks:
            best[k].append(best_iou(gt, props, k))
        groups += [ann.frequency[c] for c in ann.category_index[mine]]
    groups = np.array(groups)
    hit = {k: (torch.cat(v).numpy() >= iou) if v else np.zeros(0, dtype=bool) for k, v in best.items()}
    out = {"all": {k: float(h.mean()) if h.size else None for k, h in hit.items()}, "boxes": {"all": int(groups.size)}}
    for g in GROUPS:
        mask = groups == g
        out[g] = {k: float(h[mask].mean()) if mask.any() else None for k, h in hit.items()}
        out["boxes"][g] = int(mask.sum())
    return out


def format_recall(rows: dict, ks=(8, 100), iou: float = 0.5) -> str:
    """A Markdown table of ``{name: proposal_recall(...) plus optional "ms_per_image"}``."""
    cols = [f"R@{k} {GROUP_NAMES[g] if g in GROUP_NAMES else g}" for k in ks for g in ("all", *GROUPS)]
    lines = [f"| boxes (recall at IoU {iou}) | " + " | ".join(cols) + " | ms / image |",
             "|---|" + "---:|" * (len(cols) + 1)]
    for name, r in rows.items():
        cells = [("-" if r[g][k] is None else f"{100 * r[g][k]:.1f}") for k in ks for g in ("all", *GROUPS)]
        ms = r.get("ms_per_image")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if ms is None else f'{ms:.0f}'} |")
    return "\n".join(lines)
