import json

import pytest
import torch

from drcl.data.annotations import load_annotations
from drcl.data.boxes import ProposalBoxes, RandomBoxes, load_proposals
from drcl.data.dataset import DetectionDataset
from drcl.errors import DataError


def _proposals(tmp_path, records):
    path = tmp_path / "proposals.json"
    path.write_text(json.dumps(records))
    return path


def test_proposals_top_k_by_score_clipped_to_image(lvis_files, tmp_path):
    ann = load_annotations(lvis_files[0])
    path = _proposals(tmp_path, [
        {"image_id": 1, "bbox": [0, 0, 10, 10], "score": 0.2, "category_id": 1},
        {"image_id": 1, "bbox": [50, 40, 30, 30], "score": 0.9, "category_id": 1},
        {"image_id": 1, "bbox": [5, 5, 5, 5], "score": 0.5, "category_id": 1},
        {"image_id": 2, "bbox": [1, 2, 3, 4], "score": 0.01, "category_id": 1},
    ])
    props = load_proposals(path, ann, max_per_image=2, min_score=0.05)
    assert set(props) == {1}
    assert props[1].tolist() == [[50, 40, 64, 48], [5, 5, 10, 10]]  # 0.9 first, clipped to 64x48


@pytest.mark.parametrize("record,words", [
    ({"image_id": 99, "bbox": [0, 0, 1, 1], "score": 1}, "proposal #0: unknown image id 99"),
    ({"image_id": 1, "bbox": [0, 0, 0, 1], "score": 1}, r"proposal #0: bbox \[0, 0, 0, 1\] has non-positive"),
    ({"image_id": 1, "bbox": [0, 0, 1], "score": 1}, "proposal #0: bbox must be 4 finite numbers"),
    ({"image_id": 1, "score": 1}, "proposal #0: needs 'image_id' and 'bbox'"),
    ({"image_id": 1, "bbox": [0, 0, 1, 1], "score": "high"}, "proposal #0: score must be a finite number"),
])
def test_bad_proposal_names_file_and_record(lvis_files, tmp_path, record, words):
    ann = load_annotations(lvis_files[0])
    path = _proposals(tmp_path, [record])
    with pytest.raises(DataError, match=words) as e:
        load_proposals(path, ann)
    assert str(e.value).startswith(str(path))


def test_proposal_boxes_replace_targets(lvis_files, tmp_path):
    path, images = lvis_files
    ann = load_annotations(path, images)
    props = load_proposals(_proposals(tmp_path, [{"image_id": 1, "bbox": [2, 2, 8, 8], "score": 1}]), ann)
    ds = DetectionDataset(ann, transforms=ProposalBoxes(props))
    _, t = ds[0]
    assert t["boxes"].tolist() == [[2, 2, 10, 10]] and t["labels"].tolist() == [0] and t["ann_ids"].tolist() == [0]
    _, t = ds[1]  # no proposals for image 2
    assert t["boxes"].shape == (0, 4)


def test_random_boxes_lie_inside_with_bounded_sides(lvis_files):
    path, images = lvis_files
    torch.manual_seed(0)
    ds = DetectionDataset(load_annotations(path, images), transforms=RandomBoxes(n=50, min_frac=0.2, max_frac=0.4))
    _, t = ds[0]  # 64 x 48
    b = t["boxes"]
    assert b.shape == (50, 4) and (t["labels"] == 0).all()
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= 64).all() and (b[:, 1] >= 0).all() and (b[:, 3] <= 48).all()
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    assert ((w >= 0.2 * 64 - 1e-4) & (w <= 0.4 * 64 + 1e-4)).all()
    assert ((h >= 0.2 * 48 - 1e-4) & (h <= 0.4 * 48 + 1e-4)).all()
