"""The demo report's pieces, without running the demo: the table's units and columns, the
smoothing of the fine-tuning loss, the sampling-share legend and the reconstruction caption."""

import json

import matplotlib.figure
import numpy as np
import pytest
import torch

from drcl.config import drcl_config, load_config
from drcl.data.synthetic import make_dataset
from drcl.demo import (
    RECONSTRUCTION_CAPTION,
    plot_convergence,
    plot_losses,
    plot_reconstructions,
    plot_sampling_share,
    results_table,
    smooth,
)
from drcl.engine.checkpoint import save_checkpoint
from drcl.evaluation.curves import load_measured, summary
from drcl.evaluation.lvis_eval import format_results


@pytest.fixture
def saved_figures(monkeypatch):
    """Every matplotlib figure saved while the test runs (it is closed, not gone)."""
    saved = []
    original = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        saved.append(fig)
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    return saved


# the demo's run as plot_convergence reads it: fine-tuning iterations, random init's extra ones, step FLOPs
INFO = {"ft_iters": 110, "extra": 200, "finetune_flops_per_iter": 40e9, "pretrain_flops_per_iter": 80e9}


def _result(ap):
    return {"AP": ap, "AP50": 0.4, "AP75": 0.125, "APs": -1.0, "APm": 0.2, "APl": 0.3, "APr": 0.05,
            "APc": 0.1, "APf": 0.25, "iou_type": "bbox"}


def test_results_table_is_in_fractions_with_every_evaluator_metric():
    base, drcl = _result(0.2), _result(0.2346)
    drcl["APr"] = 0.0712
    lines = results_table(drcl, base)
    assert "as fractions in [0, 1] like `drcl evaluate` prints them" in lines[0]
    header, _, random_row, drcl_row, diff_row = lines[2:]
    assert header == "| initialisation | AP | AP50 | AP75 | APs | APm | APl | APr | APc | APf |"
    assert random_row == "| random init, same compute | 0.200 | 0.400 | 0.125 | n/a | 0.200 | 0.300 | 0.050 | 0.100 | 0.250 |"
    assert drcl_row.split(" | ")[1] == "0.235" and drcl_row.split(" | ")[7] == "0.071"
    assert diff_row == "| difference | +0.035 | +0.000 | +0.000 | n/a | +0.000 | +0.000 | +0.021 | +0.000 | +0.000 |"
    # the same numbers, to the digit, as `drcl evaluate` prints for the same result
    assert format_results(base).splitlines()[1].split() == [
        c.strip().replace("n/a", "-") for c in random_row.split("|")[2:-1]]


def test_results_table_keeps_only_metrics_both_results_have():
    base, drcl = _result(0.2), _result(0.3)
    for r in (base, drcl):
        del r["APs"], r["APm"], r["APl"]
    del base["AP75"]
    assert results_table(drcl, base)[2] == "| initialisation | AP | AP50 | APr | APc | APf |"


def test_smooth_is_a_centred_moving_average():
    x = [1.0, 2.0, 4.0, 8.0, 16.0]
    # window 3: (1+2)/2, (1+2+4)/3, (2+4+8)/3, (4+8+16)/3, (8+16)/2
    assert smooth(x, 3) == pytest.approx([1.5, 7 / 3, 14 / 3, 28 / 3, 12.0])
    # window 5: ends average the 3 and 4 points that exist
    assert smooth(x, 5) == pytest.approx([7 / 3, 15 / 4, 31 / 5, 30 / 4, 28 / 3])
    assert smooth(x, 1) == pytest.approx(x) and smooth(x, 0) == pytest.approx(x)


def test_finetune_loss_panel_has_faint_raw_and_smoothed_lines(tmp_path, saved_figures):
    rng = np.random.default_rng(0)
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"iter": i, "lcl": 3.0, "lcl_chance": 4.0, "lcl_gap": 0.1, "ar": 0.5}) for i in (1, 2)))
    losses = {}
    for name in ("finetune-2drcl", "finetune-random"):
        (tmp_path / name).mkdir()
        losses[name] = list(np.exp(-np.arange(40) / 20) * (1 + 0.3 * rng.random(40)))
        (tmp_path / name / "metrics.jsonl").write_text(
            "\n".join(json.dumps({"iter": 10 * (i + 1), "loss": v}) for i, v in enumerate(losses[name])))
    plot_losses(tmp_path, tmp_path / "losses.png")
    ft = saved_figures[-1].axes[3]
    assert ft.get_yscale() == "log"
    raw, smoothed = ft.lines[0], ft.lines[1]
    assert raw.get_alpha() < 0.5 and smoothed.get_alpha() in (None, 1.0)
    assert list(raw.get_ydata()) == pytest.approx(losses["finetune-2drcl"])
    assert list(smoothed.get_ydata()) == pytest.approx(smooth(losses["finetune-2drcl"], 40 // 8))
    assert raw.get_color() == smoothed.get_color()
    assert [t.get_text() for t in ft.get_legend().get_texts()] == ["from 2DRCL", "from random init"]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-data")
    make_dataset(root, classes=6, train_images=30, val_images=4, image_size=64, imbalance=10, seed=0, progress=False)
    return root


def test_sampling_share_legend_names_the_dotted_lines(demo_data, tmp_path, saved_figures):
    cfg = load_config("tiny", [f"data.train_json={demo_data / 'annotations' / 'train.json'}"])
    plot_sampling_share(demo_data / "annotations" / "train.json", cfg, tmp_path / "share.png")
    ax = saved_figures[-1].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"rare (no rebalancing)", "common (no rebalancing)", "frequent (no rebalancing)"} <= set(labels)
    dotted = {line.get_label() for line in ax.lines if line.get_linestyle() == ":"}
    assert dotted == {"rare (no rebalancing)", "common (no rebalancing)", "frequent (no rebalancing)"}


def test_reconstruction_panel_has_its_caption(demo_data, tmp_path, saved_figures):
    cfg = load_config("tiny", ["data.image_size=64"])
    torch.manual_seed(0)
    from drcl.model.drcl import DRCL

    save_checkpoint({"config": cfg, "model": DRCL(drcl_config(cfg)).state_dict()},
                    tmp_path / "pretrain" / "checkpoints" / "last.pt")
    plot_reconstructions(tmp_path, demo_data, tmp_path / "rec.png", n=2)
    fig = saved_figures[-1]
    caption = " ".join(t.get_text() for t in fig.texts).replace("\n", " ")
    assert caption == RECONSTRUCTION_CAPTION and "good reconstruction" in caption
    # the caption sits below the images, not over them
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    text_top = fig.texts[0].get_window_extent(FigureCanvasAgg(fig).get_renderer()).y1
    assert all(ax.get_window_extent().y0 >= text_top for ax in fig.axes)


def test_convergence_figure_puts_the_demos_two_runs_at_their_own_compute_on_the_measured_curves(tmp_path,
                                                                                             saved_figures):
    drcl, base = _result(0.05), _result(0.12)
    drcl["APr"] = -1.0  # a group the val set lacks: no star
    text = plot_convergence(drcl, base, 60, INFO, tmp_path / "convergence.png")
    assert text == summary(load_measured())
    (fig,) = saved_figures
    for ax, metric in zip(fig.axes, ("AP", "APr")):
        lines = {line.get_label(): line for line in ax.lines}
        stars = {k: (v.get_xdata()[0], v.get_ydata()[0]) for k, v in lines.items() if v.get_marker() == "*"}
        want = {"this demo: random init": ((110 + 200) * 40e9 / 1e12, 100 * base[metric])}
        if metric == "AP":
            want["this demo: 2DRCL 60"] = ((60 * 80e9 + 110 * 40e9) / 1e12, 5.0)
        assert stars.keys() == want.keys()
        for k in want:
            assert stars[k] == pytest.approx(want[k])
        # each star has its curve's colour
        assert lines["this demo: random init"].get_color() == lines["random init"].get_color()
        assert lines["random init"].get_color() != lines["2DRCL 300"].get_color()
    assert lines_of(fig.axes[0], "this demo: 2DRCL 60").get_color() == lines_of(fig.axes[0], "2DRCL 300").get_color()


def lines_of(ax, label):
    return next(line for line in ax.lines if line.get_label() == label)


def test_convergence_figure_draws_a_star_for_a_metric_of_zero(tmp_path, saved_figures):
    """Catches a demo run's APr of exactly 0.0 (a measurement) being dropped like a missing group (-1)."""
    drcl, base = _result(0.05), _result(0.12)
    drcl["APr"] = 0.0
    plot_convergence(drcl, base, 60, INFO, tmp_path / "convergence.png")
    (fig,) = saved_figures
    star = lines_of(fig.axes[1], "this demo: 2DRCL 60")
    assert (star.get_xdata()[0], star.get_ydata()[0]) == pytest.approx(((60 * 80e9 + 110 * 40e9) / 1e12, 0.0))


def _convergence_record(init, length, ap, pre=0.0):
    return {"init": init, "label": {"random": "random init", "drcl_short": "2DRCL 300"}[init], "seed": 0,
            "pretrain_iters": 300 if pre else 0, "finetune_iters": length, "pretrain_flops": pre,
            "finetune_flops": length * 40e9, "detection": {"AP": ap / 100, "APr": 0.05, "APc": 0.0, "APf": 0.0}}


def test_convergence_sentence_reads_the_measured_records_with_the_1_ap_stop_rule(tmp_path, monkeypatch):
    """Catches the report's sentence being made with another stop rule or init than the curves' default."""
    records = [_convergence_record("random", n, ap) for n, ap in ((200, 10), (400, 11.5))]
    records += [_convergence_record("drcl_short", n, ap, pre=25e12) for n, ap in ((200, 12), (400, 13))]
    monkeypatch.setattr("drcl.demo.load_measured", lambda: records)
    text = plot_convergence(_result(0.05), _result(0.12), 60, INFO, tmp_path / "convergence.png")
    # random init gained 1.5 AP from 200 to 400: over the 1 AP rule, so not converged; 2DRCL's
    # totals (33 and 41 TFLOP) are past random init's 8 and 16
    assert text == ("On the same fine-tuning, 2DRCL 300's lead over random init goes from +2.0 AP, APr +0.0 at 200 "
                    "iterations to +1.5 AP, APr +0.0 at 400 (1 seed there); at matched total compute there is no run "
                    "of random init at its compute; not converged: random init still gained 1.5 AP from 200 to 400 "
                    "iterations.")
