"""Image folders as training sets, and merging categories for a class-agnostic detector."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from drcl.data.annotations import folder_image_id, load_annotations, load_image_folder, merge_categories
from drcl.errors import DataError


def _image(path, w, h, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def test_folder_ids_are_stable_hashes_of_the_relative_path(tmp_path):
    _image(tmp_path / "b.jpg", 40, 30)
    _image(tmp_path / "sub" / "a.PNG", 20, 50)
    (tmp_path / "notes.txt").write_text("not an image")
    ann = load_image_folder(tmp_path)
    assert [img["file_name"] for img in ann.images] == ["b.jpg", "sub/a.PNG"]
    assert [(img["width"], img["height"]) for img in ann.images] == [(40, 30), (20, 50)]
    assert ann.images[1]["id"] == int(hashlib.sha1(b"sub/a.PNG").hexdigest()[:13], 16) < 2**53
    assert ann.annotations == [] and ann.categories == [] and ann.image_path(1) == tmp_path / "sub" / "a.PNG"
    # another file in the folder changes no one else's id
    _image(tmp_path / "a.jpg", 10, 10)
    again = load_image_folder(tmp_path)
    assert {img["file_name"]: img["id"] for img in again.images} == {
        "a.jpg": folder_image_id("a.jpg"), "b.jpg": ann.images[0]["id"], "sub/a.PNG": ann.images[1]["id"]}


def test_bad_image_in_folder_is_named_or_skipped_and_counted(tmp_path):
    _image(tmp_path / "good.jpg", 16, 16)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match=rf"image id {folder_image_id('broken.jpg')}: image file .*broken.jpg cannot be decoded"):
        load_image_folder(tmp_path)
    ann = load_image_folder(tmp_path, on_bad="skip")
    assert [img["file_name"] for img in ann.images] == ["good.jpg"] and ann.skipped == {"images": 1}


def test_empty_or_missing_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match="no image files"):
        load_image_folder(tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        load_image_folder(tmp_path / "nope")


def test_merge_categories_makes_one_object_category(lvis_files):
    ann = load_annotations(*lvis_files)
    before_ids = [a["category_id"] for a in ann.annotations]
    merged = merge_categories(ann)
    assert merged.categories == [{"id": 1, "name": "object"}]
    assert [a["category_id"] for a in merged.annotations] == [1] * len(ann.annotations)
    assert [a["bbox"] for a in merged.annotations] == [a["bbox"] for a in ann.annotations]
    assert merged.instance_count.tolist() == [len(ann.annotations)]
    for before, after in zip(ann.images, merged.images):
        if "neg_category_ids" in before:
            assert after["neg_category_ids"] == []
        if "not_exhaustive_category_ids" in before:
            assert after["not_exhaustive_category_ids"] == ([1] if before["not_exhaustive_category_ids"] else [])
    assert [a["category_id"] for a in ann.annotations] == before_ids and len(set(before_ids)) > 1  # untouched
