"""Torch datasets and loaders: clips of the procedural worlds and of real video folders."""

from vidgen.data.folder import VideoFolder
from vidgen.data.loader import DataConfig, build_dataset, make_loader
from vidgen.data.worlds import NO_LABEL, WORLDS, WorldClips, item_seed, to_model_range, to_uint8

__all__ = [
    "NO_LABEL",
    "WORLDS",
    "DataConfig",
    "VideoFolder",
    "WorldClips",
    "build_dataset",
    "item_seed",
    "make_loader",
    "to_model_range",
    "to_uint8",
]
