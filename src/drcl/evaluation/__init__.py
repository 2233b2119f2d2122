"""Evaluation under LVIS rules (federated, top 300 per image): AP, AP50, AP75, APs/m/l,
APr/c/f for bbox and segm, equal to lvis-api's numbers, computed by faster-coco-eval."""

from drcl.evaluation.lvis_eval import (
    CSV_COLUMNS,
    IOU_TYPES,
    MAX_DETS,
    METRICS,
    evaluate_detections,
    format_results,
    plot_ap_vs_frequency,
    write_per_category_csv,
)

__all__ = [
    "CSV_COLUMNS",
    "IOU_TYPES",
    "MAX_DETS",
    "METRICS",
    "evaluate_detections",
    "format_results",
    "plot_ap_vs_frequency",
    "write_per_category_csv",
]
