"""Video files: probe and read (PyAV-probed, decord-decoded; or streamed in chunks), write
(streaming, atomic), join."""

from vidgen.io.video import (
    DEFAULT_CRF,
    MAX_FPS,
    READER_VERSION,
    VideoInfo,
    VideoReadError,
    VideoWriter,
    as_displayed,
    concat_videos,
    iter_video,
    probe_video,
    read_metadata,
    read_video,
)

__all__ = [
    "DEFAULT_CRF",
    "MAX_FPS",
    "READER_VERSION",
    "VideoInfo",
    "VideoReadError",
    "VideoWriter",
    "as_displayed",
    "concat_videos",
    "iter_video",
    "probe_video",
    "read_metadata",
    "read_video",
]
