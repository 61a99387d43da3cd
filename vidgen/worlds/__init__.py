"""Procedural worlds with exact ground truth, rendered to uint8 RGB frames (T, H, W, 3).

Positions use pixel-centre coordinates: pixel (row i, col j) has its centre at (x=j, y=i).
"""

from vidgen.worlds.agent import (
    AGENT_PALETTE,
    DOWN,
    LEFT,
    NOOP,
    NUM_ACTIONS,
    RIGHT,
    UP,
    AgentState,
    AgentTrajectory,
    AgentWorld,
    AgentWorldConfig,
    generate_trajectory,
)
from vidgen.worlds.bouncing import (
    BOUNCING_PALETTE,
    BouncingShapes,
    BouncingShapesConfig,
    ShapesTrajectory,
)
from vidgen.worlds.palette import OBJECT_COLOURS, ScenePalette

# Raise when a change makes any world render other frames for the same settings and seed:
# training caches of world clips are keyed by it (``vidgen.train.encoded.data_description``).
# 2 (2026-12-03): AgentWorld clips continuous velocities after snapping them, and its push
# policy finishes a move max_speed clipped (below max_speed 1, other frames and actions).
WORLDS_VERSION = 2

__all__ = [
    "AGENT_PALETTE",
    "BOUNCING_PALETTE",
    "DOWN",
    "LEFT",
    "NOOP",
    "NUM_ACTIONS",
    "OBJECT_COLOURS",
    "RIGHT",
    "UP",
    "WORLDS_VERSION",
    "AgentState",
    "AgentTrajectory",
    "AgentWorld",
    "AgentWorldConfig",
    "BouncingShapes",
    "BouncingShapesConfig",
    "ScenePalette",
    "ShapesTrajectory",
    "generate_trajectory",
]
