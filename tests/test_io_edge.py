"""vidgen.io on damaged and unusual streams: a cut Matroska file, a stream cut mid-GOP, a
stream that changes frame size."""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from vidgen.io import (
    VideoReadError,
    VideoWriter,
    concat_videos,
    iter_video,
    probe_video,
    read_metadata,
    read_video,
)

# Frame i of `gop_stream` is a fixed noise texture brightened by i * LEVEL_STEP.
LEVEL_STEP = 6


def write(path: Path, frames: np.ndarray, **kwargs) -> Path:
    with VideoWriter(path, **kwargs) as writer:
        writer.write(frames)
    return path


def noise(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)


def gop_stream(path: Path, num_frames: int = 30, gop: int = 6, b_frames: int = 2) -> Path:
    """H.264 with a keyframe every `gop` frames (scene cuts off, so no extra ones)."""
    texture = np.random.default_rng(0).integers(0, 60, (32, 32, 3), dtype=np.uint8)
    options = {"g": str(gop), "bf": str(b_frames), "sc_threshold": "0", "crf": "10"}
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8, options=options)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(texture + np.uint8(i * LEVEL_STEP), "rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def frame_numbers(video) -> list[int]:
    """Which frame of `gop_stream` each decoded frame is, from its brightness."""
    means = np.asarray(video, dtype=np.float64).mean(axis=(1, 2, 3))
    return [round((mean - 29.5) / LEVEL_STEP) for mean in means]


def drop_first_packets(source: Path, out: Path, count: int) -> Path:
    """Remux `source` without its first `count` packets, as `ffmpeg -c copy` does when
    cutting at a frame that is not a keyframe."""
    with av.open(str(source)) as inp, av.open(str(out), "w") as output:
        stream_in = inp.streams.video[0]
        stream_out = output.add_stream_from_template(stream_in)
        packets = [packet for packet in inp.demux(stream_in) if packet.size]
        for packet in packets[count:]:
            packet.stream = stream_out
            output.mux(packet)
    return out


# --- a Matroska file cut short ------------------------------------------------------------


def test_a_truncated_mkv_is_refused_with_expected_and_found(tmp_path):
    """A cut mkv keeps the duration its header was given on closing, but the demuxer just
    stops early: it was read with fewer frames, without a word."""
    full = write(tmp_path / "full.mkv", noise(48, 32, 32), lossless=True)
    assert probe_video(full).num_frames == 48
    data = full.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    expected = r"cut\.mkv is truncated: .* 6\.000 s \(about 48 frames at 8 fps\) but its packets"
    for call in (probe_video, read_video):
        with pytest.raises(VideoReadError, match=expected):
            call(cut)
    # Cut where its last frame's block starts: one frame short. The slack of one frame (for
    # a last packet of unknown duration) let it pass, though every duration was known.
    with av.open(str(full)) as container:
        last = [p for p in container.demux(video=0) if p.size][-1]
        assert last.duration
    cut.write_bytes(data[: last.pos])
    with pytest.raises(VideoReadError, match=r"packets end at 5\.875 s \(47 frames\)"):
        probe_video(cut)


def _vfr_mkv(path: Path) -> Path:
    durations_ms = [40, 40, 200, 17, 1000]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"bf": "2"})
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.time_base = Fraction(1, 1000)
        pts = 0
        for i, frame in enumerate(noise(10, 32, 32)):
            video_frame = av.VideoFrame.from_ndarray(frame, "rgb24")
            video_frame.pts, video_frame.time_base = pts, Fraction(1, 1000)
            pts += durations_ms[i % len(durations_ms)]
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode(None))
    return path


def _mkv_with_longer_audio(path: Path) -> Path:
    """8 video frames (1 s) and 3 s of audio: the segment's duration is the audio's."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=8)
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        audio = container.add_stream("aac", rate=16000)
        audio.layout = "mono"
        for frame in noise(8, 32, 32):
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, "rgb24")))
        container.mux(video.encode(None))
        for i in range(48):
            samples = np.zeros((1, 1024), np.float32)
            audio_frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            audio_frame.sample_rate, audio_frame.pts = 16000, i * 1024
            container.mux(audio.encode(audio_frame))
        container.mux(audio.encode(None))
    return path


@pytest.mark.parametrize(
    ("make", "num_frames"),
    [
        (_vfr_mkv, 10),
        (_mkv_with_longer_audio, 8),
        (lambda path: gop_stream(path, num_frames=12), 12),  # B-frames
        (lambda path: write(path, noise(3, 8, 8), fps=Fraction(1, 1001), lossless=True), 3),
    ],
    ids=["variable_rate", "longer_audio", "b_frames", "one_frame_per_1001_s"],
)
def test_complete_mkv_files_are_not_taken_for_truncated(tmp_path, make, num_frames):
    path = make(tmp_path / "ok.mkv")
    assert probe_video(path).num_frames == num_frames
    assert len(read_video(path)) == num_frames


# --- a stream cut mid-GOP -----------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_a_stream_cut_mid_gop_counts_and_reads_from_its_first_keyframe(tmp_path, suffix):
    """Packets before the first keyframe cannot be decoded: they were counted as frames, so
    PyAV refused to read the last frames and decord repeated the last one instead."""
    source = gop_stream(tmp_path / f"source{suffix}")
    # Cut after frame 2: frames 2..5 have no keyframe to decode from; 6 is the next one.
    cut = drop_first_packets(source, tmp_path / f"cut{suffix}", 2)
    info = probe_video(cut)
    assert info.num_frames == 24
    assert info.undecodable_packets == 4
    for backend in ("auto", "pyav"):
        assert frame_numbers(read_video(cut, backend=backend)) == list(range(6, 30))
        assert frame_numbers(read_video(cut, start=21, backend=backend)) == [27, 28, 29]
        middle = read_video(cut, start=10, num_frames=3, backend=backend)
        assert frame_numbers(middle) == [16, 17, 18]
    with pytest.raises(VideoReadError, match=r"first 4 video packets come before the first key"):
        read_video(cut, backend="decord")
    # Joining it without re-encoding is refused: its first keyframe may not be a clean start.
    with pytest.raises(ValueError, match=r"starts mid-GOP \(4 packets before its first key"):
        concat_videos([source, cut], tmp_path / f"joined{suffix}")
    assert not (tmp_path / f"joined{suffix}").exists()


def test_a_segment_whose_edit_list_hides_packets_is_not_joined(tmp_path):
    """A cut made without re-encoding (ffmpeg -ss ... -c copy) keeps packets its edit list
    hides: they were dropped on the join, the edit list not carried over, and the joined file
    was published with 13 of its 18 frames decodable, out of order, without an error."""
    frames = np.random.default_rng(4).integers(0, 255, (12, 32, 32, 3), dtype=np.uint8)
    source, cut, joined = tmp_path / "source.mp4", tmp_path / "cut.mp4", tmp_path / "joined.mp4"
    with VideoWriter(source, lossless=True) as writer:
        writer.write(frames)
    with av.open(str(source)) as inp, av.open(str(cut), "w") as out:
        stream = inp.streams.video[0]
        copy = out.add_stream_from_template(stream)
        shift = 3 * int(1 / (stream.time_base * stream.average_rate))  # 3 frames before 0
        for packet in inp.demux(stream):
            if packet.dts is None:
                continue
            packet.pts -= shift
            packet.dts -= shift
            packet.stream = copy
            out.mux(packet)
    info = probe_video(cut)
    assert info.num_frames == 9 and info.hidden_packets == 3
    assert torch.equal(read_video(cut, backend="pyav"), torch.from_numpy(frames[3:]))
    with pytest.raises(ValueError, match="has 3 packets its edit list hides"):
        concat_videos([cut, cut], joined)
    assert not joined.exists()
    assert probe_video(source).hidden_packets == 0


@pytest.mark.parametrize(("height", "pitfall"), [(17, True), (18, False)])
def test_an_odd_height_420_video_is_read_with_pyav(tmp_path, height, pitfall):
    """decord places the chroma rows of an odd-height 4:2:0 video off (FFV1 and VP9 store
    such sizes): read_video took its frames, which differed from PyAV's and the source's."""
    h, w = height, 33
    yy, xx = np.mgrid[0:h, 0:w]
    source = np.stack([xx * 7 % 256, yy * 13 % 256, (xx * 3 + yy * 5) % 256], -1)
    source = source.astype(np.uint8)[None].repeat(3, 0)
    path = tmp_path / "odd.mkv"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=8)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i, frame in enumerate(source):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")
            picture.pts = i
            for packet in stream.encode(picture):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    assert probe_video(path).pixel_format == "yuv420p"
    pyav = read_video(path, backend="pyav")
    assert torch.equal(read_video(path), pyav)
    assert (pyav.int() - torch.from_numpy(source).int()).abs().float().mean() < 4  # 4:2:0
    if pitfall:
        with pytest.raises(VideoReadError, match="frame height 17 is odd with yuv420p"):
            read_video(path, backend="decord")
    else:
        assert torch.equal(read_video(path, backend="decord"), pyav)


# --- a stream that changes frame size -----------------------------------------------------


def test_an_mkv_that_changes_frame_size_is_not_stretched_by_decord(tmp_path, caplog):
    """decord scaled every frame to one size (here the second part's 64x48, stretching the
    first part's 32x32 frames) and read_video returned them without a word."""
    parts = [
        write(tmp_path / "a.h264", noise(3, 32, 32), lossless=True),
        write(tmp_path / "b.h264", noise(2, 48, 64, seed=1), lossless=True),
    ]
    raw = tmp_path / "joined.h264"
    raw.write_bytes(b"".join(part.read_bytes() for part in parts))
    path = tmp_path / "joined.mkv"
    with av.open(str(raw)) as inp, av.open(str(path), "w") as out:
        stream_in = inp.streams.video[0]
        stream_out = out.add_stream_from_template(stream_in)
        packets = [packet for packet in inp.demux(stream_in) if packet.size]
        for i, packet in enumerate(packets):
            packet.pts = packet.dts = i
            packet.duration, packet.time_base = 1, Fraction(1, 8)
            packet.stream = stream_out
            out.mux(packet)
    sizes = r"frame 0 is 32x32 but frame 3 is 64x48 \(width x height\)"
    for backend in ("auto", "pyav"):
        with pytest.raises(
            VideoReadError, match=rf"joined\.mkv changes frame size at frame 3: {sizes}"
        ):
            read_video(path, backend=backend)
        # The part before the change reads, unscaled (lossless: exactly as written).
        first = read_video(path, num_frames=3, backend=backend).numpy()
        assert np.array_equal(first, noise(3, 32, 32))
    # Streamed: the chunks before the change come out, then the same error.
    chunks = iter_video(path, chunk=2)
    assert np.array_equal(next(chunks).numpy(), noise(3, 32, 32)[:2])
    with pytest.raises(VideoReadError, match=r"joined\.mkv changes frame size at frame 3"):
        list(chunks)
    # A range wholly after the change is refused too (it was read at the new size, unlike
    # the video's probed one).
    for start in (3, 4):
        with pytest.raises(VideoReadError, match=r"changes frame size at frame 3"):
            read_video(path, start=start, backend="pyav")
        with pytest.raises(VideoReadError, match=r"changes frame size at frame 3"):
            list(iter_video(path, start=start))
    info = probe_video(path)
    assert (info.num_frames, info.width, info.height, info.size_changes) == (5, 32, 32, True)
    decord_error = re.escape(f"decord cannot read {path} correctly: it changes frame size")
    with pytest.raises(VideoReadError, match=decord_error):
        read_video(path, backend="decord")
    # A training folder leaves such a file out when it is built, with a warning, instead of
    # listing clips across the change that failed at some later training step.
    from vidgen.data import VideoFolder

    write(tmp_path / "fine.mp4", noise(4, 32, 32), lossless=True)
    with caplog.at_level("WARNING", logger="vidgen.data.folder"):
        folder = VideoFolder(tmp_path, clip_len=2, size=32, stride=1)
    assert [p.name for p in folder.files] == ["fine.mp4", "joined.mkv"]
    assert {i for i, _ in folder.clips} == {0} and len(folder) == 3
    assert "joined.mkv changes frame size midway; skipped" in caplog.text
    (tmp_path / "fine.mp4").unlink()  # nothing left of one frame size
    with pytest.raises(ValueError, match="has clip_len=2 frames of one frame size"):
        VideoFolder(tmp_path, clip_len=2, size=32)


def open_gop_stream(path: Path, gop: int = 16) -> Path:
    """32 frames of H.264 in open GOPs of ``gop`` (B-frames after each keyframe shown before
    it, referencing the GOP before), frame i brightened as `gop_stream`'s."""
    texture = np.random.default_rng(0).integers(0, 60, (32, 32, 3), dtype=np.uint8)
    x264 = f"open-gop=1:keyint={gop}:min-keyint={gop}:scenecut=0:bframes=3:b-adapt=0"
    options = {"g": str(gop), "bf": "3", "crf": "10", "x264-params": x264}
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8, options=options)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(32):  # brightness stays below 256
            frame = av.VideoFrame.from_ndarray(texture + np.uint8(i * LEVEL_STEP), "rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def test_an_open_gop_stream_cut_mid_gop_leaves_out_its_leading_frames(tmp_path):
    """An open GOP's keyframe is followed (in the stream) by B-frames shown before it, which
    reference the GOP that was cut away: they cannot be decoded, so they are no frames."""
    source = open_gop_stream(tmp_path / "open.mkv")
    cut = drop_first_packets(source, tmp_path / "cut.mkv", 5)
    info = probe_video(cut)
    video = read_video(cut, backend="pyav")
    assert len(video) == info.num_frames  # before: more counted than decode (an error)
    assert torch.equal(torch.cat(list(iter_video(cut, chunk=5))), video)
    numbers = frame_numbers(video)
    assert numbers == list(range(numbers[0], 32)) and numbers[0] >= 16
    assert info.undecodable_packets == 32 - 5 - info.num_frames


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_open_gops_are_read_with_pyav_where_decords_seeks_land_frames_off(tmp_path, suffix):
    """libx265's default (and x264's open-gop=1): decord read such a file from a later start
    frames off (start 13 gave frames 16-20), with no error; a read to the end repeated the
    last frame to make up the count."""
    info = probe_video(open_gop_stream(tmp_path / f"open{suffix}", gop=8))
    assert info.open_gop and info.num_frames == 32
    for start, count in [(0, 32), (5, 6), (13, 5), (19, 13), (27, 5)]:
        video = read_video(info.path, start, count)
        assert frame_numbers(video) == list(range(start, start + count)), start
    with pytest.raises(VideoReadError, match="its GOPs are open"):
        read_video(info.path, 13, 5, backend="decord")
    closed = probe_video(gop_stream(tmp_path / f"closed{suffix}", gop=8, b_frames=3))
    assert not closed.open_gop  # B-frames alone are no open GOP: decord reads those
    assert frame_numbers(read_video(closed.path, 13, 5, backend="decord")) == list(range(13, 18))


@pytest.mark.parametrize("suffix", [".mkv", ".mp4", ".h264"])
def test_the_probe_decodes_only_keyframes_that_bring_new_parameters(tmp_path, suffix, monkeypatch):
    """H.264 gives its frame size in the sequence parameter set: a keyframe without a new one
    keeps the size, so decoding every keyframe (5-34x slower probes) is not needed."""
    from vidgen.io import video

    decisions: list[bool] = []
    real = video._SizeWatch.needs_decode

    def spy(self, packet):
        decisions.append(real(self, packet))
        return decisions[-1]

    monkeypatch.setattr(video._SizeWatch, "needs_decode", spy)
    if suffix == ".h264":  # Annex B, parameter sets repeated in-band at every keyframe
        path = write(tmp_path / "s.h264", np.repeat(noise(5, 32, 32), 6, axis=0), lossless=True)
    else:
        path = gop_stream(tmp_path / f"s{suffix}")
    info = probe_video(path)
    assert info.num_frames == 30 and not info.size_changes
    assert len(decisions) >= 3 and decisions.count(True) == 1


# --- streamed reading ---------------------------------------------------------------------


def test_iter_video_streams_what_read_video_reads_in_chunks(tmp_path):
    frames = noise(11, 16, 24)
    path = write(tmp_path / "v.mp4", frames, lossless=True)
    chunks = list(iter_video(path, chunk=4))
    assert [len(c) for c in chunks] == [4, 4, 3]
    assert all(c.dtype == torch.uint8 and c.shape[1:] == (16, 24, 3) for c in chunks)
    assert np.array_equal(torch.cat(chunks).numpy(), frames)
    part = list(iter_video(path, chunk=100, start=3, num_frames=5, info=probe_video(path)))
    assert len(part) == 1 and np.array_equal(part[0].numpy(), frames[3:8])
    assert [len(c) for c in iter_video(path, chunk=1, start=9)] == [1, 1]
    for bad, error, message in [
        (0, ValueError, "chunk must be >= 1"),
        (2.0, TypeError, "chunk must be an int"),
    ]:
        with pytest.raises(error, match=message):
            next(iter_video(path, chunk=bad))
    with pytest.raises(ValueError, match="start"):
        next(iter_video(path, start=11))
    with pytest.raises(ValueError, match="info describes"):
        next(iter_video(path, info=probe_video(write(tmp_path / "w.mp4", frames[:2]))))


def _png_mov_damaged_at(path: Path, frames: np.ndarray, bad: int) -> Path:
    """An intra-only (PNG) stream whose packet ``bad`` is garbage."""
    source = path.with_name("source.mov")
    with av.open(str(source), "w") as container:
        stream = container.add_stream("png", rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "rgb24"
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, "rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with av.open(str(source)) as inp, av.open(str(path), "w") as out:
        stream_in = inp.streams.video[0]
        stream_out = out.add_stream_from_template(stream_in)
        for i, packet in enumerate(p for p in inp.demux(stream_in) if p.size):
            if i == bad:
                garbage = av.Packet(b"garbage" * 20)
                garbage.pts, garbage.dts = packet.pts, packet.dts
                garbage.duration, garbage.time_base = packet.duration, packet.time_base
                packet = garbage
            packet.stream = stream_out
            out.mux(packet)
    return path


def test_reading_stops_at_the_range_before_a_damaged_frame_after_it(tmp_path):
    """PyAV decoded one frame past the range asked for, so a damaged packet there failed a
    read of frames that are all fine."""
    frames = noise(10, 16, 16)
    path = _png_mov_damaged_at(tmp_path / "bad.mov", frames, bad=5)
    assert np.array_equal(read_video(path, num_frames=5, backend="pyav").numpy(), frames[:5])
    chunks = list(iter_video(path, chunk=5, num_frames=5))
    assert len(chunks) == 1 and np.array_equal(chunks[0].numpy(), frames[:5])
    with pytest.raises(VideoReadError, match="damaged: decoding failed at frame 5"):
        read_video(path, num_frames=6, backend="pyav")


def test_iter_video_checks_its_arguments_when_called(tmp_path):
    path = write(tmp_path / "v.mp4", noise(3, 16, 16))
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        iter_video(path, chunk=0)  # no next(): the call itself refuses
    with pytest.raises(ValueError, match="start"):
        iter_video(path, start=3)
    with pytest.raises(VideoReadError):
        iter_video(tmp_path / "missing.mp4")


# --- a video stored turned (a phone's portrait video) ---------------------------------------


def _turned(path: Path, matrix: tuple[int, int, int, int]) -> Path:
    """``path`` with the display matrix of its mp4 track header set to (a, b, c, d) (16.16
    fixed point, as phones write it)."""
    import struct

    data = bytearray(path.read_bytes())
    at = data.find(b"tkhd")
    version = data[at + 4]
    offset = at + 8 + (32 if version == 1 else 20) + 16  # to the matrix
    a, b, c, d = (v * 0x10000 & 0xFFFFFFFF for v in matrix)
    data[offset : offset + 36] = struct.pack(">9I", a, b, 0, c, d, 0, 0, 0, 0x40000000)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("matrix", "rotation", "turns"),
    [((0, 1, -1, 0), 270, -1), ((-1, 0, 0, -1), 180, 2), ((0, -1, 1, 0), 90, 1)],
)
def test_a_video_stored_turned_is_read_as_displayed(tmp_path, matrix, rotation, turns):
    """A phone stores a portrait video landscape with a display rotation; it was read
    sideways (probe and frames in the stored orientation), and decord failed on it."""
    from vidgen.data import VideoFolder, to_uint8

    stored = noise(4, 16, 32)  # 32 wide, 16 high, as stored
    path = _turned(write(tmp_path / "phone.mp4", stored, lossless=True), matrix)
    with av.open(str(path)) as container:  # what the display matrix says, PyAV's reading
        assert next(container.decode(video=0)).rotation % 360 == rotation
    info = probe_video(path)
    shown = np.rot90(stored, turns, axes=(1, 2))  # counterclockwise, as np.rot90 turns
    assert info.rotation == rotation and (info.height, info.width) == shown.shape[1:3]
    for backend in ("auto", "pyav"):
        assert np.array_equal(read_video(path, backend=backend).numpy(), shown)
    assert np.array_equal(torch.cat(list(iter_video(path, chunk=3))).numpy(), shown)
    with pytest.raises(VideoReadError, match=f"displayed turned {rotation} degrees"):
        read_video(path, backend="decord")
    # A training folder's clip is the displayed frames' centre 16x16 (the shorter side is 16).
    clip = to_uint8(VideoFolder(tmp_path, clip_len=4, size=16)[0]["video"]).numpy()
    h, w = shown.shape[1:3]
    top, left = (h - 16) // 2, (w - 16) // 2
    assert np.array_equal(clip, shown[:, top : top + 16, left : left + 16])


def test_a_mirroring_display_matrix_is_not_taken_for_a_turn(tmp_path, caplog):
    """PyAV gives a horizontal mirror's angle as -180: the frames were turned upside down.
    A matrix with a reflection is not applied (the frames are read as stored), and said."""
    stored = noise(2, 16, 32)
    path = _turned(write(tmp_path / "mirror.mp4", stored, lossless=True), (-1, 0, 0, 1))
    with caplog.at_level("WARNING", logger="vidgen.io.video"):
        info = probe_video(path)
    assert info.rotation == 0 and (info.width, info.height) == (32, 16)
    assert "mirrors the frames; they are read as stored" in caplog.text
    assert np.array_equal(read_video(path, backend="pyav").numpy(), stored)


# --- an anamorphic video (its pixels displayed wider than high) -------------------------------


def _anamorphic(path: Path, frames: np.ndarray, sar) -> Path:
    """``frames`` stored losslessly (libx264rgb, qp 0) with sample aspect ratio ``sar``."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264rgb", rate=8, options={"qp": "0"})
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "rgb24"
        stream.codec_context.sample_aspect_ratio = sar
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_an_anamorphic_video_is_resized_as_displayed(tmp_path):
    """A stream whose pixels are shown twice as wide as high (sample aspect ratio 2:1) was
    resized as if they were square: training folders and render contexts saw the picture
    squeezed to half its width. Reads at a size now show it as displayed; native reads keep
    the stored pixels."""
    from fractions import Fraction

    from vidgen.data import VideoFolder, to_uint8

    stored = np.zeros((4, 32, 32, 3), dtype=np.uint8)  # red | green | blue columns, stored
    stored[:, :, :8, 0] = stored[:, :, 8:24, 1] = stored[:, :, 24:, 2] = 200
    path = _anamorphic(tmp_path / "wide.mp4", stored, Fraction(2, 1))
    info = probe_video(path)
    assert info.pixel_aspect == 2.0 and (info.width, info.height) == (32, 32)
    assert np.array_equal(read_video(path).numpy(), stored)  # native: the stored pixels
    # Displayed 64 x 32: covering 32 x 32 keeps its middle half, the green (its edge columns
    # blend with the neighbours the interpolation reads).
    square = read_video(path, size=32).numpy()
    assert (np.abs(square[:, :, 1:-1].astype(int) - [0, 200, 0]) <= 2).all()
    clip = to_uint8(VideoFolder(tmp_path, clip_len=4, size=32)[0]["video"]).numpy()
    assert np.array_equal(clip, square)
    # Displayed 64 x 32 at half size is 32 wide, 16 high: every column kept, rows halved.
    half = read_video(path, size=(16, 32)).numpy()
    assert half.shape == (4, 16, 32, 3)
    np.testing.assert_allclose(half[:, :, 2:6, 0], 200, atol=3)
    np.testing.assert_allclose(half[:, :, 12:20, 1], 200, atol=3)
    # Turned a quarter (a phone's portrait video): a stored pixel's width is now its height.
    turned = _turned(_anamorphic(tmp_path / "t.mp4", stored, Fraction(2, 1)), (0, 1, -1, 0))
    assert probe_video(turned).pixel_aspect == 0.5
    upright = read_video(turned, size=32).numpy()  # displayed 32 wide, 64 high: the middle
    assert (np.abs(upright[:, 1:-1].astype(int) - [0, 200, 0]) <= 2).all()  # the green rows
    # Unset (0:1) or absurd ratios are square pixels.
    plain = _anamorphic(tmp_path / "plain.mp4", stored, Fraction(0, 1))
    assert probe_video(plain).pixel_aspect == 1.0
    assert np.array_equal(read_video(plain, size=32).numpy(), stored)


# --- names, tags and cuts FFmpeg reads its own way ---------------------------------------------


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_a_tag_that_is_not_utf8_leaves_the_video_readable(tmp_path, suffix):
    """An old muxer's Latin-1 title made every read a bare UnicodeDecodeError (PyAV reads
    tags strictly): the video itself was fine."""
    path = tmp_path / f"latin1{suffix}"
    frames = np.full((2, 16, 16, 3), 77, np.uint8)
    with VideoWriter(path, lossless=True, metadata={"title": "caf\u00e9"}) as writer:
        writer.write(frames)
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"caf\xc3\xa9", b"caf\xe9!"))  # same length, Latin-1
    assert probe_video(path).num_frames == 2
    assert np.array_equal(read_video(path).numpy(), frames)
    assert read_metadata(path)["title"].startswith("caf")


def test_an_mp4_cut_inside_its_index_is_a_video_read_error(tmp_path):
    """Cut inside its moov, the stream has no codec parameters: an AttributeError escaped
    where a VideoReadError naming the file is promised."""
    src = tmp_path / "src.mp4"
    with VideoWriter(src) as writer:
        writer.write(np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8))
    data = src.read_bytes()
    cut = tmp_path / "cut.mp4"
    for end in range(len(data) - 1, len(data) - 600, -1):
        cut.write_bytes(data[:end])
        try:
            probe_video(cut)
        except VideoReadError as err:
            assert "cut.mp4" in str(err)


def test_a_relative_name_with_a_colon_is_a_file_not_a_protocol(tmp_path, monkeypatch):
    """FFmpeg took `run-12:30.mp4` for the protocol `run-12`: reads said "not a video?" and
    the writer raised ProtocolNotFoundError. A probe's info names the file however it is
    written (relative or absolute)."""
    monkeypatch.chdir(tmp_path)
    frames = np.full((2, 16, 16, 3), 40, np.uint8)
    with VideoWriter("run-12:30.mp4", lossless=True) as writer:
        writer.write(frames)
    assert np.array_equal(read_video("run-12:30.mp4").numpy(), frames)
    info = probe_video(tmp_path / "run-12:30.mp4")
    assert read_video("run-12:30.mp4", info=info).shape[0] == 2


def test_a_frame_rate_below_the_least_is_refused_not_rounded_up(tmp_path):
    with pytest.raises(ValueError, match="fps must be >= 1/1001"):
        VideoWriter(tmp_path / "slow.mp4", fps=0.0006)  # was written at 1/1001
    with VideoWriter(tmp_path / "least.mp4", fps=1 / 1001, lossless=True) as writer:
        writer.write(np.zeros((1, 16, 16, 3), np.uint8))
    assert probe_video(tmp_path / "least.mp4").num_frames == 1


def _two_stream_mp4(path: Path) -> Path:
    """Stream 0: a flat red 32x32 video; stream 1: a blue 48x64 one, its top half noise (a
    higher bit rate, which FFmpeg's "best stream" pick, decord's, prefers)."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        streams = []
        for (height, width), colour in (((32, 32), (200, 30, 30)), ((48, 64), (30, 30, 200))):
            stream = out.add_stream("libx264", rate=8, options={"bf": "0"})
            stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
            streams.append((stream, height, width, colour))
        for _ in range(12):
            for k, (stream, height, width, colour) in enumerate(streams):
                frame = np.zeros((height, width, 3), np.uint8)
                frame[:] = colour
                if k:
                    frame[: height // 2] = rng.integers(0, 256, (height // 2, width, 3))
                out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        for stream, *_ in streams:
            out.mux(stream.encode(None))
    return path


def test_a_file_with_two_video_streams_is_read_from_the_probed_one(tmp_path):
    """decord decoded the stream FFmpeg found "best" (here the second, at another size)
    while the probe described the first: read_video (auto) and training folders returned
    the other stream's frames, at a size the probe never gave."""
    path = _two_stream_mp4(tmp_path / "two.mp4")
    info = probe_video(path)
    assert (info.width, info.height, info.num_frames, info.video_streams) == (32, 32, 12, 2)
    for backend in ("auto", "pyav"):
        video = read_video(path, backend=backend)
        assert video.shape == (12, 32, 32, 3)
        assert video.float().mean((0, 1, 2)).tolist() == pytest.approx([200, 30, 30], abs=5)
    with pytest.raises(VideoReadError, match="it has 2 video streams"):
        read_video(path, backend="decord")
    from vidgen.data import VideoFolder, to_uint8

    (tmp_path / "folder").mkdir()
    path.rename(tmp_path / "folder" / "two.mp4")
    clip = to_uint8(VideoFolder(tmp_path / "folder", clip_len=4, size=32)[0]["video"])
    assert clip.float().mean((0, 1, 2)).tolist() == pytest.approx([200, 30, 30], abs=5)


def test_cover_art_is_not_taken_for_the_video_stream():
    """A still picture attached as cover art (disposition attached_pic) may come first."""
    from types import SimpleNamespace

    from vidgen.io.video import _video_stream

    cover = SimpleNamespace(disposition=av.stream.Disposition.attached_pic, type="video")
    moving = SimpleNamespace(disposition=av.stream.Disposition.default, type="video")
    container = SimpleNamespace(streams=SimpleNamespace(video=[cover, moving]))
    assert _video_stream(container, Path("x.mp4")) is moving
    container = SimpleNamespace(streams=SimpleNamespace(video=[cover]))
    assert _video_stream(container, Path("x.mp4")) is cover  # nothing else: the picture


@pytest.mark.parametrize("suffix", [".ts", ".mpg"])
def test_mpeg_ts_and_ps_streams_with_b_frames_read_every_frame_in_place(tmp_path, suffix):
    """MPEG-TS with B-frames (libx264's default): decord returned the frames shifted (start
    20 gave frames 30-34, the last repeated to make up the count), with no error. MPEG-PS
    times only the first frame of each pack: the probe counted the timed packets only (6 of
    30 here), and reads returned those alone; counted, decord read them from a later start
    as frames from 0. Both are read with PyAV."""
    info = probe_video(gop_stream(tmp_path / f"b{suffix}", num_frames=30, gop=10, b_frames=3))
    assert info.num_frames == 30
    for backend in ("auto", "pyav"):
        assert frame_numbers(read_video(info.path, backend=backend)) == list(range(30))
        assert frame_numbers(read_video(info.path, 20, 5, backend=backend)) == list(range(20, 25))
    assert frame_numbers(torch.cat(list(iter_video(info.path, chunk=8)))) == list(range(30))
    container, kind = {".ts": ("mpegts", "TS"), ".mpg": ("mpeg", "PS")}[suffix]
    assert info.container == container
    with pytest.raises(VideoReadError, match=f"it is an MPEG-{kind} stream"):
        read_video(info.path, backend="decord")
