"""Reading, writing and joining mp4 files of uint8 RGB frames (T, H, W, 3).

Reading probes every file with PyAV first and counts its frames by demuxing, because decord
0.6 trusts the container header and can hang in native code when asked for a frame past the
real end of a file whose header over-reports. decord then decodes (it is the fast path) and
is only ever asked for indices below the probed count; PyAV decodes when decord is missing,
fails, or finds fewer frames than the probe.

Writing is streaming (one frame at a time through the encoder, constant memory) and atomic:
frames go to a hidden temporary file next to the target, which is renamed onto the target only
when the writer closes cleanly, so an interrupted render never leaves a half-written mp4 under
its final name. Segments written this way can be joined by `concat_videos` without
re-encoding, which is how long renders are assembled (DESIGN.md section 6).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import struct
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from vidgen.fsutil import publish, temp_beside

try:
    import av
    from av.bitstream import BitStreamFilterContext
    from av.video.reformatter import VideoReformatter
except ImportError:  # a bare training image (CUDA, no ffmpeg) can still import vidgen
    av = BitStreamFilterContext = VideoReformatter = None


def _require_av(what: str) -> None:
    if av is None:
        raise ImportError(f"{what} needs PyAV, which is not installed: pip install av")


logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
Backend = Literal["auto", "decord", "pyav"]

# Measured on a 64x64 clip of saturated squares moving 1 px a frame (see benchmarks/video_io.py and
# tests/test_io.py): up to crf 18 the encoder's loss is invisible next to the loss of 4:2:0
# chroma subsampling; 16 keeps a margin for textured, generated content, where luma PSNR
# falls about 1.5 dB per 2 crf steps.
DEFAULT_CRF = 16

# Tags the muxers write (or, Matroska's "duration", drop) themselves: refused for every
# container, as the lower-case rule below, so that metadata reads back from any of them.
_MUXER_TAGS = frozenset(
    {"major_brand", "minor_version", "compatible_brands", "encoder", "duration", "software"}
)
# AVI stores tags as RIFF INFO chunks: these keys only (others were dropped without a word;
# "album" reads back as "product").
_AVI_TAGS = frozenset(
    {"artist", "comment", "copyright", "date", "encoded_by", "genre", "language", "timecode"}
    | {"title", "track"}
)
_MP4_SUFFIXES = frozenset({"", ".mp4", ".m4v", ".mov"})
_H264_NAMES = frozenset({"h264", "libx264", "libx264rgb"})
# Frames resized at once; bounds the float copy of a long video.
_RESIZE_CHUNK = 64
# Matroska stores timestamps in milliseconds: above 1000 fps frames share a timestamp (and
# concat_videos could not give them distinct ones), so no writer goes faster.
MAX_FPS = 1000
# Raise when a change makes `read_video` return other frames for some file (a decoder moved
# off decord for a kind of stream): training caches of a folder's clips are keyed by it
# (``vidgen.train.encoded.data_description``). 2 (2026-12-03): odd-height 4:2:0 video, open
# GOPs, files with several video streams and MPEG-PS/TS read with PyAV since 2026-12-01.
READER_VERSION = 2


class VideoReadError(RuntimeError):
    """A file could not be read as a video; the message names the file and what is wrong."""


@dataclass(frozen=True)
class VideoInfo:
    """What `probe_video` found in a file.

    num_frames: frames that can be decoded (counted from the packets, not the header): the
    packets from the first keyframe on.
    fps: average frame rate; 0.0 when the container does not say.
    width, height: of the first frame.
    codec: decoder name of the video stream, e.g. "h264".
    identity: the file's (inode, size, modification time in ns) when probed: `read_video`
    refuses an `info` whose file has changed since (None: not checked).
    undecodable_packets: packets before the first keyframe (a stream cut mid-GOP without
    re-encoding); they reference frames that are not in the file and are not counted.
    size_changes: the keyframes do not all have one frame size (`read_video` then decodes
    with PyAV, which reads up to the change and refuses frames after it).
    rotation: degrees counterclockwise (0, 90, 180, 270) the stored frames are turned for
    display, as a phone stores a portrait video: reads return the frames as displayed, and
    width and height are the displayed ones (a player's view, not the stored one).
    pixel_aspect: the displayed width of a returned frame's pixel over its height (the
    stream's sample aspect ratio, turned with the frame: an anamorphic video stores a wide
    picture in narrower pixels). Reads at a given ``size`` show the picture as displayed;
    reads at the native size return the pixels as stored (width x height of them).
    open_gop: a frame after a keyframe (not the first) in the stream is shown before it: an
    open GOP (libx265's default), whose leading frames reference the GOP before; decord's
    seeks then land frames off, so `read_video` decodes such a file with PyAV.
    video_streams: video streams in the file, cover art included. Everything here describes
    and reads the first that is not cover art; decord decodes the one FFmpeg finds "best"
    (by bit rate, say), so `read_video` decodes a file with more than one with PyAV.
    container: FFmpeg's name of the container format, e.g. "mov,mp4,m4a,3gp,3g2,mj2" or
    "mpegts" (decord returns MPEG-TS and MPEG-PS streams shifted by frames, silently:
    `read_video` decodes them with PyAV).
    hidden_packets: packets an edit list hides (a cut made without re-encoding, such as
    ``ffmpeg -ss ... -c copy``): decoded for the frames after them, never shown, not counted.
    pixel_format: FFmpeg's name of the stored pixel format, e.g. "yuv420p" ("" unknown).
    """

    path: Path
    num_frames: int
    fps: float
    width: int
    height: int
    codec: str
    identity: tuple[int, int, int] | None = None
    undecodable_packets: int = 0
    size_changes: bool = False
    rotation: int = 0
    pixel_aspect: float = 1.0
    open_gop: bool = False
    video_streams: int = 1
    container: str = ""
    hidden_packets: int = 0
    pixel_format: str = ""


# A sample aspect ratio outside this range is taken for broken metadata, not a picture.
_PIXEL_ASPECT_RANGE = (0.1, 10.0)


def _pixel_aspect(stream: Any, path: Path) -> float:
    """The stream's sample aspect ratio (pixel width over height as displayed) as a float:
    1 when it has none (0/1 or unset) or one outside ``_PIXEL_ASPECT_RANGE``."""
    sar = getattr(stream, "sample_aspect_ratio", None) or getattr(
        stream.codec_context, "sample_aspect_ratio", None
    )
    try:
        value = float(sar) if sar else 1.0
    except (TypeError, ValueError, ZeroDivisionError):
        value = 1.0
    low, high = _PIXEL_ASPECT_RANGE
    if not low <= value <= high:
        logger.warning("%s: sample aspect ratio %s ignored (read as square pixels)", path, sar)
        return 1.0
    return value


def _stat_or_none(path: Path) -> tuple[int, int, int] | None:
    try:
        return _identity(path)
    except OSError:
        return None


def _identity(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


# --------------------------------------------------------------------------------------------
# Probing and reading
# --------------------------------------------------------------------------------------------


def _open_input(path: Path) -> Any:
    """Open `path` with PyAV, turning every failure into a VideoReadError naming the file."""
    try:
        exists, is_file = path.exists(), path.is_file()
    except OSError as err:  # a name too long for the filesystem (ENAMETOOLONG), ...
        raise VideoReadError(f"video path {path} cannot be read: {err.strerror}") from None
    if not exists:
        raise VideoReadError(f"video file {path} does not exist")
    if not is_file:
        raise VideoReadError(f"video path {path} is not a regular file")
    if path.stat().st_size == 0:
        raise VideoReadError(f"video file {path} is empty (0 bytes)")
    _require_av(f"reading {path}")
    try:
        # Tags that are not UTF-8 (an old muxer's Latin-1 title) must not make the video
        # unreadable: they are read with replacement characters.
        return av.open(_ffmpeg_path(path), metadata_errors="replace")
    except (av.FFmpegError, OSError) as err:
        raise VideoReadError(
            f"cannot open {path} as a video container (truncated or not a video?): {err}"
        ) from err


def _ffmpeg_path(path: Path) -> str:
    """``path`` as FFmpeg must be given it: absolute, so that a relative name with a colon
    (``run-12:30.mp4``) is not taken for a protocol prefix (``run-12:``)."""
    return os.path.abspath(path)


def _codec_context(stream: Any, path: Path) -> Any:
    """The stream's codec context; an mp4 cut inside its index has none."""
    if stream.codec_context is None:
        raise VideoReadError(
            f"{path}: its video stream has no codec parameters (truncated inside its index?)"
        )
    return stream.codec_context


_ATTACHED_PIC = 1024  # AV_DISPOSITION_ATTACHED_PIC


def _video_stream(container: Any, path: Path) -> Any:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise VideoReadError(
            f"{path} has no video stream (streams found: {', '.join(map(str, kinds))})"
        )
    # Cover art (an attached picture: one still image) is no stream of the video's frames.
    moving = [s for s in container.streams.video if not int(s.disposition) & _ATTACHED_PIC]
    return (moving or container.streams.video)[0]


def _is_frame_packet(packet: Any) -> bool:
    # The demuxer ends with an empty flush packet, marks a packet cut short by the end of a
    # truncated file as corrupt, and one an edit list hides (a cut made without re-encoding)
    # as discard; none of them decodes to a shown frame.
    return packet.size > 0 and not packet.is_corrupt and not packet.is_discard


@dataclass
class _PacketScan:
    """What one pass over the packets of a video stream found."""

    num_frames: int
    undecodable: int
    end: float | None  # seconds at which the last frame packet ends; None: no timestamps
    sizes: list[tuple[int, int]]  # (width, height) of each decoded keyframe
    rotation: int = 0  # the first decoded keyframe's display rotation (``_display``)
    end_known: bool = False  # the last packet's duration was given (not taken as 0)
    open_gop: bool = False  # a frame shown before a later keyframe it follows in the stream
    hidden: int = 0  # packets an edit list hides (discard): decoded, never shown


def _display(frame: Any) -> tuple[int, bool]:
    """How a decoded frame is shown: the degrees counterclockwise it is turned (a phone's
    portrait video is stored landscape with a rotation in its display matrix), as 0, 90, 180
    or 270, and whether the matrix mirrors it (negative determinant: PyAV gives a plain
    horizontal mirror as -180, which turning by would show upside down). PyAV gives the
    angle in [-180, 180]; an older PyAV without ``rotation`` or side data: (0, False)."""
    rotation = round(float(getattr(frame, "rotation", 0) or 0) / 90) % 4 * 90
    try:
        data = frame.side_data.get("DISPLAYMATRIX")
    except Exception:  # an older PyAV without side data by name: rotations only
        return rotation, False
    if data is None or len(bytes(data)) != 36:
        return rotation, False
    a, b, _, c, d, *_ = struct.unpack("=9i", bytes(data))  # 16.16 fixed point, native order
    return rotation, a * d - b * c < 0


def _is_keyframe(packet: Any) -> bool:
    return packet.is_keyframe and packet.size > 0 and not packet.is_corrupt


# The NAL unit type of a sequence parameter set, where a frame size is given.
_SPS_TYPE = {"h264": (lambda b: b & 0x1F, 7), "hevc": (lambda b: (b >> 1) & 0x3F, 33)}


def _nal_units(data: bytes, length_size: int) -> Iterator[bytes]:
    """The NAL units of an H.264/HEVC packet: length-prefixed (mp4, Matroska), or Annex B
    with start codes (raw streams) when ``length_size`` is 0."""
    if length_size:
        i = 0
        while i + length_size <= len(data):
            size = int.from_bytes(data[i : i + length_size], "big")
            yield data[i + length_size : i + length_size + size]
            i += length_size + size
        return
    for unit in data.split(b"\x00\x00\x01")[1:]:
        yield unit.rstrip(b"\x00")


def _length_size(codec: str, extradata: bytes | None) -> int:
    """NAL length-prefix bytes of a stream with avcC/hvcC extradata; 0: Annex B."""
    if not extradata or extradata[0] != 1:
        return 0
    if codec == "h264" and len(extradata) > 4:
        return (extradata[4] & 3) + 1
    if codec == "hevc" and len(extradata) > 21:
        return (extradata[21] & 3) + 1
    return 0


class _SizeWatch:
    """Which keyframes must be decoded to see every frame size: all of them, except in
    H.264/HEVC, where the size lives in the sequence parameter set: there only the first
    keyframe and those that bring new parameters (in the packet or as new extradata).
    Decoding every keyframe made probing 5-34x slower on 720p or all-intra files."""

    def __init__(self, stream: Any) -> None:
        self.codec = stream.codec_context.name
        self.length_size = _length_size(self.codec, stream.codec_context.extradata)
        self.last_sps: bytes | None = None
        self.first = True

    def needs_decode(self, packet: Any) -> bool:
        if self.codec not in _SPS_TYPE:
            return True
        sps = self._sps(packet)
        new = sps is not None and sps != self.last_sps
        needed = self.first or new or packet.has_sidedata("new_extradata")
        self.first = False
        self.last_sps = sps or self.last_sps
        return needed

    def _sps(self, packet: Any) -> bytes | None:
        nal_type, sps_type = _SPS_TYPE[self.codec]
        units = _nal_units(bytes(packet), self.length_size)
        found = [u for u in units if u and nal_type(u[0]) == sps_type]
        return b"".join(found) or None


def _scan_packets(container: Any, stream: Any, path: Path) -> _PacketScan:
    """Count the video packets really present; the header's frame count can over-report.

    Packets before the first keyframe (a discarded one counts: it is still decoded) cannot be
    decoded and are not frames, unless no packet is marked a keyframe at all. Packets without
    a timestamp count only in a stream where none has one (a raw H.264 elementary stream). A
    packet with a pts but no dts is timed: Matroska stores the first frames that B-frames
    delay so. Keyframes are decoded for their size (``_SizeWatch`` picks which): a stream
    can change size only at one (H.264, HEVC; VP9 and AV1 can also change at other frames,
    which this does not see).
    """
    counts = [[0, 0], [0, 0]]  # [before / from the first keyframe][timed / untimed]
    hidden = 0
    keyed = False
    key_pts: int | None = None
    last_key_pts: int | None = None  # of the latest keyframe after the first
    open_gop = False
    end_ticks: int | None = None
    end_known = False
    sizes: list[tuple[int, int]] = []
    display: tuple[int, bool] | None = None  # the first decoded keyframe's (``_display``)
    ctx = stream.codec_context
    watch = _SizeWatch(stream)
    try:
        for packet in container.demux(stream):
            if _is_keyframe(packet):
                if not keyed:
                    key_pts = packet.pts
                elif packet.pts is not None:
                    last_key_pts = packet.pts
                keyed = True
                if watch.needs_decode(packet):
                    for frame in ctx.decode(packet):
                        sizes.append((frame.width, frame.height))
                        display = display or _display(frame)
            if not _is_frame_packet(packet):
                hidden += packet.size > 0 and packet.is_discard and not packet.is_corrupt
                continue
            untimed = packet.dts is None and packet.pts is None
            counts[keyed and not _leading(packet, key_pts)][untimed] += 1
            open_gop = open_gop or _leading(packet, last_key_pts)
            if packet.pts is not None:
                packet_end = packet.pts + (packet.duration or 0)
                if end_ticks is None or packet_end > end_ticks:
                    end_ticks, end_known = packet_end, bool(packet.duration)
        if keyed:
            for frame in ctx.decode(None):
                sizes.append((frame.width, frame.height))
                display = display or _display(frame)
    except av.FFmpegError as err:
        seen = sum(map(sum, counts))
        raise VideoReadError(
            f"{path} is damaged: reading its video packets failed after {seen}: {err}"
        ) from err
    # Untimed frame packets count whether or not others are timed: an MPEG-PS muxer times
    # only the first frame of each pack, and 37 frames were counted as 1.
    before, after = sum(counts[0]), sum(counts[1])
    end = None if end_ticks is None else float(end_ticks * stream.time_base)
    rotation, mirrored = display or (0, False)
    if mirrored:  # not applied: a turn by its angle alone would show it upside down
        logger.warning("%s: its display matrix mirrors the frames; they are read as stored", path)
        rotation = 0
    if not keyed:  # no keyframe flags at all: trust every packet, the decoder will tell
        return _PacketScan(before, 0, end, sizes, rotation, end_known, hidden=hidden)
    return _PacketScan(after, before, end, sizes, rotation, end_known, open_gop, hidden)


def _matroska_duration(container: Any, stream: Any) -> float | None:
    """Seconds the Matroska header gives the video stream: its DURATION tag (ffmpeg and
    mkvmerge write one per track), else the segment's duration when the video is the only
    stream (with audio, the segment may be the longer audio's). None when unknown."""
    tag = stream.metadata.get("DURATION")
    if tag is not None:
        try:
            hours, minutes, seconds = tag.split(":")
            return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
        except ValueError:
            return None
    if len(container.streams) == 1 and container.duration is not None:
        return container.duration / av.time_base
    return None


def _check_complete(
    container: Any, stream: Any, path: Path, scan: _PacketScan, rate: Fraction | None
) -> None:
    """Raise if a Matroska file ends clearly before its header says: its duration is written
    into the header on closing, so a cut file keeps it, but the demuxer just stops early.
    Other containers are not checked: a cut mp4 loses its index and does not open, or, written
    with faststart, keeps an index that lists the lost frames and is read up to the cut."""
    if "matroska" not in container.format.name or scan.end is None:
        return
    claimed = _matroska_duration(container, stream)
    if claimed is None:
        return
    # One frame where the last packet's duration is unknown (its end is then its start),
    # half of one where it is known (a file one frame short is cut); 1 ms: Matroska's
    # rounding.
    frame = 1 / float(rate) if rate else 0.0
    slack = (frame / 2 if scan.end_known else frame) + 0.001
    if claimed - scan.end <= slack:
        return
    expected = f" (about {round(claimed * rate)} frames at {float(rate):g} fps)" if rate else ""
    raise VideoReadError(
        f"{path} is truncated: its Matroska header gives the video {claimed:.3f} s{expected} "
        f"but its packets end at {scan.end:.3f} s ({scan.num_frames} frames)"
    )


def probe_video(path: PathLike) -> VideoInfo:
    """Describe the first video stream of `path`, counting its frames by demuxing.

    Raises VideoReadError (naming the file) when it is missing, empty, truncated (a Matroska
    file that ends before its header's duration), not a video container, has no video
    stream, or has no video frames. Keyframes are decoded to find size changes, so an
    all-keyframe stream (MJPEG, FFV1, ...) is decoded in full.
    """
    path = Path(path)
    with _open_input(path) as container:
        identity = _identity(path)
        stream = _video_stream(container, path)
        video_streams = len(container.streams.video)
        container_format = container.format.name
        ctx = _codec_context(stream, path)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        codec = ctx.name
        pixel_format = ctx.pix_fmt or ""
        width, height = ctx.width, ctx.height
        pixel_aspect = _pixel_aspect(stream, path)
        scan = _scan_packets(container, stream, path)
        _check_complete(container, stream, path, scan, rate)
    if scan.num_frames == 0:
        raise VideoReadError(f"{path} has a video stream but no video frames")
    if scan.sizes:  # the header's size can be that of a later part of the stream
        width, height = scan.sizes[0]
    if scan.rotation in (90, 270):  # the size as displayed, which is what reads return
        width, height = height, width
        pixel_aspect = 1 / pixel_aspect  # a stored pixel's width is now its height
    if width <= 0 or height <= 0:
        raise VideoReadError(f"{path} has a video stream without a frame size ({width}x{height})")
    return VideoInfo(
        path=path,
        num_frames=scan.num_frames,
        fps=float(rate) if rate else 0.0,
        width=width,
        height=height,
        codec=codec,
        identity=identity,
        undecodable_packets=scan.undecodable,
        size_changes=len(set(scan.sizes)) > 1,
        rotation=scan.rotation,
        pixel_aspect=pixel_aspect,
        open_gop=scan.open_gop,
        video_streams=video_streams,
        container=container_format,
        hidden_packets=scan.hidden,
        pixel_format=pixel_format,
    )


def _check_int(name: str, value: object) -> int:
    # bool is an int subclass; True as a frame count is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def _frame_range(info: VideoInfo, start: int, num_frames: int | None) -> range:
    start = _check_int("start", start)
    total = info.num_frames
    name = info.path.name
    if start < 0:
        raise ValueError(f"start must be >= 0, got start={start}")
    if start >= total:
        raise ValueError(
            f"start={start} is past the end of {name} ({total} frames; valid start is "
            f"0..{total - 1})"
        )
    if num_frames is None:
        return range(start, total)
    num_frames = _check_int("num_frames", num_frames)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1 (or None for all), got num_frames={num_frames}")
    if start + num_frames > total:
        raise ValueError(
            f"num_frames={num_frames} from start={start} runs past the end of {name} "
            f"({total} frames; at most {total - start} are available from start={start})"
        )
    return range(start, start + num_frames)


def _parse_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int | np.integer) and not isinstance(size, bool):
        dims: tuple[Any, ...] = (size, size)
    elif isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2:
        dims = tuple(size)
    else:
        raise ValueError(f"size must be None, an int, or a (height, width) pair, got {size!r}")
    if any(isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 1 for d in dims):
        raise ValueError(f"size must hold positive ints (height, width), got {size!r}")
    return int(dims[0]), int(dims[1])


def as_displayed(frames: torch.Tensor, pixel_aspect: float) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) of a video whose pixels are shown ``pixel_aspect`` times as
    wide as high (``VideoInfo.pixel_aspect``), resized so that its pixels are square: wider
    when they are shown wide, taller when narrow (never smaller). Square pixels are returned
    as they are."""
    try:  # any real number: numpy's, a Fraction
        aspect = float(pixel_aspect)
    except (TypeError, ValueError):
        aspect = math.nan
    if isinstance(pixel_aspect, bool) or not (math.isfinite(aspect) and aspect > 0):
        raise ValueError(f"pixel_aspect must be a positive number, got {pixel_aspect!r}")
    pixel_aspect = aspect
    if pixel_aspect == 1:
        return frames
    height, width = frames.shape[1:3]
    if pixel_aspect > 1:
        size = (height, max(1, round(width * pixel_aspect)))
    else:
        size = (max(1, round(height / pixel_aspect)), width)
    return _resize_cover_crop(frames, size, pixel_aspect)


def _resize_cover_crop(
    frames: torch.Tensor, size: tuple[int, int], pixel_aspect: float = 1.0
) -> torch.Tensor:
    """Scale so the frame as displayed (its pixels ``pixel_aspect`` times as wide as high)
    covers `size` (shorter side first), then center-crop to it."""
    height, width = frames.shape[1:3]
    shown_width = width * pixel_aspect
    target_h, target_w = size
    scale = max(target_h / height, target_w / shown_width)
    # max() guards against rounding leaving the scaled frame a pixel short of the target.
    scaled_h = max(target_h, round(height * scale))
    scaled_w = max(target_w, round(shown_width * scale))
    top = (scaled_h - target_h) // 2
    left = (scaled_w - target_w) // 2
    if (scaled_h, scaled_w) == (height, width):
        return frames[:, top : top + target_h, left : left + target_w].contiguous()
    out = torch.empty((frames.shape[0], target_h, target_w, 3), dtype=torch.uint8)
    for i in range(0, frames.shape[0], _RESIZE_CHUNK):
        chunk = frames[i : i + _RESIZE_CHUNK].permute(0, 3, 1, 2).float()  # t c h w
        chunk = F.interpolate(
            chunk, size=(scaled_h, scaled_w), mode="bilinear", align_corners=False, antialias=True
        )
        chunk = chunk[:, :, top : top + target_h, left : left + target_w]
        out[i : i + _RESIZE_CHUNK] = chunk.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out


def _import_decord() -> Any | None:
    try:
        import decord
    except ImportError:
        return None
    return decord


_DECORD_FAILED: set[Path] = set()  # files decord failed on (its warning is logged once)


def _read_decord(decord: Any, info: VideoInfo, indices: range) -> np.ndarray | None:
    """Decode `indices` with decord; None when it reports fewer frames than the probe."""
    reader = decord.VideoReader(_ffmpeg_path(info.path), ctx=decord.cpu(0), num_threads=1)
    available = len(reader)
    if available < indices.stop:
        logger.warning(
            "decord sees %d frames in %s but %d are needed; decoding with PyAV instead",
            available,
            info.path,
            indices.stop,
        )
        return None
    batch = reader.get_batch(list(indices))
    # decord.bridge.set_bridge("torch") elsewhere in the process makes this a torch tensor.
    return batch.asnumpy() if hasattr(batch, "asnumpy") else batch.numpy()


def _leading(packet: Any, key_pts: int | None) -> bool:
    """A frame shown before the first keyframe although it comes after it in the stream: an
    open GOP's leading B-frame, which references the GOP before, cut away."""
    return key_pts is not None and packet.pts is not None and packet.pts < key_pts


def _from_first_keyframe(packets: Iterable[Any]) -> Iterator[Any]:
    """The packets from the first keyframe on, less the leading frames shown before it: they
    reference frames that are not in the file (a stream cut mid-GOP), and some decoders
    would make up frames for them."""
    keyed = False
    key_pts = None
    for packet in packets:
        if not keyed and _is_keyframe(packet):
            keyed, key_pts = True, packet.pts
        if keyed and not _leading(packet, key_pts):
            yield packet


def _decoded(container: Any, stream: Any, info: VideoInfo) -> Iterator[Any]:
    packets = container.demux(stream)
    if info.undecodable_packets:
        packets = _from_first_keyframe(packets)
    for packet in packets:  # the demuxer's last, empty packet flushes the decoder
        yield from packet.decode()


def _pyav_frames(info: VideoInfo, indices: range) -> Iterator[np.ndarray]:
    """Frames ``indices`` of the file, decoded by PyAV in one pass from its start."""
    done, first = 0, None  # first: frame 0's (height, width) as decoded, before any turn
    # One converter for the whole read: ``frame.to_ndarray(format=...)`` sets up a new
    # swscale context for every frame, which cost 30x the conversion itself (1.6 ms per
    # 64x64 frame, against 0.07 ms); the output is the same.
    reformatter = VideoReformatter()
    with _open_input(info.path) as container:
        stream = _video_stream(container, info.path)
        stream.thread_type = "AUTO"
        try:
            # Decoding from the start is slow for a late `start` but exact; seeking lands on
            # keyframes and frame-accurate seeking in arbitrary files is fragile.
            for index, frame in enumerate(_decoded(container, stream, info)):
                # Against frame 0, frames before the range too: a range wholly after a size
                # change was read at the new size, unlike the video's probed one.
                first = (frame.height, frame.width) if first is None else first
                _check_same_size(info.path, first, (frame.height, frame.width), index)
                if index < indices.start:
                    continue
                array = reformatter.reformat(frame, format="rgb24").to_ndarray()
                if info.rotation:  # as displayed (np.rot90 turns counterclockwise)
                    array = np.ascontiguousarray(np.rot90(array, info.rotation // 90))
                done += 1
                yield array
                if done == len(indices):
                    break  # before decoding past the range: a damaged packet there is no error
        except av.FFmpegError as err:
            raise VideoReadError(
                f"{info.path} is damaged: decoding failed at frame {indices.start + done}: {err}"
            ) from err
    if done < len(indices):
        raise VideoReadError(
            f"{info.path} has {info.num_frames} video packets but only "
            f"{indices.start + done} decodable frames"
        )


def _read_pyav(info: VideoInfo, indices: range) -> np.ndarray:
    return np.stack(list(_pyav_frames(info, indices)))


def _check_same_size(path: Path, first: tuple[int, int], size: tuple[int, int], index: int) -> None:
    """Raise unless frame ``index`` (``size``, height and width as stored) has the size of
    frame 0 (``first``): a stream that changes size midway (joined raw H.264 of two sizes)
    cannot be one (T, H, W, 3) tensor."""
    if size != first:
        raise VideoReadError(
            f"{path} changes frame size at frame {index}: frame 0 is {first[1]}x{first[0]} "
            f"but frame {index} is {size[1]}x{size[0]} (width x height); a video must keep "
            "one frame size to be read as a tensor"
        )


def _probed(path: PathLike, info: VideoInfo | None) -> VideoInfo:
    """``info`` checked to describe ``path`` as it is now, or the file probed afresh."""
    if info is None:
        return probe_video(path)
    if os.path.abspath(info.path) != os.path.abspath(path):  # a relative name is the same
        raise ValueError(f"info describes {info.path}, not {path}")
    if info.identity is not None and _stat_or_none(Path(path)) != info.identity:
        # Replaced or rewritten since: its frames would be read as the probed video's.
        raise VideoReadError(f"{path} has changed since it was probed: probe it again")
    return info


def read_video(
    path: PathLike,
    start: int = 0,
    num_frames: int | None = None,
    size: int | Sequence[int] | None = None,
    backend: Backend = "auto",
    info: VideoInfo | None = None,
) -> torch.Tensor:
    """Read frames [start, start + num_frames) of `path` as a uint8 tensor (T, H, W, 3).

    num_frames=None reads to the end. size: None keeps the native size (the stored pixels),
    an int gives a square, (height, width) a rectangle; the frame as displayed (its sample
    aspect ratio applied, `VideoInfo.pixel_aspect`) is scaled to cover it and center-cropped.
    backend: "decord" or "pyav" to force one decoder (no fallback); "auto" uses decord and
    falls back to PyAV when decord is missing, fails or sees fewer frames than the probe.
    Files decord would read wrongly go to PyAV ("decord" refuses them): a stream that changes
    frame size (frames up to the change read; a range past it raises VideoReadError), and
    a stream cut mid-GOP, whose frame 0 is its first keyframe (see `VideoInfo`).
    info: the file's `probe_video` result, to skip probing it again (datasets read many clips
    of one file).
    """
    if backend not in ("auto", "decord", "pyav"):
        raise ValueError(f"backend must be 'auto', 'decord' or 'pyav', got {backend!r}")
    target = _parse_size(size)
    info = _probed(path, info)
    indices = _frame_range(info, start, num_frames)
    array = _decode(info, indices, backend)
    frames = torch.from_numpy(np.ascontiguousarray(array))
    if target is not None and (target != tuple(frames.shape[1:3]) or info.pixel_aspect != 1):
        frames = _resize_cover_crop(frames, target, info.pixel_aspect)
    return frames


def iter_video(
    path: PathLike,
    chunk: int = 256,
    start: int = 0,
    num_frames: int | None = None,
    info: VideoInfo | None = None,
) -> Iterator[torch.Tensor]:
    """Frames [start, start + num_frames) of `path` in order, as uint8 tensors of at most
    ``chunk`` frames each (T, H, W, 3): a video of any length in memory bounded by ``chunk``
    frames (``read_video`` holds them all). Decoded by PyAV in one pass, with the checks of
    ``read_video``: a stream that changes frame size or holds fewer decodable frames than its
    packets raises VideoReadError when the reading gets there (the chunks before it have
    been yielded). info: the file's `probe_video` result, to skip probing it again."""
    # Checked now, not at the first ``next`` (this is no generator function itself).
    _require_av("iter_video")
    chunk = _check_int("chunk", chunk)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 frame, got {chunk}")
    info = _probed(path, info)
    return _chunked(_pyav_frames(info, _frame_range(info, start, num_frames)), chunk)


def _chunked(frames: Iterator[np.ndarray], chunk: int) -> Iterator[torch.Tensor]:
    batch: list[np.ndarray] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == chunk:
            yield torch.from_numpy(np.stack(batch))
            batch = []
    if batch:
        yield torch.from_numpy(np.stack(batch))


def _half_height_chroma(pixel_format: str) -> bool:
    """Whether ``pixel_format`` stores chroma at half the frame's height (4:2:0, NV12)."""
    name = pixel_format.lower()
    return "420" in name or name in ("nv12", "nv21", "p010le", "p010be", "p016le", "p016be")


def _decord_pitfall(info: VideoInfo) -> str | None:
    """Why decord would return wrong frames for `info`'s file, or None."""
    if info.size_changes:
        return "it changes frame size midway, and decord scales every frame to one size"
    if info.rotation:
        return f"it is displayed turned {info.rotation} degrees, which decord does not apply"
    if info.undecodable_packets:
        return (
            f"its first {info.undecodable_packets} video packets come before the first "
            "keyframe (cut mid-GOP), and decord's frame indices then count them"
        )
    if info.open_gop:
        return (
            "its GOPs are open (frames shown before the keyframe they follow), and decord's "
            "seeks then land frames off"
        )
    if info.video_streams > 1:
        return (
            f"it has {info.video_streams} video streams, and decord may decode another than "
            "the first, which the probe describes"
        )
    if info.height % 2 and _half_height_chroma(info.pixel_format):
        # Its last chroma row covers one luma row: decord's conversion places the chroma
        # rows off (mean error 2.7 against PyAV's 0.7 on a 17x33 FFV1 video).
        return (
            f"its frame height {info.height} is odd with {info.pixel_format} chroma, whose "
            "rows decord places off"
        )
    if info.container in ("mpegts", "mpeg"):
        # TS: a B-frame stream came back shifted, the last frame repeated; PS (which times
        # one frame a pack): reads from a later start came back from frame 0.
        return (
            f"it is an MPEG-{'TS' if info.container == 'mpegts' else 'PS'} stream, which "
            "decord returns shifted by frames"
        )
    return None


def _decode(info: VideoInfo, indices: range, backend: Backend) -> np.ndarray:
    if backend == "pyav":
        return _read_pyav(info, indices)
    pitfall = _decord_pitfall(info)
    if pitfall is not None:
        if backend == "decord":
            raise VideoReadError(
                f"decord cannot read {info.path} correctly: {pitfall}; use backend='pyav' or 'auto'"
            )
        logger.debug("reading %s with PyAV: %s", info.path, pitfall)
        return _read_pyav(info, indices)
    decord = _import_decord()
    if decord is None:
        if backend == "decord":
            raise ImportError(
                "read_video(backend='decord') needs the decord package, which is not "
                "importable; install decord or use backend='pyav' or 'auto'"
            )
        logger.debug("decord is not installed; reading %s with PyAV", info.path)
        return _read_pyav(info, indices)
    try:
        array = _read_decord(decord, info, indices)
    except Exception as err:  # decord raises its own DECORDError and plain RuntimeErrors
        if backend == "decord":
            raise VideoReadError(f"decord failed to read {info.path}: {err}") from err
        # Once per file: a dataset of small videos (decord fails on some widths) read clip
        # by clip would log it at every read.
        level = logging.DEBUG if info.path in _DECORD_FAILED else logging.WARNING
        _DECORD_FAILED.add(info.path)
        logger.log(level, "decord failed on %s (%s); decoding with PyAV instead", info.path, err)
        return _read_pyav(info, indices)
    if array is None:
        if backend == "decord":
            raise VideoReadError(
                f"decord sees fewer frames in {info.path} than the {indices.stop} needed "
                f"(PyAV counted {info.num_frames}); use backend='pyav' or 'auto'"
            )
        return _read_pyav(info, indices)
    return array


def read_metadata(path: PathLike) -> dict[str, str]:
    """Container-level tags of `path` (as given to VideoWriter), without the muxer's own.
    Matroska (``.mkv``, ``.webm``) stores tag names upper-case: there they come back
    lower-case, so the lower-case keys vidgen writes (``comment``) read back as written."""
    path = Path(path)
    with _open_input(path) as container:
        tags = dict(container.metadata)
        matroska = "matroska" in container.format.name
    if matroska:
        tags = {key.lower(): value for key, value in tags.items()}
    return {key: value for key, value in tags.items() if key not in _MUXER_TAGS}


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _check_target(path: Path) -> None:
    """Fail before any encoding when the file could never be published at `path`."""
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {path.parent} does not exist")
    if path.is_dir():
        raise IsADirectoryError(
            f"cannot write {path}: it is an existing directory; expected a file path"
        )


def _temp_path(path: Path) -> Path:
    """A new hidden file beside `path` with the same suffix, so the muxer guesses the format."""
    return temp_beside(path, suffix=f".tmp{path.suffix}")


def _open_output(tmp: Path, final: Path, metadata: dict[str, str]) -> Any:
    options = {}
    fmt = None
    if final.suffix.lower() in _MP4_SUFFIXES:
        # Without use_metadata_tags the mp4 muxer silently drops keys it has no atom for.
        options["movflags"] = "use_metadata_tags"
        fmt = "mp4" if final.suffix == "" else None
    # Written through a file of our own, closed by `_close_output`/`_discard`: FFmpeg's own
    # (from a path) stays open when the header cannot be written (a full disk, a container
    # that cannot hold the codec), and PyAV never closes it; a worker retrying leaked one
    # descriptor of a deleted temp file per try.
    handle = open(tmp, "wb")  # noqa: SIM115 (closed with the container)
    try:
        container = av.open(handle, mode="w", format=fmt, options=options)
    except ValueError as err:
        handle.close()
        raise ValueError(
            f"cannot choose a container format for {final} from its suffix {final.suffix!r}; "
            "use .mp4 (or another suffix ffmpeg knows, like .mkv)"
        ) from err
    except BaseException:
        handle.close()
        raise
    container.metadata.update(metadata)
    return container


def _close_output(container: Any) -> None:
    """Close an `_open_output` container (the trailer written) and then its file."""
    try:
        container.close()
    finally:
        handle = getattr(getattr(container, "file", None), "file", None)
        if handle is not None:
            handle.close()  # flushes: a full disk raises here


def _discard(container: Any, tmp: Path) -> None:
    """Close `container` ignoring errors and delete `tmp`: the cleanup of a failed write."""
    if container is not None:
        try:
            _close_output(container)
        except Exception:  # already failing; the original error is the one to report
            logger.debug("closing the container of %s failed during cleanup", tmp, exc_info=True)
    tmp.unlink(missing_ok=True)


def _check_metadata(metadata: dict[str, str] | None, path: Path | None = None) -> dict[str, str]:
    if metadata is None:
        return {}
    if path is not None and path.suffix.lower() == ".avi" and isinstance(metadata, dict):
        dropped = sorted(str(k) for k in metadata if k not in _AVI_TAGS)
        if dropped:
            raise ValueError(
                f"metadata keys {dropped} cannot be stored in {path.name} (AVI keeps only "
                f"{', '.join(sorted(_AVI_TAGS))}): use one of those, or an .mp4 or .mkv"
            )
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise TypeError(f"metadata must be a dict[str, str], got {metadata!r}")
    for key, value in metadata.items():
        if key in _MUXER_TAGS:  # the muxer writes its own and reading drops them
            raise ValueError(
                f"metadata key {key!r} is the container's own ({', '.join(sorted(_MUXER_TAGS))})"
                ": it would not be read back; choose another key"
            )
        if key != key.lower():  # Matroska stores tags lower-cased: it would read back so
            raise ValueError(f"metadata key {key!r} must be lower-case (e.g. {key.lower()!r})")
        if any(c.isspace() for c in key):  # Matroska stores "a b" as "a_b"
            underscored = "".join("_" if c.isspace() else c for c in key)
            raise ValueError(
                f"metadata key {key!r} must not contain spaces (Matroska would read it back "
                f"as {underscored!r})"
            )
        # FFmpeg keeps tags as C strings: everything after a NUL would be silently cut.
        if "\x00" in key or "\x00" in value:
            raise ValueError(
                f"metadata key {key!r}: keys and values must not contain a NUL character "
                "('\\x00'), which the container would cut the text at"
            )
    return dict(metadata)


def _as_frames(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """Validate and convert one write's worth of frames to a contiguous (T, H, W, 3) uint8 array."""
    if isinstance(frames, torch.Tensor):
        if frames.dtype != torch.uint8:
            raise TypeError(f"frames must be uint8, got a tensor of dtype {frames.dtype}")
        array = frames.detach().cpu().numpy()
    elif isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8:
            raise TypeError(f"frames must be uint8, got an array of dtype {frames.dtype}")
        array = frames
    else:
        raise TypeError(
            f"frames must be a torch.Tensor or numpy array, got {type(frames).__name__}"
        )
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(
            f"frames must have shape (T, H, W, 3) or (H, W, 3), got {tuple(frames.shape)}"
        )
    if array.shape[1] < 1 or array.shape[2] < 1:
        raise ValueError(f"frames must have H and W >= 1, got shape {tuple(frames.shape)}")
    return np.ascontiguousarray(array)


def _frame_rate(fps: float | Fraction) -> Fraction:
    if isinstance(fps, np.integer | np.floating):
        fps = fps.item()
    if isinstance(fps, bool) or not isinstance(fps, int | float | Fraction):
        raise TypeError(f"fps must be a number, got {fps!r}")
    if not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive finite number, got fps={fps}")
    if fps > MAX_FPS:
        raise ValueError(f"fps must be <= {MAX_FPS} (MAX_FPS), got fps={fps}")
    # Checked before the rounding below, which would lift 0.0006 to 1/1001; 1/1001 as a
    # float (a hair below it) passes.
    if Fraction(fps).limit_denominator(10**9) < Fraction(1, 1001):
        raise ValueError(f"fps must be >= 1/1001 (one frame per 1001 s), got fps={fps}")
    # A small denominator keeps the time base exact for rates like 8, 24 or 29.97.
    return Fraction(fps).limit_denominator(1001)


class VideoWriter:
    """Stream uint8 RGB frames into a video file, atomically.

    Default: H.264 (libx264, yuv420p, crf DEFAULT_CRF) that ordinary players open. lossless:
    libx264rgb at qp 0 in rgb24, which decodes back to the exact RGB input (yuv444 would not:
    the colour conversion itself rounds). Any other `codec` name is passed to PyAV as-is.
    fps: frames per second, in [1/1001, MAX_FPS].
    B-frames are off so that segments can be joined by remuxing with monotonic timestamps.

    Frames go to a hidden temporary file in the target's directory, renamed onto `path` on a
    clean close (or a `with` block that exits without an exception); otherwise the temporary
    file is deleted and `path` is left as it was.
    """

    def __init__(
        self,
        path: PathLike,
        fps: float | Fraction = 8,
        codec: str = "h264",
        lossless: bool = False,
        crf: int | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        _check_target(self.path)
        self.rate = _frame_rate(fps)
        self.metadata = _check_metadata(metadata, self.path)
        if not isinstance(lossless, bool | np.bool_):  # "no" is truthy: it chose lossless
            raise ValueError(f"lossless must be True or False, got {lossless!r}")
        self._encoder, self._options = _encoder_settings(codec, bool(lossless), crf)
        self._pix_fmt = _pick_pix_fmt(self._encoder, lossless)
        self._container: Any = None
        self._stream: Any = None
        self._tmp: Path | None = None
        self._frame_hw: tuple[int, int] | None = None
        self._frames_written = 0
        self._closed = False
        self._finalizer: weakref.finalize | None = None

    @property
    def frames_written(self) -> int:
        return self._frames_written

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, frames: torch.Tensor | np.ndarray) -> None:
        """Encode frames of shape (T, H, W, 3) or (H, W, 3), uint8 RGB."""
        if self._closed:
            raise RuntimeError(f"VideoWriter for {self.path} is closed")
        array = _as_frames(frames)
        if len(array) == 0:  # nothing to encode: no file started, no frame size fixed
            return
        height, width = array.shape[1:3]
        if self._frame_hw is None:
            self._start(height, width)
        elif (height, width) != self._frame_hw:
            first_h, first_w = self._frame_hw
            raise ValueError(
                f"frame size changed while writing {self.path}: the first write had frames of "
                f"shape ({first_h}, {first_w}, 3), this one has shape {array.shape[1:]}"
            )
        for frame in array:
            if self._frames_written:
                self._encode(frame)
                continue
            try:  # the encoder opens on its first frame: a refusal there names the codec
                self._encode(frame)
            except av.FFmpegError as err:
                self.abort()
                raise ValueError(
                    f"the {self._encoder!r} encoder refused {self.path} ({width}x{height}, "
                    f"pixel format {self._pix_fmt}): {err}"
                ) from err

    def close(self) -> None:
        """Flush the encoder and move the finished file onto `path`."""
        if self._closed:
            return
        if self._frames_written == 0:
            self.abort()
            raise ValueError(f"VideoWriter for {self.path} was closed without any frames written")
        assert self._tmp is not None
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            _close_output(self._container)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._detach()
        try:
            publish(self._tmp, self.path)
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        logger.debug("wrote %d frames to %s", self._frames_written, self.path)

    def abort(self) -> None:
        """Stop without producing a file; `path` is left untouched."""
        if self._closed:
            return
        self._closed = True
        if self._tmp is not None:
            _discard(self._container, self._tmp)
        self._detach()

    def _detach(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
        self._container = self._stream = None

    def _start(self, height: int, width: int) -> None:
        if self._pix_fmt in ("yuv420p", "yuvj420p", "nv12") and (height % 2 or width % 2):
            raise ValueError(
                f"{self._pix_fmt} needs an even frame size, got height={height} width={width} "
                f"for {self.path}; crop or pad the frames, or use lossless=True (rgb24)"
            )
        self._tmp = _temp_path(self.path)
        try:
            self._container = _open_output(self._tmp, self.path, self.metadata)
            stream = self._container.add_stream(
                self._encoder, rate=self.rate, options=self._options
            )
            stream.width, stream.height = width, height
            stream.pix_fmt = self._pix_fmt
            # pts counts frames; the muxer rescales to its own time base.
            stream.time_base = 1 / self.rate
            # The encoder and the header now, not at the first packet (x264 buffers about 40
            # frames, or all of a short video until close): a container that cannot hold the
            # codec failed there as "Invalid argument" naming the deleted temp file.
            try:
                stream.codec_context.open()
            except av.FFmpegError as err:
                raise ValueError(
                    f"the {self._encoder!r} encoder refused {self.path} ({width}x{height}, "
                    f"pixel format {self._pix_fmt}): {err}"
                ) from err
            # Options the encoder did not take are left over: a crf it has no such option
            # for (mpeg4) was dropped without a word, every crf giving the same file.
            if "crf" in (stream.codec_context.options or {}):
                raise ValueError(
                    f"crf={self._options['crf']}: the {self._encoder!r} encoder has no crf "
                    "option; drop crf (or use codec='h264')"
                )
            try:
                self._container.start_encoding()
            except av.FFmpegError as err:
                if getattr(err, "errno", None) != errno.EINVAL:
                    raise
                raise ValueError(
                    f"cannot write {self._encoder!r} video into {self.path.name} (container "
                    f"{self._container.format.name}): {getattr(err, 'strerror', err)}; use "
                    ".mp4 or .mkv, or another codec="
                ) from err
        except BaseException:
            _discard(self._container, self._tmp)
            self._closed = True
            raise
        self._stream = stream
        self._frame_hw = (height, width)
        self._reformatter = VideoReformatter()
        # Whoever drops the writer without closing it still gets the temporary file removed.
        self._finalizer = weakref.finalize(self, _discard, self._container, self._tmp)

    def _encode(self, frame: np.ndarray) -> None:
        video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
        if self._pix_fmt != "rgb24":
            # Area averaging puts each chroma sample at the mean of its 2x2 block, which is what
            # decoders that repeat chroma over the block reconstruct best (+0.5 dB RGB PSNR over
            # swscale's default filter on sharp saturated edges).
            # One converter per writer (a frame's own ``reformat`` sets up a new swscale
            # context every time, several times the cost of the conversion).
            video_frame = self._reformatter.reformat(
                video_frame, format=self._pix_fmt, interpolation="AREA"
            )
        video_frame.pts = self._frames_written
        for packet in self._stream.encode(video_frame):
            self._container.mux(packet)
        self._frames_written += 1


def _encoder_settings(codec: str, lossless: bool, crf: int | None) -> tuple[str, dict[str, str]]:
    """Map the writer's arguments to a PyAV encoder name and its options."""
    _require_av("writing video")
    if not isinstance(codec, str) or not codec:
        raise ValueError(f"codec must be a non-empty encoder name, got {codec!r}")
    is_h264 = codec in _H264_NAMES
    if crf is not None:
        crf = _check_int("crf", crf)
        if lossless:
            raise ValueError(f"crf={crf} has no meaning with lossless=True (qp is 0); drop crf")
        if is_h264 and not 0 <= crf <= 51:
            raise ValueError(f"crf for h264 must be in 0..51, got crf={crf}")
    if lossless and not is_h264:
        raise ValueError(f"lossless=True is only supported for codec='h264', got codec={codec!r}")
    # "bf" is libavcodec's generic max_b_frames; x264 ignores an unknown "bframes" key here.
    options = {"bf": "0"}
    if lossless:
        encoder = "libx264rgb"
        options["qp"] = "0"
    elif is_h264:
        encoder = "libx264" if codec == "h264" else codec
        options["crf"] = str(DEFAULT_CRF if crf is None else crf)
    else:
        encoder = codec
        if crf is not None:
            options["crf"] = str(crf)
    try:
        av.Codec(encoder, "w")
    except (ValueError, av.FFmpegError) as err:
        raise ValueError(f"codec={codec!r}: PyAV has no encoder named {encoder!r}") from err
    return encoder, options


def _pick_pix_fmt(encoder: str, lossless: bool) -> str:
    if lossless or encoder == "libx264rgb":
        return "rgb24"
    formats = [fmt.name for fmt in (av.Codec(encoder, "w").video_formats or [])]
    if formats and formats[0].startswith("yuvj"):  # MJPEG: full range, refuses plain yuv420p
        return formats[0]
    if not formats or "yuv420p" in formats:
        return "yuv420p"
    return formats[0]


# --------------------------------------------------------------------------------------------
# Joining segments
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _StreamSignature:
    """What must match between segments for their packets to form one decodable stream."""

    codec: str
    width: int
    height: int
    rate: Fraction | None
    pix_fmt: str | None
    extradata: bytes | None

    def describe(self) -> str:
        return f"{self.codec} {self.width}x{self.height} {self.pix_fmt} at {self.rate} fps"


def _signature(path: Path) -> _StreamSignature:
    with _open_input(path) as container:
        stream = _video_stream(container, path)
        ctx = _codec_context(stream, path)
        return _StreamSignature(
            codec=ctx.name,
            width=ctx.width,
            height=ctx.height,
            rate=stream.average_rate,
            pix_fmt=ctx.format.name if ctx.format is not None else None,
            extradata=bytes(ctx.extradata) if ctx.extradata else None,
        )


def _check_segments(paths: list[Path]) -> None:
    first = _signature(paths[0])
    for path in paths[1:]:
        other = _signature(path)
        if other == first:
            continue
        if other.extradata != first.extradata and other.describe() == first.describe():
            raise ValueError(
                f"concat_videos: {path} was encoded with different settings (its SPS/PPS "
                f"differ from {paths[0]}); write all segments with the same VideoWriter options"
            )
        raise ValueError(
            f"concat_videos: {path} is {other.describe()} but {paths[0]} is "
            f"{first.describe()}; all segments must have the same codec, size and fps"
        )


def concat_videos(
    paths: Sequence[PathLike], out: PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Join video segments into one file by remuxing their packets (no re-encoding).

    All segments must share codec, frame size, frame rate and encoder settings (segments from
    VideoWriter with the same arguments do). Timestamps of each segment are shifted to follow
    the previous one; raw H.264 segments, which have none, are timed one frame after another.
    metadata defaults to that of the first segment (an .avi `out` refuses tags AVI cannot
    keep rather than drop them). Atomic like VideoWriter: a segment whose
    frames cannot all be copied raises ValueError naming it, and `out` is left as it was.
    """
    if isinstance(paths, str | os.PathLike):
        raise TypeError(f"paths must be a sequence of paths, got a single path {paths!r}")
    segments = [Path(p) for p in paths]
    if not segments:
        raise ValueError("concat_videos needs at least one segment, got paths=[]")
    out = Path(out)
    _check_target(out)
    # Probing first names a bad file before anything is written.
    infos = [probe_video(segment) for segment in segments]
    for segment, info in zip(segments, infos, strict=True):
        if info.undecodable_packets:
            # Its first keyframe may be no clean start (an open GOP's), so the joined file
            # could hold frames that do not decode: refuse rather than publish it.
            raise ValueError(
                f"concat_videos: {segment} starts mid-GOP ({info.undecodable_packets} packets "
                "before its first keyframe); re-encode it to join it without re-encoding the rest"
            )
        if info.hidden_packets:
            # Its edit list is not carried over: the frames after the hidden packets (their
            # keyframe, maybe) would not decode in the joined file, which looked complete.
            raise ValueError(
                f"concat_videos: {segment} has {info.hidden_packets} packets its edit list "
                "hides (cut without re-encoding); re-encode it to join it without re-encoding "
                "the rest"
            )
    _check_segments(segments)
    if metadata is None:
        tags = read_metadata(segments[0])
        if out.suffix.lower() == ".avi":
            lost = sorted(key for key in tags if key not in _AVI_TAGS)
            if lost:
                raise ValueError(
                    f"concat_videos: the tags {lost} of {segments[0]} cannot be stored in "
                    f"{out.name} (AVI keeps only {', '.join(sorted(_AVI_TAGS))}); pass "
                    "metadata= with the ones to keep, or join into an .mp4 or .mkv"
                )
    else:
        tags = _check_metadata(metadata, out)
    tmp = _temp_path(out)
    container = None
    try:
        container = _open_output(tmp, out, tags)
        remuxer = _Remuxer(container)
        for segment, info in zip(segments, infos, strict=True):
            muxed = remuxer.add(segment)
            expected = info.num_frames
            if muxed != expected:
                # Never publish a short file over `out`: the old one is worth more.
                raise ValueError(
                    f"concat_videos: copied {muxed} of the {expected} frames of {segment}; "
                    f"{out} was not written"
                )
        _close_output(container)
    except BaseException:
        _discard(container, tmp)
        raise
    try:
        publish(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


class _Remuxer:
    """Copies segments' packets into one output stream with timestamps shifted to follow on."""

    def __init__(self, output: Any) -> None:
        self.output = output
        self.out_stream: Any = None
        self.time_base: Fraction | None = None
        self.offset = 0  # where the next segment starts, in time_base units
        self.last_dts: int | None = None
        self.frame_ticks = 0

    def add(self, path: Path) -> int:
        """Append the frames of `path`; returns how many packets were copied."""
        with _open_input(path) as container:
            in_stream = _video_stream(container, path)
            if self.out_stream is None:
                self.out_stream = self.output.add_stream_from_template(in_stream)
                self.time_base = in_stream.time_base
                rate = in_stream.average_rate
                # For packets without a duration: one frame at the stream's rate.
                self.frame_ticks = round(1 / (rate * self.time_base)) if rate else 0
            shift: int | None = None
            end = self.offset
            count = 0
            packets = container.demux(in_stream)
            if self._needs_annexb(in_stream):
                packets = _annexb(packets, in_stream, self.out_stream)
            for packet, pts, dts, duration in self._timed(packets, in_stream.time_base):
                if shift is None:
                    # Align the segment's first timestamp with the end of the previous one.
                    shift = self.offset - min(pts, dts)
                pts, dts = pts + shift, dts + shift
                if self.last_dts is not None and dts <= self.last_dts:
                    raise ValueError(
                        f"concat_videos: {path} has non-increasing decode timestamps "
                        f"({dts} after {self.last_dts}); was it written with B-frames?"
                    )
                packet.pts, packet.dts, packet.duration = pts, dts, duration
                packet.time_base = self.time_base
                packet.stream = self.out_stream
                self.output.mux(packet)
                self.last_dts = dts
                end = max(end, pts + duration)
                count += 1
        # The next segment starts after the last shown frame and after the last decoded one.
        last_dts = self.last_dts if self.last_dts is not None else -1
        self.offset = max(end, last_dts + 1)
        return count

    def _needs_annexb(self, in_stream: Any) -> bool:
        """H.264 from mp4/mkv carries length-prefixed NAL units (avcC extradata): the AVI
        muxer copies them as they are, where readers expect start codes (Annex B), and the
        file does not decode. The other muxers convert by themselves."""
        extradata = in_stream.codec_context.extradata or b""
        return (
            "avi" in self.output.format.name
            and in_stream.codec_context.name in _H264_NAMES
            and extradata[:1] == b"\x01"
        )

    def _timed(
        self, packets: Iterable[Any], source: Fraction
    ) -> Iterator[tuple[Any, int, int, int]]:
        """The frame packets with (pts, dts, duration) in the output time base, gaps filled.

        A raw H.264 stream has no timestamps: its frames follow one another in decode order
        (VideoWriter writes no B-frames). Matroska gives the first frames that B-frames delay
        a pts but no dts; their dts count back one frame each from the first known dts, the
        way ffmpeg fills them, so decode order stays increasing.
        """
        assert self.time_base is not None
        pending: list[tuple[Any, int, int]] = []  # (packet, pts, duration) awaiting a dts
        clock = 0  # decode time after the previous packet, for packets with no timestamp
        for packet in packets:
            if not _is_frame_packet(packet):
                continue
            duration = (
                _rescale(packet.duration, source, self.time_base)
                if packet.duration
                else self.frame_ticks
            )
            if packet.pts is None and packet.dts is None:
                yield packet, clock, clock, duration
                clock += duration
                continue
            pts = _rescale(
                packet.pts if packet.pts is not None else packet.dts, source, self.time_base
            )
            if packet.dts is None:
                pending.append((packet, pts, duration))
                continue
            dts = _rescale(packet.dts, source, self.time_base)
            back = dts - sum(d for _, _, d in pending)
            for early, early_pts, early_duration in pending:
                yield early, early_pts, back, early_duration
                back += early_duration
            pending.clear()
            yield packet, pts, dts, duration
            clock = dts + duration
        # No dts anywhere (a stream of pts only): decode order is presentation order.
        for packet, pts, duration in pending:
            yield packet, pts, pts, duration


def _annexb(packets: Iterable[Any], in_stream: Any, out_stream: Any) -> Iterator[Any]:
    """`packets` rewritten from length-prefixed H.264 to Annex B (start codes), the SPS/PPS
    put in band; `out_stream` takes the filter's parameters."""
    bsf = BitStreamFilterContext("h264_mp4toannexb", in_stream, out_stream)
    for packet in packets:
        if packet.size:  # demux ends with an empty packet; the filter is flushed below
            yield from bsf.filter(packet)
    yield from bsf.filter(None)


def _rescale(value: int, source: Fraction, target: Fraction) -> int:
    if source == target:
        return value
    return round(value * source / target)
