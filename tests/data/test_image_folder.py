"""Image folders as training sets, and merging categories for a class-agnostic detector."""

import numpy as np
import pytest
from PIL import Image

from drcl.data.annotations import load_annotations, load_image_folder, merge_categories
from drcl.errors import DataError


def _image(path, w, h, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def test_folder_ids_are_places_in_the_sorted_listing(tmp_path):
    _image(tmp_path / "b.jpg", 40, 30)
    _image(tmp_path / "sub" / "a.PNG", 20, 50)
    (tmp_path / "notes.txt").write_text("not an image")
    ann = load_image_folder(tmp_path)
    assert [(img["id"], img["file_name"]) for img in ann.images] == [(1, "b.jpg"), (2, "sub/a.PNG")]
    assert [(img["width"], img["height"]) for img in ann.images] == [(40, 30), (20, 50)]
    assert ann.annotations == [] and ann.categories == [] and ann.image_path(1) == tmp_path / "sub" / "a.PNG"
    assert load_image_folder(tmp_path).images == ann.images  # the same folder, the same ids


def test_bad_image_in_folder_is_named_or_skipped_and_counted(tmp_path):
    _image(tmp_path / "good.jpg", 16, 16)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    _image(tmp_path / "later.jpg", 16, 16)
    with pytest.raises(DataError, match=r"image id 1: image file .*broken.jpg cannot be decoded"):
        load_image_folder(tmp_path)
    ann = load_image_folder(tmp_path, on_bad="skip")
    # the bad file keeps its place: the others' ids do not move
    assert [(img["id"], img["file_name"]) for img in ann.images] == [(2, "good.jpg"), (3, "later.jpg")]
    assert ann.skipped == {"images": 1}


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
