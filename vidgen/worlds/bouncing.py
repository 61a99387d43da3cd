"""BouncingShapes: K coloured shapes moving at constant speed with elastic wall bounces.

Motion is computed in closed form, not integrated: along each axis an elastic bounce between
two walls is a triangle wave of the unfolded position ``p0 + v * t``. Any frame, however far
into the video (up to frame 2**40), is exact (no drift after 10,000 frames) and can be
rendered on its own.

Coordinates: pixel (row i, col j) has its centre at (x=j, y=i); positions are the area
centroids of the shapes in that convention. Shapes pass through each other and are drawn in a
fixed order (later shapes on top); the ground truth says which ones are partly hidden.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from vidgen.validate import check_int, check_number, check_world_size, shown
from vidgen.worlds.palette import BACKGROUND, OBJECT_COLOURS, ScenePalette

SHAPES = ("circle", "square", "triangle")

BOUNCING_PALETTE = ScenePalette(objects=dict(OBJECT_COLOURS), scenery=(BACKGROUND,))


MIN_RADIUS = 2**0.5  # the smallest shape radius that always covers a pixel centre


@dataclass
class BouncingShapesConfig:
    """Sizes are in pixels, speeds in pixels per frame. ``num_shapes=None`` draws K from
    [min_shapes, max_shapes] by seed; K is the class label."""

    size: int = 64
    num_shapes: int | None = None
    min_shapes: int = 1
    max_shapes: int = 4
    min_radius: float = 5.0
    max_radius: float = 8.0
    min_speed: float = 1.0
    max_speed: float = 2.0

    def __post_init__(self) -> None:
        check_world_size(self.size, minimum=16)
        check_int("min_shapes", self.min_shapes)
        check_int("max_shapes", self.max_shapes)
        if self.num_shapes is not None:
            check_int("num_shapes", self.num_shapes)
        for name in ("min_radius", "max_radius", "min_speed", "max_speed"):
            check_number(name, getattr(self, name))
        if not 1 <= self.min_shapes <= self.max_shapes <= len(OBJECT_COLOURS):
            raise ValueError(
                "need 1 <= min_shapes <= max_shapes <= "
                f"{len(OBJECT_COLOURS)} (one palette colour per shape), "
                f"got min_shapes={self.min_shapes}, max_shapes={self.max_shapes}"
            )
        if self.num_shapes is not None and not 1 <= self.num_shapes <= len(OBJECT_COLOURS):
            raise ValueError(
                f"num_shapes must be in [1, {len(OBJECT_COLOURS)}] or None, got {self.num_shapes}"
            )
        # A triangle's inscribed radius is half its radius: below sqrt(2) one can fall between
        # pixel centres and draw nothing while its label and ground truth still count it.
        if not MIN_RADIUS <= self.min_radius <= self.max_radius <= self.size / 4:
            raise ValueError(
                f"need {MIN_RADIUS:.3f} <= min_radius <= max_radius <= size/4 = {self.size / 4}, "
                f"got min_radius={self.min_radius}, max_radius={self.max_radius}"
            )
        if not 0.0 <= self.min_speed <= self.max_speed:
            raise ValueError(
                f"need 0 <= min_speed <= max_speed, got {self.min_speed}, {self.max_speed}"
            )


@dataclass(frozen=True)
class ShapesTrajectory:
    """Frames and exact ground truth for frames ``start .. start + T - 1``.

    positions, velocities: (T, K, 2) float64, (x, y) centroid and pixels per frame at each
    frame (the velocity a frame leaves with). occluded: (T, K) bool, True where a shape drawn
    later covers part of it. shapes/colours/radii: per shape, constant over the video.
    """

    frames: np.ndarray
    positions: np.ndarray
    velocities: np.ndarray
    occluded: np.ndarray
    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    radii: np.ndarray
    label: int
    start: int
    seed: int


def _reflect(unfolded: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fold unfolded positions into [lo, hi] as elastic bounces do; returns (position, sign)
    where sign is +1 while moving in the unfolded direction and -1 after an odd number of
    bounces."""
    span = hi - lo
    u = np.mod(unfolded - lo, 2.0 * span)
    forward = u <= span
    position = lo + np.where(forward, u, 2.0 * span - u)
    return position, np.where(forward, 1.0, -1.0)


def _extents(shapes: tuple[str, ...], radii: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(before, after), each (K, 2): how far each shape reaches from its centroid towards
    -x/-y and +x/+y (the triangle points up: its apex is r above, its base r/2 below)."""
    before, after = np.empty((len(shapes), 2)), np.empty((len(shapes), 2))
    for i, (shape, r) in enumerate(zip(shapes, radii, strict=True)):
        if shape == "circle":
            before[i] = after[i] = (r, r)
        elif shape == "square":
            before[i] = after[i] = r * np.sqrt(np.pi) / 2.0
        else:
            half_width = r * np.sqrt(3.0) / 2.0
            before[i], after[i] = (half_width, r), (half_width, r / 2.0)
    return before, after


def _shape_mask(shape: str, radius: float, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Pixels covered by a shape of the given radius, from pixel offsets to its centroid
    (dx (T, 1, W), dy (T, H, 1)); broadcasts to (T, H, W)."""
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        # A square gets the area of the circle of the same radius, so sizes look alike.
        half = radius * np.sqrt(np.pi) / 2.0
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # Upward equilateral triangle with centroid at the origin and circumradius ``radius``;
    # its vertices run clockwise on screen (y down), so inside is cross >= 0 on every edge.
    angles = np.deg2rad(np.array([-90.0, 30.0, 150.0]))
    vx, vy = radius * np.cos(angles), radius * np.sin(angles)
    inside = np.ones(np.broadcast_shapes(dx.shape, dy.shape), dtype=bool)
    for a in range(3):
        b = (a + 1) % 3
        inside &= (vx[b] - vx[a]) * (dy - vy[a]) - (vy[b] - vy[a]) * (dx - vx[a]) >= 0
    return inside


class BouncingShapes:
    """A seeded BouncingShapes video of unbounded length.

    >>> world = BouncingShapes(BouncingShapesConfig(num_shapes=3), seed=3)
    >>> traj = world.trajectory(num_frames=16)
    >>> traj.frames.shape, traj.label
    ((16, 64, 64, 3), 3)
    """

    palette = BOUNCING_PALETTE

    def __init__(self, config: BouncingShapesConfig | None = None, seed: int = 0) -> None:
        if config is not None and not isinstance(config, BouncingShapesConfig):
            raise ValueError(
                f"config must be a BouncingShapesConfig or None, got {type(config).__name__}"
            )
        self.config = config = config if config is not None else BouncingShapesConfig()
        self.seed = check_int("seed", seed, minimum=0)
        rng = np.random.default_rng(self.seed)
        k = config.num_shapes
        if k is None:
            k = int(rng.integers(config.min_shapes, config.max_shapes + 1))
        self.label = k
        self.shapes = tuple(SHAPES[i] for i in rng.integers(0, len(SHAPES), size=k))
        names = list(OBJECT_COLOURS)
        self.colours = tuple(names[i] for i in rng.permutation(len(names))[:k])
        self.radii = rng.uniform(config.min_radius, config.max_radius, size=k)
        # Each shape bounces when its own outline touches a wall: its centroid moves between
        # extent_before - 0.5 and size - 0.5 - extent_after on each axis, so its pixels stay
        # inside the frame and no shape is ever cut by the border.
        before, after = _extents(self.shapes, self.radii)  # (K, 2) each
        self._lo = before - 0.5
        self._hi = config.size - 0.5 - after
        self._p0 = rng.uniform(self._lo, self._hi)
        speed = rng.uniform(config.min_speed, config.max_speed, size=k)
        angle = rng.uniform(0.0, 2.0 * np.pi, size=k)
        self._v0 = np.stack([np.cos(angle), np.sin(angle)], axis=-1) * speed[:, None]
        self._colour_rgb = np.array([OBJECT_COLOURS[c] for c in self.colours], dtype=np.uint8)

    @property
    def speeds(self) -> np.ndarray:
        """(K,) constant speed of each shape in pixels per frame."""
        return np.linalg.norm(self._v0, axis=-1)

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi), each (K, 2): the range each shape's centroid moves in."""
        return self._lo.copy(), self._hi.copy()

    def state(self, t: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
        """Exact (positions, velocities), each (..., K, 2), at frame index or indices ``t``."""
        t = np.asarray(t, dtype=np.float64)[..., None, None]
        position, sign = _reflect(self._p0 + self._v0 * t, self._lo, self._hi)
        return position, self._v0 * sign

    def masks(self, positions: np.ndarray) -> np.ndarray:
        """(T, K, H, W) bool pixel coverage of each shape for positions (T, K, 2)."""
        size = self.config.size
        axis = np.arange(size, dtype=np.float32)
        masks = np.empty((positions.shape[0], len(self.shapes), size, size), dtype=bool)
        for i, (shape, r) in enumerate(zip(self.shapes, self.radii, strict=True)):
            dx = axis[None, None, :] - positions[:, i, 0, None, None].astype(np.float32)
            dy = axis[None, :, None] - positions[:, i, 1, None, None].astype(np.float32)
            masks[:, i] = _shape_mask(shape, float(r), dx, dy)  # (T, H, W)
        return masks

    def render(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Frames (T, H, W, 3) uint8 and occlusion flags (T, K) for positions (T, K, 2)."""
        masks = self.masks(positions)
        t, k, h, w = masks.shape
        frames = np.empty((t, h, w, 3), dtype=np.uint8)
        frames[:] = np.asarray(BACKGROUND, dtype=np.uint8)
        occluded = np.zeros((t, k), dtype=bool)
        covered_later = np.zeros((t, h, w), dtype=bool)
        # Paint back to front; a shape is hidden in part where one drawn after it overlaps.
        for i in reversed(range(k)):
            occluded[:, i] = (masks[:, i] & covered_later).any(axis=(1, 2))
            covered_later |= masks[:, i]
        for i in range(k):
            frames[masks[:, i]] = self._colour_rgb[i]
        return frames, occluded

    def trajectory(self, num_frames: int, start: int = 0) -> ShapesTrajectory:
        """Frames ``start .. start + num_frames - 1`` with their ground truth."""
        num_frames, start = _check_span(num_frames, start)
        positions, velocities = self.state(np.arange(start, start + num_frames))
        frames, occluded = self.render(positions)
        return ShapesTrajectory(
            frames=frames,
            positions=positions,
            velocities=velocities,
            occluded=occluded,
            shapes=self.shapes,
            colours=self.colours,
            radii=self.radii.copy(),
            label=self.label,
            start=start,
            seed=self.seed,
        )

    def iter_frames(
        self, num_frames: int, start: int = 0, chunk: int = 256
    ) -> Iterator[np.ndarray]:
        """Yield (H, W, 3) frames one at a time, rendering ``chunk`` at once: constant memory
        for any length. The arguments are checked when it is called."""
        num_frames, start = _check_span(num_frames, start)
        chunk = check_int("chunk", chunk, minimum=1)
        return self._frames(start, start + num_frames, chunk)

    def _frames(self, start: int, end: int, chunk: int) -> Iterator[np.ndarray]:
        for lo in range(start, end, chunk):
            positions, _ = self.state(np.arange(lo, min(lo + chunk, end)))
            frames, _ = self.render(positions)
            yield from frames


MAX_FRAME = 2**40  # float64 time keeps positions within 1e-3 px up to here (0.17 px at 2**50)


def _check_span(num_frames: int, start: int) -> tuple[int, int]:
    """Checked ``num_frames`` and ``start``: frames past ``MAX_FRAME`` are refused (at 10**20
    three frames of a moving world came out the same)."""
    num_frames = check_int("num_frames", num_frames, minimum=1)
    start = check_int("start", start, minimum=0)
    if start + num_frames > MAX_FRAME:
        raise ValueError(
            f"start + num_frames must be at most 2**40 (exact positions), got {shown(start)} + "
            f"{shown(num_frames)}"
        )
    return num_frames, start
