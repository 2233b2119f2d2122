"""AP against fine-tuning length and against total training compute, the protocol of
"Rethinking ImageNet Pre-training" (He, Girshick and Dollar, ICCV 2019): pre-training that only
speeds convergence gives curves that meet; one that helps leaves a gap at the end.

A record is one fine-tuning run: ``init``, ``seed``, ``finetune_iters``, ``pretrain_flops``
(everything its start cost), ``finetune_flops`` and ``detection`` (LVIS-rule metrics, fractions;
a group the val set lacks reads -1). ``benchmarks/convergence.py`` makes them; the ones it
measured ship as :data:`MEASURED`, which ``drcl demo`` draws with its own two runs on top.

Compute is counted as the trainer counts it: FLOPs of one step (forward + backward) times the
iterations, for the pre-training and the fine-tuning of a run::

    total = pretrain_flops + finetune_flops
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

#: The convergence records measured so far (``benchmarks/convergence.py``; BENCHMARKS.md,
#: "Convergence"), reduced to what the curves read.
MEASURED = Path(__file__).with_name("convergence.json")
KEYS = ("init", "label", "seed", "pretrain_iters", "finetune_iters", "pretrain_flops", "finetune_flops")


def total_flops(record: dict) -> float:
    """A run's total training compute: everything its start cost plus its fine-tuning."""
    return record["pretrain_flops"] + record["finetune_flops"]


def curve(records: list[dict], init: str, metric: str, axis: str = "iters") -> list[dict]:
    """One init's points, one per fine-tuning length: ``x`` (the length for ``axis="iters"``,
    the mean over seeds of :func:`total_flops` for ``"flops"``), and over the seeds that have
    the metric (in AP points; a group the val set lacks reads -1 and is left out): ``mean``,
    ``std`` (0 for one seed), ``lo`` and ``hi`` (min and max), ``seeds``."""
    points = []
    mine = [r for r in records if r["init"] == init]
    for length in sorted({r["finetune_iters"] for r in mine}):
        at = [r for r in mine if r["finetune_iters"] == length]
        values = [100 * r["detection"][metric] for r in at
                  if r["detection"].get(metric) is not None and r["detection"][metric] >= 0]
        if not values:
            continue
        x = length if axis == "iters" else statistics.fmean(total_flops(r) for r in at)
        points.append({"x": x, "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1
                       else 0.0, "lo": min(values), "hi": max(values), "seeds": len(values)})
    return points


def converged_length(records: list[dict], min_gain: float = 1.0, init: str = "random") -> int | None:
    """The first fine-tuning length at which ``init`` gains under ``min_gain`` AP (points) over
    the length before it, each gain paired over the seeds run at both (:func:`paired_gain`);
    None while every step gains more, or none of its seeds ran at both lengths of a step."""
    lengths = sorted({r["finetune_iters"] for r in records if r["init"] == init})
    for before, length in zip(lengths, lengths[1:]):
        gain, seeds = paired_gain(records, init, before, length)
        if seeds and gain < min_gain:
            return length
    return None


def paired(records: list[dict], a: tuple[str, int], b: tuple[str, int], metric: str = "AP") -> tuple[float, int]:
    """Run ``a`` less run ``b`` in ``metric`` (points), each an (init, fine-tuning length): the
    mean over the seeds both ran of each seed's own difference, and how many seeds that is (0,
    difference nan, when none is). A seed whose val set lacks the metric's group (-1) is left
    out. Means over different sets of seeds would add the seeds' spread to the difference."""
    at = [{r["seed"]: 100 * r["detection"][metric] for r in records
           if (r["init"], r["finetune_iters"]) == run and r["detection"].get(metric, -1) >= 0} for run in (a, b)]
    seeds = sorted(set(at[0]) & set(at[1]))
    return (statistics.fmean(at[0][s] - at[1][s] for s in seeds) if seeds else math.nan), len(seeds)


def paired_gain(records: list[dict], init: str, before: int, after: int, metric: str = "AP") -> tuple[float, int]:
    """``init``'s gain in ``metric`` from fine-tuning length ``before`` to ``after`` (:func:`paired`)."""
    return paired(records, (init, after), (init, before), metric)


def seeds_run(records: list[dict], inits: tuple[str, ...] = ("random",)) -> dict[int, int]:
    """How many seeds ``inits`` were fine-tuned with, per fine-tuning length."""
    return {n: len({r["seed"] for r in records if r["init"] in inits and r["finetune_iters"] == n})
            for n in sorted({r["finetune_iters"] for r in records if r["init"] in inits})}


def well_seeded(counts: dict[int, int]) -> int:
    """The longest length run with as many seeds as any (``counts``: :func:`seeds_run`): the
    longest that a conclusion over every seed can rest on."""
    return max(n for n, c in counts.items() if c == max(counts.values()))


def n_seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def at_compute(points: list[dict], x: float) -> float | None:
    """A curve's mean at total compute ``x``, linear in log-compute between its two points
    around ``x``; None outside the compute it was measured at."""
    for a, b in zip(points, points[1:]):
        if a["x"] <= x <= b["x"]:
            t = (math.log(x) - math.log(a["x"])) / (math.log(b["x"]) - math.log(a["x"]))
            return a["mean"] + t * (b["mean"] - a["mean"])
    return points[0]["mean"] if len(points) == 1 and points[0]["x"] == x else None


def compute_for(points: list[dict], value: float) -> float | None:
    """Where a curve first reaches ``value``: the inverse of :func:`at_compute` on its first
    rising segment that spans it; None where no measured segment does."""
    for a, b in zip(points, points[1:]):
        if a["mean"] <= value <= b["mean"] and b["mean"] > a["mean"]:
            t = (value - a["mean"]) / (b["mean"] - a["mean"])
            return math.exp(math.log(a["x"]) + t * (math.log(b["x"]) - math.log(a["x"])))
    return None


def break_even_shares(records: list[dict], init: str, metric: str = "AP") -> list[dict]:
    """How many fine-tunings must share one pre-training of ``init`` for it to pay, per
    fine-tuning length L both ``init`` and random init have. ``init`` reaches its mean ``metric``
    m(L) for a share P / k of its pre-training's compute P plus the fine-tuning's F(L); random
    init needs x* to reach m(L) (:func:`compute_for` on its curve). It pays when P / k + F(L) <= x*::

        k = P / (x* - F(L))

    ``shares`` is inf when random init is not behind at L, or when its curve reached m(L) for
    less than F(L) and dipped after (x* <= F(L)): no sharing makes it pay; None when m(L) is
    above every random-init run measured (unknown)."""
    base = curve(records, "random", metric, "flops")
    mine = curve(records, init, metric)
    rows = []
    for p in mine:
        at = [r for r in records if r["init"] == init and r["finetune_iters"] == p["x"]]
        pre = statistics.fmean(r["pretrain_flops"] for r in at)
        ft = statistics.fmean(r["finetune_flops"] for r in at)
        same = at_compute(base, ft)
        if same is None:
            continue
        x = compute_for(base, p["mean"]) if p["mean"] > same else None
        if p["mean"] <= same or (x is not None and x <= ft):
            shares = math.inf
        else:
            shares = None if x is None else pre / (x - ft)
        rows.append({"length": p["x"], "lead": p["mean"] - same, "shares": shares})
    return rows


def matched_compute(records: list[dict], init: str, metric: str = "AP", baseline: str = "random") -> list[dict]:
    """At each of ``init``'s points on the compute axis: its mean ``metric`` and the baseline's
    at the same total compute (:func:`at_compute`); points beyond the baseline's range are left out."""
    base = curve(records, baseline, metric, "flops")
    rows = []
    for p in curve(records, init, metric, "flops"):
        other = at_compute(base, p["x"])
        if other is not None:
            rows.append({"x": p["x"], init: p["mean"], baseline: other})
    return rows


def summary(records: list[dict], init: str = "drcl_short", min_gain: float = 1.0) -> str:
    """One sentence on ``init`` against random init: its lead on the same fine-tuning (paired
    over the seeds both ran, :func:`paired`) at the shortest length both have, at the longest
    that every seed has run (and at the longest, if fewer seeds have), where it stands at
    matched compute, and whether random init has converged (gains under ``min_gain`` AP over
    its last doubling, :func:`paired_gain`)."""
    name = next(r["label"] for r in records if r["init"] == init)
    leads = {n: {m: paired(records, (init, n), ("random", n), m) for m in ("AP", "APr")}
             for n in sorted({r["finetune_iters"] for r in records if r["init"] == init})}
    seeds = {n: lead["AP"][1] for n, lead in leads.items() if lead["AP"][1]}  # run by both, same seeds
    lengths = sorted(seeds)
    first, last = lengths[0], lengths[-1]
    well = well_seeded(seeds)

    def signed(x):  # +0.0, not -0.0, for a lead that rounds to nothing
        return f"{round(x, 1) + 0.0:+.1f}"

    def lead(n):
        (ap, _), (apr, with_apr) = leads[n]["AP"], leads[n]["APr"]
        return f"{signed(ap)} AP" + (f", APr {signed(apr)}" if with_apr else "") + f" at {n} " + (
            "iterations" if n == first else f"({n_seeds(seeds[n])} there)")

    matched = matched_compute(records, init)
    ahead = sum(row["random"] > row[init] for row in matched)
    where = ("there is no run of random init at its compute" if not matched else
             "random init is ahead at every point measured" if ahead == len(matched) else
             f"{name} is ahead at every point measured" if ahead == 0 else
             f"random init is ahead at {ahead} of {len(matched)} points measured")
    own = sorted({r["finetune_iters"] for r in records if r["init"] == "random"})
    done = converged_length(records, min_gain)
    if done or len(own) < 2:
        state = f"random init converged at {done} iterations (under {min_gain:g} AP gained)" if done else "one length only"
    else:
        gain, both = paired_gain(records, "random", own[-2], own[-1])
        if not both:
            state = f"not known to have converged: no seed of random init ran both {own[-2]} and {own[-1]} iterations"
        else:
            state = (f"not converged: random init still gained {gain:.1f} AP from {own[-2]} to {own[-1]} iterations"
                     + (f" ({n_seeds(both)} run at both)" if both < max(seeds.values()) else ""))
    ends = [n for n in dict.fromkeys((well, last)) if n != first]
    goes = (f"goes from {lead(first)} to " + ", and ".join(lead(n) for n in ends) if ends
            else f"is {lead(first)}")
    return f"On the same fine-tuning, {name}'s lead over random init {goes}; at matched total compute {where}; {state}."


def reduce(records: list[dict]) -> list[dict]:
    """What :data:`MEASURED` keeps of ``benchmarks/convergence.py``'s records (each with its
    legend, ``label``): :data:`KEYS` and the four AP metrics."""
    return [{**{k: r[k] for k in KEYS}, "detection": {m: r["detection"][m] for m in ("AP", "APr", "APc", "APf")}}
            for r in records]


def load_measured() -> list[dict]:
    return json.loads(MEASURED.read_text())["records"]


def plot_curves(records: list[dict], path: Path, axis: str, marks: list[dict] | None = None,
                title: str = "") -> Path:
    """AP and APr against fine-tuning iterations (``axis="iters"``) or total counted compute
    (``"flops"``): one line per init in the order the records name them (mean over seeds, band
    min-max; one length: error bars). ``marks`` (``label``, ``x``, ``AP`` and ``APr`` in points
    or None, ``init``: its line's colour) are single runs drawn as stars on top."""
    from drcl.data.stats import pyplot

    plt = pyplot("the convergence figures")
    inits = list(dict.fromkeys(r["init"] for r in records))
    labels = {r["init"]: r["label"] for r in records}
    scale = 1.0 if axis == "iters" else 1e-12
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    for ax, metric in zip(axes, ("AP", "APr")):
        for init in inits:
            points = curve(records, init, metric, axis)
            if not points:
                continue
            xs = [p["x"] * scale for p in points]
            means, lo, hi = [p["mean"] for p in points], [p["lo"] for p in points], [p["hi"] for p in points]
            color = f"C{inits.index(init)}"
            if len(points) > 1:
                ax.plot(xs, means, marker="o", ms=3, color=color, label=labels[init])
                ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
            else:
                ax.errorbar(xs, means, yerr=[[m - a for m, a in zip(means, lo)], [b - m for m, b in zip(means, hi)]],
                            fmt="D", capsize=3, color=color, label=labels[init])
        for mark in marks or []:
            if mark[metric] is None:  # a group the val set lacks
                continue
            color = f"C{inits.index(mark['init'])}" if mark["init"] in inits else "black"
            ax.plot([mark["x"] * scale], [mark[metric]], marker="*", ms=13, color=color, mec="black",
                    mew=0.6, linestyle="none", label=mark["label"])
        ax.set_xscale("log")
        if axis == "iters":
            lengths = sorted({r["finetune_iters"] for r in records})
            ax.set_xticks(lengths, [str(n) for n in lengths])
            ax.set_xticks([], minor=True)
            ax.set_xlabel("fine-tuning iterations (batch 4, each its own schedule)")
        else:
            ax.set_xlabel("total training compute, TFLOP counted (pre-training + fine-tuning)")
        ax.set_ylabel(f"bbox {metric} (LVIS rules, %)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    seeds = sorted({p["seeds"] for init in inits for p in curve(records, init, "AP")})
    seeds = f"{seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else str(seeds[0])
    fig.suptitle(title or f"Fine-tuning to convergence: mean over {seeds} seed(s) per point, band min-max",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
