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
