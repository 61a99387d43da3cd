"""Video files: probe and read (PyAV-probed, decord-decoded), write (streaming, atomic), join."""

from vidgen.io.video import (
    DEFAULT_CRF,
    MAX_FPS,
    VideoInfo,
    VideoReadError,
    VideoWriter,
    concat_videos,
    probe_video,
    read_metadata,
    read_video,
)

__all__ = [
    "DEFAULT_CRF",
    "MAX_FPS",
    "VideoInfo",
    "VideoReadError",
    "VideoWriter",
    "concat_videos",
    "probe_video",
    "read_metadata",
    "read_video",
]
