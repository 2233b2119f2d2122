"""Long-tail statistics of an annotation file: per category and per frequency group.

For a group G (rare / common / frequent):

* images: images that contain at least one category of G;
* instances: annotations of G's categories;
* image-level share: sum over c in G of image_count(c) / sum over all c of image_count(c);
* instance-level share: instances of G / all instances.

The gap between the two shares is what instance-level rebalancing acts on: a head category
with many instances per image holds a larger share of instances than of images.
"""

from __future__ import annotations

import numpy as np

from drcl.data.annotations import GROUP_NAMES, GROUPS, Annotations
from drcl.errors import import_optional


def category_stats(ann: Annotations) -> dict:
    """JSON-ready statistics: ``categories`` (id, name, frequency, image_count,
    instance_count, counted in this file) and ``groups`` (per r/c/f: categories, images,
    instances, image_share, instance_share)."""
    freq = np.array(ann.frequency)
    total_img = max(int(ann.image_count.sum()), 1)
    total_ins = max(int(ann.instance_count.sum()), 1)
    ann_group = freq[ann.category_index] if len(ann.category_index) else np.array([], dtype=freq.dtype)
    groups = {}
    for g in GROUPS:
        in_g = freq == g
        groups[g] = {
            "name": GROUP_NAMES[g],
            "categories": int(in_g.sum()),
            "images": int(np.unique(ann.image_index[ann_group == g]).size),
            "instances": int(ann.instance_count[in_g].sum()),
            "image_share": float(ann.image_count[in_g].sum() / total_img),
            "instance_share": float(ann.instance_count[in_g].sum() / total_ins),
        }
    categories = [
        {
            "id": cat["id"],
            "name": cat["name"],
            "frequency": ann.frequency[c],
            "image_count": int(ann.image_count[c]),
            "instance_count": int(ann.instance_count[c]),
        }
        for c, cat in enumerate(ann.categories)
    ]
    return {
        "file": ann.path,
        "images": ann.num_images,
        "annotations": ann.num_instances,
        "frequency_source": ann.frequency_source,
        "groups": groups,
        "categories": categories,
    }


def format_table(stats: dict) -> str:
    header = f"{'group':<10}{'categories':>11}{'images':>9}{'instances':>11}{'img share':>11}{'inst share':>12}"
    lines = [
        f"{stats['file']}: {stats['images']} images, {stats['annotations']} annotations, "
        f"{len(stats['categories'])} categories (groups from {stats['frequency_source']} frequency)",
        header,
        "-" * len(header),
    ]
    for g in GROUPS:
        s = stats["groups"][g]
        lines.append(
            f"{s['name']:<10}{s['categories']:>11}{s['images']:>9}{s['instances']:>11}"
            f"{s['image_share']:>10.1%} {s['instance_share']:>11.1%}"
        )
    return "\n".join(lines)


GROUP_COLORS = {"r": "tab:red", "c": "tab:orange", "f": "tab:blue"}


def pyplot(feature: str):
    """``matplotlib.pyplot`` drawing to files (the Agg backend), or a
    :class:`~drcl.errors.MissingDependency` naming ``feature`` when matplotlib is missing."""
    import_optional("matplotlib", feature).use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_frequency(stats: dict, out_png: str, shares: dict | None = None) -> None:
    """Sorted class-frequency curve, image-level and instance-level, coloured by group.

    ``shares`` (label -> per-category expected instance share, in the order of
    ``stats["categories"]``) adds a second panel comparing sampling settings.
    """
    plt = pyplot("the class-frequency plot")
    from matplotlib.patches import Patch

    order = sorted(range(len(stats["categories"])),
                   key=lambda i: (-stats["categories"][i]["image_count"], -stats["categories"][i]["instance_count"]))
    cats = [stats["categories"][i] for i in order]
    x = np.arange(len(cats))
    img = np.array([c["image_count"] for c in cats])
    ins = np.array([c["instance_count"] for c in cats])
    colors = [GROUP_COLORS[c["frequency"]] for c in cats]
    panels = 2 if shares else 1
    fig, axes = plt.subplots(1, panels, figsize=(8 * panels, 4.5), dpi=100, squeeze=False)
    ax = axes[0, 0]
    ax.bar(x, img, color=colors, width=1.0, alpha=0.8)
    (line,) = ax.plot(x, ins, color="black", linewidth=1.2, label="instances")
    handles = [Patch(color=GROUP_COLORS[g], label=f"images, {GROUP_NAMES[g]}") for g in GROUPS] + [line]
    ax.set_yscale("log")
    ax.set_xlabel("category (sorted by image count)")
    ax.set_ylabel("count (log scale)")
    ax.set_title(f"Class frequency: {stats['file']}", fontsize=9)
    ax.legend(handles=handles, fontsize=8)
    if shares:
        ax = axes[0, 1]
        for label, share in shares.items():
            style = {"color": "black", "linewidth": 2.0} if label == "random" else {"linewidth": 1.2}
            name = "random (raw instance share)" if label == "random" else label
            ax.plot(x, np.asarray(share)[order], label=name, **style)
        ax.set_yscale("log")
        ax.set_xlabel("category (sorted by image count)")
        ax.set_ylabel("expected share of sampled instances (log scale)")
        ax.set_title("Per-class sampling share", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
