import numpy as np
import pytest

from vidgen.eval.scene import (
    SceneScorer,
    centroid_error,
    count_accuracy,
    detect_objects,
    motion_stats,
    scene_metrics,
    seam_ratio,
    summarize_seams,
)
from vidgen.io import VideoWriter, read_video
from vidgen.worlds.agent import AGENT_PALETTE, AgentWorldConfig, generate_trajectory
from vidgen.worlds.bouncing import BOUNCING_PALETTE, BouncingShapes, BouncingShapesConfig


@pytest.fixture(scope="module")
def shapes():
    world = BouncingShapes(BouncingShapesConfig(num_shapes=3), seed=21)
    return world, world.trajectory(256)


def test_centroids_recovered_within_one_pixel(shapes):
    _world, traj = shapes
    err = centroid_error(
        traj.frames, traj.positions, traj.colours, BOUNCING_PALETTE, valid=~traj.occluded
    )
    assert err["missed"] == 0.0
    assert err["max"] < 1.0 and err["mean"] < 0.5


def test_agent_centroids_recovered_within_one_pixel():
    traj = generate_trajectory(AgentWorldConfig(), seed=3, num_frames=128, policy="push")
    positions = np.stack([traj.agent, traj.box], axis=1)
    err = centroid_error(traj.frames, positions, ("agent", "box"), AGENT_PALETTE)
    assert err["missed"] == 0.0 and err["max"] < 1.0


def test_count_accuracy(shapes):
    world, traj = shapes
    assert count_accuracy(traj.frames, world.label, BOUNCING_PALETTE) > 0.95
    assert count_accuracy(traj.frames, world.label + 1, BOUNCING_PALETTE) < 0.05
    per_frame = np.full(len(traj.frames), world.label)
    assert count_accuracy(traj.frames, per_frame, BOUNCING_PALETTE) > 0.95
    with pytest.raises(ValueError, match="expected must be an int >= 0 or one such count"):
        count_accuracy(traj.frames, per_frame[:10], BOUNCING_PALETTE)
    for bad in (None, "2", 2.5, -1):  # each scored 0.0 without a word
        with pytest.raises(ValueError, match="expected must be an int >= 0"):
            count_accuracy(traj.frames, bad, BOUNCING_PALETTE)


def test_detection_survives_h264(tmp_path, shapes):
    _world, traj = shapes
    path = tmp_path / "clip.mp4"
    with VideoWriter(path) as writer:
        writer.write(traj.frames[:64])
    decoded = read_video(path)
    err = centroid_error(
        decoded, traj.positions[:64], traj.colours, BOUNCING_PALETTE, valid=~traj.occluded[:64]
    )
    assert err["missed"] == 0.0 and err["mean"] < 1.0


def test_motion_of_real_video_matches_truth(shapes):
    world, traj = shapes
    stats = motion_stats(traj.frames, BOUNCING_PALETTE)
    assert stats.moving_fraction == 1.0
    assert 0.9 < stats.mean_speed / world.speeds.mean() < 1.1
    assert set(stats.per_object_speed) == set(world.colours)


def test_frozen_video_is_flagged(shapes):
    world, traj = shapes
    frozen = np.repeat(traj.frames[:1], 64, axis=0)
    metrics = scene_metrics(frozen, BOUNCING_PALETTE, world.label, clip_len=8, true_speed=1.5)
    assert metrics["moving_fraction"] == 0.0
    assert metrics["speed_ratio"] == 0.0
    assert metrics["seam_ratio"] is None  # undefined, not 1.0
    assert metrics["count_accuracy"] == 1.0  # the objects are there; they just never move


@pytest.mark.parametrize("shape", [(4, 0, 8, 3), (4, 8, 0, 3)])
def test_frames_without_pixels_are_refused(shape):
    """A ZeroDivisionError from detect_objects and scene_metrics; NaN from seam_ratio, whose
    contract is a number or None."""
    frames = np.zeros(shape, np.uint8)
    for call in (
        lambda: detect_objects(frames, BOUNCING_PALETTE),
        lambda: scene_metrics(frames, BOUNCING_PALETTE, 1, clip_len=2),
        lambda: seam_ratio(frames, clip_len=2),
    ):
        with pytest.raises(ValueError, match=r"must have H, W >= 1"):
            call()


def test_an_empty_video_has_no_speed_ratio_rather_than_zero(shapes):
    """No object seen in two consecutive frames: no speed to measure. It scored 0, which a
    mean over videos took as a perfectly still one (pulling ratios of 3 towards 1)."""
    world, traj = shapes
    empty = np.repeat(np.zeros_like(traj.frames[:1]), 64, axis=0)
    metrics = scene_metrics(empty, BOUNCING_PALETTE, world.label, clip_len=8, true_speed=1.5)
    assert metrics["speed_ratio"] is None and metrics["moving_fraction"] == 0.0
    # One visible frame in each clip: still no pair, so still no speed.
    blinking = empty.copy()
    blinking[::8] = traj.frames[:64:8]
    metrics = scene_metrics(blinking, BOUNCING_PALETTE, world.label, clip_len=8, true_speed=1.5)
    assert metrics["speed_ratio"] is None


def test_seam_ratio_continuous_vs_spliced(shapes):
    _world, traj = shapes
    assert 0.8 < seam_ratio(traj.frames, clip_len=8) < 1.25
    spliced = np.concatenate(
        [
            BouncingShapes(BouncingShapesConfig(num_shapes=3), seed=s).trajectory(8).frames
            for s in range(32)
        ]
    )
    assert seam_ratio(spliced, clip_len=8) > 3.0


def test_seam_ratio_sees_a_single_jump(shapes):
    # One clip replaced by frames from much later: its two seams jump, so the ratio rises.
    _world, traj = shapes
    frames = traj.frames[:64].copy()
    frames[32:40] = traj.frames[100:108]
    assert seam_ratio(frames, clip_len=8) > seam_ratio(traj.frames[:64], clip_len=8) * 1.5


def test_seam_ratio_of_a_slideshow_is_infinite(shapes):
    _world, traj = shapes
    slideshow = np.repeat(traj.frames[::8][:8], 8, axis=0)  # frozen within clips, jumps at seams
    assert seam_ratio(slideshow, clip_len=8) == float("inf")


@pytest.mark.parametrize("threshold", [0.0, -1.0, float("nan"), "1"])
def test_seam_ratio_refuses_a_static_threshold_that_is_not_above_zero(threshold):
    """At 0 or less no video was still, and a frozen one scored 0 / 0: nan, not None."""
    frozen = np.full((24, 8, 8, 3), 20, np.uint8)
    assert seam_ratio(frozen, clip_len=8) is None
    with pytest.raises(ValueError, match="static_threshold must be"):
        seam_ratio(frozen, clip_len=8, static_threshold=threshold)


def test_pooled_seams_count_slideshows_and_frozen_videos_apart(shapes):
    _world, traj = shapes
    real = seam_ratio(traj.frames[:64], clip_len=8)
    slideshow = seam_ratio(np.repeat(traj.frames[::8][:8], 8, axis=0), clip_len=8)
    frozen = seam_ratio(np.repeat(traj.frames[:1], 64, axis=0), clip_len=8)
    assert frozen is None
    pooled = summarize_seams([real, slideshow, frozen, real])
    assert pooled == {"mean": pytest.approx(real), "infinite": 1, "undefined": 1}
    assert summarize_seams([slideshow, frozen]) == {"mean": None, "infinite": 1, "undefined": 1}


@pytest.mark.parametrize("seed", [3, 4])
def test_count_accuracy_survives_h264(tmp_path, seed):
    # Clean accuracy is below 1 where shapes hide each other; h264 must not cost much more.
    world = BouncingShapes(BouncingShapesConfig(num_shapes=4), seed=seed)
    frames = world.trajectory(96).frames
    path = tmp_path / "clip.mp4"
    with VideoWriter(path) as writer:
        writer.write(frames)
    clean = count_accuracy(frames, 4, BOUNCING_PALETTE)
    decoded = count_accuracy(read_video(path), 4, BOUNCING_PALETTE)
    assert clean > 0.85 and decoded > clean - 0.1


def test_min_blob_ignores_specks_and_keeps_objects():
    frame = np.zeros((1, 32, 32, 3), np.uint8)
    frame[:] = BOUNCING_PALETTE.scenery[0]
    red, blue = BOUNCING_PALETTE.objects["red"], BOUNCING_PALETTE.objects["blue"]
    for y, x in [(2, 2), (2, 9), (9, 2), (20, 25), (28, 5), (15, 15), (5, 28), (25, 12)]:
        frame[0, y, x] = red  # 8 scattered red pixels: noise, not an object
    frame[0, 10:15, 20:24] = blue  # 20 pixels in one blob: an object
    det = detect_objects(frame, BOUNCING_PALETTE)
    assert det.counts.tolist() == [1]
    assert det.present[0, det.index("blue")] and not det.present[0, det.index("red")]
    np.testing.assert_allclose(det.centroids[0, det.index("blue")], [21.5, 12.0])
    # A colour far from every palette entry is nobody's pixel.
    frame[0, 10:15, 20:24] = (128, 128, 20)
    assert detect_objects(frame, BOUNCING_PALETTE).counts.tolist() == [0]


def test_bad_inputs():
    with pytest.raises(ValueError, match="uint8"):
        detect_objects(np.zeros((2, 8, 8, 3), np.float32), BOUNCING_PALETTE)
    with pytest.raises(ValueError, match="more than one clip"):
        seam_ratio(np.zeros((8, 8, 8, 3), np.uint8), clip_len=8)
    with pytest.raises(ValueError, match="clip_len must be >= 2"):
        seam_ratio(np.zeros((8, 8, 8, 3), np.uint8), clip_len=1)
    with pytest.raises(ValueError, match="palette"):
        count_accuracy(np.zeros((2, 8, 8, 3), np.uint8), 1)


def test_motion_inside_clips_leaves_the_seams_to_the_seam_ratio(shapes):
    """A slideshow (each clip one frame held, jumping at the seams) does not move; objects
    that teleport at every seam are not counted fast. Without ``clip_len`` both would be."""
    world, traj = shapes
    slideshow = np.repeat(traj.frames[::8][:16], 8, axis=0)  # 128 frames, frozen in clips
    assert motion_stats(slideshow, BOUNCING_PALETTE).mean_speed > 1.0  # the seams' jumps
    held = motion_stats(slideshow, BOUNCING_PALETTE, clip_len=8)
    assert held.mean_speed == 0.0 and held.moving_fraction == 0.0 and held.transitions == 112
    teleport = np.concatenate([traj.frames[i * 16 : i * 16 + 8] for i in range(16)])
    truth = world.speeds.mean()
    assert motion_stats(teleport, BOUNCING_PALETTE).mean_speed / truth > 1.3
    assert 0.9 < motion_stats(teleport, BOUNCING_PALETTE, clip_len=8).mean_speed / truth < 1.1
    metrics = scene_metrics(teleport, BOUNCING_PALETTE, world.label, clip_len=8, true_speed=truth)
    assert 0.9 < metrics["speed_ratio"] < 1.1 and metrics["seam_ratio"] > 2.0
    with pytest.raises(ValueError, match="clip_len"):
        motion_stats(slideshow, BOUNCING_PALETTE, clip_len=1)


def test_a_blurred_edge_between_two_objects_is_not_a_third_object():
    """Red and yellow blur into colours nearest orange: a thin band, not an object."""
    from scipy import ndimage

    from vidgen.worlds.palette import BACKGROUND, OBJECT_COLOURS

    yy, xx = np.mgrid[:64, :64]
    frame = np.empty((64, 64, 3), np.uint8)
    frame[:] = BACKGROUND
    frame[(xx - 26) ** 2 + (yy - 32) ** 2 <= 12**2] = OBJECT_COLOURS["red"]
    frame[(abs(xx - 36) <= 9) & (abs(yy - 32) <= 9)] = OBJECT_COLOURS["yellow"]
    for sigma in (0.7, 1.0, 1.5):
        blurred = np.stack(
            [ndimage.gaussian_filter(frame[..., c].astype(float), sigma) for c in range(3)], -1
        )
        det = detect_objects(np.round(blurred)[None].astype(np.uint8), BOUNCING_PALETTE)
        assert det.counts.tolist() == [2], sigma
        assert not det.present[0, det.index("orange")]


def test_metric_arguments_that_gave_silently_wrong_figures_are_refused(shapes):
    _world, traj = shapes
    frames = traj.frames[:16]
    names = list(traj.colours)
    positions = traj.positions[:16]
    ok = np.ones(positions.shape[:2], dtype=bool)
    assert centroid_error(frames, positions, names, BOUNCING_PALETTE, valid=ok)["missed"] >= 0
    # An int mask indexed instead of masking; a (K,) mask broadcast ("missed" came out -1).
    for bad in (ok.astype(int), ok[0]):
        with pytest.raises(ValueError, match="valid must be bool of shape"):
            centroid_error(frames, positions, names, BOUNCING_PALETTE, valid=bad)
    # A float clip length marked the wrong transitions as seams.
    with pytest.raises(ValueError, match="clip_len must be an int"):
        seam_ratio(frames, 4.5)
    with pytest.raises(ValueError, match="clip_len must be an int"):
        motion_stats(frames, BOUNCING_PALETTE, clip_len=4.5)


def _square(frame: np.ndarray, colour: np.ndarray, x: int, y: int, side: int = 8) -> None:
    frame[y : y + side, x : x + side] = colour


def test_two_blobs_of_one_colour_are_two_objects_and_motion_follows_one_of_them():
    """Each colour counted once: two red squares and a blue one scored as 2 objects (right
    for label 2, wrong for 3). And the centroid followed whichever blob was largest, so two
    red squares swapping sizes counted as a jump across the frame each time."""
    red, blue = (BOUNCING_PALETTE.colours()[i].astype(np.uint8) for i in (0, 2))
    frames = np.zeros((12, 64, 64, 3), np.uint8)
    for t in range(12):
        _square(frames[t], red, 4 + t, 4, side=8 + (t % 2))  # moves 1 px per frame
        _square(frames[t], red, 40, 40, side=9 - (t % 2))  # still; sizes alternate
        _square(frames[t], blue, 40, 4)
    det = detect_objects(frames, BOUNCING_PALETTE)
    assert det.counts.tolist() == [3] * 12
    assert count_accuracy(det, 3) == 1.0 and count_accuracy(det, 2) == 0.0
    motion = motion_stats(det)
    assert motion.per_object_speed[det.names[0]] < 1.5  # the moving red one, not jumps
    assert motion.mean_speed < 1.0


def test_a_shape_cut_in_two_by_another_passing_over_it_is_one_object():
    """Counting every blob made a real occlusion two objects: a bar over the middle of a
    square leaves two pieces of its colour, joined through the bar."""
    red, blue = (BOUNCING_PALETTE.colours()[i].astype(np.uint8) for i in (0, 2))
    frame = np.zeros((1, 64, 64, 3), np.uint8)
    _square(frame[0], red, 10, 10, side=20)
    frame[0, 8:32, 18:22] = blue  # a bar across it: two red pieces either side
    _square(frame[0], red, 44, 44, side=8)  # a red duplicate apart: a second red object
    det = detect_objects(frame, BOUNCING_PALETTE)
    assert det.blobs[0, 0] == 2 and det.counts.tolist() == [3]


def test_an_empty_flickering_video_has_no_seam_ratio():
    """A nearly black generated video changes by 0.01 levels: its seam ratio (0.06-0.8)
    entered the mean as better than perfect."""
    rng = np.random.default_rng(0)
    frames = (rng.random((32, 64, 64, 3)) < 0.002).astype(np.uint8) * 3  # faint specks
    assert seam_ratio(frames, 8) is None
    assert scene_metrics(frames, BOUNCING_PALETTE, 1, 8, 1.5)["seam_ratio"] is None


def _duplicate_video() -> np.ndarray:
    """A red square that moves 1 px per frame and, from frame 3, a larger red one that
    stays far away: the one followed is the moving one (seen first), never the larger."""
    background = np.array(BOUNCING_PALETTE.scenery[0], np.uint8)
    red = np.array(BOUNCING_PALETTE.objects["red"], np.uint8)
    frames = np.broadcast_to(background, (24, 48, 48, 3)).copy()
    for t in range(24):
        frames[t, 4:10, 4 + t : 10 + t] = red
        if t >= 3:
            frames[t, 30:44, 30:44] = red
    return frames


@pytest.mark.parametrize("pieces", [[24], [1, 7, 5, 11], [5, 19], [8, 8, 8]])
def test_a_video_scored_in_pieces_scores_as_a_whole(shapes, pieces):
    world, traj = shapes
    teleport = traj.frames[:24].copy()
    teleport[8:16] = traj.frames[100:108]  # a seam that jumps
    for video, label in [(teleport, world.label), (_duplicate_video(), 1)]:
        whole = scene_metrics(video, BOUNCING_PALETTE, label, clip_len=4, true_speed=1.5)
        scorer = SceneScorer(BOUNCING_PALETTE, label, clip_len=4, true_speed=1.5)
        for lo, hi in zip(np.cumsum([0, *pieces[:-1]]), np.cumsum(pieces), strict=True):
            scorer.add(video[lo:hi])
        assert scorer.frames == len(video)
        assert scorer.result() == pytest.approx(whole, rel=1e-12)
    # The moving square is followed across every piece: 1 px per frame inside the clips.
    assert scorer.result()["mean_speed"] == pytest.approx(1.0)


def test_the_scorer_refuses_what_does_not_continue_the_video():
    scorer = SceneScorer(BOUNCING_PALETTE, 1, clip_len=4)
    scorer.add(_duplicate_video()[:3])
    with pytest.raises(ValueError, match="frames must keep the video's frame size"):
        scorer.add(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="clip_len must be in"):
        scorer.result()  # 3 frames, clips of 4
    scorer.add(_duplicate_video()[3:4])
    with pytest.raises(ValueError, match="seam ratio needs more than one clip"):
        scorer.result()
    for bad in (1, 2.5):
        with pytest.raises(ValueError, match="clip_len must be"):
            SceneScorer(BOUNCING_PALETTE, clip_len=bad)
    with pytest.raises(ValueError, match="expected_count must be"):
        SceneScorer(BOUNCING_PALETTE, expected_count=-1)


@pytest.mark.parametrize("shape", [(3, 9, 7), (2, 600, 500)])  # one chunk; frames in chunks
def test_classify_pixels_is_the_nearest_palette_colour_first_on_ties(shape):
    """Each pixel's label is the argmin of its squared distances to the palette's colours
    (the first on a tie), -1 past the distance limit, whatever the frame size."""
    from vidgen.eval.scene import classify_pixels, default_max_distance

    rng = np.random.default_rng(0)
    colours = BOUNCING_PALETTE.colours()
    frames = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    frames[:, 0] = colours[rng.integers(0, len(colours), shape[::2])].astype(np.uint8)
    frames[:, 1, :] = ((colours[0] + colours[1]) // 2).astype(np.uint8)  # ties
    dist = ((frames[..., None, :].astype(np.float32) - colours) ** 2).sum(-1)  # float32, exact
    want = dist.argmin(-1)
    want[dist.min(-1) > default_max_distance(BOUNCING_PALETTE) ** 2] = -1
    got = classify_pixels(frames, BOUNCING_PALETTE)
    assert got.shape == shape and (got == -1).any() and (got >= 0).any()
    np.testing.assert_array_equal(got, want)


def test_a_moving_video_of_large_frames_has_a_seam_ratio():
    """The still-video level was a mean over all pixels: at 256x256 one moving shape
    changes it 16 times less than at 64x64, and its videos were counted as never changing
    (seam ratio None). Pixels that move say so at any size; a still or flickering video stays
    None."""
    from vidgen.eval.scene import SceneScorer, seam_ratio

    for size in (64, 256):
        config = BouncingShapesConfig(num_shapes=1, size=size)
        frames = BouncingShapes(config, seed=0).trajectory(40).frames
        whole = seam_ratio(frames, 8)
        scorer = SceneScorer(BOUNCING_PALETTE, clip_len=8)
        scorer.add(frames)
        assert 0.8 < whole < 1.25 and scorer.result()["seam_ratio"] == pytest.approx(whole)
        still = np.repeat(frames[:1], 40, axis=0)
        assert seam_ratio(still, 8) is None
        # Flicker of a level on 2% of the pixels: no motion at any size (the mean over the
        # pixels is the same at every size; a level scaled down by area took it for some).
        rng = np.random.default_rng(0)
        flicker = still.astype(np.int16) + (rng.random(still.shape[:3]) < 0.02)[..., None]
        flicker = np.clip(flicker, 0, 255).astype(np.uint8)
        assert seam_ratio(flicker, 8) is None
        scorer = SceneScorer(BOUNCING_PALETTE, clip_len=8)
        scorer.add(flicker)
        assert scorer.result()["seam_ratio"] is None
        # Lone bright specks on black, two a frame: each counted as it came and went, they
        # made the video 'move' (a ratio of 1.0 from noise).
        specks = np.zeros((40, size, size, 3), np.uint8)
        for t in range(40):
            y, x = rng.integers(0, size, 2), rng.integers(0, size, 2)
            specks[t, y, x] = 40
        assert seam_ratio(specks, 8) is None
