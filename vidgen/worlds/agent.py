"""AgentWorld: a top-down room in which an agent walks and pushes a box, with exact ground truth.

The room is a square with solid outer walls and a few rectangular obstacles; the agent and
the box are squares. Actions are discrete (noop, up, down, left, right; ``step`` px each) or
continuous velocities (vx, vy) clipped to ``max_speed`` per axis. Action t acts between
frame t and frame t + 1.

Coordinates: pixel (row i, col j) has its centre at (x=j, y=i); ground-truth positions are
(x, y) centres in that convention. Internally everything is an axis-aligned rectangle in edge
coordinates (pixel j spans [j, j + 1)): a rectangle with left edge L and width w has centre
x = L + w/2 - 0.5. A pixel is drawn when its centre lies in the half-open rectangle, so a
rectangle at a fractional position still covers exactly w x w pixels.

Exactness: walls, obstacles and sizes are integers, and continuous velocities are snapped to
multiples of 2**-16 px, so every position is a short binary fraction and every sum or
difference of positions, sizes and velocities is exact in float64. Collisions move one axis
at a time (x, then y) and clamp the move to the contact position computed as an edge minus a
size; with no rounding anywhere, touching is reached exactly and overlap never happens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from vidgen.validate import check_int, check_number, check_world_size
from vidgen.worlds.palette import FLOOR, OBJECT_COLOURS, WALL, ScenePalette

AGENT_PALETTE = ScenePalette(
    objects={"agent": OBJECT_COLOURS["blue"], "box": OBJECT_COLOURS["orange"]},
    scenery=(FLOOR, WALL),
)

NOOP, UP, DOWN, LEFT, RIGHT = 0, 1, 2, 3, 4
NUM_ACTIONS = 5
# Unit (dx, dy) of each discrete action; up is -y because rows grow downwards.
ACTION_DIRECTIONS: tuple[tuple[int, int], ...] = ((0, 0), (0, -1), (0, 1), (-1, 0), (1, 0))

# Velocities are snapped to this grid (px) so that all position arithmetic is exact (above).
_GRID = 2.0**16
_LAYOUT_ATTEMPTS = 200

Policy = Callable[["AgentWorld", "AgentState", np.random.Generator], Any]


@dataclass
class AgentWorldConfig:
    """Sizes in pixels. ``step``: px moved per discrete action; ``max_speed``: per-axis clip
    of continuous velocities (px per frame). Obstacles: between min_obstacles and
    max_obstacles rectangles with sides in [obstacle_min, obstacle_max], drawn by seed; in a
    room too small for obstacle_max, sides are capped at what leaves the box room."""

    size: int = 64
    wall: int = 4
    agent_size: int = 6
    box_size: int = 8
    step: int = 2
    max_speed: float = 3.0
    min_obstacles: int = 1
    max_obstacles: int = 3
    obstacle_min: int = 6
    obstacle_max: int = 14
    continuous: bool = False

    def __post_init__(self) -> None:
        check_world_size(self.size, minimum=1)
        for name in ("wall", "agent_size", "box_size", "step", "obstacle_min"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("min_obstacles", "max_obstacles", "obstacle_max"):
            check_int(name, getattr(self, name), minimum=0)
        self.max_speed = check_number("max_speed", self.max_speed)
        # Continuous actions are recorded as float32 velocities, exact below 2**8.
        if not 0 < self.max_speed < 2**8:
            raise ValueError(
                f"max_speed must be in (0, 256) pixels per frame, got {self.max_speed}"
            )
        if not isinstance(self.continuous, (bool, np.bool_)):
            raise ValueError(f"continuous must be a bool, got {self.continuous!r}")
        self.continuous = bool(self.continuous)
        if self.min_obstacles > self.max_obstacles:
            raise ValueError(
                f"need min_obstacles <= max_obstacles, got min_obstacles={self.min_obstacles}, "
                f"max_obstacles={self.max_obstacles}"
            )
        if self.obstacle_min > self.obstacle_max:
            raise ValueError(
                f"need obstacle_min <= obstacle_max, got obstacle_min={self.obstacle_min}, "
                f"obstacle_max={self.obstacle_max}"
            )
        inner = self.size - 2 * self.wall
        need = self.agent_size + self.box_size + 2
        if inner < need:
            raise ValueError(
                f"the room inside the walls (size - 2*wall = {inner} px) must fit the agent "
                f"beside the box with 1 px to spare (agent_size + box_size + 2 = {need} px); "
                f"got size={self.size}, wall={self.wall}, agent_size={self.agent_size}, "
                f"box_size={self.box_size}"
            )
        if self.max_obstacles > 0 and self.obstacle_min > inner - self.box_size - 2:
            raise ValueError(
                f"obstacle_min={self.obstacle_min} leaves no room for the box beside an "
                f"obstacle: expected <= size - 2*wall - box_size - 2 = {inner - self.box_size - 2}"
            )


class Rect(NamedTuple):
    """Axis-aligned rectangle in edge coordinates: x0 <= x < x1, y0 <= y < y1."""

    x0: float
    y0: float
    x1: float
    y1: float

    def overlaps(self, other: Rect) -> bool:
        """Strict overlap of interiors; rectangles that only touch do not overlap."""
        return (
            self.x0 < other.x1 and other.x0 < self.x1 and self.y0 < other.y1 and other.y0 < self.y1
        )


@dataclass(frozen=True)
class AgentState:
    """Top-left corners (x, y) in edge coordinates of the agent and the box."""

    agent: tuple[float, float]
    box: tuple[float, float]
    agent_size: int
    box_size: int

    @property
    def agent_centre(self) -> tuple[float, float]:
        """(x, y) in pixel-centre coordinates."""
        return _centre(self.agent, self.agent_size)

    @property
    def box_centre(self) -> tuple[float, float]:
        return _centre(self.box, self.box_size)

    @property
    def agent_rect(self) -> Rect:
        return _rect(self.agent, self.agent_size)

    @property
    def box_rect(self) -> Rect:
        return _rect(self.box, self.box_size)


def _centre(corner: tuple[float, float], size: int) -> tuple[float, float]:
    half = size / 2 - 0.5
    return (corner[0] + half, corner[1] + half)


def _rect(corner: tuple[float, float], size: int) -> Rect:
    return Rect(corner[0], corner[1], corner[0] + size, corner[1] + size)


@dataclass
class AgentTrajectory:
    """Frames and exact ground truth of one episode of T frames.

    actions: (T,) int64 (discrete) or (T, 2) float32 velocities as applied (clipped and
    snapped); actions[t] acts between frame t and t + 1, so the last one produces no frame
    here. agent, box: (T, 2) float64 (x, y) centres at each frame.
    """

    frames: np.ndarray
    actions: np.ndarray
    agent: np.ndarray
    box: np.ndarray
    seed: int


class AgentWorld:
    """One room, its layout and initial positions fixed by ``seed``; ``step`` moves the agent."""

    def __init__(self, config: AgentWorldConfig | None = None, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if config is not None and not isinstance(config, AgentWorldConfig):
            raise ValueError(
                f"config must be an AgentWorldConfig or None, got {type(config).__name__}"
            )
        self.config = config if config is not None else AgentWorldConfig()
        self.seed = int(seed)
        obstacles, agent, box = _sample_layout(self.config, np.random.default_rng(self.seed))
        self._obstacles = obstacles
        self._initial = AgentState(agent, box, self.config.agent_size, self.config.box_size)
        self._state = self._initial
        self._background = _draw_background(self.config.size, obstacles)
        self._agent_colour = np.asarray(AGENT_PALETTE.objects["agent"], dtype=np.uint8)
        self._box_colour = np.asarray(AGENT_PALETTE.objects["box"], dtype=np.uint8)

    @property
    def state(self) -> AgentState:
        return self._state

    @property
    def obstacles(self) -> list[Rect]:
        """Every static rectangle, the four outer walls first, then the obstacles."""
        return list(self._obstacles)

    @property
    def palette(self) -> ScenePalette:
        return AGENT_PALETTE

    def reset(self, state: AgentState | None = None) -> AgentState:
        """Back to the seeded start, or to ``state`` (which must be a valid placement)."""
        if state is not None:
            state = self._check_state(state)
        self._state = self._initial if state is None else state
        return self._state

    def step(self, action: Any) -> AgentState:
        """Apply one action: an int in [0, 5) (discrete) or a velocity (vx, vy) (continuous)."""
        return self._advance(*self.displacement(action))

    def displacement(self, action: Any) -> tuple[float, float]:
        """The (dx, dy) in px that ``action`` asks for before collisions, after validation,
        clipping to max_speed and snapping to the exact grid."""
        if not self.config.continuous:
            dx, dy = ACTION_DIRECTIONS[self.discrete_action(action)]
            return (float(dx * self.config.step), float(dy * self.config.step))
        try:
            v = np.asarray(action)
        except ValueError:  # ragged, like [1.0, [2.0]]
            v = None
        if v is None or v.shape != (2,) or v.dtype.kind not in "iuf":
            raise ValueError(
                f"a continuous action must be a real velocity (vx, vy) of shape (2,), got "
                f"{action!r}"
            )
        # The largest grid value not above max_speed: snapping after the clip could round
        # past it (max_speed 0.1 applied 0.10000610), out of the action space.
        limit = math.floor(self.config.max_speed * _GRID) / _GRID
        out = []
        for value in v.tolist():  # plain floats: far cheaper than numpy for two numbers
            if not math.isfinite(value):
                raise ValueError(f"a continuous action must be finite, got {action!r}")
            out.append(min(max(round(value * _GRID) / _GRID, -limit), limit))
        return (out[0], out[1])

    def discrete_action(self, action: Any) -> int:
        """``action`` as a plain int in [0, NUM_ACTIONS), or a ValueError."""
        if self.config.continuous:
            raise ValueError("discrete_action needs a discrete world (config.continuous=False)")
        value = action.item() if isinstance(action, np.ndarray) and action.ndim == 0 else action
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise ValueError(
                f"a discrete action must be an int in [0, {NUM_ACTIONS}), got {action!r}"
            )
        if not 0 <= value < NUM_ACTIONS:
            raise ValueError(
                f"a discrete action must be an int in [0, {NUM_ACTIONS}), got {int(value)}"
            )
        return int(value)

    def render(self, state: AgentState | None = None) -> np.ndarray:
        """(H, W, 3) uint8 frame of ``state`` (default: the current state), which must be a
        valid placement (one off the room's edge lost its agent without a word)."""
        out = np.empty_like(self._background)
        self._paint(out, self._state if state is None else self._check_state(state))
        return out

    # -- internals -------------------------------------------------------------------------

    def _paint(self, out: np.ndarray, state: AgentState) -> None:
        out[...] = self._background
        a, b = state.agent_size, state.box_size
        out[_span(state.agent[1], a), _span(state.agent[0], a)] = self._agent_colour
        out[_span(state.box[1], b), _span(state.box[0], b)] = self._box_colour

    def _check_state(self, state: AgentState) -> AgentState:
        """``state`` with its corners as float pairs, if it is a valid placement."""
        if not isinstance(state, AgentState):
            raise ValueError(f"state must be an AgentState, got {type(state).__name__}")
        corners = []
        for name, corner in (("agent", state.agent), ("box", state.box)):
            # (x, y, 99) was taken (the 99 unread); (x,) or ("a", "b") failed in arithmetic.
            if (
                np.ndim(corner) != 1
                or len(corner) != 2
                or not all(
                    isinstance(v, int | float | np.integer | np.floating)
                    and not isinstance(v, bool | np.bool_)
                    for v in corner
                )
            ):
                raise ValueError(
                    f"state.{name} must be an (x, y) corner of 2 real numbers, got {corner!r}"
                )
            corners.append((float(corner[0]), float(corner[1])))
        state = dataclasses.replace(state, agent=corners[0], box=corners[1])
        cfg = self.config
        if (state.agent_size, state.box_size) != (cfg.agent_size, cfg.box_size):
            raise ValueError(
                f"state sizes (agent_size={state.agent_size}, box_size={state.box_size}) must "
                f"match the config ({cfg.agent_size}, {cfg.box_size})"
            )
        for name, corner in (("agent", state.agent), ("box", state.box)):
            for v in corner:
                if not math.isfinite(v) or v * _GRID != round(v * _GRID):
                    raise ValueError(
                        f"state.{name} must hold finite multiples of 2**-16 px, got {corner}"
                    )
        agent, box = state.agent_rect, state.box_rect
        lo, hi = cfg.wall, cfg.size - cfg.wall
        for name, rect in (("agent", agent), ("box", box)):
            if not (lo <= rect.x0 and rect.x1 <= hi and lo <= rect.y0 and rect.y1 <= hi):
                raise ValueError(f"state places the {name} {rect} outside the room [{lo}, {hi})")
        if agent.overlaps(box):
            raise ValueError(f"state places the agent {agent} over the box {box}")
        for name, rect in (("agent", agent), ("box", box)):
            hit = next((o for o in self._obstacles if rect.overlaps(o)), None)
            if hit is not None:
                raise ValueError(f"state places the {name} {rect} over the obstacle {hit}")
        return state

    def _advance(self, dx: float, dy: float) -> AgentState:
        self._state = self._move(self._state, dx, dy)
        return self._state

    def _move(self, state: AgentState, dx: float, dy: float) -> AgentState:
        agent, box = list(state.agent), list(state.box)
        for axis, delta in ((0, dx), (1, dy)):
            if delta != 0:
                self._move_axis(agent, box, axis, delta)
        return AgentState((agent[0], agent[1]), (box[0], box[1]), state.agent_size, state.box_size)

    def _move_axis(self, agent: list[float], box: list[float], axis: int, delta: float) -> None:
        """Move the agent by ``delta`` along ``axis``, pushing the box if it is in the way."""
        a, b = self.config.agent_size, self.config.box_size
        other = 1 - axis
        # The box is in the path iff the extents on the other axis overlap strictly; since
        # agent and box never overlap, it is then entirely ahead of or behind the agent.
        in_line = box[other] < agent[other] + a and agent[other] < box[other] + b
        if delta > 0:
            target = min(agent[axis] + delta, self._free_limit(agent, a, axis, 1))
            if in_line and box[axis] >= agent[axis] + a and target + a > box[axis]:
                # Push by what is left of the move, as far as the box itself can go.
                box[axis] = min(target + a, self._free_limit(box, b, axis, 1))
                target = box[axis] - a
        else:
            target = max(agent[axis] + delta, self._free_limit(agent, a, axis, -1))
            if in_line and box[axis] + b <= agent[axis] and target < box[axis] + b:
                box[axis] = max(target - b, self._free_limit(box, b, axis, -1))
                target = box[axis] + b
        agent[axis] = target

    def _free_limit(self, corner: Sequence[float], size: int, axis: int, sign: int) -> float:
        """The furthest corner coordinate along ``axis`` (direction ``sign``) that a square at
        ``corner`` reaches before touching a wall or obstacle."""
        other = 1 - axis
        lo_o, hi_o = corner[other], corner[other] + size
        if sign > 0:
            front = corner[axis] + size
            limit = math.inf
            for r in self._obstacles:
                if r[other] < hi_o and lo_o < r[other + 2] and r[axis] >= front:
                    limit = min(limit, r[axis] - size)
            return limit
        limit = -math.inf
        for r in self._obstacles:
            if r[other] < hi_o and lo_o < r[other + 2] and r[axis + 2] <= corner[axis]:
                limit = max(limit, r[axis + 2])
        return limit


def _span(lo: float, n: int) -> slice:
    """The n pixels whose centres (j + 0.5 in edge coordinates) lie in [lo, lo + n)."""
    start = math.ceil(lo - 0.5)
    return slice(start, start + n)


def _draw_background(size: int, obstacles: list[Rect]) -> np.ndarray:
    frame = np.empty((size, size, 3), dtype=np.uint8)
    frame[...] = np.asarray(FLOOR, dtype=np.uint8)
    for r in obstacles:
        frame[int(r.y0) : int(r.y1), int(r.x0) : int(r.x1)] = np.asarray(WALL, dtype=np.uint8)
    return frame


def _sample_layout(
    cfg: AgentWorldConfig, rng: np.random.Generator
) -> tuple[list[Rect], tuple[float, float], tuple[float, float]]:
    """Walls, random obstacles and free integer start corners for the box and the agent.

    The free space must be connected (see ``_sample_obstacles`` for why).
    """
    s, w = cfg.size, cfg.wall
    walls = [Rect(0, 0, s, w), Rect(0, s - w, s, s), Rect(0, w, w, s - w), Rect(s - w, w, s, s - w)]
    for _ in range(_LAYOUT_ATTEMPTS):
        rects = _sample_obstacles(cfg, rng, walls)
        if rects is None:
            continue
        occupied = _occupancy(s, rects)
        corners = _free_corners(occupied, None, cfg.agent_size)
        if not np.isfinite(_distance_field(corners, _first(corners))[corners]).all():
            continue
        # Room for the agent (plus 1 px) on every side lets the box be pushed any way; a
        # small or crowded room settles for the most it has, at least 1 px, and less again
        # where the box so placed leaves the agent no room (an empty room barely larger than
        # the two: a box centred with wide margins fills it).
        for c in range(cfg.agent_size + 1, 0, -1):
            box = _pick_free(occupied, cfg.box_size + 2 * c, rng)
            if box is None:
                continue
            box = (box[0] + c, box[1] + c)
            placed = occupied.copy()
            placed[box[1] : box[1] + cfg.box_size, box[0] : box[0] + cfg.box_size] = True
            agent = _pick_free(placed, cfg.agent_size, rng)
            if agent is not None:
                return rects, (float(agent[0]), float(agent[1])), (float(box[0]), float(box[1]))
    raise RuntimeError(
        f"could not lay out a room in {_LAYOUT_ATTEMPTS} random tries: the agent, the box and "
        f"the obstacles do not fit together; use a larger room, or fewer or smaller obstacles "
        f"than {cfg}"
    )


def _sample_obstacles(
    cfg: AgentWorldConfig, rng: np.random.Generator, walls: list[Rect], tries: int = 50
) -> list[Rect] | None:
    """Walls plus random obstacles that either touch their neighbours or leave the agent
    room to pass: narrow slits and pockets are where a pushed box gets stuck for good.
    None when an obstacle found no place in ``tries`` draws."""
    s, w = cfg.size, cfg.wall
    # A side longer than this leaves the box no room: capping it lets a smaller room keep
    # the default obstacle sizes (the config guarantees obstacle_min fits).
    longest = min(cfg.obstacle_max, s - 2 * w - cfg.box_size - 2)
    rects = list(walls)
    for _ in range(int(rng.integers(cfg.min_obstacles, cfg.max_obstacles + 1))):
        for _ in range(tries):
            ow, oh = (int(v) for v in rng.integers(cfg.obstacle_min, longest + 1, 2))
            x0 = int(rng.integers(w, s - w - ow + 1))
            y0 = int(rng.integers(w, s - w - oh + 1))
            rect = Rect(x0, y0, x0 + ow, y0 + oh)
            if all(not 0 < _gap(rect, r) <= cfg.agent_size for r in rects):
                rects.append(rect)
                break
        else:
            return None
    return rects


def _gap(r: Rect, s: Rect) -> float:
    """Chebyshev gap between two rectangles: 0 when they touch or overlap."""
    gx = max(r.x0 - s.x1, s.x0 - r.x1, 0)
    gy = max(r.y0 - s.y1, s.y0 - r.y1, 0)
    return max(gx, gy)


def _first(mask: np.ndarray) -> np.ndarray:
    """A mask holding only the first True cell of ``mask``."""
    first = np.zeros_like(mask)
    first.flat[int(np.argmax(mask))] = True
    return first


def _pick_free(occupied: np.ndarray, k: int, rng: np.random.Generator) -> tuple[int, int] | None:
    """A uniformly random top-left (x, y) of a free k x k window, or None if there is none."""
    table = np.pad(occupied.astype(np.int32).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    counts = table[k:, k:] - table[:-k, k:] - table[k:, :-k] + table[:-k, :-k]
    ys, xs = np.nonzero(counts == 0)
    if len(xs) == 0:
        return None
    i = int(rng.integers(len(xs)))
    return int(xs[i]), int(ys[i])


# -- policies --------------------------------------------------------------------------------


class _RandomPolicy:
    """Persistent random actions: discrete ones are kept with probability 0.8, continuous
    velocities follow a clipped AR(1) process so that motion is smooth."""

    def __init__(self, keep: float = 0.8, smoothing: float = 0.9) -> None:
        self._keep = keep
        self._smoothing = smoothing
        self._previous: Any = None

    def __call__(self, world: AgentWorld, state: AgentState, rng: np.random.Generator) -> Any:
        cfg = world.config
        if not cfg.continuous:
            if self._previous is None or rng.random() >= self._keep:
                self._previous = int(rng.integers(NUM_ACTIONS))
            return self._previous
        # Stationary std of the AR(1) is noise / sqrt(1 - smoothing**2) ~ 0.7 max_speed.
        noise = 0.3 * cfg.max_speed * rng.standard_normal(2)
        v = noise if self._previous is None else self._smoothing * self._previous + noise
        self._previous = np.clip(v, -cfg.max_speed, cfg.max_speed)
        return self._previous.astype(np.float32)


class _PushPolicy:
    """Walks to the far side of the box and pushes it in one direction, then picks another.

    Greedy, not optimal. The agent descends a breadth-first distance field (1 px grid of
    agent corners, the box counting as an obstacle) to a spot just behind the box, lined up
    with it, then pushes. A push stops while the box still has room for the agent between
    it and whatever lies ahead, so the box rarely ends in a corner it cannot leave. When no
    move gets closer the agent takes a short random detour, and it gives up on a direction
    after ``patience`` steps in which the box did not move.
    """

    def __init__(self, patience: int = 60, reach: float = 2.0) -> None:
        self._patience = patience
        self._reach = reach  # the largest gap (px) behind the box to push from
        self._direction: tuple[int, int] | None = None  # (axis, sign)
        self._margin = 0.0  # px to keep free ahead of the box in that direction
        self._field: np.ndarray | None = None  # distance to the push spot, [y, x] of corner
        self._field_key: tuple[Any, ...] | None = None
        # Box position at which no direction worked: while the box stays there the agent's
        # reachable region is unchanged, so only a chance push on a detour can help.
        self._hopeless: tuple[float, float] | None = None
        self._static: np.ndarray | None = None  # pixels covered by walls and obstacles
        self._previous: AgentState | None = None
        self._pushing = False  # the last action was a push
        self._idle = 0  # steps since the box last moved
        self._detour: tuple[int, int] = (0, 1)
        self._detour_left = 0
        # A planned move that max_speed clipped: (corner it should reach, axis, px left).
        # Planning again from the fractional corner half-way finds no move that is strictly
        # better on the 1 px field, so below 1 px per frame the agent never reached the box.
        self._rest: tuple[tuple[float, float], int, float] | None = None

    def __call__(self, world: AgentWorld, state: AgentState, rng: np.random.Generator) -> Any:
        self._observe(state)
        if self._static is None:
            self._static = _occupancy(world.config.size, world.obstacles)
        if self._direction is not None and self._room(world, state, *self._direction) <= 0:
            self._direction = None
        if self._direction is None and self._detour_left == 0 and state.box != self._hopeless:
            self._choose_direction(world, state, rng)
        rest, self._rest = self._rest, None
        move = None
        if rest is not None and rest[0] == state.agent and self._direction is not None:
            move = (rest[1], rest[2], False)  # finish the clipped move
        elif self._detour_left == 0 and self._direction is not None:
            move = self._plan(world, state)
        self._pushing = move is not None and move[2]
        if move is None:  # blocked, lost, or no direction: wander a little
            return self._wander(world, state, rng)
        action = _axis_action(world, move[0], move[1])
        if world.config.continuous and not move[2]:
            applied = world.displacement(action)
            left = move[1] - applied[move[0]]
            if left and applied[move[0]]:
                self._rest = (world._move(state, *applied).agent, move[0], left)
        return action

    def _wander(self, world: AgentWorld, state: AgentState, rng: np.random.Generator) -> Any:
        """One step of a short random detour that does not push the box: a stray push can
        wedge it against a wall for good. Only a hopeless box may be pushed by chance."""
        if self._detour_left == 0:
            self._detour = (int(rng.integers(2)), int(rng.choice((-1, 1))))
            self._detour_left = int(rng.integers(2, 8))
        self._detour_left -= 1
        axis, sign = self._detour
        action = _axis_action(world, axis, sign * math.inf)
        if (
            state.box != self._hopeless
            and world._move(state, *world.displacement(action)).box != state.box
        ):
            self._detour_left = 0  # pick a new detour next step
            return NOOP if not world.config.continuous else np.zeros(2, dtype=np.float32)
        return action

    def _observe(self, state: AgentState) -> None:
        previous, self._previous = self._previous, state
        if previous is None:
            return
        box_moved = state.box != previous.box
        self._idle = 0 if box_moved else self._idle + 1
        if self._pushing and not box_moved and state.agent == previous.agent:
            self._direction = None  # the box cannot go further this way
        if self._idle > self._patience:
            self._direction, self._idle = None, 0

    def _room(self, world: AgentWorld, state: AgentState, axis: int, sign: int) -> float:
        """How far (px) the box may still be pushed this way, keeping the margin free ahead
        of it; a discrete push needs a whole step."""
        ahead = abs(world._free_limit(state.box, state.box_size, axis, sign) - state.box[axis])
        room = ahead - self._margin
        if not world.config.continuous and room < world.config.step:
            return 0.0
        return room

    def _choose_direction(
        self, world: AgentWorld, state: AgentState, rng: np.random.Generator
    ) -> None:
        """A random direction the box can move in from a push spot the agent can reach;
        None if there is none. Pushes keep the agent's size plus 1 px free ahead of the box,
        so that it can be pushed back later; only when that leaves no direction (a small or
        crowded room) may the box go all the way."""
        assert self._static is not None
        free = _free_corners(self._static, state, state.agent_size)
        for self._margin in (state.agent_size + 1.0, 0.0):
            options = [
                (axis, sign)
                for axis in (0, 1)
                for sign in (-1, 1)
                if self._room(world, state, axis, sign) > 0
            ]
            for i in rng.permutation(len(options)):
                axis, sign = options[i]
                field = _distance_field(free, self._spots(world, state, free, axis, sign))
                if math.isfinite(_cost(field, state.agent)):
                    self._direction = (axis, sign)
                    self._field, self._field_key = field, (state.box, self._direction)
                    return
        self._direction, self._hopeless = None, state.box

    def _spots(
        self, world: AgentWorld, state: AgentState, free: np.ndarray, axis: int, sign: int
    ) -> np.ndarray:
        """Mask of free agent corners close behind the box and lined up with it."""
        a, b = state.agent_size, state.box_size
        ys, xs = np.indices(free.shape, dtype=np.float64)
        along, across = (xs, ys) if axis == 0 else (ys, xs)
        box = state.box
        gap = box[axis] - (along + a) if sign > 0 else along - (box[axis] + b)
        offset = np.abs(across + a / 2 - (box[1 - axis] + b / 2))
        return free & (gap >= 0) & (gap <= self._reach) & (offset <= self._tolerance(world))

    @staticmethod
    def _tolerance(world: AgentWorld) -> float:
        # A discrete agent moves on a lattice of `step` px, so it can only line up to half that.
        return 0.5 if world.config.continuous else max(0.5, world.config.step / 2)

    def _plan(self, world: AgentWorld, state: AgentState) -> tuple[int, float, bool] | None:
        """(axis, signed distance, is a push) of the next move, or None if none helps."""
        assert self._direction is not None and self._static is not None
        axis, sign = self._direction
        a, b = state.agent_size, state.box_size
        agent, box = state.agent, state.box
        gap = box[axis] - (agent[axis] + a) if sign > 0 else agent[axis] - (box[axis] + b)
        offset = abs(agent[1 - axis] + a / 2 - (box[1 - axis] + b / 2))
        if 0 <= gap <= self._reach and offset <= self._tolerance(world):
            return axis, sign * (gap + self._room(world, state, axis, sign)), True
        key = (state.box, self._direction)
        if self._field_key != key:
            free = _free_corners(self._static, state, state.agent_size)
            self._field = _distance_field(free, self._spots(world, state, free, axis, sign))
            self._field_key = key
        assert self._field is not None
        best, best_cost = None, _cost(self._field, agent)
        for move_axis, delta in _candidate_moves(world, agent):
            moved = world._move(state, *((delta, 0.0) if move_axis == 0 else (0.0, delta)))
            if moved.box != state.box:
                continue  # never push the box from the wrong side
            cost = _cost(self._field, moved.agent)
            if cost < best_cost:
                best, best_cost = (move_axis, delta, False), cost
        return best


def _occupancy(size: int, rects: list[Rect]) -> np.ndarray:
    """(size, size) bool, True on pixels covered by integer rectangles."""
    occupied = np.zeros((size, size), dtype=bool)
    for r in rects:
        occupied[int(r.y0) : int(r.y1), int(r.x0) : int(r.x1)] = True
    return occupied


def _free_corners(static: np.ndarray, box: AgentState | None, agent_size: int) -> np.ndarray:
    """[y, x] bool: an agent with this integer top-left corner overlaps no wall, no obstacle
    and (when ``box`` is given) not the box of that state."""
    occupied = static
    if box is not None:
        occupied = static.copy()
        (bx, by), b = box.box, box.box_size
        occupied[math.floor(by) : math.ceil(by + b), math.floor(bx) : math.ceil(bx + b)] = True
    a = agent_size
    table = np.pad(occupied.astype(np.int32).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    counts = table[a:, a:] - table[:-a, a:] - table[a:, :-a] + table[:-a, :-a]
    free = np.zeros_like(occupied)
    free[: counts.shape[0], : counts.shape[1]] = counts == 0
    return free


def _distance_field(free: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """4-connected breadth-first distance (in cells) from ``sources`` through ``free``."""
    h, w = free.shape
    # A border of blocked cells lets the flat-index neighbours +-1, +-row never wrap.
    row = w + 2
    open_cells = np.zeros((h + 2, row), dtype=bool)
    open_cells[1:-1, 1:-1] = free
    open_cells = open_cells.ravel()
    start = np.zeros((h + 2, row), dtype=bool)
    start[1:-1, 1:-1] = sources & free
    front = np.flatnonzero(start)
    open_cells[front] = False
    field = np.full(open_cells.size, np.inf)
    neighbours = np.array([-1, 1, -row, row])
    distance = 0
    while front.size:
        field[front] = distance
        ahead = (front[:, None] + neighbours).ravel()
        front = np.unique(ahead[open_cells[ahead]])
        open_cells[front] = False
        distance += 1
    return field.reshape(h + 2, row)[1:-1, 1:-1]


def _cost(field: np.ndarray, corner: tuple[float, float]) -> float:
    """Distance-field value at a corner: the best of the integer corners around it."""
    x, y = corner
    cells = field[math.floor(y) : math.ceil(y) + 1, math.floor(x) : math.ceil(x) + 1]
    return float(cells.min()) if cells.size else math.inf


def _candidate_moves(world: AgentWorld, corner: tuple[float, float]) -> list[tuple[int, float]]:
    """(axis, signed distance) moves to try. Continuous moves first snap a fractional
    coordinate to the next integer, so that the agent walks on the distance field's grid."""
    if not world.config.continuous:
        return [(axis, sign * world.config.step) for axis in (0, 1) for sign in (-1, 1)]
    whole = float(max(1, math.floor(world.config.max_speed)))
    moves = []
    for axis in (0, 1):
        v = corner[axis]
        if v != math.floor(v):
            moves += [(axis, math.ceil(v) - v), (axis, math.floor(v) - v)]
        else:
            moves += [(axis, whole), (axis, -whole), (axis, 1.0), (axis, -1.0)]
    return moves


def _axis_action(world: AgentWorld, axis: int, delta: float) -> Any:
    """The action that moves toward ``delta`` px along ``axis`` (at most one step's worth)."""
    if not world.config.continuous:
        if axis == 0:
            return RIGHT if delta > 0 else LEFT
        return DOWN if delta > 0 else UP
    v = np.zeros(2, dtype=np.float32)
    v[axis] = math.copysign(min(abs(delta), world.config.max_speed), delta)
    return v


POLICIES: dict[str, Callable[[], Policy]] = {"random": _RandomPolicy, "push": _PushPolicy}


def _policy(policy: str | Policy) -> Policy:
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(
                f"policy must be one of {sorted(POLICIES)} or a callable, got {policy!r}"
            )
        return POLICIES[policy]()
    if callable(policy):
        return policy
    raise ValueError(f"policy must be a str or a callable (world, state, rng), got {policy!r}")


def iter_trajectory(
    config: AgentWorldConfig | None,
    seed: int,
    num_frames: int,
    policy: str | Policy = "random",
    chunk: int = 256,
) -> Iterator[AgentTrajectory]:
    """``generate_trajectory`` in pieces of at most ``chunk`` frames, in constant memory:
    concatenated, the pieces equal ``generate_trajectory(config, seed, num_frames, policy)``.
    The arguments are checked when it is called, not at the first piece."""
    num_frames = check_int("num_frames", num_frames, minimum=1)
    chunk = check_int("chunk", chunk, minimum=1)
    return _trajectory_pieces(_policy(policy), AgentWorld(config, seed), num_frames, chunk)


def _trajectory_pieces(
    act: Policy, world: AgentWorld, num_frames: int, chunk: int
) -> Iterator[AgentTrajectory]:
    cfg = world.config
    rng = np.random.default_rng([world.seed, 1])  # a stream separate from the layout's
    state = world.reset()
    for lo in range(0, num_frames, chunk):
        n = min(chunk, num_frames - lo)
        frames = np.empty((n, cfg.size, cfg.size, 3), dtype=np.uint8)
        agent = np.empty((n, 2), dtype=np.float64)
        box = np.empty((n, 2), dtype=np.float64)
        actions = np.empty(
            (n, 2) if cfg.continuous else (n,), np.float32 if cfg.continuous else np.int64
        )
        for t in range(n):
            world._paint(frames[t], state)
            agent[t], box[t] = state.agent_centre, state.box_centre
            action = act(world, state, rng)
            delta = world.displacement(action)
            # Continuous velocities are recorded as applied (exact in float32 while
            # max_speed < 2**8); discrete ones as their action id.
            actions[t] = delta if cfg.continuous else world.discrete_action(action)
            if lo + t + 1 < num_frames:
                state = world._advance(*delta)
        yield AgentTrajectory(frames=frames, actions=actions, agent=agent, box=box, seed=world.seed)


def generate_trajectory(
    config: AgentWorldConfig | None,
    seed: int,
    num_frames: int,
    policy: str | Policy = "random",
) -> AgentTrajectory:
    """Roll out ``policy`` for ``num_frames`` frames in the world of ``seed``.

    policy: "random", "push" or a callable (world, state, rng) -> action. The policy draws
    from its own generator derived from ``seed``, so the whole trajectory is a function of
    (config, seed, num_frames, policy). ``actions[t]`` acts between frame t and t+1.
    """
    num_frames = check_int("num_frames", num_frames, minimum=1)
    (traj,) = iter_trajectory(config, seed, num_frames, policy, chunk=num_frames)
    return traj
