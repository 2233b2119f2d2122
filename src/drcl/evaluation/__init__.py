"""Evaluation under LVIS rules (federated, top 300 per image): AP, AP50, AP75, APs/m/l,
APr/c/f for bbox and segm, equal to lvis-api's numbers, computed by faster-coco-eval; per-class
AP against training frequency; and, in :mod:`drcl.evaluation.visualize`, detections drawn on
images, a gallery and a confusion table."""

from drcl.evaluation.lvis_eval import (
    CSV_COLUMNS,
    IOU_TYPES,
    MAX_DETS,
    METRICS,
    TRAIN_CSV_COLUMNS,
    add_train_counts,
    evaluate_detections,
    format_results,
    plot_ap_vs_frequency,
    plot_ap_vs_frequency_panels,
    write_per_category_csv,
)

__all__ = [
    "CSV_COLUMNS",
    "IOU_TYPES",
    "MAX_DETS",
    "METRICS",
    "TRAIN_CSV_COLUMNS",
    "add_train_counts",
    "evaluate_detections",
    "format_results",
    "plot_ap_vs_frequency",
    "plot_ap_vs_frequency_panels",
    "write_per_category_csv",
]
