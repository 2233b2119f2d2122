"""Tests for the synthetic long-tailed LVIS-format dataset generator."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from drcl.config import load_config
from drcl.data import synthetic as syn
from drcl.data.annotations import load_annotations

SMALL = dict(classes=6, train_images=16, val_images=6, image_size=64, imbalance=20.0)

IMAGE_KEYS = {
    "id", "width", "height", "coco_url", "flickr_url", "license", "date_captured",
    "neg_category_ids", "not_exhaustive_category_ids",
}
ANNOTATION_KEYS = {"id", "image_id", "category_id", "bbox", "area", "segmentation"}
CATEGORY_KEYS = {
    "id", "name", "synset", "synonyms", "def", "frequency", "image_count", "instance_count",
}


def _load(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"{split}.json").read_text())


def _image_counts(annotations: list[dict]) -> Counter:
    return Counter(c for _, c in {(a["image_id"], a["category_id"]) for a in annotations})


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("small")
    return root, syn.make_dataset(root, seed=3, progress=False, **SMALL)


@pytest.fixture(scope="module")
def default_plan() -> syn.DatasetPlan:
    return syn.plan_dataset()  # the real defaults, planned without drawing (~2 s)


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(classes=2), "classes"),
        (dict(classes=syn.MAX_CLASSES + 1), "classes"),
        (dict(train_images=0), "train_images"),
        (dict(val_images=0), "val_images"),
        (dict(classes=60, val_images=9), "too few"),
        (dict(image_size=63), "image_size"),
        (dict(imbalance=0.5), "imbalance"),
        (dict(imbalance=float("nan")), "imbalance"),
        (dict(seed=-1), "seed"),
        (dict(processes=0), "processes"),
    ],
)
def test_bad_arguments_raise_value_error(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        syn.make_dataset(tmp_path, progress=False, **kwargs)
    assert not any(tmp_path.iterdir())  # nothing written


# --------------------------------------------------------------------------- schema


def test_layout_and_summary(small):
    root, summary = small
    for split in ("train", "val"):
        data = _load(root, split)
        jpgs = sorted((root / "images" / split).glob("*.jpg"))
        assert len(data["images"]) == len(jpgs) == SMALL[f"{split}_images"]
        assert summary[split]["images"] == len(jpgs)
        assert summary[split]["instances"] == len(data["annotations"])
        assert Path(summary[split]["annotations"]) == root / "annotations" / f"{split}.json"
    groups = Counter(c["frequency"] for c in _load(root, "train")["categories"])
    assert summary["frequency"] == {g: groups[g] for g in "rcf"}
    assert summary["categories"] == SMALL["classes"]


def test_lvis_v1_schema(small):
    root, _ = small
    train, val = _load(root, "train"), _load(root, "val")
    for split, data in (("train", train), ("val", val)):
        assert set(data) == {"info", "licenses", "images", "annotations", "categories"}
        for im in data["images"]:
            assert set(im) == IMAGE_KEYS  # in particular no file_name
            name = im["coco_url"].rsplit("/", 1)[-1]
            assert im["coco_url"].endswith(f"/{split}/{name}")
            assert (root / "images" / split / name).is_file()
            assert Image.open(root / "images" / split / name).size == (im["width"], im["height"])
            assert im["not_exhaustive_category_ids"] == []
        for ann in data["annotations"]:
            assert set(ann) == ANNOTATION_KEYS  # in particular no iscrowd
        for cat in data["categories"]:
            assert set(cat) == CATEGORY_KEYS
    assert train["categories"] == val["categories"]
    assert [c["id"] for c in train["categories"]] == list(range(1, SMALL["classes"] + 1))


def test_ids_unique_across_splits(small):
    root, _ = small
    train, val = _load(root, "train"), _load(root, "val")
    image_ids = [im["id"] for d in (train, val) for im in d["images"]]
    ann_ids = [a["id"] for d in (train, val) for a in d["annotations"]]
    assert len(set(image_ids)) == len(image_ids) and len(set(ann_ids)) == len(ann_ids)
    assert min(im["id"] for im in val["images"]) > max(im["id"] for im in train["images"])
    assert min(a["id"] for a in val["annotations"]) > max(a["id"] for a in train["annotations"])
    for data in (train, val):
        ids = {im["id"] for im in data["images"]}
        assert {a["image_id"] for a in data["annotations"]} <= ids


def test_negative_categories_are_the_absent_ones(small):
    root, _ = small
    for split in ("train", "val"):
        data = _load(root, split)
        present = {}
        for a in data["annotations"]:
            present.setdefault(a["image_id"], set()).add(a["category_id"])
        every = set(range(1, SMALL["classes"] + 1))
        for im in data["images"]:
            assert im["neg_category_ids"] == sorted(every - present.get(im["id"], set()))


def test_category_counts_come_from_train(small):
    root, _ = small
    train = _load(root, "train")
    instances = Counter(a["category_id"] for a in train["annotations"])
    images = _image_counts(train["annotations"])
    for cat in train["categories"]:
        assert cat["instance_count"] == instances[cat["id"]]
        assert cat["image_count"] == images[cat["id"]] >= 1
        assert cat["frequency"] == syn.frequency_group(cat["image_count"])
        assert cat["name"] == syn.class_spec(cat["id"]).name


# --------------------------------------------------------------------------- geometry


def test_boxes_inside_image_and_tight_around_polygons(small):
    root, _ = small
    for split in ("train", "val"):
        data = _load(root, split)
        sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
        for ann in data["annotations"]:
            width, height = sizes[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert w >= syn.MIN_BOX_SIDE and h >= syn.MIN_BOX_SIDE
            assert x >= 0 and y >= 0 and x + w <= width + 1e-6 and y + h <= height + 1e-6
            xy = np.concatenate([np.reshape(p, (-1, 2)) for p in ann["segmentation"]])
            assert len(xy) >= 3
            assert xy.min() >= 0 and (xy <= [width, height]).all()
            bounds = [*xy.min(0), *(xy.max(0) - xy.min(0))]
            np.testing.assert_allclose(bounds, ann["bbox"], atol=0.011)
            area = sum(syn.polygon_area(p) for p in ann["segmentation"])
            assert ann["area"] == pytest.approx(area, abs=0.01) and ann["area"] > 0


def _inside(xy: np.ndarray, size: int) -> np.ndarray:
    """Even-odd point-in-polygon at pixel centres: a (size, size) boolean mask."""
    py, px = np.mgrid[:size, :size] + 0.5
    inside = np.zeros((size, size), dtype=bool)
    for (x0, y0), (x1, y1) in zip(xy, np.roll(xy, -1, axis=0)):
        crosses = (y0 > py) != (y1 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (px < x_at)
    return inside


def _one_object(
    category_id: int, seed: int, center=(45.0, 50.0), half=(30.0, 24.0), angle=0.2, size=96
) -> syn.ImagePlan:
    """An image plan holding one object of the given pose (built like the planner does)."""
    unit = syn._UNIT_SHAPES[syn.class_spec(category_id).shape]
    pts = syn._pose_points(unit, np.asarray(half), np.asarray(angle)) + center
    points = syn._clip_polygon([tuple(q) for q in pts.tolist()], size)
    flat = tuple(round(v, 2) for q in points for v in q)
    obj = syn.ObjectPlan(category_id, center, half, angle, flat)
    return syn.ImagePlan(1, "train", 0, size, seed, (obj,))


def _drawn_pixels(plan: syn.ImagePlan) -> np.ndarray:
    with_object = np.asarray(syn.render_image(plan), dtype=int)
    empty = syn.ImagePlan(plan.image_id, plan.split, plan.index, plan.size, plan.seed, ())
    return np.abs(with_object - np.asarray(syn.render_image(empty), dtype=int)).sum(-1) > 0


@pytest.mark.parametrize("shape", syn.SHAPES)
def test_polygon_covers_drawn_object(shape):
    cid = next(i for i in range(1, syn.MAX_CLASSES + 1) if syn.class_spec(i).shape == shape)
    for plan in (_one_object(cid, seed=1), _one_object(cid, seed=2, center=(10.0, 85.0))):
        drawn = _drawn_pixels(plan)
        polygon = _inside(np.reshape(plan.objects[0].polygon, (-1, 2)), plan.size)
        iou = (drawn & polygon).sum() / (drawn | polygon).sum()
        assert iou > 0.99, (shape, iou)
        assert syn.polygon_area(plan.objects[0].polygon) == pytest.approx(polygon.sum(), rel=0.1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools on NumPy 2
def test_official_lvis_api_reads_the_files(small):
    """lvis-api loads the JSON, and its (pycocotools) masks agree with the drawn masks."""
    import lvis
    root, _ = small
    api = lvis.LVIS(str(root / "annotations" / "train.json"))
    assert len(api.get_img_ids()) == SMALL["train_images"]
    assert len(api.get_cat_ids()) == SMALL["classes"]
    for ann in api.load_anns(api.get_ann_ids()[:10]):
        official = api.ann_to_mask(ann).astype(bool)
        ours = _inside(np.reshape(ann["segmentation"][0], (-1, 2)), SMALL["image_size"])
        assert (official & ours).sum() / (official | ours).sum() > 0.85
        assert official.sum() == pytest.approx(ann["area"], rel=0.15, abs=10)


# --------------------------------------------------------------------------- determinism


def test_images_rendered_in_processes_are_the_same_bytes(small, tmp_path):
    first, _ = small
    pooled = tmp_path / "pooled"
    syn.make_dataset(pooled, seed=3, progress=False, processes=2, **SMALL)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(pooled) for p in pooled.rglob("*") if p.is_file())
    for rel in files:
        assert (first / rel).read_bytes() == (pooled / rel).read_bytes(), rel


def test_same_seed_same_bytes_other_seed_other_data(small, tmp_path):
    first, _ = small
    again, other = tmp_path / "again", tmp_path / "other"
    syn.make_dataset(again, seed=3, progress=False, **SMALL)
    syn.make_dataset(other, seed=4, progress=False, **SMALL)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (first / rel).read_bytes() == (again / rel).read_bytes(), rel
    for rel in (Path("annotations/train.json"), Path("annotations/val.json"), files[-1]):
        assert (first / rel).read_bytes() != (other / rel).read_bytes(), rel
    # class appearance does not follow the seed
    names = [[c["name"] for c in _load(root, "train")["categories"]] for root in (first, other)]
    assert names[0] == names[1]


def test_plan_is_pure_and_matches_written_annotations(small):
    root, _ = small
    plan = syn.plan_dataset(seed=3, **SMALL)
    assert plan == syn.plan_dataset(seed=3, **SMALL)
    content = syn.lvis_dicts(plan)
    for split in ("train", "val"):
        assert content[split] == _load(root, split)


# --------------------------------------------------------------------------- long tail


def test_all_frequency_groups_at_defaults(default_plan):
    cats = syn.lvis_dicts(default_plan)["train"]["categories"]
    groups = Counter(c["frequency"] for c in cats)
    assert set(groups) == {"r", "c", "f"}, groups
    assert all(c["image_count"] >= 1 for c in cats)
    counts = [c["instance_count"] for c in cats]
    assert 50 <= max(counts) / min(counts) <= 400  # imbalance=200, up to rounding


def test_val_is_balanced_and_covers_every_class(default_plan):
    val = syn.lvis_dicts(default_plan)["val"]
    instances = Counter(a["category_id"] for a in val["annotations"])
    images = _image_counts(val["annotations"])
    assert set(instances) == set(images) == set(range(1, 61))
    assert max(instances.values()) - min(instances.values()) <= 1
    assert max(images.values()) <= 4 * min(images.values())


def test_objects_per_image_and_sizes(default_plan):
    size = default_plan.image_size
    per_image = [len(im.objects) for im in default_plan.train + default_plan.val]
    assert min(per_image) >= 1 and max(per_image) <= syn.MAX_OBJECTS
    longest = np.array([2 * max(o.half_size) for im in default_plan.train for o in im.objects])
    assert longest.min() >= 0.15 * size - 1e-6 and longest.max() <= 0.45 * size + 1e-6


@settings(max_examples=60, deadline=None)
@given(
    classes=st.integers(3, 300),
    extra=st.integers(0, 5000),
    imbalance=st.floats(1.0, 1000.0),
)
def test_long_tail_counts_properties(classes, extra, imbalance):
    total = classes + extra
    counts = syn.long_tail_counts(total, classes, imbalance)
    assert counts.sum() == total and counts.min() >= 1 and len(counts) == classes
    if imbalance == 1.0:
        assert counts.max() - counts.min() <= 1


def test_long_tail_counts_follow_the_imbalance():
    counts = syn.long_tail_counts(100_000, 50, 100.0)
    assert (np.diff(counts) <= 0).all()
    assert counts[0] / counts[-1] == pytest.approx(100.0, rel=0.05)


# --------------------------------------------------------------------------- classes


def test_class_specs_are_unique_and_fine_grained():
    specs = [syn.class_spec(i) for i in range(1, syn.MAX_CLASSES + 1)]
    assert len({(s.shape, s.texture, s.fill, s.pattern) for s in specs}) == syn.MAX_CLASSES
    assert len({s.name for s in specs}) == syn.MAX_CLASSES
    assert syn.class_spec(7) == syn.class_spec(7)
    first = specs[:60]
    for s in first:  # every default class has a sibling differing in exactly one attribute
        for attr in ("shape", "texture", "fill"):
            same = [t for t in first if t is not s and all(
                getattr(t, a) == getattr(s, a) for a in ("shape", "texture", "fill") if a != attr)]
            assert same, (s.name, attr)
    with pytest.raises(ValueError):
        syn.class_spec(0)


@pytest.mark.parametrize("category_id", [1, 17, 60, 500])
def test_class_appearance_does_not_depend_on_seed(category_id):
    """The same pose in two images with different seeds: object pixels differ only by noise."""
    a, b = _one_object(category_id, seed=0), _one_object(category_id, seed=99)
    pixels = [np.asarray(syn.render_image(p), dtype=float) for p in (a, b)]
    inside = _drawn_pixels(a) & _drawn_pixels(b)
    inside &= _inside(np.reshape(a.objects[0].polygon, (-1, 2)), a.size)
    assert inside.sum() > 500
    diff = np.abs(pixels[0] - pixels[1])
    assert diff[inside].mean() < 8  # pixel noise only (sigma 4 per image)
    assert diff[~inside].mean() > 8  # the seeded backgrounds differ
    fill, pattern = syn.class_spec(category_id).fill_rgb, syn.class_spec(category_id).pattern_rgb
    colours = pixels[0][inside]
    near = np.minimum(np.abs(colours - fill).sum(1), np.abs(colours - pattern).sum(1))
    assert np.median(near) < 15  # the object is painted in its two class colours


def test_crowded_scenes_have_more_objects_than_lcl_takes():
    plan = syn.plan_dataset(classes=10, train_images=200, val_images=20, max_objects=16, seed=1)
    per_image = np.array([len(im.objects) for im in plan.train])
    assert per_image.max() <= 16 and per_image.min() >= 1
    # instance-level rebalancing needs images with more boxes than the 8 LCL takes
    assert (per_image > 8).mean() > 0.3
    scale = np.sqrt(6 / 16)
    longest = np.array([2 * max(o.half_size) for im in plan.train for o in im.objects])
    assert longest.max() <= 0.45 * scale * plan.image_size + 1e-6
    assert longest.min() >= 0.15 * scale * plan.image_size - 1e-6


@pytest.mark.parametrize("bad", [5, 33, 8.5])
def test_max_objects_out_of_range(bad):
    with pytest.raises(ValueError, match="max_objects"):
        syn.plan_dataset(max_objects=bad)


def test_crowded_scenes_need_room_for_their_smallest_objects():
    with pytest.raises(ValueError, match="image_size=64 is too small for max_objects=32.*use image_size >= 103"):
        syn.plan_dataset(classes=8, train_images=20, val_images=4, image_size=64, max_objects=32)
    plan = syn.plan_dataset(classes=8, train_images=20, val_images=4, image_size=103, max_objects=32)
    boxes = [o.bbox for im in plan.train for o in im.objects]
    assert min(min(b[2:]) for b in boxes) >= syn.MIN_BOX_SIDE


# --------------------------------------------------------------------------- disjoint class ranges


def test_first_class_shifts_ids_and_appearances_balanced_with_imbalance_1():
    target = syn.plan_dataset(classes=8, train_images=40, val_images=8, image_size=64, imbalance=20.0, seed=0)
    upstream = syn.plan_dataset(classes=12, train_images=60, val_images=8, image_size=64, imbalance=1.0, seed=0,
                                first_class=9)
    content = syn.lvis_dicts(upstream)["train"]
    ids = [c["id"] for c in content["categories"]]
    assert ids == list(range(9, 21))
    assert {a["category_id"] for a in content["annotations"]} == set(ids)
    # an id looks the same in every dataset; the two sets share no appearance
    assert [c["name"] for c in content["categories"]] == [syn.class_spec(i).name for i in ids]
    target_names = {c["name"] for c in syn.lvis_dicts(target)["train"]["categories"]}
    assert not target_names & {c["name"] for c in content["categories"]}
    # imbalance 1: every class has the same number of instances, within one
    counts = Counter(a["category_id"] for a in content["annotations"])
    assert max(counts.values()) - min(counts.values()) <= 1
    assert all(set(im["neg_category_ids"]) <= set(ids) for im in content["images"])
    assert all(c["instance_count"] == counts[c["id"]] for c in content["categories"])


def test_first_class_range_is_checked():
    with pytest.raises(ValueError, match="first_class"):
        syn.plan_dataset(classes=10, train_images=4, val_images=4, first_class=syn.MAX_CLASSES - 8)
    with pytest.raises(ValueError, match="first_class"):
        syn.plan_dataset(classes=10, train_images=4, val_images=4, first_class=0)


def test_config_overrides_point_a_config_at_the_generated_files(small):
    root, summary = small
    data = load_config("tiny", syn.config_overrides(root))["data"]
    for split in ("train", "val"):
        ann = load_annotations(data[f"{split}_json"], data[f"{split}_images"])
        assert ann.num_images == summary[split]["images"]
        assert data[f"{split}_json"] == summary[split]["annotations"]
