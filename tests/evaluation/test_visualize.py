"""drcl visualize: drawn pixels, the confusion table's counts, the command end to end, bad input."""

import csv
import json
from collections import Counter

import numpy as np
import pytest
import torch

from drcl.cli import main
from drcl.data.annotations import load_annotations
from drcl.errors import DataError
from drcl.evaluation.visualize import (
    GT_COLOR,
    MATCH_COLOR,
    OTHER_COLOR,
    box_iou,
    confusion_table,
    draw_boxes,
    select_categories,
    write_confusion_csv,
)

BACKGROUND = (50, 60, 70)


def _canvas(h=100, w=120):
    return torch.tensor(BACKGROUND, dtype=torch.uint8).view(3, 1, 1).repeat(1, h, w)


def _pixel(image, x, y):
    return tuple(image[:, y, x].tolist())


# ----------------------------------------------------------------------------- drawing


def test_drawn_box_lands_on_its_pixels():
    # [x, y, w, h] = [10, 20, 40, 30]: corners (10, 20) and (50, 50), 2 px wide inwards
    image = draw_boxes(_canvas(), [([10, 20, 40, 30], None)], [], width=2)
    for x in (10, 11, 30, 49, 50):
        for y in (20, 21, 49, 50):
            assert _pixel(image, x, y) == GT_COLOR, (x, y)
    for y in (20, 35, 50):
        for x in (10, 11, 49, 50):
            assert _pixel(image, x, y) == GT_COLOR, (x, y)
    # just outside, just inside the 2-px line, the middle, far away: untouched
    for x, y in ((9, 35), (51, 35), (30, 19), (30, 51), (12, 35), (48, 35), (30, 22), (30, 48), (30, 35), (100, 90)):
        assert _pixel(image, x, y) == BACKGROUND, (x, y)
    changed = (image != _canvas()).any(dim=0)
    assert changed.sum().item() == 41 * 31 - 37 * 27  # exactly the 2-px frame of a 41 x 31 rectangle


def test_detection_colours_and_labels():
    dets = [([60, 50, 40, 30], "dog 0.90", False), ([5, 5, 20, 20], "cat 0.50", True)]
    image = draw_boxes(_canvas(), [], dets, width=1)
    assert _pixel(image, 100, 65) == OTHER_COLOR and _pixel(image, 80, 80) == OTHER_COLOR  # right and bottom edge
    assert _pixel(image, 25, 23) == MATCH_COLOR and _pixel(image, 15, 25) == MATCH_COLOR and _pixel(image, 5, 22) == MATCH_COLOR
    # the label is written inside the top-left corner, the rest of the inside is untouched
    label = image[:, 52:62, 62:80]
    assert (label != _canvas()[:, 52:62, 62:80]).any()
    assert _pixel(image, 90, 75) == BACKGROUND and _pixel(image, 101, 75) == BACKGROUND and _pixel(image, 100, 75) == OTHER_COLOR


def test_box_iou_reference():
    iou = box_iou([[0, 0, 10, 10]], [[5, 0, 10, 10], [0, 0, 10, 10], [20, 20, 5, 5]])
    np.testing.assert_allclose(iou, [[50 / 150, 1.0, 0.0]])


# ----------------------------------------------------------------------------- confusion table

# categories: 1 rare "apple", 2 rare "pear", 3 frequent "bowl"
CATS = [{"id": 1, "name": "apple", "frequency": "r"}, {"id": 2, "name": "pear", "frequency": "r"},
        {"id": 3, "name": "bowl", "frequency": "f"}]


def _gt(tmp_path, annotations, n_images=2):
    images = [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in range(1, n_images + 1)]
    anns = [{"id": k, "image_id": i, "category_id": c, "bbox": b} for k, (i, c, b) in enumerate(annotations, start=1)]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    return load_annotations(path)


def _det(image_id, cat, box, score):
    return {"image_id": image_id, "category_id": cat, "bbox": box, "score": score}


def test_confusion_counts_a_planted_confusion(tmp_path):
    ann = _gt(tmp_path, [
        (1, 1, [10, 10, 40, 40]),   # apple, taken by bowl
        (1, 3, [60, 60, 30, 30]),   # bowl (not a chosen category)
        (2, 1, [0, 0, 50, 50]),     # apple, found (a bowl detection on it does not count)
        (2, 2, [50, 50, 40, 40]),   # pear, missed: its detections are too far off or below the score
    ])
    dets = [
        _det(1, 3, [10, 10, 40, 36], 0.9),   # bowl on apple, IoU 0.9: the confusion
        _det(1, 2, [14, 14, 40, 40], 0.95),  # pear on apple, IoU ~0.68: other category, lower IoU
        _det(1, 3, [60, 60, 30, 30], 0.8),
        _det(2, 1, [0, 0, 50, 45], 0.6),     # apple found
        _det(2, 3, [0, 0, 50, 50], 0.99),
        _det(2, 1, [70, 70, 40, 40], 0.9),   # apple on pear, IoU 400/2800 < 0.5
        _det(2, 2, [50, 50, 40, 40], 0.1),   # pear on pear, below the score threshold
    ]
    chosen = select_categories(ann, "rare")
    assert [ann.categories[c]["id"] for c in chosen] == [1, 2]
    rows = {r["id"]: r for r in confusion_table(ann, dets, chosen, min_score=0.3)}
    assert set(rows) == {1, 2}
    apple, pear = rows[1], rows[2]
    assert (apple["boxes"], apple["found"], apple["confused"], apple["missed"]) == (2, 1, 1, 0)
    assert apple["into"] == [{"id": 3, "name": "bowl", "frequency": "f", "count": 1}]
    assert (pear["boxes"], pear["found"], pear["confused"], pear["missed"]) == (1, 0, 0, 1)
    # with the threshold lowered the pear detection counts: found
    low = {r["id"]: r for r in confusion_table(ann, dets, chosen, min_score=0.05)}
    assert low[2]["found"] == 1 and low[2]["missed"] == 0

    path = tmp_path / "confusion.csv"
    write_confusion_csv(list(rows.values()), path)
    with open(path, newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["gt_id"], r["outcome"], r["det_id"], r["count"]) for r in table] == [
        ("1", "found", "", "1"), ("1", "missed", "", "0"), ("1", "confused", "3", "1"),
        ("2", "found", "", "0"), ("2", "missed", "", "1"),
    ]
    assert table[2]["share"] == "0.5000" and table[2]["det_name"] == "bowl"


def test_equal_iou_goes_to_the_higher_score(tmp_path):
    ann = _gt(tmp_path, [(1, 1, [10, 10, 40, 40])], n_images=1)
    dets = [_det(1, 2, [10, 10, 40, 40], 0.5), _det(1, 3, [10, 10, 40, 40], 0.7)]
    (row,) = confusion_table(ann, dets, select_categories(ann, "1"), min_score=0.3)
    assert row["confused"] == 1 and row["into"][0]["id"] == 3


def test_select_categories(tmp_path):
    ann = _gt(tmp_path, [(1, 1, [10, 10, 40, 40])], n_images=1)
    assert select_categories(ann, "frequent") == [2]
    assert select_categories(ann, "3, 1") == [2, 0]
    with pytest.raises(ValueError, match="no category id 9"):
        select_categories(ann, "1,9")
    with pytest.raises(ValueError, match="no category is common"):
        select_categories(ann, "common")
    with pytest.raises(ValueError, match="'abc'"):
        select_categories(ann, "abc")


# ----------------------------------------------------------------------------- the command


@pytest.fixture
def vis_files(small_data, tmp_path):
    """(gt, detections, images, confused box, its detection's category, missed box) on the
    generated set: every val box detected as its own category, except one rare box that is
    detected as another category and one rare box, alone on its image, that no detection finds."""
    gt = small_data / "annotations" / "val.json"
    data = json.loads(gt.read_text())
    rare = {c["id"] for c in data["categories"] if c["frequency"] == "r"}
    planted = next(a for a in data["annotations"] if a["category_id"] in rare)
    per_image = Counter(a["image_id"] for a in data["annotations"])
    missed = next(a for a in data["annotations"] if a["category_id"] in rare and per_image[a["image_id"]] == 1
                  and a["category_id"] != planted["category_id"])
    other = next(c["id"] for c in data["categories"] if c["frequency"] == "c")
    dets = [_det(a["image_id"], other if a is planted else a["category_id"], a["bbox"], 0.8)
            for a in data["annotations"] if a is not missed]
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    return gt, path, small_data / "images" / "val", planted, other, missed


def test_visualize_end_to_end(vis_files, tmp_path, capsys):
    gt, dets, images, planted, other, missed = vis_files
    out = tmp_path / "vis"
    assert main(["visualize", "--gt", str(gt), "--detections", str(dets), "--images", str(images),
                 "--out", str(out), "--max-images", "8"]) == 0
    printed = capsys.readouterr().out
    assert "confused 1" in printed and "missed 1" in printed and "-> " in printed
    drawn = sorted(out.glob("images/*.png"))
    data = json.loads(gt.read_text())
    rare_ids = {c["id"] for c in data["categories"] if c["frequency"] == "r"}
    assert {p.stem for p in drawn} == {str(a["image_id"]) for a in data["annotations"] if a["category_id"] in rare_ids}
    for path in drawn + [out / "gallery.png", out / "confusion.png"]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image, ImageDraw, ImageFont

    # the missed box's image, scaled up to 480 px: detected boxes are blue, the missed ground truth
    # green (its 2-px frame at the scaled box), named by a green label inside its top-left corner
    pixels = np.asarray(Image.open(out / "images" / f"{missed['image_id']}.png"))
    assert pixels.shape == (480, 480, 3)
    scale = 480 / 64
    x, y, w, h = missed["bbox"]
    x0, y0, x1, y1 = int(x * scale), int(y * scale), int(x * scale + w * scale), int(y * scale + h * scale)
    name = next(c["name"] for c in data["categories"] if c["id"] == missed["category_id"])
    font = ImageFont.load_default()
    canvas = Image.new("RGB", (480, 480))
    pen = ImageDraw.Draw(canvas)
    left, top, right, bottom = pen.textbbox((x0 + 3, y0 + 3), name, font=font)
    pen.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=GT_COLOR)
    pen.text((x0 + 3, y0 + 3), name, fill="black", font=font)
    box = (slice(top - 1, bottom + 2), slice(left - 1, right + 2))
    expected = np.asarray(canvas)[box]
    green = (pixels == np.array(GT_COLOR, dtype=np.uint8)).all(axis=2)
    frame = np.zeros_like(green)
    frame[y0:y1 + 1, x0:x1 + 1] = True
    frame[y0 + 2:y1 - 1, x0 + 2:x1 - 1] = False
    frame[box] = False  # the label may run over the frame
    assert frame.sum() > 400 and green[frame].all()
    assert not (pixels == np.array(MATCH_COLOR, dtype=np.uint8)).all(axis=2).any()  # nothing found it
    assert (expected != np.array(GT_COLOR)).any(axis=2).sum() > 10  # the text has ink
    np.testing.assert_array_equal(pixels[box], expected)
    # an image whose boxes were all found: blue frames, no green pixel left uncovered
    found_image = next(a["image_id"] for a in data["annotations"]
                       if per_image_all_found(data, a["image_id"], planted, missed))
    found_pixels = np.asarray(Image.open(out / "images" / f"{found_image}.png"))
    assert (found_pixels == np.array(MATCH_COLOR, dtype=np.uint8)).all(axis=2).sum() > 100
    assert not (found_pixels == np.array(GT_COLOR, dtype=np.uint8)).all(axis=2).any()

    ann = load_annotations(gt)
    rare = [c for c in ann.categories if c["frequency"] == "r"]
    with open(out / "confusion.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert {int(r["gt_id"]) for r in table} == {c["id"] for c in rare if ann.instance_count[ann.category_pos[c["id"]]]}
    confused = [r for r in table if r["outcome"] == "confused"]
    assert [(int(r["gt_id"]), int(r["det_id"]), int(r["count"])) for r in confused] == [
        (planted["category_id"], other, 1)]
    found = {int(r["gt_id"]): int(r["count"]) for r in table if r["outcome"] == "found"}
    boxes = {int(r["gt_id"]): int(r["gt_boxes"]) for r in table}
    assert all(found[c] == boxes[c] - (c == planted["category_id"]) - (c == missed["category_id"]) for c in found)
    missing = {int(r["gt_id"]): int(r["count"]) for r in table if r["outcome"] == "missed"}
    assert missing == {c: int(c == missed["category_id"]) for c in boxes}


def per_image_all_found(data, image_id, *planted):
    """True when ``image_id`` holds a rare box and none of the planted (confused / missed) ones."""
    rare = {c["id"] for c in data["categories"] if c["frequency"] == "r"}
    anns = [a for a in data["annotations"] if a["image_id"] == image_id]
    return any(a["category_id"] in rare for a in anns) and not any(a["id"] == p["id"] for a in anns for p in planted)


def test_visualize_bad_detection_is_one_line(vis_files, tmp_path, capsys):
    gt, dets, images, *_ = vis_files
    records = json.loads(dets.read_text())
    records[3]["category_id"] = 999
    records[5]["image_id"] = 123456
    dets.write_text(json.dumps(records))
    args = ["visualize", "--gt", str(gt), "--detections", str(dets), "--images", str(images),
            "--out", str(tmp_path / "v"), "--max-images", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"drcl visualize: error: {dets}: detection #3: unknown category id 999"
    assert main(args + ["--on-bad", "skip"]) == 0
    assert f"{dets}: skipped 2 bad detections" in capsys.readouterr().err


def test_visualize_missing_image_is_one_line(vis_files, tmp_path, capsys):
    gt, dets, images, *_ = vis_files
    data = json.loads(gt.read_text())
    first = data["images"][0]  # the first image in the file comes first in its categories' queues
    cats = sorted({a["category_id"] for a in data["annotations"] if a["image_id"] == first["id"]})
    holding = {a["image_id"] for a in data["annotations"] if a["category_id"] in cats}
    copy = tmp_path / "images"
    copy.mkdir()
    for f in images.iterdir():
        if f.name != first["coco_url"].split("/")[-1]:
            (copy / f.name).write_bytes(f.read_bytes())
    args = ["visualize", "--gt", str(gt), "--detections", str(dets), "--images", str(copy),
            "--out", str(tmp_path / "v"), "--categories", ",".join(map(str, cats)), "--max-images", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    err = err.strip().splitlines()[-1]  # after the progress bar
    assert err == (f"drcl visualize: error: {gt}: image id {first['id']}: image file "
                   f"{copy / first['coco_url'].split('/')[-1]} not found")
    assert main(args + ["--on-bad", "skip"]) == 0
    assert "skipped 1 images whose file is missing or bad" in capsys.readouterr().err
    assert len(list((tmp_path / "v" / "images").glob("*.png"))) == min(2, len(holding) - 1)


def test_visualize_bad_arguments(vis_files, tmp_path, capsys):
    gt, dets, images, *_ = vis_files
    base = ["visualize", "--gt", str(gt), "--detections", str(dets), "--images", str(images), "--out", str(tmp_path)]
    assert main(base + ["--categories", "1,99"]) == 2
    assert "no category id 99" in capsys.readouterr().err
    assert main(base + ["--score", "1.5"]) == 2
    assert "minimum score" in capsys.readouterr().err


def test_side_by_side_panel(vis_files, tmp_path):
    from drcl.evaluation.visualize import plot_detections_side_by_side

    gt, dets, images, *_ = vis_files
    ann = load_annotations(gt)
    path = tmp_path / "side.png"
    rows = plot_detections_side_by_side(ann, {"a": dets, "b": []}, images, path, "rare", max_images=2)
    assert rows == 2 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = json.loads(dets.read_text())
    records[0]["image_id"] = 999
    with pytest.raises(DataError, match=r"^detections: detection #0: unknown image id 999$"):
        plot_detections_side_by_side(ann, {"a": records}, images, path)
