"""``benchmarks/convergence.py`` (issue 28): the stop rule, the curves and the table on
hand-written records, then the ``--smoke`` run end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import convergence  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)
from drcl.evaluation.curves import curve  # noqa: E402

LENGTHS = [220, 440, 880, 1760, 3520]
STEP_2DRCL, STEP_FT = 86e9, 43e9  # counted FLOPs of one step, about the tiny preset's


def record(init, seed, length, ap, apr=None, pretrain_iters=0, pretrain_flops=0.0):
    return {"init": init, "seed": seed, "finetune_iters": length, "pretrain_iters": pretrain_iters,
            "pretrain_flops": pretrain_flops, "finetune_flops": length * STEP_FT,
            "detection": {"AP": ap, "APr": ap / 2 if apr is None else apr, "APc": ap, "APf": ap}}


def walk(curve_ap, lengths=LENGTHS, until_converged=True, max_length=14080):
    """The lengths run_grid runs when random init's AP (points, one seed) at each length is ``curve_ap``."""
    done = []
    while (n := convergence.next_length(lengths, done, [record("random", 0, k, curve_ap[k] / 100) for k in done],
                                        until_converged, max_length)) is not None:
        done.append(n)
    return done


def converged(curve_ap, **kw):
    return convergence.converged_length([record("random", 0, n, ap / 100) for n, ap in curve_ap.items()], **kw)


def test_stop_rule_stops_at_the_first_length_gaining_under_one_ap():
    # random init gains 5, 3, then 0.5 AP: the 1,760 run is the converged one, 3,520 is not run
    curve_ap = {220: 10.0, 440: 15.0, 880: 18.0, 1760: 18.5, 3520: 18.7}
    assert walk(curve_ap) == [220, 440, 880, 1760]
    assert converged({n: curve_ap[n] for n in (220, 440, 880, 1760)}) == 1760
    assert converged({n: curve_ap[n] for n in (220, 440, 880)}) is None
    assert walk(curve_ap, until_converged=False) == LENGTHS  # the rule is off: every length
    # a gain of exactly 1 AP is not under 1: go on; the list runs out, so double, up to --max-length
    rising = {220 * 2 ** k: 10.0 + k for k in range(8)}
    assert walk(rising, lengths=[220, 440], max_length=3520) == [220, 440, 880, 1760, 3520]
    assert converged({220: 10.0, 440: 10.99}) == 440
    assert converged({220: 10.0, 440: 10.5}, min_gain=0.4) is None


def test_stop_rule_pairs_the_seeds():
    # seeds 0 and 1 at 1,760, only seed 0 at 3,520: seed 0 gains 3 AP, so not converged, though
    # the means over the seeds run at each length read 23.0 at both
    records = [record("random", 0, 1760, 0.20), record("random", 1, 1760, 0.26), record("random", 0, 3520, 0.23)]
    assert convergence.converged_length(records) is None
    assert convergence.converged_length(records, min_gain=3.5) == 3520
    # no seed run at both lengths: the gain is unknown, so not converged
    assert convergence.converged_length([record("random", 0, 1760, 0.2), record("random", 1, 3520, 0.2)]) is None
    assert convergence.converged_length([record("drcl_short", 0, n, 0.2) for n in (220, 440)]) is None


def test_curve_is_the_seed_mean_with_its_min_max_band():
    records = [record("drcl_short", s, 220, ap, pretrain_iters=300, pretrain_flops=300 * STEP_2DRCL)
               for s, ap in enumerate((0.10, 0.12, 0.17))]
    records.append(record("drcl_short", 3, 220, 0.11, apr=-1.0, pretrain_iters=300, pretrain_flops=300 * STEP_2DRCL))
    (p,) = curve(records[:3], "drcl_short", "AP")
    assert (p["x"], p["seeds"]) == (220, 3)
    assert p["mean"] == pytest.approx(13.0) and (p["lo"], p["hi"]) == pytest.approx((10.0, 17.0))
    assert p["std"] == pytest.approx(3.6056, abs=1e-4)  # sample std over seeds, as the table's ±
    (p,) = curve(records, "drcl_short", "APr")  # -1: the val set lacks the group
    assert p["seeds"] == 3 and p["mean"] == pytest.approx(6.5)
    assert curve(records, "random", "AP") == []


def test_flops_axis_adds_the_pre_training_to_the_fine_tuning():
    records = [record("random", s, n, 0.1) for s in (0, 1) for n in (220, 440)]
    records += [record("drcl_long", s, n, 0.1, pretrain_iters=1000, pretrain_flops=(1000 + s) * STEP_2DRCL)
                for s in (0, 1) for n in (220, 440)]
    assert [p["x"] for p in curve(records, "random", "AP", "flops")] == [220 * STEP_FT, 440 * STEP_FT]
    drcl = curve(records, "drcl_long", "AP", "flops")
    assert [p["x"] for p in drcl] == pytest.approx([1000.5 * STEP_2DRCL + n * STEP_FT for n in (220, 440)])
    assert [p["x"] for p in curve(records, "drcl_long", "AP")] == [220, 440]


def test_table_is_at_the_longest_length_every_seed_ran(tmp_path):
    records = [record("random", s, n, ap) for s in (0, 1, 2) for n, ap in ((880, 0.30), (1760, 0.305 + s / 100))]
    records += [record("drcl_short", s, n, ap, pretrain_iters=300, pretrain_flops=300 * STEP_2DRCL)
                for s, ap in enumerate((0.10, 0.12, 0.17)) for n in (880, 1760)]
    records.append(record("paper", 0, 1760, 0.2, pretrain_iters=1000, pretrain_flops=1000 * STEP_2DRCL))
    text = convergence.table(records)
    assert text.startswith("At 1760 fine-tuning iterations; mean ± std over seeds (one seed: its value)")
    assert "| random init | 0 | 3 | 31.5 ± 1.0 |" in text
    assert "| 2DRCL 300 | 300 | 3 | 13.0 ± 3.6 |" in text
    assert "| paper's form 1000" in text and "| 1 | 20.0 |" in text
    assert f"| {300 * STEP_2DRCL / 1e12:,.1f} | {(300 * STEP_2DRCL + 1760 * STEP_FT) / 1e12:,.1f} |" in text
    assert "+1.5 AP from 880 to 1760 iterations (3 seeds run at both); not converged yet." in text
    assert "converged (under 2 AP) at 1760." in convergence.table(records, min_gain=2.0)
    # 2DRCL is behind on the same schedule at both lengths: sharing its pre-training never pays
    assert "2DRCL 300: one pre-training pays (AP) when shared by at least k fine-tunings of the same length: " \
           "880: never (not ahead); 1760: never (not ahead)." in text
    # one seed run longer: the table stays at 1,760 and a second one follows at 3,520
    longer = records + [record("random", 0, 3520, 0.40)]
    text = convergence.table(longer)
    first, second = text.split("\n\nAt 3520 fine-tuning iterations (1 seed of random init);")
    assert first.startswith("At 1760 fine-tuning iterations;") and "| paper's form 1000" in first
    assert "| random init | 0 | 1 | 40.0 |" in second and "paper" not in second.split("\n\n")[0]
    assert "+9.5 AP from 1760 to 3520 iterations (1 seed run at both); not converged yet." in text
    # every seed of random init at 3,520: one table there, and one at 1,760 for the paper row,
    # run no longer
    longest = longer + [record("random", s, 3520, 0.41) for s in (1, 2)]
    first, second = convergence.table(longest).split("\n\nAt 3520 fine-tuning iterations;")
    assert first.startswith("At 1760 fine-tuning iterations (3 seeds of random init);") and "| paper's form" in first
    assert "| random init | 0 | 3 | 40.7 ± 0.6 |" in second and "paper" not in second.split("\n\n")[0]


def test_table_when_random_init_ran_shorter_or_not_at_all():
    # 2DRCL run one length past random init: a second table at that length, none of random init
    records = [record("random", 0, 220, 0.10), record("random", 0, 440, 0.20)]
    records += [record("drcl_short", 0, n, 0.3, pretrain_iters=300, pretrain_flops=1e12) for n in (440, 880)]
    text = convergence.table(records)
    assert "\n\nAt 880 fine-tuning iterations (random init not run there);" in text
    # no random init: the table is at the longest length run, with no break-even line
    alone = [r for r in records if r["init"] == "drcl_short"]
    text = convergence.table(alone)
    assert text.startswith("At 880 fine-tuning iterations;") and "one pre-training pays" not in text


def _break_even_records(init="drcl_short", pretrain_iters=300, pretrain_flops=28.2e12):
    # random init reaches 15 AP halfway (in log) from its 220 to its 440: at 9.46 * sqrt(2) TFLOP,
    # 3.92 more than the 220 fine-tuning's 9.46; k = 28.2 / 3.92 = 7.2, so 8 fine-tunings
    records = [record("random", 0, n, ap) for n, ap in ((220, 0.10), (440, 0.20), (880, 0.40))]
    return records + [record(init, 0, 220, 0.15, pretrain_iters=pretrain_iters, pretrain_flops=pretrain_flops)]


@pytest.mark.parametrize("init, name", [("drcl_short", "2DRCL 300"), ("drcl_long", "2DRCL 1000"),
                                        ("labels", "labels only (supervised 1000)")])
def test_table_has_a_break_even_line_per_pre_training_rounded_up(init, name):
    text = convergence.table(_break_even_records(init, 300 if init == "drcl_short" else 1000))
    assert f"{name}: one pre-training pays (AP) when shared by at least k fine-tunings of the same length: " \
           "220: k = 8." in text  # 7.2 shares do not pay; 8 do


def test_label_names_every_pre_training_length_of_the_init():
    # labels-only matches 2DRCL's FLOPs per seed, so its iterations differ between seeds
    records = [record("labels", s, 220, 0.1, pretrain_iters=it) for s, it in ((0, 3010), (1, 2990), (2, 3010))]
    records.append(record("drcl_short", 0, 220, 0.1, pretrain_iters=300))
    assert convergence.label("labels", records) == "labels only (supervised 2990/3010)"


def test_next_length_passes_min_gain_to_the_stop_rule():
    records = [record("random", 0, 220, 0.100), record("random", 0, 440, 0.115)]  # gains 1.5 AP
    assert convergence.next_length([220, 440, 880], [220, 440], records, True, 14080, min_gain=2.0) is None
    assert convergence.next_length([220, 440, 880], [220, 440], records, True, 14080) == 880


def test_table_rows_give_every_metric_and_the_seeds_mean_pre_training():
    def metrics(ap, apr):
        return {"AP": ap, "APr": apr, "APc": 0.3, "APf": 0.4}

    records = [{**record("random", s, 220, 0), "detection": metrics(ap, apr)} for s, ap, apr in ((0, .10, .05), (1, .12, .06))]
    records += [{**record("labels", s, 220, 0, pretrain_iters=1000, pretrain_flops=pre), "detection": metrics(.2, .1)}
                for s, pre in ((0, 20e12), (1, 30e12))]
    text = convergence.table(records)
    ft = 220 * STEP_FT / 1e12  # 9.46 TFLOP
    assert f"| random init | 0 | 2 | 11.0 ± 1.4 | 5.5 ± 0.7 | 30.0 ± 0.0 | 40.0 ± 0.0 | 0.0 | {ft:.1f} |" in text
    assert f"| labels only (supervised 1000) | 1000 | 2 | 20.0 ± 0.0 | 10.0 ± 0.0 | 30.0 ± 0.0 | 40.0 ± 0.0 " \
           f"| 25.0 | {25 + ft:.1f} |" in text


def test_table_without_random_init_marks_the_length_it_is_not_at():
    records = [record(init, 0, n, 0.2, pretrain_iters=300, pretrain_flops=1e12)
               for init, lengths in (("drcl_short", (220, 440)), ("drcl_long", (220,))) for n in lengths]
    first, second = convergence.table(records).split("\n\n", 1)
    assert first.startswith("At 220 fine-tuning iterations (random init not run there);")
    assert "At 440 fine-tuning iterations;" in second


def test_table_reports_the_first_length_random_init_converged_at():
    # seeds' mean gains: 5, 0.5, then 2: converged at 880, though the last step gained 2 AP
    records = [record("random", s, n, (ap + s) / 100) for s in (0, 1)
               for n, ap in ((220, 10), (440, 15), (880, 15.5), (1760, 17.5))]
    assert convergence.table(records).endswith(
        "Random init: +2.0 AP from 880 to 1760 iterations (2 seeds run at both); converged (under 1 AP) at 880.")


def test_break_even_k_of_exactly_four_is_four():
    # random init: 10 AP at 220 iterations, 20 at 440; 2DRCL reads 20 at 220 after a pre-training
    # worth 4 x (440 - 220) fine-tuning iterations: shared 4 ways it costs what random init needs
    records = [record("random", 0, 220, 0.10), record("random", 0, 440, 0.20)]
    records.append(record("drcl_short", 0, 220, 0.20, pretrain_iters=300, pretrain_flops=4 * 220 * STEP_FT))
    assert "fine-tunings of the same length: 220: k = 4." in convergence.table(records)


def test_a_rerun_with_a_new_seed_reads_the_stop_rule_from_the_lengths_it_walked(tmp_path, monkeypatch):
    """Seed 0 has converged at 440 from an earlier run; seed 1 is new: it must get its 220 and
    440 cells before the rule (over both seeds) stops the walk."""
    out = tmp_path / "out"
    for seed in (0, 1):
        convergence.write_json(out / f"random-seed{seed}" / "pretrain.json", {})

    def write(init, seed, length, ap):
        convergence.write_json(out / f"{init}-seed{seed}" / f"L{length}" / "record.json", record(init, seed, length, ap))

    write("random", 0, 220, 0.100)
    write("random", 0, 440, 0.105)
    ran = []

    def cell(init, seed, length, data, run, args):
        ran.append((init, seed, length))
        write(init, seed, length, 0.1)
        return record(init, seed, length, 0.1)

    monkeypatch.setattr(convergence.tg, "make_data", lambda *a: None)
    monkeypatch.setattr(convergence, "in_processes", lambda fn, calls, jobs, logs: (fn(*c) for c in calls))
    monkeypatch.setattr(convergence, "finetune_cell", cell)
    args = convergence.parse_args(["--out", str(out), "--inits", "random", "--seeds", "0", "1",
                                   "--lengths", "220", "440", "880", "--until-converged"])
    convergence.run_grid(args, out)
    assert ran == [("random", 1, 220), ("random", 1, 440)]


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
    """Toy sizes, the inits whose starts differ in kind (the 2DRCL-from-upstream ones combine
    two of them): one run, its records, figures and table, its FLOPs, and a rerun that skips."""
    out = tmp_path / "out"
    inits = ["random", "drcl_short", "upstream", "labels", "paper"]
    argv = ["--smoke", "--out", str(out), "--inits", *inits]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "convergence.py"), *argv], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    records = {(r["init"], r["finetune_iters"]): r for r in convergence.load_records(out)}
    short, long = convergence.SMOKE["pretrain_iters"]
    assert set(records) == {(i, n) for i in inits if i != "paper" for n in (1, 2)} | {("paper", 2)}
    for r in records.values():
        assert r["seed"] == 0 and r["finetune_flops"] == r["finetune_iters"] * r["finetune_flops_per_iter"] > 0
        assert set(convergence.METRICS) <= set(r["detection"])
        assert r["pretrain_flops"] == sum(r["pretrain_flops_parts"].values())
    for n in (1, 2):
        random, drcl = records["random", n], records["drcl_short", n]
        assert random["pretrain_flops"] == 0 and random["weights"] is None
        assert drcl["pretrain_iters"] == short and drcl["pretrain_flops"] > 0
        # same fine-tuning length: the pre-trained cell costs its pre-training more
        assert convergence.total_flops(drcl) - convergence.total_flops(random) == pytest.approx(
            drcl["pretrain_flops"], rel=0.01)
    up = records["upstream", 2]
    assert up["weights"].endswith("classifier.pt") and set(up["pretrain_flops_parts"]) == {"upstream"}
    labels = records["labels", 2]  # as many counted FLOPs as 2DRCL's LONG pre-training, to one step
    target = labels["matched_to"]["2drcl_iters"] * labels["matched_to"]["2drcl_flops_per_iter"]
    assert labels["matched_to"]["2drcl_iters"] == long and labels["pretrain_iters"] > long
    step = labels["pretrain_flops"] / labels["pretrain_iters"]
    assert target <= labels["pretrain_flops"] < target + step
    paper = records["paper", 2]
    assert set(paper["pretrain_flops_parts"]) == {"proposals", "pretrain"} and paper["pretrain_iters"] == long
    assert "proposals" in paper

    table = (out / "table.md").read_text()
    assert table.startswith("At 2 fine-tuning iterations") and "converged (under 1 AP) at 2." in table
    for name in ("random init", f"2DRCL {short}", "upstream stand-in", "labels only", "paper's form"):
        assert f"| {name}" in table, name
    figures = [out / "ap_vs_iters.png", out / "ap_vs_flops.png"]
    assert all(p.stat().st_size > 10_000 for p in figures)
    assert len(json.loads((out / "results.json").read_text())) == len(records)

    # a rerun finds everything finished and trains nothing; the report is made again from the records
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*-seed0/**/*.json")}
    for p in figures + [out / "table.md"]:
        p.unlink()
    args = convergence.parse_args(argv)
    convergence.run_grid(args, out)
    convergence.report(out, args.min_gain)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*-seed0/**/*.json")} == stamps
    assert all(p.exists() for p in figures) and (out / "table.md").read_text() == table


class _Killed(Exception):
    """Stands for the process dying right after a checkpoint was written."""


def test_an_interrupted_cell_goes_on_from_its_last_checkpoint_and_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):
    """A 3,520-iteration cell is an hour here and more than one sitting's worth on a shared
    machine: a rerun must continue it exactly, not start it over or restart its schedule."""
    import drcl.engine.trainer as trainer

    args = convergence.parse_args(["--smoke", "--out", str(tmp_path), "--checkpoint-every", "2"])
    data = tmp_path / "data"
    convergence.tg.make_data(data, args, 0)
    runs = {name: tmp_path / name for name in ("whole", "cut")}
    for run in runs.values():
        convergence.pretrain_init("random", 0, data, run, args)
    whole = convergence.finetune_cell("random", 0, 4, data, runs["whole"], args)

    save = trainer.save_checkpoint

    def save_then_die(obj, path):
        save(obj, path)
        raise _Killed

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        convergence.finetune_cell("random", 0, 4, data, runs["cut"], args)
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    cut = convergence.finetune_cell("random", 0, 4, data, runs["cut"], args)

    assert whole["resumed_from"] is None and cut["resumed_from"] == 2
    assert cut["finetune_iters"] == whole["finetune_iters"] == 4
    assert cut["detection"] == whole["detection"]

    def read(run, name):
        return [json.loads(line) for line in (run / "L4" / "finetune" / name).read_text().splitlines()]

    # the same weights at the end: the same detections, scores and boxes included
    # (tests/test_finetune.py compares the weights and every step's loss of drcl finetune --resume)
    detections = [json.loads((run / "L4" / "finetune" / "eval" / "detections.json").read_text())
                  for run in runs.values()]
    a, b = (np.array([(d["image_id"], d["category_id"], d["score"], *d["bbox"]) for d in dets]) for dets in detections)
    assert len(a) > 0 and a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    iters = {name: [r["iter"] for r in read(run, "metrics.jsonl")] for name, run in runs.items()}
    assert iters["cut"] == iters["whole"]
    assert not (runs["cut"] / "L4" / "finetune" / "checkpoints").exists()  # ~100 MB a cell, deleted once scored


def test_the_curves_drcl_demo_draws_are_the_committed_records():
    """src/drcl/evaluation/convergence.json is OUT/curves.json of the run whose records are
    committed under benchmarks/results/: new records committed without it fail here."""
    from drcl.evaluation.curves import MEASURED, reduce

    shipped = json.loads(MEASURED.read_text())
    committed = json.loads((ROOT / shipped["source"]).read_text())
    assert shipped["records"] == reduce(convergence.labelled(committed))


def test_table_says_when_no_seed_of_random_init_ran_its_last_two_lengths():
    """Catches "Random init: +nan AP" when the last two lengths share no seed."""
    records = [record("random", 0, 220, 0.1), record("random", 0, 440, 0.2), record("random", 1, 880, 0.3)]
    assert convergence.table(records).endswith("Random init: no seed run at both 440 and 880 iterations; "
                                               "not converged yet.")
