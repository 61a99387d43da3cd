"""Samplers: pure schedules and loops that take the denoiser (or logits) as a callable."""

from vidgen.sampling.flow import (
    add_noise,
    classifier_free,
    euler_sample,
    time_grid,
    velocity_target,
)

__all__ = ["add_noise", "classifier_free", "euler_sample", "time_grid", "velocity_target"]
