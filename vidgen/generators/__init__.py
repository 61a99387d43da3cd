"""The clip-generator contract (DESIGN.md section 3) and its implementations."""

from vidgen.generators.base import (
    Clip,
    ClipGenerator,
    ClipLatents,
    GenerationRequest,
    Stream,
    StreamSnapshot,
    generate_video,
)
from vidgen.generators.diffusion import DiffusionClipGenerator

__all__ = [
    "Clip",
    "ClipGenerator",
    "ClipLatents",
    "DiffusionClipGenerator",
    "GenerationRequest",
    "Stream",
    "StreamSnapshot",
    "generate_video",
]
