"""Evaluation: scene metrics against the procedural worlds' ground truth."""

from vidgen.eval.scene import (
    Detections,
    MotionStats,
    centroid_error,
    count_accuracy,
    detect_objects,
    motion_stats,
    scene_metrics,
    seam_ratio,
)

__all__ = [
    "Detections",
    "MotionStats",
    "centroid_error",
    "count_accuracy",
    "detect_objects",
    "motion_stats",
    "scene_metrics",
    "seam_ratio",
]
