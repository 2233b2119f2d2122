"""The convergence curves' arithmetic on hand-written records: compute read off a curve in
log-compute, the matched-compute comparison and the sentence the demo and README quote."""

import math

import matplotlib.figure
import pytest

from drcl.evaluation.curves import (
    at_compute,
    break_even_shares,
    compute_for,
    converged_length,
    curve,
    load_measured,
    matched_compute,
    n_seeds,
    paired,
    paired_gain,
    plot_curves,
    seeds_run,
    summary,
)

FT, PRE = 40e9, 25e12  # one fine-tuning step; one pre-training's counted FLOPs


def rec(init, seed, length, ap, apr, pre=0.0):
    return {"init": init, "label": {"random": "random init", "drcl_short": "2DRCL 300"}[init], "seed": seed,
            "pretrain_iters": 300 if pre else 0, "finetune_iters": length, "pretrain_flops": pre,
            "finetune_flops": length * FT, "detection": {"AP": ap / 100, "APr": apr / 100, "APc": 0.0, "APf": 0.0}}


def test_at_compute_is_linear_in_log_compute_and_none_outside():
    points = [{"x": 1e12, "mean": 10.0}, {"x": 4e12, "mean": 30.0}, {"x": 16e12, "mean": 40.0}]
    assert at_compute(points, 2e12) == pytest.approx(20.0)  # halfway in log between 1 and 4
    x = 8e12
    assert at_compute(points, x) == pytest.approx(30 + 10 * math.log(x / 4e12) / math.log(4))
    assert at_compute(points, 4e12) == pytest.approx(30.0)
    assert at_compute(points, 0.5e12) is None and at_compute(points, 17e12) is None


def test_matched_compute_reads_random_init_at_the_pre_trained_runs_total():
    records = [rec("random", 0, n, ap, ap / 2) for n, ap in ((200, 10), (400, 20), (800, 40), (1600, 50))]
    records += [rec("drcl_short", 0, n, ap, ap / 2, pre=PRE) for n, ap in ((200, 15), (400, 25), (1600, 52))]
    rows = matched_compute(records, "drcl_short")
    # 2DRCL at 200 iterations cost 25 + 8 = 33 TFLOP: between random init's 800 (32) and 1,600 (64)
    assert [r["x"] for r in rows] == [PRE + 200 * FT, PRE + 400 * FT]  # 1,600 + pre-training is past 64
    t = math.log(33 / 32) / math.log(2)
    assert rows[0]["random"] == pytest.approx(40 + 10 * t) and rows[0]["drcl_short"] == 15


def test_summary_states_the_lead_the_matched_compute_side_and_convergence():
    records = [rec("random", s, n, ap + s, ap / 2) for s in (0, 1)
               for n, ap in ((200, 10), (400, 20), (800, 40), (1600, 60))]
    records += [rec("drcl_short", s, n, ap + s, ap / 2 + 3, pre=PRE) for s in (0, 1)
                for n, ap in ((200, 15), (400, 24), (800, 41))]
    text = summary(records)
    assert text.startswith("On the same fine-tuning, 2DRCL 300's lead over random init goes from +5.0 AP, APr +5.5 "
                           "at 200 iterations to +1.0 AP, APr +3.5 at 800 (2 seeds there);")
    assert "random init is ahead at every point measured" in text
    assert text.endswith("not converged: random init still gained 20.0 AP from 800 to 1600 iterations.")
    records += [rec("random", s, 3200, 60.5 + s, 20) for s in (0, 1)]
    assert "random init converged at 3200 iterations (under 1 AP gained)" in summary(records)
    assert "no run of random init at its compute" in summary([r for r in records if r["finetune_iters"] <= 800])


def test_paired_gain_is_the_mean_of_each_seeds_own_difference():
    # seed 1 only at 800: the means of the two lengths would read 41 - 15 = 26; seed 0 gained 20
    records = [rec("random", 0, 400, 20, 0), rec("random", 1, 400, 10, 0), rec("random", 0, 800, 40, 0),
               rec("random", 2, 800, 60, 0), rec("drcl_short", 0, 400, 99, 0, pre=PRE)]
    assert paired_gain(records, "random", 400, 800) == (pytest.approx(20.0), 1)
    records.append(rec("random", 1, 800, 16, 0))
    assert paired_gain(records, "random", 400, 800) == (pytest.approx((20 + 6) / 2), 2)
    assert paired_gain(records, "random", 400, 800, "APr") == (0.0, 2)
    gain, seeds = paired_gain(records, "random", 200, 800)
    assert seeds == 0 and math.isnan(gain)


def test_summary_quotes_the_longest_length_every_seed_ran_and_the_longest_apart():
    """As in the measured grid: two seeds to 1,600 iterations, one at 3,200. A lead that rounds
    to nothing prints as +0.0, and random init's last gain is seed 0's alone (the means would
    read 72 - 60.5 = 11.5)."""
    records = [rec("random", s, n, ap + s, ap / 2) for s in (0, 1) for n, ap in ((200, 10), (1600, 60))]
    records += [rec("drcl_short", s, n, ap + s, ap / 2 + 1, pre=PRE) for s in (0, 1)
                for n, ap in ((200, 15), (1600, 59.96))]
    records += [rec("random", 0, 3200, 72, 50), rec("drcl_short", 0, 3200, 73, 52, pre=PRE)]
    text = summary(records)
    assert text.startswith("On the same fine-tuning, 2DRCL 300's lead over random init goes from +5.0 AP, APr +3.5 "
                           "at 200 iterations to +0.0 AP, APr +1.0 at 1600 (2 seeds there), and +1.0 AP, APr +2.0 "
                           "at 3200 (1 seed there);"), text
    assert text.endswith("random init still gained 12.0 AP from 1600 to 3200 iterations (1 seed run at both)."), text


def test_summary_says_when_the_pre_trained_runs_are_ahead_at_matched_compute():
    records = [rec("random", 0, n, ap, 1) for n, ap in ((200, 10), (400, 12), (800, 14), (1600, 60))]
    records += [rec("drcl_short", 0, n, ap, 2, pre=PRE) for n, ap in ((200, 30), (400, 35))]
    assert "2DRCL 300 is ahead at every point measured" in summary(records)


def test_the_shipped_records_make_both_curves():
    records = load_measured()
    for init in ("random", "drcl_short"):
        points = curve(records, init, "AP", "flops")
        assert len(points) >= 2 and all(a["x"] < b["x"] for a, b in zip(points, points[1:]))


def test_break_even_shares_is_the_pre_training_over_the_compute_random_init_needs_more():
    records = [rec("random", 0, n, ap, ap / 2) for n, ap in ((200, 10), (400, 20), (800, 40))]
    records += [rec("drcl_short", 0, n, ap, 1, pre=PRE) for n, ap in ((200, 15), (400, 20), (800, 45))]
    rows = {r["length"]: r for r in break_even_shares(records, "drcl_short")}
    # at 200 random init reaches 15 AP halfway (in log) from 8 to 16 TFLOP: 8 * sqrt(2)
    assert compute_for(curve(records, "random", "AP", "flops"), 15) == pytest.approx(8e12 * 2 ** 0.5)
    assert rows[200]["lead"] == pytest.approx(5) and rows[200]["shares"] == pytest.approx(PRE / (8e12 * (2 ** 0.5 - 1)))
    assert rows[400]["shares"] == math.inf  # not ahead on the same schedule: no sharing pays
    assert rows[800]["shares"] is None  # 45 AP is past every random-init run measured


def test_converged_length_steps_over_random_inits_own_lengths_only():
    # another init's 400 between random init's 200 and 800 must not split random's step in two
    # steps that no seed ran at both ends of (it would never converge)
    records = [rec("random", 0, 200, 10, 5), rec("random", 0, 800, 10.5, 5), rec("drcl_short", 0, 400, 30, 5, pre=PRE)]
    assert converged_length(records) == 800


def test_seeds_run_counts_the_given_inits_seeds_at_their_own_lengths():
    records = [rec("random", 0, 200, 10, 5), rec("drcl_short", 0, 200, 10, 5, pre=PRE),
               rec("drcl_short", 1, 200, 10, 5, pre=PRE), rec("drcl_short", 0, 400, 10, 5, pre=PRE)]
    assert seeds_run(records) == {200: 1}
    assert seeds_run(records, ("random", "drcl_short")) == {200: 2, 400: 1}
    assert [n_seeds(n) for n in (0, 1, 2)] == ["0 seeds", "1 seed", "2 seeds"]


def test_curve_keeps_a_metric_of_zero_and_drops_a_missing_group():
    # APr is often exactly 0.0 at this scale: a measurement; -1 is a val set without the group
    records = [rec("random", 0, 200, 0.0, -100), rec("random", 1, 200, 10, 0.0)]
    (ap,) = curve(records, "random", "AP")
    assert (ap["seeds"], ap["mean"], ap["lo"]) == (2, pytest.approx(5.0), 0.0)
    (apr,) = curve(records, "random", "APr")
    assert (apr["seeds"], apr["mean"]) == (1, 0.0)


def test_paired_takes_each_seeds_own_difference_between_two_runs():
    records = [rec("random", 0, 800, 40, 20), rec("random", 1, 800, 50, -100), rec("random", 2, 800, 60, 30),
               rec("drcl_short", 0, 800, 45, 30, pre=PRE), rec("drcl_short", 1, 800, 51, 10, pre=PRE)]
    # seed 2 ran random init only; seed 1's val set lacks rare classes (APr -1)
    assert paired(records, ("drcl_short", 800), ("random", 800)) == (pytest.approx(3.0), 2)
    assert paired(records, ("drcl_short", 800), ("random", 800), "APr") == (pytest.approx(10.0), 1)


def test_summary_pairs_the_lead_over_the_seeds_both_inits_ran():
    # three seeds of random init at 1,600, one of 2DRCL: the lead is seed 0's, not 2DRCL's
    # seed 0 against random init's mean (which would read 61 - 62 = -1.0), and says 1 seed
    records = [rec("random", s, n, ap + 2 * s, 5) for s in (0, 1, 2) for n, ap in ((200, 10), (1600, 60))]
    records += [rec("drcl_short", s, 200, 15 + 2 * s, 6, pre=PRE) for s in (0, 1, 2)]
    records.append(rec("drcl_short", 0, 1600, 61, 6, pre=PRE))
    assert summary(records).startswith("On the same fine-tuning, 2DRCL 300's lead over random init goes from "
                                       "+5.0 AP, APr +1.0 at 200 iterations to +1.0 AP, APr +1.0 at 1600 "
                                       "(1 seed there);")
    # a seed of 2DRCL's alone at a length random init never ran changes nothing
    assert summary(records + [rec("drcl_short", 3, 3200, 70, 6, pre=PRE)]) == summary(records)
    only = [r for r in records if r["finetune_iters"] == 200]
    assert summary(only).startswith("On the same fine-tuning, 2DRCL 300's lead over random init is "
                                    "+5.0 AP, APr +1.0 at 200 iterations;")
    no_rare = [{**r, "detection": {**r["detection"], "APr": -1.0}} for r in only]  # val set without rare classes
    assert summary(no_rare).startswith("On the same fine-tuning, 2DRCL 300's lead over random init is "
                                       "+5.0 AP at 200 iterations;")


def test_summary_does_not_count_a_tie_at_matched_compute_as_random_ahead():
    pre = 8e12  # 2DRCL at 200 costs 16 TFLOP (random init's 400), at 600 32 TFLOP (its 800)
    records = [rec("random", 0, n, ap, 1) for n, ap in ((200, 10), (400, 20), (800, 40))]
    records += [rec("drcl_short", 0, n, ap, 1, pre=pre) for n, ap in ((200, 20), (600, 30))]
    assert "random init is ahead at 1 of 2 points measured" in summary(records)


def test_summary_passes_min_gain_to_the_stop_rule():
    records = [rec("random", 0, n, ap, 1) for n, ap in ((200, 10), (400, 11.5))]
    records += [rec("drcl_short", 0, n, ap, 1, pre=PRE) for n, ap in ((200, 12), (400, 13))]
    assert "random init converged at 400 iterations (under 2 AP gained)" in summary(records, min_gain=2.0)
    assert "not converged: random init still gained 1.5 AP from 200 to 400" in summary(records)


def test_converged_length_is_the_first_step_under_min_gain_and_a_drop_is_one():
    # 200 -> 400 gains 0.5, 400 -> 800 0.2: converged at 400, the first small step, not the last
    assert converged_length([rec("random", 0, n, ap, 1) for n, ap in ((200, 10), (400, 10.5), (800, 10.7))]) == 400
    # a drop of 2 AP is a gain under 1: the curve has stopped rising
    assert converged_length([rec("random", 0, n, ap, 1) for n, ap in ((200, 10), (400, 20), (800, 18))]) == 800


def test_one_random_init_run_is_read_only_at_its_own_compute():
    records = [rec("random", 0, 200, 10, 5), rec("drcl_short", 0, 200, 8, 4, pre=PRE)]
    # the same fine-tuning compute (8 TFLOP) as random init's one run: 2DRCL is 2 AP behind, no sharing pays
    assert break_even_shares(records, "drcl_short") == [{"length": 200, "lead": -2.0, "shares": math.inf}]
    # at 2DRCL's total (33 and 41 TFLOP) there is no random-init run to read
    records.append(rec("drcl_short", 0, 400, 12, 6, pre=PRE))
    assert matched_compute(records, "drcl_short") == []
    assert "at matched total compute there is no run of random init at its compute" in summary(records)


def test_compute_for_reads_the_first_rising_segment_that_reaches_the_value():
    # the curve passes 17 AP twice: rising from 10 to 20 (1 -> 4 TFLOP) and again from 15 to 25
    points = [{"x": x * 1e12, "mean": m} for x, m in ((1, 10.0), (4, 20.0), (16, 15.0), (64, 25.0))]
    assert compute_for(points, 17) == pytest.approx(1e12 * 4 ** 0.7)  # 70 % of the way, in log
    assert compute_for(points, 10) == pytest.approx(1e12) and compute_for(points, 26) is None


def test_break_even_shares_uses_the_seeds_mean_pre_training_and_fine_tuning():
    # labels-only matches FLOPs per seed, so seeds' pre-trainings differ; so may the fine-tunings
    records = [rec("random", 0, n, ap, 1) for n, ap in ((200, 10), (400, 20), (800, 40))]
    records += [rec("drcl_short", s, 200, 15, 1, pre=pre) for s, pre in ((0, 20e12), (1, 30e12))]
    records[-1]["finetune_flops"] *= 1.1  # mean F: 8.4 TFLOP
    (row,) = break_even_shares(records, "drcl_short")
    # random init: 10 AP at 8 TFLOP, 20 at 16, so it reaches 15 at 8 * sqrt(2) and reads
    # 10 + 10 log2(8.4 / 8) at F
    assert row["lead"] == pytest.approx(5 - 10 * math.log2(8.4 / 8))
    assert row["shares"] == pytest.approx(25e12 / (8e12 * 2 ** 0.5 - 8.4e12))


def test_summary_starts_at_the_shortest_length_both_inits_ran():
    # 2DRCL also ran 100 iterations, random init did not: the lead starts at 200
    records = [rec("random", 0, n, ap, ap / 2) for n, ap in ((200, 10), (400, 20))]
    records += [rec("drcl_short", 0, n, ap, ap / 2, pre=PRE) for n, ap in ((100, 12), (200, 15), (400, 22))]
    assert summary(records).startswith("On the same fine-tuning, 2DRCL 300's lead over random init goes from "
                                       "+5.0 AP, APr +2.5 at 200 iterations to +2.0 AP, APr +1.0 at 400 "
                                       "(1 seed there);")


def test_curve_band_is_the_min_and_max_whatever_the_seeds_order():
    """Catches a band read off the first or last seed instead of the lowest and highest."""
    records = [rec("random", s, 200, ap, 1) for s, ap in ((0, 12), (1, 9), (2, 15), (3, 10))]
    (p,) = curve(records, "random", "AP")
    assert (p["lo"], p["hi"]) == pytest.approx((9.0, 15.0))


def test_curve_skips_a_length_without_the_metric_and_keeps_the_longer_ones():
    """Catches a curve that stops at the first length whose val sets all lack the group."""
    records = [rec("random", 0, 200, 10, 5), rec("random", 0, 400, 20, -100), rec("random", 0, 800, 30, 15)]
    assert [(p["x"], p["mean"]) for p in curve(records, "random", "APr")] == [(200, 5.0), (800, 15.0)]


def test_compute_for_passes_over_a_flat_segment_at_the_value():
    """Catches a flat segment (a 0 / 0 step) being read instead of skipped for the rising one after it."""
    points = [{"x": x * 1e12, "mean": m} for x, m in ((1, 20.0), (2, 20.0), (4, 30.0))]
    assert compute_for(points, 20) == pytest.approx(2e12)  # the first rising segment starts at 2 TFLOP


def test_break_even_shares_reads_the_metric_asked_for_on_both_curves():
    """Catches the pre-trained init's points read in AP when another metric is asked for."""
    records = [rec("random", 0, n, ap, ap / 2) for n, ap in ((200, 10), (400, 20), (800, 40))]
    records.append(rec("drcl_short", 0, 200, 12, 7.5, pre=PRE))
    (row,) = break_even_shares(records, "drcl_short", "APr")
    # random init's APr: 5 at 8 TFLOP, 10 at 16; 7.5 is halfway in log: 8 * sqrt(2)
    assert row["lead"] == pytest.approx(2.5)
    assert row["shares"] == pytest.approx(PRE / (8e12 * (2 ** 0.5 - 1)))


def test_summary_counts_the_points_random_init_is_ahead_at():
    """Catches the count of matched-compute points random init leads at swapped with the ones it trails."""
    pre = 8e12  # 2DRCL at 200, 600 and 1,400 costs 16, 32 and 64 TFLOP: random init's 400, 800 and 1,600
    records = [rec("random", 0, n, ap, 1) for n, ap in ((200, 10), (400, 20), (800, 40), (1600, 50))]
    records += [rec("drcl_short", 0, n, ap, 1, pre=pre) for n, ap in ((200, 25), (600, 45), (1400, 45))]
    assert "at matched total compute random init is ahead at 1 of 3 points measured;" in summary(records)


def test_summary_counts_the_seeds_of_the_ap_lead_where_a_seed_lacks_rare_classes():
    """Catches "(n seeds there)" counting the seeds with APr instead of those the AP lead is over."""
    records = [rec("random", s, n, ap + s, 5) for s in (0, 1) for n, ap in ((200, 10), (800, 40))]
    records += [rec("drcl_short", s, n, ap + s, 6, pre=PRE) for s in (0, 1) for n, ap in ((200, 15), (800, 41))]
    records[-1]["detection"]["APr"] = -1.0  # seed 1's val set at 800 lacks rare classes
    assert summary(records).startswith("On the same fine-tuning, 2DRCL 300's lead over random init goes from "
                                       "+5.0 AP, APr +1.0 at 200 iterations to +1.0 AP, APr +1.0 at 800 "
                                       "(2 seeds there);")


def test_plot_curves_title_gives_the_range_of_seeds_and_the_band_spans_min_to_max(tmp_path, monkeypatch):
    """Catches a title naming only the most seeds per point, and a band drawn from the mean."""
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    records = [rec("random", s, 200, 10 + 2 * s, 5) for s in (0, 1)] + [rec("random", 0, 400, 20, 5)]
    plot_curves(records, tmp_path / "curves.png", "iters")
    (fig,) = saved
    assert "mean over 1-2 seed(s) per point, band min-max" in " ".join(t.get_text() for t in fig.texts)
    (band,) = fig.axes[0].collections
    assert {round(float(y), 6) for y in band.get_paths()[0].vertices[:, 1]} == {10.0, 12.0, 20.0}


def test_break_even_shares_is_never_when_random_init_reached_the_value_for_less_and_dipped():
    """Catches a negative k ("k = -2") where random init's curve reached m(L) before F(L) and fell back."""
    records = [rec("random", 0, n, ap, 1) for n, ap in ((100, 10), (200, 20), (400, 10), (800, 30))]
    records.append(rec("drcl_short", 0, 400, 15, 1, pre=PRE))
    # random init is at 10 AP at 400 iterations (16 TFLOP) but had 15 at about 5.7 TFLOP
    (row,) = break_even_shares(records, "drcl_short")
    assert row["lead"] == pytest.approx(5.0) and row["shares"] == math.inf


def test_summary_says_when_no_seed_of_random_init_ran_its_last_two_lengths():
    """Catches "still gained nan AP" when random init's last two lengths share no seed."""
    records = [rec("random", 0, n, ap, 1) for n, ap in ((200, 10), (400, 20))] + [rec("random", 1, 800, 30, 1)]
    records += [rec("drcl_short", 0, n, ap, 1, pre=PRE) for n, ap in ((200, 15), (400, 22))]
    assert summary(records).endswith("; not known to have converged: no seed of random init ran both 400 and 800 "
                                     "iterations.")
