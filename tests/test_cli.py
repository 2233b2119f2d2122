import json
import subprocess
import sys

import pytest

from drcl.cli import main


def test_stats_writes_json_and_plot(lvis_files, tmp_path, capsys):
    path, images = lvis_files
    out_json, out_png = tmp_path / "stats.json", tmp_path / "freq.png"
    assert main(["stats", str(path), "--images", str(images), "--json", str(out_json), "--plot", str(out_png)]) == 0
    printed = capsys.readouterr().out
    assert "rare" in printed and "frequent" in printed
    stats = json.loads(out_json.read_text())
    assert set(stats["groups"]) == {"r", "c", "f"}
    assert {"id", "name", "frequency", "image_count", "instance_count"} <= set(stats["categories"][0])
    assert out_png.stat().st_size > 1000


def test_bad_record_is_one_line_and_exit_2(tmp_path, lvis_dict, capsys):
    lvis_dict["annotations"][2]["category_id"] = 77
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(lvis_dict))
    assert main(["stats", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert str(path) in err and "annotation id 12" in err and "unknown category id 77" in err


def test_skip_reports_how_many(tmp_path, lvis_dict, capsys):
    lvis_dict["annotations"][2]["category_id"] = 77
    lvis_dict["annotations"][3]["bbox"] = [0, 0, 0, 0]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(lvis_dict))
    assert main(["stats", str(path), "--on-bad", "skip"]) == 0
    assert "skipped 2 bad records (2 annotations)" in capsys.readouterr().err


def test_missing_image_via_cli(lvis_files, capsys):
    path, images = lvis_files
    (images / "train2017" / "000000000003.jpg").unlink()
    assert main(["stats", str(path), "--images", str(images)]) == 2
    assert "image id 3: image file" in capsys.readouterr().err


def test_console_script_has_no_traceback(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    proc = subprocess.run([sys.executable, "-m", "drcl", "stats", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("drcl stats: error: ") and "malformed JSON at line 1" in proc.stderr


def test_unknown_option_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["stats"])
    assert e.value.code == 2


def test_make_data_then_stats_shows_all_groups(tmp_path, capsys):
    out = tmp_path / "lt"
    assert main(["make-data", str(out), "--classes", "30", "--train-images", "300", "--val-images", "40",
                 "--image-size", "64", "--imbalance", "100", "--processes", "2"]) == 0
    assert "next: drcl stats" in capsys.readouterr().out
    png = tmp_path / "freq.png"
    assert main(["stats", str(out / "annotations" / "train.json"), "--images", str(out / "images" / "train"),
                 "--plot", str(png)]) == 0
    table = capsys.readouterr().out
    rows = {line.split()[0]: int(line.split()[1]) for line in table.splitlines()[3:6]}
    assert set(rows) == {"rare", "common", "frequent"} and min(rows.values()) > 0
    assert png.exists()
    assert len(list((out / "images" / "train").iterdir())) == 300  # every image rendered by the pool


def test_make_data_bad_argument_exits_2(tmp_path, capsys):
    assert main(["make-data", str(tmp_path / "x"), "--classes", "2"]) == 2
    assert "classes" in capsys.readouterr().err


def test_stats_repeat_factors_json(lvis_files, tmp_path, capsys):
    path, _ = lvis_files
    out = tmp_path / "rf.json"
    png = tmp_path / "share.png"
    assert main(["stats", str(path), "--repeat-factors", "rfs", "--threshold", "0.5", "--json", str(out),
                 "--plot", str(png)]) == 0
    stats = json.loads(out.read_text())
    # f_img = 1/3, 2/3, 1/3 over 3 images -> category factors sqrt(1.5), 1, sqrt(1.5)
    assert stats["repeat_factors"] == pytest.approx({"1": 1.5 ** 0.5, "2": 1.5 ** 0.5, "3": 1.0})
    assert [c["repeat_factor"] for c in stats["categories"]] == pytest.approx([1.5 ** 0.5, 1.0, 1.5 ** 0.5])
    assert stats["repeat_factor_settings"] == {"mode": "rfs", "threshold": 0.5, "alpha": None}
    assert "expected instance share per group" in capsys.readouterr().out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_stats_dynamic_alpha_zero_is_instance_level(lvis_files, tmp_path):
    path, _ = lvis_files
    out = tmp_path / "rf.json"
    assert main(["stats", str(path), "--repeat-factors", "dynamic", "--alpha", "0", "--threshold", "0.5",
                 "--json", str(out)]) == 0
    # f_ins = 1/4, 2/4, 1/4 over 4 instances -> sqrt(2), 1, sqrt(2)
    assert [c["repeat_factor"] for c in json.loads(out.read_text())["categories"]] == pytest.approx(
        [2 ** 0.5, 1.0, 2 ** 0.5])


@pytest.mark.parametrize("args,words", [
    (["--repeat-factors", "dynamic"], "needs --alpha"),
    (["--repeat-factors", "rfs", "--alpha", "0.5"], "dynamic only"),
    (["--repeat-factors", "dynamic", "--alpha", "2"], "alpha"),
    (["--repeat-factors", "rfs", "--threshold", "0"], "threshold"),
])
def test_stats_repeat_factor_option_errors(lvis_files, capsys, args, words):
    assert main(["stats", str(lvis_files[0]), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("drcl stats: error: ") and words in err


def test_version_prints_the_installed_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"drcl {version('drcl')}"


def test_version_in_a_source_tree_is_the_package_attribute(monkeypatch):
    import importlib.metadata

    import drcl
    from drcl import cli

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert cli.version() == drcl.__version__


def test_pyproject_takes_its_version_from_the_package():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert "version" in pyproject["project"]["dynamic"] and "version" not in pyproject["project"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "drcl.__version__"}


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_output_into_a_closed_pipe_ends_quietly(lvis_files, unbuffered):
    """``drcl stats ... | head``: the reader is gone before drcl writes. Deterministic: the pipe's
    read end is closed before the process starts, so the first write (unbuffered) or the exit
    flush (buffered, as for a user without PYTHONUNBUFFERED) meets EPIPE."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = unbuffered
    proc = subprocess.run([sys.executable, "-m", "drcl", "stats", str(lvis_files[0]), "--repeat-factors", "rfs"],
                          stdout=write_end, stderr=subprocess.PIPE, env=env, text=True, timeout=120)
    os.close(write_end)
    assert proc.stderr == ""  # no traceback, no "Exception ignored ... BrokenPipeError"
    assert proc.returncode == 141  # 128 + SIGPIPE, as `head`'s other writers end


def test_reader_that_stops_after_one_line(lvis_files):
    """The newcomer's case: read a line, close the pipe, let drcl go on writing."""
    import os

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "drcl", "stats", str(lvis_files[0]), "--repeat-factors", "rfs"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    assert proc.stdout.readline().startswith(str(lvis_files[0]))
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) in (0, 141)  # 0 when drcl had written everything before the close
    assert "Traceback" not in err and "BrokenPipeError" not in err


def _thousand_images(tmp_path):
    """1,000 images all holding category 1; category 2 in 5 of them (f_img 0.005 > LVIS's t)."""
    images = [{"id": i, "width": 32, "height": 32, "file_name": f"{i}.jpg"} for i in range(1, 1001)]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 8, 8], "area": 64} for i in range(1, 1001)]
    anns += [{"id": 1000 + i, "image_id": i, "category_id": 2, "bbox": [10, 10, 8, 8], "area": 64} for i in range(1, 6)]
    cats = [{"id": 1, "name": "head", "frequency": "f"}, {"id": 2, "name": "tail", "frequency": "r"}]
    path = tmp_path / "thousand.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def test_stats_says_when_the_threshold_repeats_nothing(tmp_path, capsys):
    path = _thousand_images(tmp_path)
    assert main(["stats", str(path), "--repeat-factors", "rfs"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "max factor 1.00" in out[-3]
    assert out[-1] == ("note: every repeat factor is 1.00, so rfs changes nothing here: a category is repeated only "
                       "when its score is below t=0.001, and the rarest's is 0.005; try --threshold 0.1 (LVIS's "
                       "1e-3 scaled from its 100,170 images to these 1,000) or 0.05 (the tiny configs')")

    # the suggested t repeats the tail category's 5 images sqrt(0.1 / 0.005) times, and says nothing more
    out_json = tmp_path / "rf.json"
    assert main(["stats", str(path), "--repeat-factors", "rfs", "--threshold", "0.1", "--json", str(out_json)]) == 0
    assert "note:" not in capsys.readouterr().out
    assert [c["repeat_factor"] for c in json.loads(out_json.read_text())["categories"]] == pytest.approx(
        [1.0, 20 ** 0.5])

    assert main(["stats", str(path), "--repeat-factors", "random"]) == 0  # no sampler to tune: no note
    assert "note:" not in capsys.readouterr().out


def test_stats_threshold_note_for_a_set_without_rare_categories(tmp_path, capsys):
    """Every category in at least 100 images: LVIS's scaled t would repeat nothing either."""
    images = [{"id": i, "width": 32, "height": 32, "file_name": f"{i}.jpg"} for i in range(1, 201)]
    anns = [{"id": i, "image_id": i, "category_id": 1 + i % 2, "bbox": [1, 1, 8, 8], "area": 64} for i in range(1, 201)]
    path = tmp_path / "even.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    assert main(["stats", str(path), "--repeat-factors", "irfs"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(
        "the rarest's is 0.5; any t above 0.5 repeats the rarest category")


def test_evaluate_with_train_counts(small_data, tmp_path, capsys):
    import csv
    from collections import Counter

    ann = small_data / "annotations"
    val = json.loads((ann / "val.json").read_text())
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in val["annotations"]]
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    out = tmp_path / "m.json"
    assert main(["evaluate", "--gt", str(ann / "val.json"), "--detections", str(path), "--json", str(out),
                 "--train-gt", str(ann / "train.json")]) == 0
    train = json.loads((ann / "train.json").read_text())
    instances = Counter(a["category_id"] for a in train["annotations"])
    with open(tmp_path / "m_per_category.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {int(r["id"]): int(r["train_instance_count"]) for r in rows} == {
        c["id"]: instances[c["id"]] for c in train["categories"]}
    assert all(float(r["ap"]) == 1.0 for r in rows)  # every box detected exactly
    assert (tmp_path / "m_ap_vs_frequency.png").stat().st_size > 5000
    assert main(["evaluate", "--gt", str(ann / "val.json"), "--detections", str(path),
                 "--train-gt", str(tmp_path / "nope.json")]) == 2
    assert "nope.json: no such file" in capsys.readouterr().err


@pytest.mark.parametrize("preset", [None, "ACTIVE"])
def test_openmp_threads_sleep_when_idle_unless_the_user_says_otherwise(preset):
    """OMP_WAIT_POLICY is read when torch first loads OpenMP: the CLI must set it before any
    command imports torch, and leave a user's own value alone."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = ("import os, sys\n"
            "from drcl import cli\n"
            "assert 'torch' not in sys.modules, 'the CLI module imports torch before main() runs'\n"
            "cli.main(['make-data', sys.argv[1], '--classes', '3', '--train-images', '2', '--val-images', '1',"
            " '--image-size', '64'])\n"
            "import torch\n"
            "print(os.environ['OMP_WAIT_POLICY'])\n")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-c", code, tmp], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == (preset or "PASSIVE")
