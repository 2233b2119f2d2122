import pytest

from drcl.data.annotations import load_annotations
from drcl.data.stats import category_stats, format_table, plot_frequency


def test_group_statistics_by_hand(lvis_files):
    stats = category_stats(load_annotations(lvis_files[0]))
    g = stats["groups"]
    # fixture: aerosol_can (c) in image 1; air_conditioner (f) in images 1, 2; airplane (r) in image 2
    assert (g["r"]["categories"], g["r"]["images"], g["r"]["instances"]) == (1, 1, 1)
    assert (g["c"]["categories"], g["c"]["images"], g["c"]["instances"]) == (1, 1, 1)
    assert (g["f"]["categories"], g["f"]["images"], g["f"]["instances"]) == (1, 2, 2)
    assert g["f"]["image_share"] == pytest.approx(2 / 4) and g["r"]["instance_share"] == pytest.approx(1 / 4)
    assert sum(s["image_share"] for s in g.values()) == pytest.approx(1.0)
    assert stats["categories"][1] == {
        "id": 2, "name": "air_conditioner", "frequency": "f", "image_count": 2, "instance_count": 2,
    }


def test_instance_share_differs_from_image_share(tmp_path):
    import json

    # head category: 3 instances in each of 2 images; tail: 1 instance in 1 image
    images = [{"id": i, "width": 20, "height": 20, "file_name": f"{i}.jpg"} for i in range(2)]
    anns = [{"id": k, "image_id": k // 3, "category_id": 1, "bbox": [0, 0, 5, 5]} for k in range(6)]
    anns.append({"id": 6, "image_id": 1, "category_id": 2, "bbox": [0, 0, 5, 5]})
    cats = [{"id": 1, "name": "head", "frequency": "f"}, {"id": 2, "name": "tail", "frequency": "r"}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    g = category_stats(load_annotations(path))["groups"]
    assert g["f"]["image_share"] == pytest.approx(2 / 3)
    assert g["f"]["instance_share"] == pytest.approx(6 / 7)


def test_table_and_plot(lvis_files, tmp_path):
    stats = category_stats(load_annotations(lvis_files[0]))
    table = format_table(stats)
    for word in ("rare", "common", "frequent", "3 images, 4 annotations, 3 categories"):
        assert word in table
    out = tmp_path / "freq.png"
    plot_frequency(stats, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
