"""Evaluation: scene metrics against the procedural worlds' ground truth, and FVD
(``vidgen.eval.fvd.fvd``; the module, not re-exported here, so that its name stays the
module's)."""

from vidgen.eval.fvd import (
    FVDError,
    frechet_distance,
    i3d_features,
    kernel_distance,
    load_i3d,
)
from vidgen.eval.scene import (
    Detections,
    MotionStats,
    SceneScorer,
    centroid_error,
    count_accuracy,
    detect_objects,
    motion_stats,
    scene_metrics,
    seam_ratio,
)

__all__ = [
    "Detections",
    "FVDError",
    "MotionStats",
    "SceneScorer",
    "centroid_error",
    "count_accuracy",
    "detect_objects",
    "frechet_distance",
    "i3d_features",
    "kernel_distance",
    "load_i3d",
    "motion_stats",
    "scene_metrics",
    "seam_ratio",
]
