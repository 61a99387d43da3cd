"""Gymnasium environments. Importing this package registers them (``import vidgen`` does)."""

from __future__ import annotations

import gymnasium

from vidgen.envs.agent_world import AgentWorldEnv

__all__ = ["AgentWorldEnv"]

AGENT_WORLD_ID = "vidgen/AgentWorld-v0"

# A re-import (importlib.reload, or two import paths) must not register the id twice.
if AGENT_WORLD_ID not in gymnasium.registry:
    gymnasium.register(
        id=AGENT_WORLD_ID,
        entry_point="vidgen.envs.agent_world:AgentWorldEnv",
        max_episode_steps=1000,
    )
