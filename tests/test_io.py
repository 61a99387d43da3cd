"""vidgen.io: probing, reading, atomic streaming writes and segment concatenation."""

from __future__ import annotations

import dataclasses
import re
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from vidgen.io import (
    MAX_FPS,
    VideoReadError,
    VideoWriter,
    concat_videos,
    probe_video,
    read_metadata,
    read_video,
)
from vidgen.io import video as video_module
from vidgen.worlds.bouncing import BouncingShapes, BouncingShapesConfig

BACKGROUND = (20, 20, 28)
RED, GREEN, BLUE = (220, 40, 40), (40, 200, 60), (50, 90, 230)


def moving_squares(
    num_frames: int = 20, size: int = 64, step: int = 1, offset: int = 1
) -> np.ndarray:
    """Saturated squares on a dark background, each moving `step` px a frame.

    offset=1, step=1 puts edges on odd pixels half the time, splitting 2x2 chroma blocks
    (the hard case for yuv420p); offset=0, step=2 keeps every edge on the chroma grid.
    """
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    frames[:] = BACKGROUND
    for t in range(num_frames):
        d = step * t
        frames[t, 10:26, 4 + offset + d : 20 + offset + d] = RED
        frames[t, 24 + d : 38 + d, 40:54] = GREEN
        frames[t, 4 + offset : 14 + offset, 50 - d : 60 - d] = BLUE
    return frames


def noise(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def luma(frames: np.ndarray) -> np.ndarray:
    return frames.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def write(path: Path, frames: np.ndarray, **kwargs) -> Path:
    with VideoWriter(path, **kwargs) as writer:
        writer.write(frames)
    return path


def b_frame_mkv(path: Path, num_frames: int = 20, step: int = 12, first: int = 0) -> Path:
    """Flat grey frames of value (first + i) * step from libx264 with B-frames allowed:
    Matroska gives the first packets that B-frames delay a pts but no dts."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"bf": "3"})
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(first, first + num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * step, np.uint8), "rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


@pytest.fixture(scope="module")
def lossless_clip(tmp_path_factory) -> tuple[Path, np.ndarray]:
    # Odd sizes on purpose: rgb24 has no chroma subsampling, so any size must work.
    frames = noise(16, 33, 47)
    path = tmp_path_factory.mktemp("lossless") / "noise.mp4"
    return write(path, frames, lossless=True), frames


@pytest.fixture(scope="module")
def h264_clip(tmp_path_factory) -> tuple[Path, np.ndarray]:
    frames = moving_squares(24)
    path = tmp_path_factory.mktemp("h264") / "squares.mp4"
    return write(path, frames), frames


# --- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_lossless_round_trip_is_bit_exact(lossless_clip, backend):
    path, frames = lossless_clip
    out = read_video(path, backend=backend)
    assert out.dtype == torch.uint8
    assert out.shape == frames.shape
    assert np.array_equal(out.numpy(), frames)


@pytest.mark.parametrize("seed", [0, 5])
def test_h264_default_quality_on_bouncing_shapes(tmp_path, seed):
    # PSNR in luma, as codecs are measured: yuv420p keeps one colour per 2x2 block, so
    # where a saturated shape edge splits a block the RGB error is fixed by the format, not by
    # the encoder (even crf 0 stays near 31 dB RGB on these clips; luma is at ~43 dB).
    frames = BouncingShapes(BouncingShapesConfig(num_shapes=4), seed=seed).trajectory(32).frames
    out = read_video(write(tmp_path / "a.mp4", frames)).numpy()
    assert psnr(luma(out), luma(frames)) >= 35.0
    assert psnr(out, frames) >= 29.0
    # At 128x128 the chroma-split edge pixels are a smaller share: RGB PSNR itself >= 35 dB.
    big = BouncingShapes(BouncingShapesConfig(num_shapes=3, size=128), seed=seed)
    frames = big.trajectory(32).frames
    out = read_video(write(tmp_path / "c.mp4", frames)).numpy()
    assert psnr(out, frames) >= 35.0
    # Edges on the chroma grid: what the encoder itself loses at the default crf, in RGB.
    aligned = moving_squares(20, step=2, offset=0)
    out = read_video(write(tmp_path / "b.mp4", aligned)).numpy()
    assert psnr(out, aligned) >= 35.0


def test_default_writer_has_no_b_frames(h264_clip):
    path, _ = h264_clip
    with av.open(str(path)) as container:
        stamps = [(p.pts, p.dts) for p in container.demux(video=0) if p.size]
    assert all(pts == dts for pts, dts in stamps)
    assert [dts for _, dts in stamps] == sorted({dts for _, dts in stamps})


def test_backends_agree_on_h264(h264_clip):
    path, _ = h264_clip
    a = read_video(path, backend="decord").numpy().astype(np.int16)
    b = read_video(path, backend="pyav").numpy().astype(np.int16)
    assert a.shape == b.shape
    # Both convert yuv420p with swscale; allow a rounding step between ffmpeg versions.
    assert np.abs(a - b).max() <= 2


def test_auto_falls_back_to_pyav_without_decord(lossless_clip, monkeypatch):
    path, frames = lossless_clip
    monkeypatch.setattr(video_module, "_import_decord", lambda: None)
    assert np.array_equal(read_video(path).numpy(), frames)
    with pytest.raises(ImportError, match="decord"):
        read_video(path, backend="decord")


def test_writing_in_several_calls_equals_one_call(tmp_path):
    frames = moving_squares(20)
    one = write(tmp_path / "one.mp4", frames)
    with VideoWriter(tmp_path / "many.mp4") as writer:
        writer.write(frames[:7])
        writer.write(torch.from_numpy(frames[7]))  # a single (H, W, 3) frame
        writer.write(torch.from_numpy(frames[8:13]))
        writer.write(frames[13:])
        assert writer.frames_written == 20
    assert np.array_equal(read_video(one).numpy(), read_video(tmp_path / "many.mp4").numpy())


# --- atomic writes ------------------------------------------------------------------------


def test_exception_inside_writer_leaves_nothing(tmp_path):
    path = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="boom"), VideoWriter(path) as writer:
        writer.write(moving_squares(4))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_exception_keeps_existing_file(tmp_path):
    path = tmp_path / "out.mp4"
    path.write_bytes(b"previous render")
    with pytest.raises(RuntimeError, match="boom"), VideoWriter(path, lossless=True) as writer:
        writer.write(noise(3, 8, 8))
        raise RuntimeError("boom")
    assert path.read_bytes() == b"previous render"
    assert list(tmp_path.iterdir()) == [path]


def test_clean_close_replaces_existing_file(tmp_path):
    path = tmp_path / "out.mp4"
    path.write_bytes(b"previous render")
    write(path, moving_squares(4))
    assert probe_video(path).num_frames == 4
    assert list(tmp_path.iterdir()) == [path]


# --- writer input validation --------------------------------------------------------------


@pytest.mark.parametrize(
    ("frames", "error", "match"),
    [
        (np.zeros((2, 8, 8, 3), np.float32), TypeError, "uint8"),
        (torch.zeros((2, 8, 8, 3), dtype=torch.int64), TypeError, "uint8"),
        (np.zeros((2, 8, 8, 4), np.uint8), ValueError, r"\(T, H, W, 3\)"),
        (np.zeros((8, 8), np.uint8), ValueError, r"\(T, H, W, 3\)"),
        (np.zeros((2, 0, 0, 3), np.uint8), ValueError, r"H and W >= 1"),
        ([[0, 0, 0]], TypeError, "torch.Tensor or numpy"),
    ],
)
def test_write_rejects_bad_frames(tmp_path, frames, error, match):
    with pytest.raises(error, match=match), VideoWriter(tmp_path / "a.mp4") as writer:
        writer.write(frames)
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_size_change(tmp_path):
    with pytest.raises(ValueError, match=r"\(8, 8, 3\).*\(10, 8, 3\)"):  # noqa: SIM117
        with VideoWriter(tmp_path / "a.mp4") as writer:
            writer.write(np.zeros((2, 8, 8, 3), np.uint8))
            writer.write(np.zeros((1, 10, 8, 3), np.uint8))


def test_an_empty_write_starts_nothing(tmp_path):
    """A write of no frames started the file and fixed the frame size, so the first real
    frames of another size were refused."""
    writer = VideoWriter(tmp_path / "a.mp4")
    writer.write(np.zeros((0, 64, 64, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []
    writer.write(np.zeros((2, 48, 48, 3), np.uint8))
    writer.close()
    assert probe_video(tmp_path / "a.mp4").width == 48


def test_an_encoder_that_refuses_the_stream_is_named_and_leaves_nothing(tmp_path):
    """MJPEG takes full-range yuvj420p only: it failed at the first write with FFmpeg's
    word on the 'bf' option, and a writer outside a with block left its temporary file."""
    frames = np.full((3, 32, 64, 3), 100, np.uint8)
    mjpeg = write(tmp_path / "m.mkv", frames, codec="mjpeg")
    assert np.array_equal(np.asarray(read_video(mjpeg)), frames)
    writer = VideoWriter(tmp_path / "x.mp4", codec="mpeg2video", fps=7)  # MPEG-2 has no 7 fps
    with pytest.raises(ValueError, match=r"'mpeg2video' encoder refused .*x\.mp4"):
        writer.write(frames)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mkv"]


def test_a_container_that_cannot_hold_the_codec_is_named_and_leaks_no_file(tmp_path):
    """Ogg cannot hold H.264: the header failed at the first packet (x264 buffers about 40
    frames) as "Invalid argument" naming the deleted temp file, and FFmpeg's file stayed open
    (PyAV closes it only once a header was written): one descriptor leaked per try."""
    import os

    fds = Path("/proc/self/fd")
    before = len(list(fds.iterdir())) if fds.is_dir() else None
    for _ in range(3):
        writer = VideoWriter(tmp_path / "x.ogv")
        with pytest.raises(ValueError, match=r"cannot write 'libx264' video into x\.ogv \(con"):
            writer.write(np.zeros((2, 16, 16, 3), np.uint8))  # at once, not 40 frames on
    assert list(tmp_path.iterdir()) == []
    if before is not None:
        assert len(list(fds.iterdir())) == before, os.listdir(fds)


def test_a_crf_the_encoder_has_no_option_for_is_refused(tmp_path):
    """mpeg4 has no crf: it was dropped without a word (crf 2 and 40 gave the same file)."""
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="crf=10: the 'mpeg4' encoder has no crf option"):
        write(tmp_path / "a.mkv", frames, codec="mpeg4", crf=10)
    assert list(tmp_path.iterdir()) == []
    write(tmp_path / "b.mkv", frames, codec="mpeg4")  # no crf: fine
    write(tmp_path / "c.mp4", frames, crf=30)  # x264's own


def test_odd_size_needs_lossless(tmp_path):
    with pytest.raises(ValueError, match="lossless=True"), VideoWriter(tmp_path / "a.mp4") as w:
        w.write(np.zeros((2, 9, 8, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"codec": "mpeg4", "lossless": True}, "only supported for codec='h264'"),
        ({"codec": "no-such-codec"}, "no-such-codec"),
        ({"lossless": "no"}, "lossless must be True or False"),  # truthy: it wrote lossless
        ({"crf": 60}, "crf"),
        ({"lossless": True, "crf": 10}, "crf"),
        ({"fps": 0}, "fps"),
        ({"fps": 1 / 5000}, "fps must be >= 1/1001"),
        ({"fps": 3e9}, r"fps must be <= 1000 .*got fps=3000000000\.0"),
        ({"fps": 1000.5}, r"fps must be <= 1000"),
        ({"metadata": {"comment": "a\x00b"}}, r"metadata key 'comment'.*NUL"),
        ({"metadata": {"x\x00y": "v"}}, r"metadata key 'x\\x00y'.*NUL"),
        # the muxer's own tag (dropped on reading), and a key Matroska would lower-case
        ({"metadata": {"encoder": "mine"}}, r"metadata key 'encoder' is the container's own"),
        ({"metadata": {"Title": "x"}}, r"metadata key 'Title' must be lower-case"),
        # Matroska renames a key with a space and drops its own "duration"
        ({"metadata": {"prompt text": "x"}}, r"must not contain spaces .* as 'prompt_text'"),
        ({"metadata": {"duration": "5 s"}}, r"metadata key 'duration' is the container's own"),
    ],
)
def test_writer_rejects_bad_settings(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        VideoWriter(tmp_path / "a.mp4", **kwargs)


def test_a_raw_h264_stream_without_timestamps_is_probed_and_read(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (10, 32, 32, 3), dtype=np.uint8)
    path = tmp_path / "v.h264"
    with VideoWriter(path) as writer:
        writer.write(frames)
    assert probe_video(path).num_frames == 10
    assert read_video(path, backend="pyav").shape == (10, 32, 32, 3)


def test_an_mkv_with_b_frames_keeps_its_delayed_first_frames(tmp_path):
    """Matroska gives the first B-frame-delayed packets a pts and no dts; they were counted
    as untimed and dropped, so the last frames of a video went missing."""
    path = b_frame_mkv(tmp_path / "b.mkv")
    assert probe_video(path).num_frames == 20
    video = read_video(path, backend="pyav")
    assert len(video) == 20 and abs(float(video[-1].float().mean()) - 19 * 12) < 4


def test_writer_takes_numpy_frame_rates(tmp_path):
    for fps in (np.int64(8), np.float32(12.5)):
        assert VideoWriter(tmp_path / "a.mp4", fps=fps).rate == Fraction(float(fps))


def test_writer_at_max_fps_keeps_distinct_matroska_timestamps(tmp_path):
    # MAX_FPS is where Matroska's millisecond timestamps run out; there it still works.
    path = write(tmp_path / "fast.mkv", noise(3, 8, 8), fps=MAX_FPS, lossless=True)
    info = probe_video(path)
    assert (info.num_frames, info.fps) == (3, MAX_FPS)


def test_writer_refuses_a_directory_before_encoding(tmp_path):
    target = tmp_path / "out.mp4"
    target.mkdir()
    with pytest.raises(IsADirectoryError, match=r"out\.mp4: it is an existing directory"):
        VideoWriter(target)
    segment = write(tmp_path / "s.mp4", noise(2, 8, 8), lossless=True)
    with pytest.raises(IsADirectoryError, match=r"out\.mp4: it is an existing directory"):
        concat_videos([segment], target)
    assert target.is_dir() and not list(target.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4", "s.mp4"]


def test_close_without_frames_raises(tmp_path):
    writer = VideoWriter(tmp_path / "a.mp4")
    with pytest.raises(ValueError, match="without any frames"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


# --- probing and reader errors ------------------------------------------------------------


def test_probe_counts_frames(h264_clip, lossless_clip):
    info = probe_video(h264_clip[0])
    assert (info.num_frames, info.width, info.height, info.codec) == (24, 64, 64, "h264")
    assert info.fps == pytest.approx(8.0)
    info = probe_video(lossless_clip[0])
    assert (info.num_frames, info.width, info.height) == (16, 47, 33)


def _audio_only(path: Path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
            )
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


@pytest.mark.parametrize("case", ["missing", "empty", "truncated", "text", "audio_only"])
def test_bad_files_raise_video_read_error(tmp_path, h264_clip, case):
    path = tmp_path / f"bad_{case}.mp4"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        data = h264_clip[0].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "text":
        path.write_text("this is not a video\n" * 50)
    elif case == "audio_only":
        _audio_only(path)
    # Tags can be read from any container, so read_metadata only fails on unreadable files.
    calls = (
        (probe_video, read_video)
        if case == "audio_only"
        else (probe_video, read_video, read_metadata)
    )
    for call in calls:
        with pytest.raises(VideoReadError, match=re.escape(path.name)):
            call(path)


def test_header_over_reporting_frames(tmp_path):
    # faststart puts the sample table first, so cutting the file leaves a header that lists
    # frames whose bytes are gone: the case where decord 0.6 may hang if asked past the end.
    frames = noise(12, 32, 32, seed=2)
    path = tmp_path / "fast.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264rgb", rate=8, options={"qp": "0"})
        stream.width, stream.height, stream.pix_fmt = 32, 32, "rgb24"
        for i, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts = i
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    with av.open(str(cut)) as container:
        assert container.streams.video[0].frames == 12
    count = probe_video(cut).num_frames
    assert 0 < count < 12
    for backend in ("auto", "pyav"):
        assert np.array_equal(read_video(cut, backend=backend).numpy(), frames[:count])


def test_frames_an_edit_list_hides_are_not_counted(tmp_path):
    """A cut made without re-encoding (ffmpeg -ss ... -c copy) keeps the packets before the
    cut and hides them with an edit list: they are marked discard and are not frames."""
    frames = noise(12, 32, 32, seed=4)
    src, cut = tmp_path / "src.mp4", tmp_path / "cut.mp4"
    with VideoWriter(src, lossless=True) as writer:
        writer.write(frames)
    with av.open(str(src)) as inp, av.open(str(cut), "w") as out:
        stream_in = inp.streams.video[0]
        stream_out = out.add_stream_from_template(stream_in)
        shift = 3 * int(1 / (stream_in.time_base * stream_in.average_rate))  # 3 frames
        for packet in inp.demux(stream_in):
            if packet.dts is None:
                continue
            packet.pts -= shift
            packet.dts -= shift
            packet.stream = stream_out
            out.mux(packet)
    assert probe_video(cut).num_frames == 9
    for backend in ("decord", "pyav"):
        assert np.array_equal(read_video(cut, backend=backend).numpy(), frames[3:])


def test_a_frame_size_change_midway_names_file_frame_and_sizes(tmp_path):
    # Raw H.264 streams joined byte for byte: the second one's SPS switches the size.
    parts = [
        write(tmp_path / "a.h264", noise(3, 32, 32), lossless=True),
        write(tmp_path / "b.h264", noise(2, 48, 64), lossless=True),
    ]
    joined = tmp_path / "joined.h264"
    joined.write_bytes(b"".join(part.read_bytes() for part in parts))
    assert probe_video(joined).num_frames == 5
    sizes = r"frame 3: frame 0 is 32x32 but frame 3 is 64x48 \(width x height\)"
    for backend in ("auto", "pyav"):
        with pytest.raises(VideoReadError, match=rf"joined\.h264 changes frame size at {sizes}"):
            read_video(joined, backend=backend)
    with pytest.raises(VideoReadError, match=r"frame 0 is 32x32 but frame 3 is 64x48"):
        read_video(joined, start=1, size=16, backend="pyav")
    # The part before the change still reads.
    assert read_video(joined, num_frames=3, backend="pyav").shape == (3, 32, 32, 3)


# --- slicing and resizing -----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_start_and_num_frames(lossless_clip, backend):
    path, frames = lossless_clip
    got = read_video(path, start=3, num_frames=5, backend=backend).numpy()
    assert np.array_equal(got, frames[3:8])
    assert np.array_equal(read_video(path, start=10, backend=backend).numpy(), frames[10:])
    assert np.array_equal(read_video(path, start=15, num_frames=1, backend=backend), frames[15:])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"start": 16}, r"start=16 is past the end of noise\.mp4 \(16 frames"),
        ({"start": 40}, r"start=40 is past the end of noise\.mp4 \(16 frames"),
        ({"start": -1}, r"start must be >= 0, got start=-1"),
        ({"start": 10, "num_frames": 7}, r"num_frames=7 from start=10.*at most 6"),
        ({"num_frames": 0}, r"num_frames must be >= 1"),
        ({"size": 0}, "size"),
        ({"size": (8, 8, 3)}, "size"),
        ({"size": (8, -1)}, "size"),
        ({"size": True}, "size"),
        ({"backend": "ffmpeg"}, "backend"),
    ],
)
def test_read_rejects_bad_arguments(lossless_clip, kwargs, match):
    with pytest.raises(ValueError, match=match):
        read_video(lossless_clip[0], **kwargs)


@pytest.fixture(scope="module")
def red_blue_clip(tmp_path_factory) -> Path:
    frames = np.zeros((3, 32, 64, 3), np.uint8)
    frames[:, :, :32] = RED
    frames[:, :, 32:] = BLUE
    return write(tmp_path_factory.mktemp("rb") / "red_blue.mp4", frames, lossless=True)


@pytest.mark.parametrize(
    ("size", "shape"), [(16, (16, 16)), ((24, 40), (24, 40)), ((64, 32), (64, 32))]
)
def test_resize_covers_then_center_crops(red_blue_clip, size, shape):
    out = read_video(red_blue_clip, size=size).numpy().astype(int)
    assert out.shape == (3, *shape, 3)
    # The red/blue boundary stays in the middle; away from it the colours are unchanged.
    width = shape[1]
    margin = max(2, width // 8)
    assert np.abs(out[:, :, : width // 2 - margin] - RED).max() <= 1
    assert np.abs(out[:, :, width // 2 + margin :] - BLUE).max() <= 1


def test_native_size_is_a_no_op(red_blue_clip):
    assert torch.equal(read_video(red_blue_clip, size=(32, 64)), read_video(red_blue_clip))


# --- metadata and concatenation -----------------------------------------------------------


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_metadata_round_trip(tmp_path, suffix):
    """Lower-case keys come back as written, without the muxer's own tags (Matroska stores
    tag names upper-case and adds an ENCODER tag)."""
    tags = {"comment": "seed=3", "provenance": '{"sha256": "ab12", "steps": 20}'}
    path = write(tmp_path / f"a{suffix}", moving_squares(2), metadata=tags)
    assert read_metadata(path) == tags


def test_avi_metadata_reads_back_as_written_or_is_refused(tmp_path):
    """AVI keeps a fixed set of RIFF INFO keys: others were dropped without a word, and
    the muxer's own "software" tag came back as if written."""
    tags = {"comment": "seed=3", "title": "t"}
    assert read_metadata(write(tmp_path / "a.avi", moving_squares(2), metadata=tags)) == tags
    with pytest.raises(
        ValueError, match=r"metadata keys \['provenance'\] cannot be stored in b.avi"
    ):
        VideoWriter(tmp_path / "b.avi", metadata={"comment": "c", "provenance": "{}"})
    with pytest.raises(ValueError, match="metadata key 'software' is the container's own"):
        VideoWriter(tmp_path / "c.mp4", metadata={"software": "x"})
    assert not (tmp_path / "b.avi").exists()


def test_concat_into_avi_refuses_segment_tags_avi_cannot_keep(tmp_path):
    """With metadata=None the first segment's tags are copied: into an .avi, keys outside
    RIFF INFO were dropped without a word."""
    frames = moving_squares(8)
    tags = {"comment": "c", "provenance": "{}"}
    segments = [write(tmp_path / f"s{i}.mp4", frames, metadata=tags) for i in range(2)]
    with pytest.raises(ValueError, match=r"the tags \['provenance'\] of .*s0.mp4 cannot be"):
        concat_videos(segments, tmp_path / "all.avi")
    assert not (tmp_path / "all.avi").exists()
    out = concat_videos(segments, tmp_path / "all.avi", metadata={"comment": "c"})
    assert read_metadata(out) == {"comment": "c"}


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".avi"])
def test_concat_into_avi_from_any_container(tmp_path, suffix):
    """H.264 from mp4/mkv is length-prefixed: copied into AVI as it was, the file did not
    decode (InvalidDataError); it is rewritten to start codes on the way."""
    frames = moving_squares(16)
    segments = [write(tmp_path / f"s{i}{suffix}", frames[i * 8 : (i + 1) * 8]) for i in range(2)]
    out = concat_videos(segments, tmp_path / "all.avi")
    expected = np.concatenate([read_video(s).numpy() for s in segments])
    for backend in ("decord", "pyav"):
        assert np.array_equal(read_video(out, backend=backend).numpy(), expected)
    assert probe_video(out).num_frames == 16


def test_concat_lossless_segments_bit_exact(tmp_path):
    frames = noise(15, 24, 32, seed=1)
    segments = [
        write(tmp_path / f"seg{i}.mp4", frames[a:b], lossless=True, metadata={"comment": f"{i}"})
        for i, (a, b) in enumerate([(0, 4), (4, 11), (11, 15)])
    ]
    out = concat_videos(segments, tmp_path / "all.mp4")
    assert out == tmp_path / "all.mp4"
    assert probe_video(out).num_frames == 15
    for backend in ("decord", "pyav"):
        assert np.array_equal(read_video(out, backend=backend).numpy(), frames)
    assert read_metadata(out) == {"comment": "0"}
    with av.open(str(out)) as container:
        dts = [p.dts for p in container.demux(video=0) if p.size]
    assert dts == sorted(set(dts))  # strictly increasing
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_concat_h264_segments_with_metadata_argument(tmp_path):
    frames = moving_squares(16)
    segments = [write(tmp_path / f"s{i}.mp4", frames[i * 8 : (i + 1) * 8]) for i in range(2)]
    out = concat_videos(segments, tmp_path / "all.mp4", metadata={"comment": "joined"})
    assert read_metadata(out) == {"comment": "joined"}
    expected = np.concatenate([read_video(s).numpy() for s in segments])
    assert np.array_equal(read_video(out).numpy(), expected)


@pytest.mark.parametrize(
    ("second", "match"),
    [
        ({"frames": np.zeros((2, 16, 16, 3), np.uint8)}, "s1.mp4 is h264 16x16"),
        ({"fps": 12}, "s1.mp4 is h264 32x32 .* at 12 fps"),
        ({"crf": 30}, "s1.mp4 was encoded with different settings"),
        ({"lossless": True}, "s1.mp4 is h264 32x32 gbrp"),
    ],
)
def test_concat_rejects_mismatched_segments(tmp_path, second, match):
    first = write(tmp_path / "s0.mp4", np.zeros((2, 32, 32, 3), np.uint8))
    frames = second.pop("frames", np.zeros((2, 32, 32, 3), np.uint8))
    other = write(tmp_path / "s1.mp4", frames, **second)
    with pytest.raises(ValueError, match=match):
        concat_videos([first, other], tmp_path / "all.mp4")
    assert not (tmp_path / "all.mp4").exists()


def test_concat_raw_h264_segments_without_timestamps(tmp_path):
    """Raw .h264 has no timestamps; its packets were all dropped and a 0-byte file replaced
    the previous render."""
    frames = noise(20, 32, 32, seed=3)
    segments = [
        write(tmp_path / f"s{i}.h264", frames[i * 10 : (i + 1) * 10], lossless=True)
        for i in range(2)
    ]
    out = tmp_path / "all.mp4"
    out.write_bytes(b"previous render")
    concat_videos(segments, out)
    info = probe_video(out)
    assert (info.num_frames, info.fps) == (20, pytest.approx(8.0))
    for backend in ("decord", "pyav"):
        assert np.array_equal(read_video(out, backend=backend).numpy(), frames)
    with av.open(str(out)) as container:
        dts = [p.dts for p in container.demux(video=0) if p.size]
    assert dts == sorted(set(dts))


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_concat_b_frame_mkv_segments_keeps_the_delayed_first_frames(tmp_path, suffix):
    """The first packets of a B-frame mkv have a pts but no dts; dropping them dropped the
    keyframe, so nothing decoded."""
    segments = [b_frame_mkv(tmp_path / f"b{i}.mkv", step=6, first=20 * i) for i in range(2)]
    out = concat_videos(segments, tmp_path / f"all{suffix}")
    assert probe_video(out).num_frames == 40
    video = read_video(out, backend="pyav").float()
    means = video.mean(dim=(1, 2, 3)).numpy()
    assert np.abs(means - 6 * np.arange(40)).max() < 4  # every frame, in order


def test_concat_never_publishes_fewer_frames_than_probed(tmp_path, monkeypatch):
    """A segment whose packets are not all copied must fail, leaving `out` as it was."""
    segments = [write(tmp_path / f"s{i}.mp4", noise(3, 16, 16), lossless=True) for i in range(2)]
    out = tmp_path / "all.mp4"
    out.write_bytes(b"previous render")
    probe = video_module.probe_video

    def over_reporting_probe(path):
        info = probe(path)
        if Path(path).name == "s1.mp4":
            return dataclasses.replace(info, num_frames=info.num_frames + 1)
        return info

    monkeypatch.setattr(video_module, "probe_video", over_reporting_probe)
    with pytest.raises(ValueError, match=r"copied 3 of the 4 frames of .*s1\.mp4"):
        concat_videos(segments, out)
    assert out.read_bytes() == b"previous render"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.mp4", "s0.mp4", "s1.mp4"]


def test_concat_refuses_metadata_with_nul_before_writing(tmp_path):
    segment = write(tmp_path / "s.mp4", noise(2, 8, 8), lossless=True)
    with pytest.raises(ValueError, match=r"metadata key 'title'.*NUL"):
        concat_videos([segment], tmp_path / "all.mp4", metadata={"title": "cut\x00here"})
    assert [p.name for p in tmp_path.iterdir()] == ["s.mp4"]


def test_concat_rejects_no_segments(tmp_path):
    with pytest.raises(ValueError, match="at least one segment"):
        concat_videos([], tmp_path / "all.mp4")


def test_without_pyav_reading_and_writing_say_so(tmp_path, monkeypatch, lossless_clip):
    """A bare training image has no PyAV: importing vidgen works, video I/O names what is
    missing instead of failing on None."""
    monkeypatch.setattr(video_module, "av", None)
    with pytest.raises(ImportError, match="writing video needs PyAV.*pip install av"):
        VideoWriter(tmp_path / "a.mp4")
    with pytest.raises(ImportError, match=r"reading .* needs PyAV"):
        read_video(lossless_clip[0])
    with pytest.raises(ImportError, match="needs PyAV"):
        probe_video(lossless_clip[0])
    assert not list(tmp_path.iterdir())


def test_a_video_path_too_long_for_the_filesystem_is_a_read_error(tmp_path):
    from vidgen.io import probe_video, read_video

    path = tmp_path / ("y" * 300 + ".mp4")
    for read in (read_video, probe_video):
        with pytest.raises(VideoReadError, match="cannot be read: File name too long"):
            read(path)


def test_a_video_replaced_after_probing_is_not_read_as_the_probed_one(tmp_path):
    """Probed at 16x16, then replaced by a 32x32 file: the new file's frames came back as
    the old video's, without a word."""
    from vidgen.io import probe_video, read_video

    path = write(tmp_path / "a.mp4", moving_squares(5, size=16))
    info = probe_video(path)
    write(path, moving_squares(10, size=32))
    for backend in ("auto", "pyav"):
        with pytest.raises(VideoReadError, match="has changed since it was probed"):
            read_video(path, info=info, backend=backend)
    assert read_video(path, info=probe_video(path)).shape == (10, 32, 32, 3)
