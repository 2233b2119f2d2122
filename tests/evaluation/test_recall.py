"""Proposal recall against a hand computation."""

import pytest
import torch

from drcl.data.annotations import Annotations
from drcl.evaluation.recall import best_iou, format_recall, proposal_recall


def _ann():
    images = [{"id": 10, "width": 100, "height": 100, "file_name": "a.jpg"},
              {"id": 20, "width": 100, "height": 100, "file_name": "b.jpg"}]
    categories = [{"id": 1, "name": "r1", "frequency": "r"}, {"id": 2, "name": "f1", "frequency": "f"}]
    annotations = [  # xywh
        {"id": 1, "image_id": 10, "category_id": 1, "bbox": [0, 0, 10, 10]},
        {"id": 2, "image_id": 10, "category_id": 2, "bbox": [50, 50, 20, 20]},
        {"id": 3, "image_id": 20, "category_id": 2, "bbox": [0, 0, 40, 40]},
        {"id": 4, "image_id": 20, "category_id": 2, "bbox": [60, 0, 40, 10], "iscrowd": 1},
    ]
    return Annotations.from_records("gt.json", images, annotations, categories)


def test_recall_matches_a_hand_computation():
    proposals = {
        # image 10: first proposal is box 2 shifted by 5 px: IoU = 15*15 / (400 + 400 - 225) = 225/575 = 0.391;
        # second covers box 1 exactly (IoU 1); the third is box 2 itself
        10: torch.tensor([[55.0, 55, 75, 75], [0, 0, 10, 10], [50, 50, 70, 70]]),
        # image 20: [0, 0, 40, 20] has IoU 800 / 1600 = 0.5 with box 3: exactly at the threshold counts
        20: torch.tensor([[0.0, 0, 40, 20]]),
    }
    r = proposal_recall(_ann(), proposals, ks=(1, 2, 3), iou=0.5)
    # K=1: box 1 no (IoU 0), box 2 no (0.391), box 3 yes -> 1/3; K=2: box 1 yes -> 2/3; K=3: all -> 3/3
    assert r["all"] == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})
    assert r["r"] == pytest.approx({1: 0.0, 2: 1.0, 3: 1.0})      # box 1
    assert r["f"] == pytest.approx({1: 0.5, 2: 0.5, 3: 1.0})      # boxes 2 and 3 (the crowd box 4 is left out)
    assert r["c"] == {1: None, 2: None, 3: None}
    assert r["boxes"] == {"all": 3, "r": 1, "c": 0, "f": 2}
    assert best_iou(torch.tensor([[50.0, 50, 70, 70]]), proposals[10], 1).item() == pytest.approx(225 / 575)


def test_an_image_without_proposals_recalls_nothing():
    r = proposal_recall(_ann(), {10: torch.tensor([[0.0, 0, 10, 10]])}, ks=(8,))
    assert r["all"][8] == pytest.approx(1 / 3)
    table = format_recall({"hand": {**r, "ms_per_image": 2.0}}, ks=(8,))
    assert "| hand | 33.3 | 100.0 | - | 0.0 | 2 |" in table
