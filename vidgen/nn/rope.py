"""Rotary position embeddings (RoPE), applied to queries and keys *after* the cache is read.

Keys are cached unrotated. Each attention call rotates them with positions relative to the
start of the current window, so evicting a clip never invalidates a cached key and no video
runs out of positions: q·k under RoPE depends only on the difference of the two positions,
so window-relative positions give the same attention as absolute ones (DESIGN.md section 5).

Axis letters: ``l`` sequence, ``d`` head dim (split in two halves that rotate together).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

DEFAULT_THETA = 10_000.0


def rope_angles(positions: torch.Tensor, dim: int, theta: float = DEFAULT_THETA) -> torch.Tensor:
    """(..., dim/2) float64 rotation angles ``position * theta^(-2i/dim)`` for any (int or
    float) positions of shape (...). float64 because a float32 angle of a large absolute
    position (the banded reference over a long history) is only accurate to ~1e-2 rad."""
    if dim % 2:
        raise ValueError(f"RoPE dim must be even, got {dim}")
    inv_freq = theta ** (
        -torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim
    )
    return positions.to(torch.float64)[..., None] * inv_freq


class Rotation(NamedTuple):
    """cos and sin of RoPE angles (float64, as the angles), computed once for every
    ``apply_rope`` that uses them (a model's layers all rotate by the same positions).

    ``for_dtype`` also lays them out over the whole head dim (``cos_full`` = [cos | cos],
    ``sin_full`` = [-sin | sin]), so that each call rotates in four operations:
    ``x * cos_full + swap_halves(x) * sin_full``."""

    cos: torch.Tensor
    sin: torch.Tensor
    cos_full: torch.Tensor | None = None
    sin_full: torch.Tensor | None = None

    @classmethod
    def of(cls, angles: torch.Tensor) -> Rotation:
        return cls(angles.cos(), angles.sin())

    @property
    def shape(self) -> torch.Size:
        return self.cos.shape

    def for_dtype(self, dtype: torch.dtype) -> Rotation:
        """The cos and sin as ``apply_rope`` uses them on tensors of ``dtype`` (float32, or
        float64 for float64): converted once here, not again in every call that shares
        them, with their full-width layouts. The values ``apply_rope`` computes with are the
        same either way, bit for bit."""
        work = torch.promote_types(dtype, torch.float32)
        cos, sin = self.cos.to(work), self.sin.to(work)
        return Rotation(cos, sin, torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1))


def apply_rope(x: torch.Tensor, angles: torch.Tensor | Rotation) -> torch.Tensor:
    """Rotate (..., L, D) by angles broadcastable to (..., L, D/2) (rotate-half convention:
    dims i and i + D/2 form a pair), or by their ``Rotation`` (the same values, without
    the trigonometry)."""
    if x.shape[-1] % 2:
        raise ValueError(f"x's head dim must be even (rotated in pairs), got {x.shape[-1]}")
    half = x.shape[-1] // 2
    if angles.shape[-1] != half:
        raise ValueError(f"angles must end in head_dim/2 = {half}, got {tuple(angles.shape)}")
    if len(angles.shape) >= 2 and angles.shape[-2] not in (1, x.shape[-2]):
        # A raw broadcast error named neither: positions for 4 tokens on 3.
        raise ValueError(
            f"angles are for {angles.shape[-2]} positions, x has {x.shape[-2]} "
            f"(x {tuple(x.shape)}, angles {tuple(angles.shape)})"
        )
    work = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 x
    rot = angles if isinstance(angles, Rotation) else Rotation.of(angles)  # trig in float64
    if rot.cos_full is not None and rot.cos_full.dtype == work:
        # The same products and sums as below, bit for bit: x1 * cos + x2 * (-sin) is
        # x1 * cos - x2 * sin exactly, and x2 * cos + x1 * sin is x1 * sin + x2 * cos.
        xw = x.to(work)
        swapped = torch.cat([xw[..., half:], xw[..., :half]], dim=-1)
        return (xw * rot.cos_full + swapped * rot.sin_full).to(x.dtype)
    cos, sin = rot.cos.to(work), rot.sin.to(work)
    x1, x2 = x[..., :half].to(work), x[..., half:].to(work)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


class RoPE1D:
    """1-D RoPE over one position per token (frame index, or token index)."""

    def __init__(self, dim: int, theta: float = DEFAULT_THETA) -> None:
        if dim % 2:
            raise ValueError(f"RoPE1D dim must be even, got {dim}")
        self.dim, self.theta = dim, theta

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """(..., L) positions -> (..., L, dim/2) angles."""
        return rope_angles(positions, self.dim, self.theta)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return apply_rope(x, self.angles(positions))


class RoPE3D:
    """3-D RoPE: the head dim is split into (time, height, width) parts, each rotated by its
    own coordinate. Default split: height and width get 2*(dim//6) each, time the rest."""

    def __init__(
        self, dim: int, split: tuple[int, int, int] | None = None, theta: float = DEFAULT_THETA
    ) -> None:
        if split is None:
            side = 2 * (dim // 6)
            split = (dim - 2 * side, side, side)
        if sum(split) != dim or any(s <= 0 or s % 2 for s in split):
            raise ValueError(
                f"split must be three positive even parts summing to {dim}, got {split}"
            )
        self.dim, self.split, self.theta = dim, tuple(split), theta

    def angles(self, t: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Coordinates of shape (..., L) each -> (..., L, dim/2) angles."""
        parts = [rope_angles(p, d, self.theta) for p, d in zip((t, h, w), self.split, strict=True)]
        return torch.cat(parts, dim=-1)

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor, w: torch.Tensor
    ) -> torch.Tensor:
        return apply_rope(x, self.angles(t, h, w))
