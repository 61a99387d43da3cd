"""Attention masks: boolean tensors (True = may attend), each convertible to a FlexAttention
block mask.

Sequences are split into *blocks* (the unit of causality: a frame for the DiT's temporal
attention, ``block_size`` tokens for NBP) and *groups* of blocks (the unit of cache eviction:
a clip). Block i sees block j iff j <= i; the banded variant also drops groups that had left
the window by the time block i was written (DESIGN.md section 3: the reference that cached
inference is compared against).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from vidgen.validate import check_int

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _check_positive(**values: int) -> None:
    # Ints: a float size made a mask of another length (4.5 -> 5) or uneven blocks (1.5).
    for name, value in values.items():
        check_int(name, value, minimum=1)


def block_causal_mod(block_size: int, prefix_len: int = 0) -> MaskMod:
    """The ``mask_mod`` of ``block_causal_mask`` (index arithmetic, no dense tensor)."""

    def block(idx: torch.Tensor) -> torch.Tensor:
        return torch.where(
            idx < prefix_len, -1, torch.div(idx - prefix_len, block_size, rounding_mode="floor")
        )

    def mask_mod(b, h, q_idx, kv_idx):
        return block(kv_idx) <= block(q_idx)

    return mask_mod


def banded_mod(block_size: int, window: int, group_size: int) -> MaskMod:
    """The ``mask_mod`` of ``banded_block_mask``."""

    def mask_mod(b, h, q_idx, kv_idx):
        causal = kv_idx // block_size <= q_idx // block_size
        return causal & (kv_idx // group_size >= q_idx // group_size - window)

    return mask_mod


def _dense(mod: MaskMod, seq_len: int, device) -> torch.Tensor:
    idx = torch.arange(seq_len, device=device)
    zero = torch.zeros((), dtype=torch.long, device=device)
    return mod(zero, zero, idx[:, None], idx[None, :])[None, None]


def _flex(mod: MaskMod, seq_len: int, device, tile: int):
    from torch.nn.attention.flex_attention import create_block_mask

    device = torch.device("cpu") if device is None else torch.device(device)
    return create_block_mask(mod, None, None, seq_len, seq_len, device=device, BLOCK_SIZE=tile)


def block_causal_mask(
    seq_len: int,
    block_size: int,
    prefix_len: int = 0,
    device: torch.device | str | None = None,
    flex: bool = False,
    tile: int = 128,
):
    """(1, 1, L, L) bool: position i sees j iff block(j) <= block(i). The first
    ``prefix_len`` positions form a prefix that every position sees (and that sees only the
    prefix); the rest is split into blocks of ``block_size`` (the last may be shorter). Block
    size 1 is plain causal attention. ``flex=True`` returns the same mask as a FlexAttention
    ``BlockMask`` built from index arithmetic (no L x L tensor) with ``tile``-sized tiles."""
    _check_positive(seq_len=seq_len, block_size=block_size)
    if not 0 <= check_int("prefix_len", prefix_len) <= seq_len:
        raise ValueError(f"prefix_len must be in [0, seq_len={seq_len}], got {prefix_len}")
    mod = block_causal_mod(block_size, prefix_len)
    return _flex(mod, seq_len, device, tile) if flex else _dense(mod, seq_len, device)


def banded_block_mask(
    seq_len: int,
    block_size: int,
    window: int,
    group_size: int | None = None,
    device: torch.device | str | None = None,
    flex: bool = False,
    tile: int = 128,
):
    """(1, 1, L, L) bool: block-causal, and block i sees only the ``window`` groups before
    its own group (plus its own group up to itself). A group is ``group_size`` positions
    (default one block, so block i sees blocks i-window..i). With group_size = a clip and a
    window of W clips this is the banded whole-history reference for a cache of W clips.
    ``flex=True`` as in ``block_causal_mask``."""
    group_size = block_size if group_size is None else group_size
    _check_positive(seq_len=seq_len, block_size=block_size, group_size=group_size)
    check_int("window", window, minimum=0)
    if group_size % block_size:
        raise ValueError(f"group_size={group_size} must be a multiple of block_size={block_size}")
    mod = banded_mod(block_size, window, group_size)
    return _flex(mod, seq_len, device, tile) if flex else _dense(mod, seq_len, device)


def key_padding_mask(
    lengths: Sequence[int] | torch.Tensor, key_len: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """(B, 1, 1, Lk): row b may attend to the first ``lengths[b]`` keys."""
    key_len = check_int("key_len", key_len, minimum=0)  # 2.5 made a mask over 3 keys
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.numel() == 0 and lengths.ndim == 1:  # an empty batch: as_tensor([]) is float
        lengths = lengths.long()
    if lengths.dtype == torch.bool or lengths.is_floating_point() or lengths.is_complex():
        raise ValueError(f"lengths must be integers (key counts), got {lengths.dtype}")
    if lengths.ndim != 1:
        raise ValueError(
            f"lengths must be 1-D (one per batch row), got shape {tuple(lengths.shape)}"
        )
    if (lengths < 0).any() or (lengths > key_len).any():
        raise ValueError(f"lengths must be in [0, key_len={key_len}], got {lengths.tolist()}")
    return (torch.arange(key_len, device=lengths.device)[None, :] < lengths[:, None])[:, None, None]


def dense_mask_mod(mask: torch.Tensor) -> MaskMod:
    """A FlexAttention ``mask_mod`` that looks up a boolean (B or 1, 1, Lq, Lk) mask."""
    if mask.dtype != torch.bool or mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(
            f"mask must be a boolean (B or 1, 1, Lq, Lk) tensor, got {mask.dtype} "
            f"{tuple(mask.shape)}"
        )
    per_batch = mask.shape[0] > 1

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[b if per_batch else 0, 0, q_idx, kv_idx]

    return mask_mod


def to_block_mask(mask: torch.Tensor, block_size: int = 128):
    """Convert a boolean (B or 1, 1, Lq, Lk) mask to a FlexAttention ``BlockMask`` (whose
    ``BLOCK_SIZE`` tiles let the fused kernel skip fully masked tiles)."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, _, q_len, kv_len = mask.shape
    return create_block_mask(
        dense_mask_mod(mask),
        B=batch if batch > 1 else None,
        H=None,
        Q_LEN=q_len,
        KV_LEN=kv_len,
        device=mask.device,
        BLOCK_SIZE=block_size,
    )
