"""Data: COCO / LVIS v1 reading and validation, the detection Dataset, statistics and
synthetic long-tailed data."""

from drcl.data.annotations import Annotations, frequency_group, load_annotations
from drcl.data.dataset import DetectionDataset, collate

__all__ = ["Annotations", "DetectionDataset", "collate", "frequency_group", "load_annotations"]
