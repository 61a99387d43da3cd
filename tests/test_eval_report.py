"""``vidgen eval``: scene figures of video files (labels from render sidecars), strict JSON,
FVD against a reference folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vidgen.cli import main
from vidgen.eval.report import EvalConfig, evaluate, report_json
from vidgen.io import VideoWriter, probe_video
from vidgen.worlds.bouncing import BouncingShapes, BouncingShapesConfig


def shapes_video(path: Path, shapes: int, seed: int, frames: int = 32) -> np.ndarray:
    video = BouncingShapes(BouncingShapesConfig(num_shapes=shapes), seed=seed).trajectory(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    with VideoWriter(path, lossless=True) as writer:
        writer.write(video.frames)
    return video.frames


def sidecar(video: Path, label: int) -> None:
    """What ``vidgen render`` writes beside its video (the fields eval reads)."""
    video.with_suffix(".json").write_text(json.dumps({"request": {"label": label}}))


def test_labels_come_from_the_config_or_each_render_sidecar(tmp_path):
    shapes_video(tmp_path / "a.mp4", 3, seed=0)
    shapes_video(tmp_path / "sub" / "b.mp4", 1, seed=1)
    sidecar(tmp_path / "sub" / "b.mp4", 1)
    report = evaluate(EvalConfig(videos=str(tmp_path)))
    videos = report["per_video"]
    assert sorted(videos) == ["a.mp4", "sub/b.mp4"]
    assert videos["a.mp4"]["label"] is None and "count_accuracy" not in videos["a.mp4"]
    assert videos["sub/b.mp4"]["label"] == 1 and videos["sub/b.mp4"]["count_accuracy"] > 0.9
    # The summary pools what the videos have: one count accuracy, both videos' motion.
    summary = report["summary"]
    assert summary["count_accuracy"] == round(videos["sub/b.mp4"]["count_accuracy"], 4)
    pairs = videos["a.mp4"]["speed_pairs"] + videos["sub/b.mp4"]["speed_pairs"]
    assert summary["speed_pairs"] == pairs and 0.8 < summary["speed_ratio"] < 1.25
    assert summary["moving_fraction"] == 1.0
    # label= overrides the sidecars: 3 shapes are not 1.
    wrong = evaluate(EvalConfig(videos=str(tmp_path / "a.mp4"), label=1))
    assert wrong["per_video"]["a.mp4"]["count_accuracy"] < 0.2


def test_a_slideshow_reports_strict_json(tmp_path, capsys):
    """Frozen inside clips, jumping at seams: an infinite seam ratio, written as null (JSON
    has no Infinity) and counted in the summary."""
    frames = BouncingShapes(BouncingShapesConfig(num_shapes=2), seed=0).trajectory(32).frames
    slideshow = np.repeat(frames[::8], 8, axis=0)
    with VideoWriter(tmp_path / "s.mp4", lossless=True) as writer:
        writer.write(slideshow)
    report = evaluate(EvalConfig(videos=str(tmp_path / "s.mp4"), label=2))
    assert report["per_video"]["s.mp4"]["seam_ratio"] == float("inf")
    strict = json.loads(report_json(report))
    assert strict["per_video"]["s.mp4"]["seam_ratio"] is None
    assert strict["summary"]["seam_ratio_infinite"] == 1
    # A moving video of one clip has no seam, and is not counted as one that never changes.
    (tmp_path / "short").mkdir()
    with VideoWriter(tmp_path / "short" / "one.mp4", lossless=True) as writer:
        writer.write(frames[:8])
    with VideoWriter(tmp_path / "short" / "still.mp4", lossless=True) as writer:
        writer.write(np.repeat(frames[:1], 16, axis=0))
    short = evaluate(EvalConfig(videos=str(tmp_path / "short"), label=2))["summary"]
    assert (short["seam_ratio_no_seam"], short["seam_ratio_undefined"]) == (1, 1)
    assert short["moving_fraction"] == 0.5  # the short one moves, the still one does not
    out = tmp_path / "report.json"
    assert main(["eval", f"videos={tmp_path / 's.mp4'}", "label=2", f"out={out}"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text()) == strict


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("videos=missing", "videos='missing': no such file or folder"),
        ("scene=moon", "scene must be one of"),
        ("out=report.txt", "out must end in .json"),
        ("fvd_clips=1", "fvd_clips"),
        ("clip_len=1", "clip_len"),
        ("videos=", "videos is empty"),
        ("out=v.json", "out='v.json' is the sidecar path of scored video v.mp4"),
        ("out=v.mp4/r.json", "out='v.mp4/r.json' cannot be written"),
        ("device=tpu", "device='tpu' is no torch device"),
    ],
)
def test_bad_eval_keys_are_named(tmp_path, monkeypatch, capsys, override, message):
    monkeypatch.chdir(tmp_path)
    shapes_video(tmp_path / "v.mp4", 2, seed=0, frames=8)
    sidecar(tmp_path / "v.mp4", 2)
    before = (tmp_path / "v.json").read_text()
    args = ["eval", "videos=v.mp4", override] if "videos" not in override else ["eval", override]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert (tmp_path / "v.json").read_text() == before  # the sidecar is never replaced


def test_a_renders_label_is_read_from_its_own_provenance_before_its_sidecar(tmp_path, caplog):
    """A render stopped between publishing its video and its sidecar (or v.MP4 beside
    v.mp4) left a video beside another render's sidecar: eval scored it against that
    render's label. The video's own comment tag holds its provenance."""
    frames = BouncingShapes(BouncingShapesConfig(num_shapes=2), seed=0).trajectory(16).frames
    own = {"request": {"label": 2}, "request_sha256": "new"}
    with VideoWriter(tmp_path / "v.mp4", lossless=True, metadata={"comment": json.dumps(own)}) as w:
        w.write(frames)
    (tmp_path / "v.json").write_text(json.dumps({"request": {"label": 4}, "request_sha256": "old"}))
    report = evaluate(EvalConfig(videos=str(tmp_path / "v.mp4")))
    assert report["per_video"]["v.mp4"]["label"] == 2
    assert report["per_video"]["v.mp4"]["count_accuracy"] > 0.9
    assert "provenance of another render" in caplog.text
    (tmp_path / "v.json").unlink()  # no sidecar: the video's own still counts
    assert evaluate(EvalConfig(videos=str(tmp_path / "v.mp4")))["per_video"]["v.mp4"]["label"] == 2


def test_sidecar_labels_that_are_no_counts_are_not_taken(tmp_path, caplog):
    shapes_video(tmp_path / "a.mp4", 2, seed=0)
    for bad in (-1, 2.0, "2", True):
        (tmp_path / "a.json").write_text(json.dumps({"request": {"label": bad}}))
        report = evaluate(EvalConfig(videos=str(tmp_path / "a.mp4")))
        assert report["per_video"]["a.mp4"]["label"] is None
        assert "no count of objects" in caplog.text
    assert report["summary"]["videos"] == 1 and report["summary"]["videos_with_label"] == 0


def test_a_refused_run_leaves_no_out_folders_and_a_broken_link_is_named(tmp_path, capsys):
    """The out check made out's missing folders, and a run refused after it left them; a
    broken link in a videos folder was left out without a word."""
    shapes_video(tmp_path / "v" / "a.mp4", 2, seed=0, frames=8)
    out = tmp_path / "new" / "deep" / "r.json"
    missing = tmp_path / "missing"
    assert main(["eval", f"videos={tmp_path / 'v'}", f"fvd_reference={missing}", f"out={out}"]) == 2
    assert "fvd_reference" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    (tmp_path / "v" / "b.mp4").symlink_to(tmp_path / "gone.mp4")
    assert main(["eval", f"videos={tmp_path / 'v'}", f"out={out}"]) == 2
    assert "b.mp4" in capsys.readouterr().err and not (tmp_path / "new").exists()
    (tmp_path / "v" / "b.mp4").unlink()
    assert main(["eval", f"videos={tmp_path / 'v'}", f"out={out}"]) == 0
    assert json.loads(out.read_text())["summary"]["videos"] == 1


def test_empty_folder_is_refused(tmp_path, capsys):
    assert main(["eval", f"videos={tmp_path}"]) == 2
    assert "holds no video files" in capsys.readouterr().err


@pytest.mark.usefixtures("all_threads")
def test_fvd_against_a_reference_folder(tmp_path):
    from vidgen.eval.fvd import FVDError, i3d_weights_path

    try:
        i3d_weights_path()
    except FVDError as err:
        pytest.skip(str(err))
    for i in range(2):
        shapes_video(tmp_path / "made" / f"{i}.mp4", 2, seed=i)
        shapes_video(tmp_path / "real" / f"{i}.mp4", 2, seed=10 + i)
    # (Each clip costs an I3D pass of about a second here: few clips.) A set against itself,
    # 2 of its 4 clips asked: the same 2 clips on both sides.
    same = evaluate(
        EvalConfig(videos=str(tmp_path / "made"), fvd_reference=str(tmp_path / "made"), fvd_clips=2)
    )
    assert same["fvd_clips"] == 2 and same["fvd"] < 1e-3
    # A 3rd, short video gives no clip; more asked (256) than either set holds: all 4 of
    # each, as many from both sets.
    shapes_video(tmp_path / "made" / "2.mp4", 2, seed=5, frames=8)
    other = evaluate(
        EvalConfig(videos=str(tmp_path / "made"), fvd_reference=str(tmp_path / "real"))
    )
    assert other["fvd_clips"] == 4 and other["fvd"] > 1.0
    assert other["per_video"]["2.mp4"]["seam_ratio"] is None
    # KVD (unbiased: a set against itself scores below 0 by the self-pairs left out).
    assert same["kvd"] < 0 < other["kvd"]
    # A reference set of fewer than 2 clips: refused before any I3D pass.
    shapes_video(tmp_path / "short" / "s.mp4", 2, seed=0, frames=8)
    with pytest.raises(
        ValueError, match="at least 2 clips of 16 frames in each set; videos hold 4"
    ):
        evaluate(EvalConfig(videos=str(tmp_path / "made"), fvd_reference=str(tmp_path / "short")))


def test_videos_are_read_and_scored_in_pieces_as_if_whole(tmp_path, monkeypatch):
    """A video of any length is decoded and scored CHUNK_FRAMES at a time, with the figures
    of the whole video."""
    from vidgen.eval import report as report_module

    shapes_video(tmp_path / "a.mp4", 3, seed=0, frames=40)
    sidecar(tmp_path / "a.mp4", 3)
    whole = evaluate(EvalConfig(videos=str(tmp_path)))["per_video"]["a.mp4"]
    sizes = []
    real_add = report_module._ClipPicker.add

    def spy(self, chunk):
        sizes.append(len(chunk))
        real_add(self, chunk)

    monkeypatch.setattr(report_module._ClipPicker, "add", spy)
    monkeypatch.setattr(report_module, "CHUNK_FRAMES", 7)
    pieces = evaluate(EvalConfig(videos=str(tmp_path)))["per_video"]["a.mp4"]
    assert sizes == [7] * 5 + [5]
    assert pieces == pytest.approx(whole, rel=1e-12)
    assert pieces["frames"] == 40 and pieces["count_accuracy"] > 0.7
    # Pieces are bounded in pixels too: 256 frames of 1080p held about 10 GiB while scored.
    assert report_module.chunk_frames(1920, 1080) == 4
    assert report_module.chunk_frames(64, 64) == report_module.CHUNK_FRAMES == 7
    assert report_module.chunk_frames(10**5, 10**5) == 1
    side = probe_video(tmp_path / "a.mp4").width
    monkeypatch.setattr(report_module, "CHUNK_FRAMES", 256)
    monkeypatch.setattr(report_module, "CHUNK_PIXELS", 3 * side * side + 1)
    sizes.clear()
    pieces = evaluate(EvalConfig(videos=str(tmp_path)))["per_video"]["a.mp4"]
    assert sizes == [3] * 13 + [1]
    assert pieces == pytest.approx(whole, rel=1e-12)


@pytest.mark.parametrize("chunk", [1, 5, 16, 100])
def test_fvd_clips_picked_from_pieces_are_those_of_the_whole_video(chunk):
    from vidgen.eval.fvd import video_clips
    from vidgen.eval.report import _ClipPicker

    video = np.random.default_rng(0).integers(0, 256, (70, 4, 4, 3), dtype=np.uint8)
    for count, index, videos in [(3, 0, 1), (4, 1, 3), (9, 2, 3), (1, 0, 2)]:
        kept = _Kept()
        picker = _ClipPicker(len(video), count, index, videos, kept)
        for lo in range(0, len(video), chunk):
            piece = video[lo : lo + chunk].copy()
            picker.add(piece)
            # Copies: a view would keep every chunk holding a clip frame alive.
            held = [p for parts in picker.parts for p in parts] + kept.clips
            assert not any(np.shares_memory(p, piece) for p in held)
        expected = video_clips(video, count, (index + 0.5) / videos)
        assert np.array_equal(np.stack(kept.clips), expected)
        assert picker.needed == max(picker.starts) + 16 <= len(video)
    empty = _Kept()
    _ClipPicker(len(video), 0, 0, 1, empty).add(video)
    assert empty.clips == []


class _Kept:
    """Keeps the clips a ``_ClipPicker`` hands over."""

    def __init__(self) -> None:
        self.clips: list[np.ndarray] = []

    def add(self, clip: np.ndarray) -> None:
        self.clips.append(clip)


class _Pooled(torch.nn.Module):
    """A stand-in for I3D (no weights needed): a linear map of each clip's mean colour
    over time and space."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, 3, t, h, w)
        return self.proj(x.mean(dim=(2, 3, 4)))


@pytest.mark.parametrize("chunk", [1, 16, 100])
def test_fvd_features_of_clips_as_they_pass_are_those_of_the_whole_video(chunk):
    """Every FVD clip was kept at its frame size until all videos were read (a 1080p clip
    is 100 MB: 256 of them 25 GB); now each goes to I3D in batches as soon as it is whole,
    with the features of the clips of the whole video."""
    from vidgen.eval.fvd import i3d_features, video_clips
    from vidgen.eval.report import _ClipPicker, _Features

    model = _Pooled()
    videos = [np.random.default_rng(i).integers(0, 256, (70, 4, 4, 3), np.uint8) for i in range(2)]
    features = _Features(model, batch_size=2)
    expected = []
    for index, video in enumerate(videos):
        picker = _ClipPicker(len(video), 3, index, len(videos), features)
        for lo in range(0, len(video), chunk):
            picker.add(video[lo : lo + chunk].copy())
            assert len(features.pending) < 2  # no more than a batch held at frame size
            assert all(sum(map(len, parts)) < 16 for parts in picker.parts)
        features.flush()
        expected.append(video_clips(video, 3, (index + 0.5) / len(videos)))
    np.testing.assert_array_equal(features.result(), i3d_features(expected, model, batch_size=2))


def test_a_cuda_device_without_cuda_is_refused_by_name(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda' but CUDA is not available"):
        EvalConfig(videos="v.mp4", device="cuda")
    EvalConfig(videos="v.mp4", device="cpu")


def test_a_device_torch_names_but_cannot_use_is_refused_by_name():
    """device=meta (or mps on Linux) passed the check and failed with a traceback deep in
    I3D, after the videos were scored."""
    with pytest.raises(ValueError, match="device='meta' cannot be used here"):
        EvalConfig(videos="v.mp4", device="meta")


def test_an_anamorphic_video_is_scored_as_displayed(tmp_path):
    """A video stored at half its width with pixels shown twice as wide as high (sample
    aspect ratio 2:1) was scored at its stored pixels: every horizontal move counted half
    (speed ratio 0.70 where the square video scores 1.05). Scored as displayed, it moves as
    the square video does."""
    from fractions import Fraction

    from tests.test_io_edge import _anamorphic
    from vidgen.io import as_displayed

    frames = shapes_video(tmp_path / "square" / "a.mp4", 3, seed=0, frames=64)
    (tmp_path / "wide").mkdir()
    squeezed = np.ascontiguousarray(frames[:, :, ::2])  # every other column: 64 high, 32 wide
    _anamorphic(tmp_path / "wide" / "a.mp4", squeezed, Fraction(2, 1))
    square = evaluate(EvalConfig(videos=str(tmp_path / "square"), label=3))["summary"]
    wide = evaluate(EvalConfig(videos=str(tmp_path / "wide"), label=3))["summary"]
    assert abs(wide["speed_ratio"] / square["speed_ratio"] - 1) < 0.1
    # as_displayed: wider for wide pixels, taller for narrow ones, unchanged for square.
    clip = torch.from_numpy(squeezed[:2])
    assert as_displayed(clip, 2.0).shape == (2, 64, 64, 3)
    assert as_displayed(clip, 0.5).shape == (2, 128, 32, 3)
    assert as_displayed(clip, 1.0) is clip
    assert as_displayed(clip, np.float32(2.0)).shape == (2, 64, 64, 3)  # any real number
    assert as_displayed(clip, Fraction(1, 2)).shape == (2, 128, 32, 3)
    with pytest.raises(ValueError, match="pixel_aspect must be a positive number"):
        as_displayed(clip, 0.0)


def test_a_one_frame_video_gets_its_count_and_no_motion(tmp_path):
    """A still frame in a folder of videos failed the whole report ('motion needs at least 2
    frames'): it is counted, its motion figures are null, and the summary's motion is the
    other videos'."""
    shapes_video(tmp_path / "still.mp4", 2, seed=0, frames=1)
    shapes_video(tmp_path / "moving.mp4", 2, seed=1)
    report = evaluate(EvalConfig(videos=str(tmp_path), label=2))
    still, moving = report["per_video"]["still.mp4"], report["per_video"]["moving.mp4"]
    assert still["frames"] == 1 and still["count_accuracy"] == 1.0
    for key in ("mean_speed", "moving_fraction", "speed_ratio", "seam_ratio"):
        assert still[key] is None, key
    assert still["speed_pairs"] == 0
    summary = report["summary"]
    assert summary["moving_fraction"] == round(moving["moving_fraction"], 4) == 1.0
    assert summary["speed_ratio"] == round(moving["speed_ratio"], 4)
    assert summary["count_accuracy"] == round((1.0 + moving["count_accuracy"]) / 2, 4)
    assert summary["seam_ratio_no_seam"] == 1 and summary["videos"] == 2
    json.loads(report_json(report))


def test_a_scorer_without_frames_says_so():
    from vidgen.eval.scene import SceneScorer
    from vidgen.worlds.bouncing import BOUNCING_PALETTE

    with pytest.raises(ValueError, match="no frames were added"):
        SceneScorer(BOUNCING_PALETTE).result()
