"""One attention entry point for every model, over several backends.

    out = attention(q, k, v, mask=None, backend="auto")   # q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D)

``mask`` is a boolean (B or 1, 1, Lq or 1, Lk) tensor (True = may attend; a (B, 1, 1, Lk) key
padding mask broadcasts over queries) or a FlexAttention
``BlockMask``. ``causal=True`` (with no mask) is causal attention aligned to the last key:
query i sees keys up to ``Lk - Lq + i`` (a clip after a full cache: every cached key, and its
own frames causally); ``sdpa`` runs it with ``is_causal`` when Lq == Lk, else with torch's
lower-right ``CausalBias`` on GPUs (it takes the fused kernels there) and a mask tensor made
once per shape on the CPU (where the bias rebuilds one at every call). Backends (DESIGN.md
section 5):

- ``sdpa``: torch ``scaled_dot_product_attention``, the default. With no mask it runs the
  fused flash/efficient kernels; cached inference of full caches needs no mask.
- ``flex``: FlexAttention, for block-causal training on GPU, where it is compiled (the
  compiled kernel skips masked tiles); on CPU it runs eagerly (tests).
- ``xformers``: ``memory_efficient_attention``, only when its compiled extension loads and
  the tensors are on CUDA.
- ``math``: an explicit softmax(QK^T)V in the input dtype: the readable reference.
- ``auto``: ``flex`` for a ``BlockMask``, else ``sdpa``.

Asking for a backend that cannot run raises ``BackendUnavailable`` saying why; nothing falls
back silently.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F

from vidgen.nn.masks import to_block_mask

Backend = Literal["auto", "sdpa", "flex", "xformers", "math"]
BACKENDS: tuple[str, ...] = ("sdpa", "flex", "xformers", "math")


class BackendUnavailable(RuntimeError):
    """The requested attention backend cannot run here; the message says why."""


@functools.cache
def _flex_import_error() -> str | None:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError as err:
        return f"FlexAttention needs torch >= 2.5 ({err})"
    return None


@functools.cache
def _xformers_import_error() -> str | None:
    try:
        import xformers.ops  # noqa: F401
        from xformers.ops import fmha
    except ImportError as err:
        return f"xformers is not installed (pip install 'vidgen[gpu]'): {err}"
    except Exception as err:  # its extension can fail to load against another torch build
        return f"xformers failed to load its compiled extension: {err}"
    try:
        if not fmha.cutlass.FwOp.is_available() and not fmha.flash.FwOp.is_available():
            return "xformers loaded but none of its attention kernels is built for this torch"
    except Exception as err:
        return f"xformers kernels could not be queried: {err}"
    return None


def backend_unavailable_reason(backend: str, device: torch.device | str = "cpu") -> str | None:
    """Why ``backend`` cannot run on ``device``, or None if it can."""
    device = torch.device(device)
    if backend in ("auto", "sdpa", "math"):  # auto falls back to sdpa, which always runs
        return None
    if backend == "flex":
        return _flex_import_error()
    if backend == "xformers":
        if device.type != "cuda":
            return f"xformers kernels need CUDA tensors, got device {device}"
        return _xformers_import_error()
    raise ValueError(f"backend must be one of {['auto', *BACKENDS]}, got {backend!r}")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on ``device``."""
    return [b for b in BACKENDS if backend_unavailable_reason(b, device) is None]


def _is_block_mask(mask: Any) -> bool:
    return type(mask).__name__ == "BlockMask"


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "q, k, v must be (B, heads, L, head_dim), got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"k and v must match each other and q in batch and head_dim: q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")
    if mask is None or _is_block_mask(mask):
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.ndim != 4:
        raise ValueError(
            "mask must be None, a boolean (B or 1, 1, Lq, Lk) tensor or a FlexAttention "
            f"BlockMask, got {type(mask).__name__} {getattr(mask, 'dtype', '')}"
        )
    lq, lk = q.shape[2], k.shape[2]
    b, one, mq, mk = mask.shape
    if b not in (1, q.shape[0]) or one != 1 or mq not in (1, lq) or mk != lk:
        raise ValueError(
            f"mask must be ({q.shape[0]} or 1, 1, {lq} or 1, {lk}), got {tuple(mask.shape)}"
        )


def _repeat_kv(k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention: each kv head serves heads // kv_heads query heads."""
    groups = heads // k.shape[1]
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def _math(q, k, v, mask, scale: float) -> torch.Tensor:
    k, v = _repeat_kv(k, v, q.shape[1])
    # Scaled before the product, as sdpa does: in float16 q.k itself can pass 65504 where
    # q.k * scale does not.
    scores = (q * scale) @ k.transpose(-1, -2)  # (B, H, Lq, Lk)
    if mask is None:
        return scores.softmax(dim=-1) @ v
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    # A query that sees no key gets zeros, as sdpa and flex give (softmax of -inf is NaN);
    # only those rows: a NaN from anything else (an overflow) is not hidden as zeros.
    return probs.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0) @ v


def _sdpa(q, k, v, mask, scale: float) -> torch.Tensor:
    k, v = _repeat_kv(k, v, q.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def lower_right_causal(lq: int, lk: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(lq, lk) bool: query i sees keys j <= lk - lq + i (causal, aligned to the last key)."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(diagonal=lk - lq)


@functools.lru_cache(maxsize=64)
def _cpu_lower_right(lq: int, lk: int) -> torch.Tensor:
    """``lower_right_causal`` on the CPU, made once per shape: cached inference calls it at
    every layer of every denoising step."""
    return lower_right_causal(lq, lk)[None, None]


def _sdpa_causal(q, k, v, scale: float) -> torch.Tensor:
    k, v = _repeat_kv(k, v, q.shape[1])
    if q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if q.device.type == "cpu":
        # On the CPU torch's CausalBias builds its mask afresh at each call and is slower
        # than the same mask given as a tensor (the same kernel and values, bit for bit).
        mask = _cpu_lower_right(q.shape[2], k.shape[2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    from torch.nn.attention.bias import causal_lower_right

    bias = causal_lower_right(q.shape[2], k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, mask, scale: float) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    if isinstance(mask, torch.Tensor):
        mask = to_block_mask(mask.expand(-1, -1, q.shape[2], -1))
    enable_gqa = q.shape[1] != k.shape[1]
    if not q.is_cuda and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise BackendUnavailable(
            "attention backend 'flex' is unavailable for training on the CPU: FlexAttention "
            "has no backward there; use 'sdpa' or 'math'"
        )
    if q.is_cuda:
        return _compiled_flex()(q, k, v, block_mask=mask, scale=scale, enable_gqa=enable_gqa)
    with warnings.catch_warnings():
        # Eager FlexAttention on CPU is the intended test path, not a mistake to warn about.
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=enable_gqa)


def _xformers(q, k, v, mask, scale: float) -> torch.Tensor:
    from xformers.ops import memory_efficient_attention

    if _is_block_mask(mask):
        raise BackendUnavailable("xformers cannot take a FlexAttention BlockMask; pass a bool mask")
    k, v = _repeat_kv(k, v, q.shape[1])
    bias = None
    if mask is not None:
        b, h, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        # xformers wants the bias's last dim 8-aligned in memory: allocate padded, slice.
        padded = torch.zeros(b, h, lq, (lk + 7) // 8 * 8, dtype=q.dtype, device=q.device)
        bias = padded[..., :lk]
        bias.masked_fill_(~mask.expand(b, h, lq, lk), float("-inf"))
    out = memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale
    )
    return out.transpose(1, 2)


_IMPLEMENTATIONS = {"sdpa": _sdpa, "flex": _flex, "xformers": _xformers, "math": _math}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Any = None,
    backend: Backend | str = "auto",
    scale: float | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over (B, heads, L, head_dim); returns (B, Hq, Lq, D).
    ``scale`` defaults to 1/sqrt(head_dim). See the module docstring for masks, ``causal``
    and backends."""
    _check(q, k, v, mask)
    if causal:
        if mask is not None:
            raise ValueError("causal=True takes no mask; fold the causal part into the mask")
        if q.shape[2] > k.shape[2]:
            raise ValueError(
                f"causal=True needs at least as many keys as queries, got {q.shape[2]} queries "
                f"and {k.shape[2]} keys"
            )
        if backend in ("auto", "sdpa"):
            scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
            return _sdpa_causal(q, k, v, scale)
        mask = lower_right_causal(q.shape[2], k.shape[2], q.device)[None, None]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if backend == "auto":
        backend = "flex" if _is_block_mask(mask) else "sdpa"
    elif backend not in _IMPLEMENTATIONS:
        raise ValueError(f"backend must be one of {['auto', *BACKENDS]}, got {backend!r}")
    reason = backend_unavailable_reason(backend, q.device)
    if reason is not None:
        raise BackendUnavailable(f"attention backend {backend!r} is unavailable: {reason}")
    if _is_block_mask(mask) and backend != "flex":
        raise ValueError(f"a FlexAttention BlockMask needs backend 'flex', got {backend!r}")
    return _IMPLEMENTATIONS[backend](q, k, v, mask, scale)
