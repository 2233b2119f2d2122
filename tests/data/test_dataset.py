import json

import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from drcl.data.annotations import load_annotations
from drcl.data.dataset import DetectionDataset, collate, segmentation_mask
from drcl.errors import DataError


@pytest.fixture
def dataset(lvis_files):
    path, images = lvis_files
    return DetectionDataset(load_annotations(path, images))


def test_item_types_and_values(dataset):
    image, target = dataset[0]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
    assert image.shape == (3, 48, 64)
    boxes = target["boxes"]
    assert isinstance(boxes, tv_tensors.BoundingBoxes)
    assert boxes.format == tv_tensors.BoundingBoxFormat.XYXY and boxes.canvas_size == (48, 64)
    # COCO [x, y, w, h] -> XYXY
    torch.testing.assert_close(boxes.as_subclass(torch.Tensor), torch.tensor([[4.0, 6.0, 24.0, 16.0], [30.0, 20.0, 63.5, 47.5]]))
    assert target["labels"].tolist() == [1, 2]  # contiguous, 0 is background
    assert target["ann_ids"].tolist() == [10, 11]
    assert target["image_id"] == 1
    assert [dataset.category_ids[label - 1] for label in target["labels"]] == [1, 2]


def test_image_without_annotations(dataset):
    _, target = dataset[2]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, 50, 50)


def test_masks_rasterise_polygons(dataset):
    _, target = dataset[1]
    masks = target["masks"]
    assert isinstance(masks, tv_tensors.Mask) and masks.shape == (2, 60, 80)
    # polygon [[0,0,80,0,0,60]] is a right triangle of area 2400
    assert abs(int(masks[0].sum()) - 2400) <= 80 + 60  # at most one pixel row along the edges
    tri = masks[0].numpy().astype(bool)
    assert tri[2, 2] and not tri[57, 77]  # inside near the right angle, outside near the far corner


def test_boxes_poking_out_are_clipped(tmp_path, lvis_dict, lvis_files):
    _, images = lvis_files
    lvis_dict["annotations"][1]["bbox"] = [30.0, 20.0, 34.5, 28.5]  # 0.5 px past the edge: accepted
    path = tmp_path / "edge.json"
    path.write_text(json.dumps(lvis_dict))
    _, target = DetectionDataset(load_annotations(path, images))[0]
    assert target["boxes"][1].tolist() == [30.0, 20.0, 64.0, 48.0]


def test_crowd_annotations_left_out(tmp_path, lvis_dict, lvis_files):
    _, images = lvis_files
    lvis_dict["annotations"][0]["iscrowd"] = 1
    path = tmp_path / "crowd.json"
    path.write_text(json.dumps(lvis_dict))
    _, target = DetectionDataset(load_annotations(path, images))[0]
    assert target["ann_ids"].tolist() == [11]


def test_transforms_move_boxes_with_the_image(lvis_files):
    path, images = lvis_files
    ds = DetectionDataset(load_annotations(path, images), transforms=v2.RandomHorizontalFlip(p=1.0))
    image, target = ds[0]
    plain_image, _ = DetectionDataset(load_annotations(path, images))[0]
    torch.testing.assert_close(image, plain_image.flip(-1))
    assert target["boxes"][0].tolist() == [64 - 24.0, 6.0, 64 - 4.0, 16.0]
    assert target["masks"][0].flip(-1)[6:16, 4:24].all()


def test_undecodable_file_names_image(lvis_files):
    path, images = lvis_files
    (images / "000000000002.jpg").write_bytes(b"garbage")
    ds = DetectionDataset(load_annotations(path, images))
    with pytest.raises(DataError, match=r"train\.json: image id 2 \(000000000002\.jpg\): image file .* cannot be decoded"):
        ds[1]


def test_missing_file_names_image(lvis_files):
    path, images = lvis_files
    (images / "000000000002.jpg").unlink()
    with pytest.raises(DataError, match=r"image id 2 \(000000000002\.jpg\): image file .* not found"):
        DetectionDataset(load_annotations(path, images))[1]


def test_rle_and_polygon_rasterise_alike():
    from faster_coco_eval.core import mask as mask_util

    m_poly = segmentation_mask([[2, 2, 8, 2, 8, 6, 2, 6]], [2, 2, 6, 4], 10, 12)
    rle = mask_util.encode(np.asfortranarray(m_poly))
    rle["counts"] = rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]
    m_rle = segmentation_mask(rle, [2, 2, 6, 4], 10, 12)
    np.testing.assert_array_equal(m_poly, m_rle)
    assert m_poly.sum() == 24


def test_collate_keeps_lists(dataset):
    images, targets = collate([dataset[0], dataset[1]])
    assert len(images) == 2 and targets[1]["image_id"] == 2
