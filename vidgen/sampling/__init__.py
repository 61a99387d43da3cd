"""Samplers: pure schedules and loops that take the denoiser (or logits) as a callable."""

from vidgen.sampling.flow import (
    add_noise,
    classifier_free,
    euler_sample,
    sde_sample,
    time_grid,
    velocity_target,
)
from vidgen.sampling.tokens import guide_logits, sample_tokens, top_k_filter, top_p_filter

__all__ = [
    "add_noise",
    "classifier_free",
    "euler_sample",
    "guide_logits",
    "sample_tokens",
    "sde_sample",
    "time_grid",
    "top_k_filter",
    "top_p_filter",
    "velocity_target",
]
