"""Transformer building blocks shared by every model: attention backends, masks, the KV
window cache, RoPE and conditioning."""

from vidgen.nn.attention import (
    BACKENDS,
    BackendUnavailable,
    attention,
    available_backends,
    backend_unavailable_reason,
)
from vidgen.nn.cache import CacheSpec, KVCache
from vidgen.nn.conditioning import (
    NULL,
    ActionEmbedding,
    AdaLNModulation,
    AdaLNZeroResidual,
    FrameCondition,
    LabelEmbedding,
    TimestepEmbedding,
    modulate,
    sinusoidal_embedding,
)
from vidgen.nn.init import randomize_
from vidgen.nn.masks import (
    banded_block_mask,
    block_causal_mask,
    key_padding_mask,
    to_block_mask,
)
from vidgen.nn.rope import RoPE1D, RoPE3D, apply_rope, rope_angles

__all__ = [
    "BACKENDS",
    "NULL",
    "ActionEmbedding",
    "AdaLNModulation",
    "AdaLNZeroResidual",
    "BackendUnavailable",
    "CacheSpec",
    "FrameCondition",
    "KVCache",
    "LabelEmbedding",
    "RoPE1D",
    "RoPE3D",
    "TimestepEmbedding",
    "apply_rope",
    "attention",
    "available_backends",
    "backend_unavailable_reason",
    "banded_block_mask",
    "block_causal_mask",
    "key_padding_mask",
    "modulate",
    "randomize_",
    "rope_angles",
    "sinusoidal_embedding",
    "to_block_mask",
]
