import numpy as np
import pytest

from vidgen.worlds.bouncing import BouncingShapes, BouncingShapesConfig
from vidgen.worlds.palette import BACKGROUND, OBJECT_COLOURS

EXACT_AREA = {"circle": np.pi, "square": np.pi, "triangle": 3 * np.sqrt(3) / 4}  # x r^2


def test_same_seed_same_video_and_truth():
    a = BouncingShapes(seed=11).trajectory(40, start=7)
    b = BouncingShapes(seed=11).trajectory(40, start=7)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.positions, b.positions)
    assert (a.shapes, a.colours, a.label) == (b.shapes, b.colours, b.label)


def test_different_seeds_differ():
    a = BouncingShapes(seed=1).trajectory(8)
    b = BouncingShapes(seed=2).trajectory(8)
    assert not np.array_equal(a.frames, b.frames)


def test_label_is_number_of_shapes_with_distinct_colours():
    labels = set()
    for seed in range(40):
        world = BouncingShapes(seed=seed)
        assert 1 <= world.label <= 4 and len(world.shapes) == world.label
        assert len(set(world.colours)) == world.label
        labels.add(world.label)
    assert labels == {1, 2, 3, 4}
    assert BouncingShapes(BouncingShapesConfig(num_shapes=6), seed=0).label == 6


def test_physics_over_10000_frames():
    world = BouncingShapes(BouncingShapesConfig(num_shapes=4), seed=5)
    pos, vel = world.state(np.arange(10_000))  # (T, K, 2)
    lo, hi = world.bounds
    assert (pos >= lo - 1e-9).all() and (pos <= hi + 1e-9).all()
    # Speed is preserved exactly at every frame.
    np.testing.assert_allclose(np.linalg.norm(vel, axis=-1), world.speeds[None].repeat(10_000, 0))
    # One step of free flight, reflected at the walls, gives the next frame exactly.
    nxt = pos[:-1] + vel[:-1]
    over, under = nxt > hi, nxt < lo
    expected = np.where(over, 2 * hi - nxt, np.where(under, 2 * lo - nxt, nxt))
    np.testing.assert_allclose(pos[1:], expected, atol=1e-9)
    flipped = over | under
    np.testing.assert_allclose(vel[1:], np.where(flipped, -vel[:-1], vel[:-1]), atol=1e-12)
    assert flipped.sum() > 100  # the run really bounces, many times


def test_frames_use_only_palette_colours_and_shapes_stay_inside():
    world = BouncingShapes(BouncingShapesConfig(num_shapes=4), seed=9)
    traj = world.trajectory(200, start=9_800)
    allowed = {BACKGROUND, *(OBJECT_COLOURS[c] for c in world.colours)}
    seen = {tuple(int(v) for v in c) for c in np.unique(traj.frames.reshape(-1, 3), axis=0)}
    assert seen <= allowed
    for i, name in enumerate(world.colours):
        colour = np.array(OBJECT_COLOURS[name], dtype=np.uint8)
        mask = (traj.frames == colour).all(-1)
        clean = ~traj.occluded[:, i]
        # Unoccluded shapes are drawn whole, never cut by the border: their pixel count is
        # the shape's exact area up to rasterisation.
        area = EXACT_AREA[world.shapes[i]] * world.radii[i] ** 2
        areas = mask.sum(axis=(1, 2))[clean]
        assert clean.sum() > 50
        assert np.abs(areas / area - 1).max() < 0.2


def test_every_shape_bounces_where_its_outline_meets_the_wall():
    # Triangles and squares reach less far than their radius; they must still bounce on
    # contact, not off empty space.
    world = BouncingShapes(BouncingShapesConfig(num_shapes=4, min_speed=1.5), seed=2)
    traj = world.trajectory(1500)
    assert set(world.shapes) >= {"triangle"}
    for i, name in enumerate(world.colours):
        mask = (traj.frames == np.array(OBJECT_COLOURS[name], dtype=np.uint8)).all(-1)
        for axis, reduce_axis in ((0, 1), (1, 2)):  # x: columns, y: rows
            flips = np.nonzero(np.diff(np.sign(traj.velocities[:, i, axis])))[0]
            assert len(flips) > 2
            for t in flips:
                covered = mask[t : t + 2].any(axis=reduce_axis).any(axis=0)  # (size,)
                edge = np.nonzero(covered)[0]
                assert edge.min() <= 1 or edge.max() >= world.config.size - 2, (name, axis, t)


def test_iter_frames_matches_trajectory():
    world = BouncingShapes(seed=4)
    streamed = np.stack(list(world.iter_frames(50, start=3, chunk=16)))
    np.testing.assert_array_equal(streamed, world.trajectory(50, start=3).frames)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"size": 8}, "size"),
        ({"min_shapes": 3, "max_shapes": 2}, "min_shapes"),
        ({"num_shapes": 9}, "num_shapes"),
        ({"max_radius": 40.0}, "max_radius"),
        ({"size": 64.0}, "size must be an int"),
        ({"size": 100_000}, "size must be <= 4096 px"),  # a MemoryError traceback at a frame
        ({"num_shapes": True}, "num_shapes must be an int"),
        ({"max_speed": float("inf")}, "max_speed must be finite"),
        ({"min_radius": "5"}, "min_radius must be a number"),
        # a triangle this small can cover no pixel centre: drawn as nothing, counted anyway
        ({"min_radius": 1.0, "max_radius": 2.0}, r"need 1.414 <= min_radius"),
    ],
)
def test_bad_config_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BouncingShapesConfig(**kwargs)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda w: w.trajectory(2.5), "num_frames must be an int"),
        (lambda w: w.trajectory(2, start=1.5), "start must be an int"),
        (lambda w: w.iter_frames(-3), "num_frames must be >= 1"),
        (lambda w: w.iter_frames(4, start=-5), "start must be >= 0"),
        (lambda w: w.iter_frames(4, chunk=0), "chunk must be >= 1"),
        # Positions lose exactness past 2**40 (three equal frames of a moving world at 10**20).
        (lambda w: w.trajectory(3, start=10**20), r"start \+ num_frames must be at most 2\*\*40"),
        (lambda w: w.iter_frames(2, start=2**40 - 1), "must be at most 2"),
        (lambda w: BouncingShapes(seed=-1), "seed must be >= 0"),
        (lambda w: BouncingShapes(seed=1.7), "seed must be an int"),
        (lambda w: BouncingShapes({"size": 32}), "config must be a BouncingShapesConfig"),
    ],
)
def test_bad_arguments_name_themselves_when_called(call, message):
    # iter_frames is checked when called, not at the first frame drawn from it.
    with pytest.raises(ValueError, match=message):
        call(BouncingShapes(seed=0))
