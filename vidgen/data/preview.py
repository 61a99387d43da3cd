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

from vidgen.fsutil import expand_user, target
from vidgen.io import VideoWriter
from vidgen.render_config import is_provenance, sharing_the_sidecar
from vidgen.worlds.agent import POLICIES, AgentWorldConfig, iter_trajectory
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
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {self.policy!r}")
        if isinstance(self.world, BouncingShapesConfig) and self.policy != "random":
            raise ValueError("policy only applies to world=agent")
        size = getattr(self.world, "size", 0)
        if not self.lossless and size % 2:
            raise ValueError(
                f"world.size={size} is odd: h264 in yuv420p needs even sizes (or lossless=true)"
            )
        out = expand_user(self.out)
        if out.suffix.lower() not in (".mp4", ".mkv", ".mov"):
            raise ValueError(f"out must end in .mp4 (or .mkv/.mov), got {self.out!r}")
        # The link's target's too: written there, its missing folders were made silently.
        for where in dict.fromkeys((out.parent, target(out).parent)):
            if not where.is_dir():
                raise ValueError(f"out={self.out!r}: folder {str(where)!r} does not exist")
        if out.is_dir():
            raise ValueError(f"out={self.out!r} is a folder; give the video's file name")


@dataclass(frozen=True)
class PreviewResult:
    path: Path
    frames: int
    seconds: float
    label: int | None

    @property
    def frames_per_second(self) -> float:
        return self.frames / max(self.seconds, 1e-9)


def preview(cfg: PreviewConfig) -> PreviewResult:
    """Write ``cfg.frames`` frames of the chosen world to ``cfg.out``."""
    label: int | None = None
    if isinstance(cfg.world, BouncingShapesConfig):
        world = BouncingShapes(cfg.world, seed=cfg.seed)
        label = world.label
        chunks: Iterator[np.ndarray] = (f[None] for f in world.iter_frames(cfg.frames))
    elif isinstance(cfg.world, AgentWorldConfig):
        pieces = iter_trajectory(cfg.world, cfg.seed, cfg.frames, policy=cfg.policy)
        chunks = (piece.frames for piece in pieces)
    else:
        raise ValueError(f"world must be a world config, got {type(cfg.world).__name__}")
    out = expand_user(cfg.out)
    start = time.perf_counter()
    with (
        VideoWriter(out, fps=cfg.fps, lossless=cfg.lossless) as writer,
        tqdm(total=cfg.frames, unit="frame", desc=f"writing {out.name}", disable=None) as bar,
    ):
        for chunk in chunks:
            writer.write(chunk)
            bar.update(len(chunk))
    seconds = time.perf_counter() - start
    # Written over a render: its provenance sidecar described the old video, and `vidgen
    # eval` (which reads the label from it) scored the preview against that request. Only
    # an .mp4 can be that render (renders are .mp4): a preview to x.mkv, or to x.mp4 beside
    # a render x.MP4, removed the sidecar of the render still there.
    sidecar = out.with_suffix(".json")
    if out.suffix.lower() == ".mp4" and sharing_the_sidecar(out) is None and is_provenance(sidecar):
        sidecar.unlink(missing_ok=True)
        log.info("removed %s, the provenance of the video this preview replaced", sidecar)
    log.info("wrote %d frames to %s in %.2fs", cfg.frames, out, seconds)
    return PreviewResult(path=out, frames=cfg.frames, seconds=seconds, label=label)
