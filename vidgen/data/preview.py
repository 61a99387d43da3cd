"""``vidgen data preview``: render a procedural world straight to an mp4."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import MISSING
from tqdm import tqdm

from vidgen.io import VideoWriter
from vidgen.worlds.agent import AgentWorldConfig, generate_trajectory
from vidgen.worlds.bouncing import BouncingShapes, BouncingShapesConfig

log = logging.getLogger(__name__)


@dataclass
class PreviewConfig:
    """``world`` is chosen with ``world=bouncing|agent`` and tuned with ``world.<key>=...``;
    ``policy`` drives the AgentWorld agent (``random`` or ``push``)."""

    world: Any = MISSING
    frames: int = 256
    seed: int = 0
    out: str = "preview.mp4"
    fps: int = 8
    lossless: bool = False
    policy: str = "random"

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if self.fps < 1:
            raise ValueError(f"fps must be >= 1, got {self.fps}")


@dataclass(frozen=True)
class PreviewResult:
    path: Path
    frames: int
    seconds: float
    label: int | None

    @property
    def frames_per_second(self) -> float:
        return self.frames / max(self.seconds, 1e-9)


def _agent_frames(cfg: PreviewConfig, chunk: int = 1024) -> Iterator[np.ndarray]:
    # Trajectories are simulated whole; rolling out the final one directly keeps one copy.
    traj = generate_trajectory(cfg.world, seed=cfg.seed, num_frames=cfg.frames, policy=cfg.policy)
    for lo in range(0, cfg.frames, chunk):
        yield traj.frames[lo : lo + chunk]


def preview(cfg: PreviewConfig) -> PreviewResult:
    """Write ``cfg.frames`` frames of the chosen world to ``cfg.out``."""
    label: int | None = None
    if isinstance(cfg.world, BouncingShapesConfig):
        world = BouncingShapes(cfg.world, seed=cfg.seed)
        label = world.label
        chunks: Iterator[np.ndarray] = (f[None] for f in world.iter_frames(cfg.frames))
    elif isinstance(cfg.world, AgentWorldConfig):
        chunks = _agent_frames(cfg)
    else:
        raise ValueError(f"world must be a world config, got {type(cfg.world).__name__}")
    out = Path(cfg.out).expanduser()
    start = time.perf_counter()
    with (
        VideoWriter(out, fps=cfg.fps, lossless=cfg.lossless) as writer,
        tqdm(total=cfg.frames, unit="frame", desc=f"writing {out.name}", disable=None) as bar,
    ):
        for chunk in chunks:
            writer.write(chunk)
            bar.update(len(chunk))
    seconds = time.perf_counter() - start
    log.info("wrote %d frames to %s in %.2fs", cfg.frames, out, seconds)
    return PreviewResult(path=out, frames=cfg.frames, seconds=seconds, label=label)
