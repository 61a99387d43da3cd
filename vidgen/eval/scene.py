"""Scene metrics for the procedural worlds, computed from pixels alone.

Each object of a world has its own palette colour, so objects are found by classifying every
pixel to its nearest palette colour and keeping colours that cover at least ``min_blob``
pixels. That works the same on clean renders, lossless mp4s and generated videos, so the
metrics compare generators against the worlds' exact ground truth. Lossy (yuv420p) mp4s
score lower: half-size colour planes put 15-30% of an object's pixels past the colour
tolerance (over 12 real videos, count accuracy 0.949 against 0.984, speed ratio 0.980
against 0.946; README, ``vidgen eval``).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from vidgen.validate import check_int, check_number
from vidgen.worlds.palette import ScenePalette

# Smallest object the worlds draw: a triangle of radius 5 covers ~32 pixels, the agent 36.
# Half of that still counts a partly hidden object and ignores specks of noise.
MIN_BLOB_PX = 12

# A frame-to-frame centroid displacement below this many pixels counts as "not moving": above
# the jitter of pixel quantisation and small generation noise, far below the worlds' speeds.
MIN_MOVE_PX = 0.25


@dataclass(frozen=True)
class Detections:
    """Objects found in T frames, one slot per palette colour.

    present: (T, O) bool, any object of that colour; centroids: (T, O, 2) float64 (x, y) of
    the one followed (NaN where absent); areas: (T, O) its pixel count; blobs: (T, O) how
    many objects of that colour (more than one only in generated videos).
    """

    names: tuple[str, ...]
    present: np.ndarray
    centroids: np.ndarray
    areas: np.ndarray
    blobs: np.ndarray | None = None  # (T, O) objects of each colour; None: ``present``

    @property
    def counts(self) -> np.ndarray:
        """(T,) number of visible objects per frame (every blob, duplicates of a colour
        included)."""
        return self.present.sum(axis=1) if self.blobs is None else self.blobs.sum(axis=1)

    def index(self, name: str) -> int:
        if name not in self.names:
            raise KeyError(f"object {name!r} is not in the palette; known: {list(self.names)}")
        return self.names.index(name)


@dataclass(frozen=True)
class MotionStats:
    """Centroid motion of the detected objects between consecutive frames.

    mean_speed: pixels per frame over all (object, transition) pairs where the object is
    visible in both frames (0.0 if there is none). moving_fraction: fraction of transitions
    in which the visible objects move by at least ``MIN_MOVE_PX`` on average; a frozen video
    scores 0. transitions: how many frame transitions were scored (those inside clips, when
    ``motion_stats`` is given a clip length); pairs: how many (object, transition) pairs the
    speed is measured on (0: no object is seen in two consecutive frames, so the video has
    no measurable speed, which is not a speed of 0).
    """

    mean_speed: float
    moving_fraction: float
    per_object_speed: dict[str, float]
    transitions: int
    pairs: int = 0


def _as_frames(frames: np.ndarray | torch.Tensor, name: str = "frames") -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{name} must be (T, H, W, 3), got shape {tuple(frames.shape)}")
    if frames.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got {frames.dtype}")
    if frames.shape[1] < 1 or frames.shape[2] < 1:  # a ZeroDivisionError, or NaN figures
        raise ValueError(f"{name} must have H, W >= 1, got shape {tuple(frames.shape)}")
    return frames


def default_max_distance(palette: ScenePalette) -> float:
    """Half the smallest distance between two palette colours: a pixel farther than that from
    every colour is not any of them (an anti-aliased or compressed edge, or noise)."""
    colours = palette.colours()
    dist = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
    return float(dist[~np.eye(len(colours), dtype=bool)].min() / 2)


def classify_pixels(
    frames: np.ndarray | torch.Tensor, palette: ScenePalette, max_distance: float | None = None
) -> np.ndarray:
    """(T, H, W) index of the nearest palette colour per pixel (objects first, in palette
    order, then scenery), or -1 where the nearest colour is farther than ``max_distance``
    (default ``default_max_distance``)."""
    frames = _as_frames(frames)
    colours = palette.colours()  # (P, 3)
    limit = default_max_distance(palette) if max_distance is None else max_distance
    labels = np.empty(frames.shape[:3], dtype=np.int16)
    # Chunked by pixels and one colour at a time, so no frame size needs a (t, H, W, P, 3)
    # array (108 bytes a pixel: 2.3 GB for 16 frames of 720p): a few float arrays of a chunk.
    step = max(1, CLASSIFY_PIXELS // (frames.shape[1] * frames.shape[2]))
    for lo in range(0, len(frames), step):
        chunk = frames[lo : lo + step].astype(np.float32)
        best = np.full(chunk.shape[:3], np.inf, np.float32)
        nearest = np.zeros(chunk.shape[:3], np.int16)
        for index, colour in enumerate(colours):
            dist = ((chunk - colour) ** 2).sum(axis=-1)
            closer = dist < best  # strict: a tie goes to the first colour, as argmin's
            nearest[closer] = index
            best[closer] = dist[closer]
        labels[lo : lo + step] = np.where(best > limit**2, -1, nearest)
    return labels


CLASSIFY_PIXELS = 1 << 18  # pixels classified at a time (64 frames of 64x64)


# 4-connectivity inside each frame, none across frames.
_IN_FRAME = np.zeros((3, 3, 3), dtype=bool)
_IN_FRAME[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]


def _blobs(mask: np.ndarray) -> tuple[np.ndarray, ...]:
    """The 4-connected components of each frame of a (T, H, W) mask: their frame, area,
    centroid x, y and one pixel of each (y, x) (one entry per component, in no particular
    order)."""
    components, count = ndimage.label(mask, structure=_IN_FRAME)
    if count == 0:
        empty = np.zeros(0)
        ints = empty.astype(np.int64)
        return ints, ints, empty, empty, ints, ints
    t_idx, y_idx, x_idx = np.nonzero(components)
    ids = components[t_idx, y_idx, x_idx]
    size = np.bincount(ids, minlength=count + 1)[1:]
    sum_x = np.bincount(ids, weights=x_idx, minlength=count + 1)[1:]
    sum_y = np.bincount(ids, weights=y_idx, minlength=count + 1)[1:]
    _, first = np.unique(ids, return_index=True)  # ids 1..count, each one pixel of it
    # A component lies in one frame (labelling joins pixels within a frame only).
    frame = t_idx[first].astype(np.int64)
    return frame, size, sum_x / size, sum_y / size, y_idx[first], x_idx[first]


def _track(
    frame: np.ndarray,
    size: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    t_len: int,
    prev: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One colour's blobs -> per frame (T,) the area and centroid of the one followed: the
    blob nearest the one followed in the frame before (``prev`` for the first frame), else
    (a first sighting) the largest. Following the largest instead jumped between two blobs
    of one colour (a generator's duplicate) as their sizes changed, which counted as
    motion."""
    area, fx, fy = np.zeros(t_len, np.int64), np.full(t_len, np.nan), np.full(t_len, np.nan)
    order = np.argsort(frame, kind="stable")
    starts = np.searchsorted(frame[order], np.arange(t_len + 1))
    for t in range(t_len):
        here = order[starts[t] : starts[t + 1]]
        if here.size == 0:
            prev = None
            continue
        if prev is None:
            pick = here[np.argmax(size[here])]
        else:
            pick = here[np.argmin((cx[here] - prev[0]) ** 2 + (cy[here] - prev[1]) ** 2)]
        area[t], fx[t], fy[t] = size[pick], cx[pick], cy[pick]
        prev = (fx[t], fy[t])
    return area, fx, fy


def detect_objects(
    frames: np.ndarray | torch.Tensor,
    palette: ScenePalette,
    min_blob: int = MIN_BLOB_PX,
    max_distance: float | None = None,
    follow: np.ndarray | None = None,
) -> Detections:
    """Visible objects in each frame: the 4-connected blobs of pixels classified as each
    palette object's colour (``classify_pixels``) that have an interior pixel (bands under
    3 px wide everywhere, such as colour blends along an edge between two other objects, are
    not objects) and at least ``min_blob`` pixels. Every such blob counts as an object (two
    blobs of one colour are two objects: a world never draws that, a generator can); each
    colour's centroid follows one of them from frame to frame (``_track``). Blobs of one
    colour joined through pixels of other objects count once: a shape that another passes
    over can show in two pieces. ``follow``: (O, 2) the centroids followed in the frame
    before these (NaN where a colour was absent), to continue a video fed in pieces."""
    if min_blob < 1:
        raise ValueError(f"min_blob must be >= 1 pixel, got {min_blob}")
    labels = classify_pixels(frames, palette, max_distance)
    names = tuple(palette.object_names)
    if follow is not None and np.shape(follow) != (len(names), 2):
        raise ValueError(f"follow must be ({len(names)}, 2), got shape {np.shape(follow)}")
    t_len = labels.shape[0]
    objects = (labels >= 0) & (labels < len(names))
    areas = np.zeros((t_len, len(names)), dtype=np.int64)
    blobs = np.zeros((t_len, len(names)), dtype=np.int64)
    centroids = np.full((t_len, len(names), 2), np.nan)
    for o in range(len(names)):
        # Only blobs with an interior pixel (one whose 4 neighbours share its colour) count,
        # each kept whole: a band under 3 px wide everywhere is not an object. Where two
        # colours blur into each other (a soft red/yellow edge, as decoders and generators
        # make), the blend can sit nearest a third palette colour (orange).
        mask = labels == o
        seeds = ndimage.binary_erosion(mask, structure=_IN_FRAME)
        mask = ndimage.binary_propagation(seeds, structure=_IN_FRAME, mask=mask)
        frame, size, cx, cy, py, px = _blobs(mask)
        big = size >= min_blob
        start = None if follow is None or np.isnan(follow[o]).any() else tuple(follow[o])
        area, fx, fy = _track(frame[big], size[big], cx[big], cy[big], t_len, start)
        # Blobs of one colour joined through pixels of other objects are one object that
        # another passes over (a real shape cut in two by its occluder), not two.
        joined, _ = ndimage.label(mask | (objects & (labels != o)), structure=_IN_FRAME)
        group = joined[frame[big], py[big], px[big]]
        per_frame = np.unique(np.stack([frame[big], group]), axis=1)[0]
        blobs[:, o] = np.bincount(per_frame, minlength=t_len)[:t_len]
        areas[:, o] = area
        centroids[:, o] = np.stack([fx, fy], axis=-1)
    present = blobs > 0
    return Detections(names=names, present=present, centroids=centroids, areas=areas, blobs=blobs)


def count_accuracy(
    frames: np.ndarray | torch.Tensor | Detections,
    expected: int | np.ndarray,
    palette: ScenePalette | None = None,
    min_blob: int = MIN_BLOB_PX,
) -> float:
    """Fraction of frames whose number of visible objects equals ``expected`` (an int or a
    (T,) array)."""
    det = _detections(frames, palette, min_blob)
    expected = np.asarray(expected)
    if (
        not np.issubdtype(expected.dtype, np.integer)
        or (expected.ndim > 0 and expected.shape != det.counts.shape)
        or (expected < 0).any()
    ):
        raise ValueError(
            f"expected must be an int >= 0 or one such count per frame {det.counts.shape}, "
            f"got {expected.dtype} of shape {expected.shape}"
        )
    if det.counts.size == 0:
        raise ValueError("count_accuracy needs at least one frame")
    return float((det.counts == expected).mean())


def centroid_error(
    frames: np.ndarray | torch.Tensor | Detections,
    positions: np.ndarray,
    names: tuple[str, ...] | list[str],
    palette: ScenePalette | None = None,
    valid: np.ndarray | None = None,
    min_blob: int = MIN_BLOB_PX,
) -> dict[str, float]:
    """Distance in pixels between detected and true centroids.

    positions: (T, K, 2) true (x, y) of the objects called ``names`` (palette names).
    valid: optional (T, K) bool, which (frame, object) pairs to score (e.g. not occluded).
    Returns mean and max distance over scored pairs that were detected, and ``missed``: the
    fraction of scored pairs with no detection at all.
    """
    det = _detections(frames, palette, min_blob)
    positions = np.asarray(positions, dtype=np.float64)
    if positions.shape != (det.present.shape[0], len(names), 2):
        raise ValueError(
            f"positions must be (T={det.present.shape[0]}, K={len(names)}, 2), "
            f"got {positions.shape}"
        )
    cols = [det.index(n) for n in names]
    found = det.centroids[:, cols]  # (T, K, 2)
    if valid is None:
        valid = np.ones(positions.shape[:2], dtype=bool)
    else:  # an int mask would index, a (K,) one broadcast: both silently wrong
        valid = np.asarray(valid)
        if valid.dtype != bool or valid.shape != positions.shape[:2]:
            raise ValueError(
                f"valid must be bool of shape {positions.shape[:2]}, got {valid.dtype} "
                f"{valid.shape}"
            )
    detected = valid & det.present[:, cols]
    dist = np.linalg.norm(found - positions, axis=-1)[detected]
    scored = int(valid.sum())
    return {
        "mean": float(dist.mean()) if dist.size else float("nan"),
        "max": float(dist.max()) if dist.size else float("nan"),
        "missed": float(1.0 - detected.sum() / scored) if scored else 0.0,
    }


def motion_stats(
    frames: np.ndarray | torch.Tensor | Detections,
    palette: ScenePalette | None = None,
    min_blob: int = MIN_BLOB_PX,
    min_move: float = MIN_MOVE_PX,
    clip_len: int | None = None,
) -> MotionStats:
    """Speeds of the detected objects; see ``MotionStats``. With ``clip_len``, transitions
    across clip boundaries are left out (``seam_ratio`` measures those): a video frozen
    inside its clips that jumps at the seams has no motion, and one whose objects teleport at
    the seams is not counted fast."""
    det = _detections(frames, palette, min_blob)
    t_len = det.present.shape[0]
    if t_len < 2:
        raise ValueError("motion needs at least 2 frames")
    if clip_len is not None:
        check_int("clip_len", clip_len)  # a float marks the wrong transitions as seams
    if clip_len is not None and (clip_len < 2 or t_len < clip_len):
        raise ValueError(f"clip_len must be in [2, frames={t_len}], got {clip_len}")
    inner = np.ones(t_len - 1, dtype=bool)
    if clip_len is not None:
        inner = (np.arange(1, t_len) % clip_len) != 0  # transition i -> i+1 inside a clip
    moved = _transitions(det.present, det.centroids, inner, min_move)
    per_object = {
        name: float(moved.steps[o] / moved.object_pairs[o])
        for o, name in enumerate(det.names)
        if moved.object_pairs[o]
    }
    return MotionStats(
        mean_speed=float(moved.steps.sum() / moved.pairs) if moved.pairs else 0.0,
        moving_fraction=float(moved.moving / moved.inner),
        per_object_speed=per_object,
        transitions=moved.inner,
        pairs=moved.pairs,
    )


@dataclass(frozen=True)
class _Moved:
    """Sums over frame transitions: per object its summed steps and (object, transition)
    pairs; the transitions scored (``inner``) and those in which the objects moved."""

    steps: np.ndarray
    object_pairs: np.ndarray
    inner: int
    moving: int

    @property
    def pairs(self) -> int:
        return int(self.object_pairs.sum())


def _transitions(
    present: np.ndarray, centroids: np.ndarray, inner: np.ndarray, min_move: float
) -> _Moved:
    """The motion sums of transitions i -> i + 1 of (T, O) ``present`` / (T, O, 2)
    ``centroids``, of those where ``inner`` (T - 1,) holds."""
    both = present[1:] & present[:-1] & inner[:, None]  # (T-1, O)
    step = np.linalg.norm(centroids[1:] - centroids[:-1], axis=-1)  # (T-1, O)
    step = np.where(both, step, 0.0)
    visible = both.sum(axis=1)
    mean_step = step.sum(axis=1) / np.maximum(visible, 1)  # (T-1,); 0 where nothing visible
    moving = (visible > 0) & (mean_step >= min_move)
    return _Moved(
        steps=step.sum(axis=0),
        object_pairs=both.sum(axis=0),
        inner=int(inner.sum()),
        moving=int(moving[inner].sum()),
    )


# A mean absolute frame difference (0-255 scale, all pixels) below this is a still video,
# unless pixels move (below): a 12-pixel object moving by one pixel in a 64x64 frame changes
# it by about 1 level; an empty, nearly black generated video about 0.01, and a ratio of two
# such numbers says nothing about seams.
STATIC_LEVEL = 0.1
# A pixel whose largest channel changes by more than MOVED_LEVEL levels next to another that
# does moved; a video where STATIC_PIXELS or more move per transition (on average) is not
# still, whatever the mean:
# the mean falls with the frame's area (a shape moving in a 256x256 frame changes it by 0.04-
# 0.07, under STATIC_LEVEL), while flicker of a level or two moves no pixel at any size.
MOVED_LEVEL = 16
STATIC_PIXELS = 4


def seam_ratio(
    frames: np.ndarray | torch.Tensor, clip_len: int, static_threshold: float = STATIC_LEVEL
) -> float | None:
    """Mean absolute frame difference across clip boundaries over that within clips.

    1.0 means the seams are as smooth as the motion inside clips. A video that does not move
    (both differences below ``static_threshold`` on the 0-255 scale, ``STATIC_LEVEL``, with
    fewer than ``STATIC_PIXELS`` pixels changing by more than ``MOVED_LEVEL`` levels per
    transition) has no defined ratio: None is returned, never a number (an empty video's
    flicker scored 0.06-0.8, better than perfect). A video still within clips that jumps at
    the seams (a slideshow) returns ``inf``.
    """
    frames = _as_frames(frames)
    check_int("clip_len", clip_len)
    # 0 or less: no video is still, and a frozen one's ratio was 0 / 0 (nan)
    check_number("static_threshold", static_threshold, above=0)
    if clip_len < 2:
        raise ValueError(f"clip_len must be >= 2 (a clip needs inner transitions), got {clip_len}")
    if len(frames) <= clip_len:
        raise ValueError(
            f"seam ratio needs more than one clip: got {len(frames)} frames with "
            f"clip_len={clip_len}"
        )
    diffs, moved = _frame_diffs(frames)  # (T-1,) each
    at_seam = (np.arange(1, len(frames)) % clip_len) == 0  # transition i -> i+1 crosses
    within = (diffs[~at_seam].mean(), moved[~at_seam].mean())
    return _seam_value(within, (diffs[at_seam].mean(), moved[at_seam].mean()), static_threshold)


def _frame_diffs(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T - 1,) mean absolute difference of each frame to the next, 0-255 scale, and (T - 1,)
    how many pixels changed by more than ``MOVED_LEVEL`` in some channel next to another
    that did (a moving edge; lone specks of noise, each counted as it comes and goes, gave a
    nearly black video a ratio of 1.0)."""
    step = np.abs(np.diff(frames.astype(np.int16), axis=0))
    # (T-1, H, W); an elementwise max of the channels is 10x faster than max(axis=-1)
    moved = np.maximum(np.maximum(step[..., 0], step[..., 1]), step[..., 2]) > MOVED_LEVEL
    neighbours = ndimage.convolve(moved.astype(np.uint8), _AROUND, mode="constant")
    return step.mean(axis=(1, 2, 3)), (moved & (neighbours > 0)).sum(axis=(1, 2))


_AROUND = np.ones((1, 3, 3), dtype=np.uint8)
_AROUND[0, 1, 1] = 0  # a pixel's 8 neighbours in its frame


def _seam_value(
    within: tuple[float, float], seam: tuple[float, float], static_threshold: float
) -> float | None:
    """The ratio of the (mean difference, moved pixels) of seams to those within clips."""

    def still(diff_moved: tuple[float, float]) -> bool:
        return diff_moved[0] < static_threshold and diff_moved[1] < STATIC_PIXELS

    if still(within):
        return None if still(seam) else float("inf")
    return float(seam[0] / within[0])


def summarize_seams(ratios: list[float | None]) -> dict[str, float | int | None]:
    """Pool per-video ``seam_ratio`` values: the mean of the finite ones (None if there are
    none) and how many were ``inf`` (slideshows) or None (videos that never change), so that
    neither kind can vanish from a figure or turn it into inf."""
    finite = [r for r in ratios if r is not None and np.isfinite(r)]
    return {
        "mean": float(np.mean(finite)) if finite else None,
        "infinite": sum(r is not None and r == float("inf") for r in ratios),
        "undefined": sum(r is None for r in ratios),
    }


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and np.isfinite(v)]
    return round(statistics.fmean(kept), 4) if kept else None


def summarize_videos(
    rows: list[dict[str, float | None]], true_speed: float | Sequence[float] | None = None
) -> dict[str, float | None]:
    """The ``scene_metrics`` of several videos as one: the mean of each figure (finite
    values only: an infinite or undefined seam ratio is counted by ``summarize_seams``), but
    the mean speed and speed ratio pooled over every (object, transition) pair of them all
    (in a mean of ratios a video with one pair, a speck seen twice, weighs as much as a full
    one). ``speed_pairs``: the pairs pooled. ``true_speed``: one for every video, or each
    video's own (videos of known worlds): the speed ratio is then the pairs' speed over
    their true speed, pooled alike."""
    if not rows:
        raise ValueError("rows must hold at least one video's figures")
    if true_speed is None or isinstance(true_speed, (int, float)):
        true_speeds = [true_speed] * len(rows)
    else:
        true_speeds = list(true_speed)
        if len(true_speeds) != len(rows):
            raise ValueError(
                f"true_speed must be one number or one per video ({len(rows)}), got "
                f"{len(true_speeds)}"
            )
    keys = dict.fromkeys(k for r in rows for k in r)  # a label only some videos had too
    out = {k: _mean([r.get(k) for r in rows]) for k in keys}
    pairs = sum(r.get("speed_pairs") or 0 for r in rows)
    moved = sum((r.get("mean_speed") or 0.0) * (r.get("speed_pairs") or 0) for r in rows)
    if "mean_speed" in out:
        out["mean_speed"] = round(moved / pairs, 4) if pairs else None
    if "speed_ratio" in out:
        if len(set(true_speeds)) == 1:  # one for all (the form of the figures so far)
            ok = pairs and true_speeds[0]
            out["speed_ratio"] = round(moved / pairs / true_speeds[0], 4) if ok else None
        elif all(t is not None and t > 0 for t in true_speeds):
            expected = sum(
                (r.get("speed_pairs") or 0) * t for r, t in zip(rows, true_speeds, strict=True)
            )
            out["speed_ratio"] = round(moved / expected, 4) if expected else None
        else:
            out["speed_ratio"] = None
    out["speed_pairs"] = pairs
    return out


def scene_metrics(
    frames: np.ndarray | torch.Tensor,
    palette: ScenePalette,
    expected_count: int | None = None,
    clip_len: int | None = None,
    true_speed: float | None = None,
    min_blob: int = MIN_BLOB_PX,
) -> dict[str, float | None]:
    """The figures the quality benchmarks report for one video, as a JSON-ready dict
    (``SceneScorer`` fed the whole video at once)."""
    frames = _as_frames(frames)  # the frames' errors before the arguments', as before
    scorer = SceneScorer(palette, expected_count, clip_len, true_speed, min_blob)
    scorer.add(frames)
    return scorer.result()


class SceneScorer:
    """``scene_metrics`` of a video fed in pieces (``add``, in order; any sizes), in memory
    bounded by the largest piece: objects are followed across pieces and the transitions
    between pieces are scored as those inside them, so the figures are those of the whole
    video at once (up to float rounding of the sums).

    Figures (``result``): ``mean_count`` (objects per frame), ``mean_speed`` (pixels per
    frame over every (object, transition) pair, ``speed_pairs`` of them), ``moving_fraction``
    (see ``MotionStats``), and with ``expected_count`` its ``count_accuracy``, with
    ``true_speed`` the ``speed_ratio`` (None where no pair was seen), with ``clip_len`` the
    ``seam_ratio`` (motion is then measured inside clips only)."""

    def __init__(
        self,
        palette: ScenePalette,
        expected_count: int | None = None,
        clip_len: int | None = None,
        true_speed: float | None = None,
        min_blob: int = MIN_BLOB_PX,
    ) -> None:
        if clip_len is not None:
            check_int("clip_len", clip_len, minimum=2)  # a float marks the wrong seams
        if expected_count is not None:
            check_int("expected_count", expected_count, minimum=0)
        self.palette, self.expected_count, self.clip_len = palette, expected_count, clip_len
        self.true_speed, self.min_blob = true_speed, min_blob
        self.frames = 0
        self._objects = self._hits = 0
        self._steps, self._pairs, self._inner, self._moving = 0.0, 0, 0, 0
        # At a seam or not: [difference sum, transitions, moved pixels sum].
        self._diffs = {True: [0.0, 0, 0], False: [0.0, 0, 0]}
        self._last: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # frame, det

    def add(self, frames: np.ndarray | torch.Tensor) -> None:
        """The next frames (T, H, W, 3) uint8 of the video."""
        frames = _as_frames(frames)
        if len(frames) == 0:
            return
        if self._last is not None and frames.shape[1:] != self._last[0].shape:
            raise ValueError(
                f"frames must keep the video's frame size {self._last[0].shape}, got "
                f"{frames.shape[1:]}"
            )
        follow = None if self._last is None else self._last[2]
        det = detect_objects(frames, self.palette, self.min_blob, follow=follow)
        self._objects += int(det.counts.sum())
        if self.expected_count is not None:
            self._hits += int((det.counts == self.expected_count).sum())
        present, centroids = det.present, det.centroids
        if self._last is not None:  # the transition from the last piece's last frame
            present = np.concatenate([self._last[1][None], present])
            centroids = np.concatenate([self._last[2][None], centroids])
        # Transition i goes to frame `to[i]` of the video; it crosses a seam there.
        to = np.arange(self.frames + len(frames) - len(present) + 1, self.frames + len(frames))
        at_seam = (to % self.clip_len) == 0 if self.clip_len else np.zeros(len(to), bool)
        moved = _transitions(present, centroids, ~at_seam, MIN_MOVE_PX)
        self._steps += float(moved.steps.sum())
        self._pairs += moved.pairs
        self._inner += moved.inner
        self._moving += moved.moving
        if self.clip_len:
            diffs, moved = _frame_diffs(frames)
            if self._last is not None:
                first, first_moved = _frame_diffs(np.stack([self._last[0], frames[0]]))
                diffs, moved = np.concatenate([first, diffs]), np.concatenate([first_moved, moved])
            for seam in (True, False):
                self._diffs[seam][0] += float(diffs[at_seam == seam].sum())
                self._diffs[seam][1] += int((at_seam == seam).sum())
                self._diffs[seam][2] += int(moved[at_seam == seam].sum())
        self._last = (frames[-1].copy(), det.present[-1].copy(), det.centroids[-1].copy())
        self.frames += len(frames)

    def result(self) -> dict[str, float | None]:
        """The figures of the frames added so far (JSON-ready); of one frame, the counts only
        (speed and moving fraction None: no motion to measure)."""
        if self.frames < 1:
            raise ValueError("no frames were added")
        if self.clip_len is not None and self.clip_len > self.frames:
            raise ValueError(f"clip_len must be in [2, frames={self.frames}], got {self.clip_len}")
        still = self.frames < 2  # one frame: not a video that does not move
        out: dict[str, float | None] = {
            "mean_count": self._objects / self.frames,
            "mean_speed": None if still else self._steps / self._pairs if self._pairs else 0.0,
            "speed_pairs": self._pairs,  # what mean_speed is measured on: for pooling
            "moving_fraction": None if still else self._moving / self._inner,
        }
        if self.expected_count is not None:
            out["count_accuracy"] = self._hits / self.frames
        if self.true_speed is not None:
            # None, not 0, where no speed can be measured (no object seen in two consecutive
            # frames): an empty video is not a still one, and a 0 would pull a mean of
            # ratios that are too high towards the target.
            measurable = self.true_speed > 0 and self._pairs > 0
            out["speed_ratio"] = out["mean_speed"] / self.true_speed if measurable else None
        if self.clip_len is not None:
            if self.frames <= self.clip_len:
                raise ValueError(
                    f"seam ratio needs more than one clip: got {self.frames} frames with "
                    f"clip_len={self.clip_len}"
                )
            (seam, seams, seam_moved), (within, inner, moved) = (
                self._diffs[True],
                self._diffs[False],
            )
            out["seam_ratio"] = _seam_value(
                (within / inner, moved / inner), (seam / seams, seam_moved / seams), STATIC_LEVEL
            )
        return out


def _detections(
    frames: np.ndarray | torch.Tensor | Detections, palette: ScenePalette | None, min_blob: int
) -> Detections:
    if isinstance(frames, Detections):
        return frames
    if palette is None:
        raise ValueError("palette is required when frames are given instead of Detections")
    return detect_objects(frames, palette, min_blob)
