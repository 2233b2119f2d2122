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
                 "--image-size", "64", "--imbalance", "100"]) == 0
    assert "next: drcl stats" in capsys.readouterr().out
    png = tmp_path / "freq.png"
    assert main(["stats", str(out / "annotations" / "train.json"), "--images", str(out / "images" / "train"),
                 "--plot", str(png)]) == 0
    table = capsys.readouterr().out
    rows = {line.split()[0]: int(line.split()[1]) for line in table.splitlines()[3:6]}
    assert set(rows) == {"rare", "common", "frequent"} and min(rows.values()) > 0
    assert png.exists()


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
