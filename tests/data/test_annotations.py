import copy
import json

import numpy as np
import pytest
import torch

from drcl.data.annotations import frequency_group, load_annotations
from drcl.errors import DataError


def test_lvis_fixture_loads_and_keeps_every_field(lvis_files):
    path, images = lvis_files
    ann = load_annotations(path, images, check_images="decode")
    assert ann.num_images == 3 and len(ann.annotations) == 4 and ann.num_categories == 3
    # LVIS v1 records: no file_name, the name comes from coco_url
    assert [ann.file_name(i) for i in range(3)] == [
        "000000000001.jpg",
        "000000000002.jpg",
        "000000000003.jpg",
    ]
    # image 1 lives in images/train2017/ (the coco_url folder), image 2 flat in images/
    assert ann.image_path(0) == images / "train2017" / "000000000001.jpg"
    assert ann.image_path(1) == images / "000000000002.jpg"
    assert ann.images[0]["neg_category_ids"] == [3]
    assert ann.images[0]["not_exhaustive_category_ids"] == [2]
    assert ann.categories[1]["image_count"] == 364 and ann.categories[1]["instance_count"] == 1081
    assert ann.categories[0]["synonyms"] == ["aerosol_can", "spray_can"]
    assert ann.frequency == ["c", "f", "r"] and ann.frequency_source == "file"
    assert all("iscrowd" not in a for a in ann.annotations)


def test_arrays_index_the_records(lvis_files):
    path, _ = lvis_files
    ann = load_annotations(path)
    np.testing.assert_array_equal(ann.image_index, [0, 0, 1, 1])
    np.testing.assert_array_equal(ann.category_index, [0, 1, 1, 2])
    np.testing.assert_array_equal(ann.instance_count, [1, 2, 1])
    np.testing.assert_array_equal(ann.image_count, [1, 2, 1])
    assert [ann.instances_of(i).tolist() for i in range(3)] == [[0, 1], [2, 3], []]


@pytest.mark.parametrize("count,group", [(0, "r"), (1, "r"), (10, "r"), (11, "c"), (100, "c"), (101, "f")])
def test_frequency_group_thresholds(count, group):
    assert frequency_group(count) == group


def test_frequency_computed_from_image_counts_when_absent(tmp_path):
    # category 1 in 11 images (common), category 2 in 101 images (frequent), 3 in 10 (rare)
    images = [{"id": i, "width": 10, "height": 10, "file_name": f"{i}.jpg"} for i in range(101)]
    anns, k = [], 0
    for cat, n in ((1, 11), (2, 101), (3, 10)):
        for i in range(n):
            for _ in range(2):  # two instances per image must not count twice
                anns.append({"id": k, "image_id": i, "category_id": cat, "bbox": [1, 1, 2, 2]})
                k += 1
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]
    path = tmp_path / "coco.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    ann = load_annotations(path)
    assert ann.frequency_source == "computed"
    assert ann.frequency == ["c", "f", "r"]
    np.testing.assert_array_equal(ann.image_count, [11, 101, 10])
    np.testing.assert_array_equal(ann.instance_count, [22, 202, 20])


def _write(tmp_path, data, name="bad.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _edit(data, kind, record_id, **changes):
    rec = next(r for r in data[kind] if r["id"] == record_id)
    for key, value in changes.items():
        if value is None:
            del rec[key]
        else:
            rec[key] = value


BAD_RECORDS = [
    # (what to change, words the message must contain)
    (("annotations", 11, {"category_id": 99}), ["annotation id 11", "unknown category id 99"]),
    (("annotations", 11, {"image_id": 42}), ["annotation id 11", "unknown image id 42"]),
    (("annotations", 10, {"bbox": [4, 6, 0, 10]}), ["annotation id 10", "non-positive width or height"]),
    (("annotations", 10, {"bbox": [4, 6, 20, -1]}), ["annotation id 10", "non-positive width or height"]),
    (("annotations", 10, {"bbox": [50, 6, 20, 10]}), ["annotation id 10", "outside the 64x48 image id 1"]),
    (("annotations", 10, {"bbox": [4, 6, 20]}), ["annotation id 10", "bbox must be 4 finite numbers"]),
    (("annotations", 10, {"bbox": None}), ["annotation id 10", "missing key 'bbox'"]),
    (("annotations", 12, {"category_id": None}), ["annotation id 12", "missing key 'category_id'"]),
    (("images", 2, {"coco_url": None}), ["image id 2", "neither 'file_name' nor 'coco_url'"]),
    (("images", 2, {"width": None}), ["image id 2", "missing key 'width'"]),
    (("images", 2, {"height": 0}), ["image id 2", "width and height must be positive"]),
    (("categories", 3, {"frequency": "x"}), ["category id 3", "frequency 'x'"]),
    (("categories", 3, {"name": None}), ["category id 3", "missing key 'name'"]),
]


@pytest.mark.parametrize("change,words", BAD_RECORDS, ids=[" ".join(w) for _, w in BAD_RECORDS])
def test_bad_record_names_file_and_record(tmp_path, lvis_dict, change, words):
    kind, rid, changes = change
    _edit(lvis_dict, kind, rid, **changes)
    path = _write(tmp_path, lvis_dict)
    messages = []
    for records in (True, False):  # the records kept or not, streamed or not: the same words
        with pytest.raises(DataError) as e:
            load_annotations(path, records=records)
        messages.append(str(e.value))
    msg = messages[0]
    assert "\n" not in msg and msg.startswith(str(path))
    for w in words:
        assert w in msg
    assert messages[1] == msg


def test_skip_policy_drops_and_counts(tmp_path, lvis_dict):
    _edit(lvis_dict, "annotations", 11, category_id=99)
    _edit(lvis_dict, "annotations", 13, bbox=[0, 0, -1, 5])
    ann = load_annotations(_write(tmp_path, lvis_dict), on_bad="skip")
    assert [a["id"] for a in ann.annotations] == [10, 12]
    assert ann.skipped["annotations"] == 2
    arrays = load_annotations(_write(tmp_path, lvis_dict), on_bad="skip", records=False)
    assert arrays.ann_ids.tolist() == [10, 12] and arrays.skipped == ann.skipped


def test_skipping_a_category_drops_its_annotations(tmp_path, lvis_dict):
    _edit(lvis_dict, "categories", 3, frequency="x")
    ann = load_annotations(_write(tmp_path, lvis_dict), on_bad="skip")
    assert [c["id"] for c in ann.categories] == [1, 2]
    assert [a["id"] for a in ann.annotations] == [10, 11, 12]
    assert ann.skipped == {"categories": 1, "annotations": 1}


def test_malformed_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [\n{"id": 1,,}]}')
    with pytest.raises(DataError, match=r"broken\.json: malformed JSON at line 2 column"):
        load_annotations(path)


@pytest.mark.parametrize("content,words", [
    ("[]", "expected a JSON object"),
    ('{"images": [], "annotations": []}', "missing top-level key 'categories'"),
    ('{"images": {}, "annotations": [], "categories": []}', "top-level 'images' must be a list"),
])
def test_bad_top_level(tmp_path, content, words):
    path = tmp_path / "top.json"
    path.write_text(content)
    with pytest.raises(DataError, match=words):
        load_annotations(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.json: no such file"):
        load_annotations(tmp_path / "nope.json")


def test_duplicate_ids(tmp_path, lvis_dict):
    lvis_dict["annotations"][1]["id"] = 10
    with pytest.raises(DataError, match="annotation id 10: duplicate annotation id"):
        load_annotations(_write(tmp_path, lvis_dict))


def test_box_within_tolerance_is_accepted(tmp_path, lvis_dict):
    _edit(lvis_dict, "annotations", 11, bbox=[30.0, 20.0, 34.5, 28.5])  # 0.5 px past the edge
    assert len(load_annotations(_write(tmp_path, lvis_dict)).annotations) == 4


def test_missing_image_file(lvis_files):
    path, images = lvis_files
    (images / "000000000002.jpg").unlink()
    with pytest.raises(DataError, match=r"image id 2: image file .*000000000002\.jpg not found"):
        load_annotations(path, images, check_images="header")


def test_undecodable_image_file(lvis_files):
    path, images = lvis_files
    (images / "000000000002.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match=r"image id 2: image file .* cannot be decoded"):
        load_annotations(path, images, check_images="header")


def test_truncated_image_fails_full_decode(lvis_files):
    path, images = lvis_files
    f = images / "000000000002.jpg"
    f.write_bytes(f.read_bytes()[:300])
    with pytest.raises(DataError, match=r"image id 2: image file .* cannot be decoded"):
        load_annotations(path, images, check_images="decode")


def test_wrong_image_size(tmp_path, lvis_dict, lvis_files):
    _, images = lvis_files
    _edit(lvis_dict, "images", 2, width=81)
    _edit(lvis_dict, "annotations", 12, bbox=[0, 0, 10, 10])
    with pytest.raises(DataError, match=r"image id 2: file .* is 80x60 but the record says 81x60"):
        load_annotations(_write(tmp_path, lvis_dict), images, check_images="header")


def test_skip_missing_image_drops_its_annotations(lvis_files):
    path, images = lvis_files
    (images / "000000000002.jpg").unlink()
    ann = load_annotations(path, images, on_bad="skip", check_images="header")
    assert [img["id"] for img in ann.images] == [1, 3]
    assert [a["id"] for a in ann.annotations] == [10, 11]
    assert ann.skipped == {"images": 1, "annotations of skipped images": 2}


# --------------------------------------------------------------------------- without the records


def _lvis_order(data: dict) -> dict:
    """The published LVIS v1 files' key order: annotations before images, categories last."""
    return {k: data[k] for k in ("info", "annotations", "images", "licenses", "categories") if k in data}


def _same_arrays(a, b):
    for name in ("image_ids", "widths", "heights", "file_names", "url_dirs", "ann_ids", "boxes", "image_index",
                 "category_index", "iscrowd", "has_segmentation", "instance_count", "image_count"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.categories == b.categories and a.frequency == b.frequency and a.skipped == b.skipped


def _segmentation_file(tmp_path, lvis_dict, chunk_text=""):
    """The fixture with every kind of segmentation: polygons (one and two, pretty-printed,
    exponents), RLE, an empty list, none."""
    anns = lvis_dict["annotations"]
    anns[0]["segmentation"] = [[4, 6, 24, 6.5, 24, 16], [4.25, 6, 5e0, 7, 1.5E1, 8]]
    anns[1]["segmentation"] = {"size": [48, 64], "counts": "a1b2"}
    anns[2]["segmentation"] = []
    del anns[3]["segmentation"]
    anns.append({"id": 14, "image_id": 3, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25,
                 "segmentation": [[1, 1, 6, 1, 6, 6]]})
    path = tmp_path / "segs.json"
    path.write_text(json.dumps(_lvis_order(lvis_dict), indent=1))
    return path


@pytest.mark.parametrize("chunk", [None, 7, 64])
def test_arrays_and_segmentations_without_records_equal_the_records(tmp_path, lvis_dict, chunk, monkeypatch):
    from drcl.data import jsonstream

    path = _segmentation_file(tmp_path, lvis_dict)
    with_records = load_annotations(path)
    if chunk:  # chunks far smaller than a record: polygons cut at every place
        monkeypatch.setattr(jsonstream, "CHUNK", chunk)
        monkeypatch.setattr(jsonstream, "MARGIN", 3)
    arrays = load_annotations(path, records=False, segmentations=True)
    _same_arrays(with_records, arrays)
    assert arrays.image_records is None and arrays.annotation_records is None
    for k, rec in enumerate(with_records.annotations):
        assert arrays.segmentation(k) == rec.get("segmentation"), k
        np.testing.assert_array_equal(arrays.boxes[k], rec["bbox"])
    assert arrays.has_segmentation.tolist() == [True, True, True, False, True]
    with pytest.raises(RuntimeError, match="without its segmentations"):
        load_annotations(path, records=False).segmentation(0)


def test_without_records_the_records_are_not_kept(tmp_path, lvis_dict):
    """Nothing per image or per annotation is a Python object: what a forked DataLoader
    worker touches is a few numpy arrays, however large the file."""
    import gc

    def objects(n_images):
        data = copy.deepcopy(lvis_dict)
        data["images"] = [{**data["images"][0], "id": i + 1} for i in range(n_images)]
        data["annotations"] = [{**data["annotations"][0], "id": 10 * i + j, "image_id": i + 1}
                               for i in range(n_images) for j in range(3)]
        path = tmp_path / f"n{n_images}.json"
        path.write_text(json.dumps(data))
        ann = load_annotations(path, records=False)
        seen, todo = set(), [ann.__dict__]
        while todo:
            obj = todo.pop()
            if id(obj) in seen or isinstance(obj, (type, np.ndarray)):
                continue
            seen.add(id(obj))
            todo += gc.get_referents(obj)
        return len(seen)

    assert objects(10) == objects(2000)
    with pytest.raises(RuntimeError, match="records=True"):
        load_annotations(_write(tmp_path, lvis_dict), records=False).annotations


def test_problems_are_reported_categories_first_whatever_the_key_order(tmp_path, lvis_dict):
    _edit(lvis_dict, "annotations", 10, category_id=99)
    _edit(lvis_dict, "images", 2, height=0)
    _edit(lvis_dict, "categories", 3, frequency="x")
    path = tmp_path / "lvis_order.json"
    path.write_text(json.dumps(_lvis_order(lvis_dict)))
    for records in (True, False):
        with pytest.raises(DataError, match="category id 3: frequency 'x'"):
            load_annotations(path, records=records)
    _edit(lvis_dict, "categories", 3, frequency="r")
    path.write_text(json.dumps(_lvis_order(lvis_dict)))
    for records in (True, False):
        with pytest.raises(DataError, match="image id 2: width and height"):
            load_annotations(path, records=records)


def test_a_repeated_id_counts_only_after_a_record_that_was_kept(tmp_path, lvis_dict):
    # the first record with id 10 is bad (its box), so the second one with that id is kept;
    # a third one repeats a kept id
    anns = lvis_dict["annotations"]
    anns[0]["bbox"] = [0, 0, -1, 5]
    anns[1]["id"] = 10
    anns[2]["id"] = 10
    path = _write(tmp_path, lvis_dict)
    for records in (True, False):
        ann = load_annotations(path, on_bad="skip", records=records)
        assert ann.ann_ids.tolist() == [10, 13] and ann.skipped == {"annotations": 2}
        assert ann.category_index.tolist() == [1, 2]  # the second record's category, not the first's
        with pytest.raises(DataError, match="annotation id 10: bbox .* non-positive"):
            load_annotations(path, records=records)
    anns[0]["bbox"] = [4, 6, 20, 10]
    with pytest.raises(DataError, match="annotation id 10: duplicate annotation id"):
        load_annotations(_write(tmp_path, lvis_dict), records=False)


@pytest.mark.parametrize("kind,rid,key,value", [
    ("annotations", 11, "id", "11"),
    ("images", 2, "id", 2.0),
    ("categories", 3, "id", True),
    ("annotations", 11, "id", 2**64),
])
def test_ids_must_be_integers(tmp_path, lvis_dict, kind, rid, key, value):
    _edit(lvis_dict, kind, rid, **{key: value})
    for records in (True, False):
        with pytest.raises(DataError, match=f"id must be an integer, got {value!r}"):
            load_annotations(_write(tmp_path, lvis_dict), records=records)


def test_an_image_id_that_is_not_an_integer_is_unknown(tmp_path, lvis_dict):
    _edit(lvis_dict, "annotations", 11, image_id="1")
    for records in (True, False):
        with pytest.raises(DataError, match="annotation id 11: unknown image id 1$"):
            load_annotations(_write(tmp_path, lvis_dict), records=records)


def test_generated_data_loads_alike_with_and_without_records(small_data):
    from drcl.data.synthetic import split_paths

    for split in ("train", "val"):
        path, images = split_paths(small_data, split)
        with_records = load_annotations(path, images, check_images="header")
        arrays = load_annotations(path, images, check_images="header", records=False, segmentations=True)
        _same_arrays(with_records, arrays)
        assert all(arrays.segmentation(k) == a["segmentation"] for k, a in enumerate(with_records.annotations))
        # and the masks a Mask R-CNN trains on are the same, pixel for pixel
        from drcl.data.dataset import DetectionDataset

        a, b = DetectionDataset(with_records), DetectionDataset(arrays)
        assert a.has_masks and b.has_masks
        for i in range(min(8, arrays.num_images)):
            ta, tb = a[i][1], b[i][1]
            assert torch.equal(ta["masks"], tb["masks"]) and torch.equal(ta["boxes"], tb["boxes"])
