"""Gymnasium environment over the ground-truth AgentWorld (a learned world model comes later).

The observation is the rendered frame; the reward is how far the box moved this step, which
rewards pushing. Episodes never terminate on their own: registration adds a time limit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import gymnasium
import numpy as np
from gymnasium import spaces

from vidgen.worlds.agent import NUM_ACTIONS, AgentState, AgentWorld, AgentWorldConfig


class AgentWorldEnv(gymnasium.Env[np.ndarray, Any]):
    """AgentWorld as a Gymnasium env; every ``reset`` draws a new room from ``np_random``.

    config: the world config (default ``AgentWorldConfig()``); ``size`` and ``continuous``
    override its fields for convenience (``gymnasium.make(..., continuous=True)``).
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": 8}

    def __init__(
        self,
        render_mode: str | None = None,
        config: AgentWorldConfig | None = None,
        size: int | None = None,
        continuous: bool | None = None,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode must be None or one of {self.metadata['render_modes']}, "
                f"got {render_mode!r}"
            )
        if config is not None and not isinstance(config, AgentWorldConfig):
            raise ValueError(f"config must be an AgentWorldConfig, got {type(config).__name__}")
        overrides = {
            name: value
            for name, value in (("size", size), ("continuous", continuous))
            if value is not None
        }
        # replace() copies and re-validates, so the caller's config is never mutated.
        self.config = dataclasses.replace(config or AgentWorldConfig(), **overrides)
        self.render_mode = render_mode
        s = self.config.size
        self.observation_space = spaces.Box(0, 255, (s, s, 3), np.uint8)
        if self.config.continuous:
            limit = self.config.max_speed
            self.action_space: spaces.Space = spaces.Box(-limit, limit, (2,), np.float32)
        else:
            self.action_space = spaces.Discrete(NUM_ACTIONS)
        self._world: AgentWorld | None = None
        self._frame_index = 0

    @property
    def world(self) -> AgentWorld:
        """The current room; exists after the first ``reset``."""
        if self._world is None:
            raise gymnasium.error.ResetNeeded("call reset() before using the environment")
        return self._world

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """New room drawn from ``np_random`` (deterministic given ``seed``); options unused."""
        super().reset(seed=seed)
        world_seed = int(self.np_random.integers(0, 2**63 - 1))
        self._world = AgentWorld(self.config, world_seed)
        self._frame_index = 0
        state = self._world.reset()
        return self._world.render(), self._info(state)

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        world = self.world
        if self.config.continuous:  # the world clips for policies; the env refuses instead
            self._check_bounds(action)
        before = world.state.box
        state = world.step(action)
        self._frame_index += 1
        reward = float(np.hypot(state.box[0] - before[0], state.box[1] - before[1]))
        return world.render(), reward, False, False, self._info(state)

    def _check_bounds(self, action: Any) -> None:
        """A continuous action outside the action space is refused (the world's own checks
        name a wrong shape or a non-finite value)."""
        try:
            value = np.asarray(action, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):  # 10**400: the world's check names it
            return
        limit = np.float32(self.config.max_speed)  # float32, as the space's samples are
        with np.errstate(over="ignore"):  # 1e300 is inf in float32: outside, as it should be
            inside = np.abs(value.astype(np.float32)) <= limit
        if value.shape == (2,) and np.isfinite(value).all() and not inside.all():
            raise ValueError(
                f"action must be within the action space's +-{limit:g} per axis, got "
                f"{value.tolist()}"
            )

    def render(self) -> np.ndarray | None:
        if self.render_mode is None:
            return None
        return self.world.render()

    def _info(self, state: AgentState) -> dict[str, Any]:
        return {
            "agent_pos": np.asarray(state.agent_centre, dtype=np.float64),
            "box_pos": np.asarray(state.box_centre, dtype=np.float64),
            "frame_index": self._frame_index,
        }
