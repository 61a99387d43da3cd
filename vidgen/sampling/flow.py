"""Rectified-flow (flow-matching) schedule and Euler sampler, as pure functions.

Why flow matching rather than DDPM/DDIM: the noising path x_t = (1 - t) x0 + t eps is a straight
line, so a velocity model integrates in few Euler steps (what makes long videos affordable),
there is no beta schedule to tune, and the training target (eps - x0) has the same scale at
every t. Time runs from t = 1 (pure noise) to t = 0 (data).

The denoiser is any callable ``(x, t) -> velocity`` where t is a (b,) tensor of flow times.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vidgen.validate import check_int, check_number

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# ``sde_sample``'s largest eta: each step takes eta |dt| of the estimated noise out, so past
# about 1 / |dt| a step overshoots; 10 is already far past any useful setting (0.25-1).
MAX_ETA = 10.0


def time_grid(
    steps: int, shift: float = 1.0, device: torch.device | str | None = None
) -> torch.Tensor:
    """(steps + 1,) flow times from 1 down to 0. ``shift`` > 1 spends more steps at high noise
    (t' = shift t / (1 + (shift - 1) t)), where the coarse layout of a clip is decided."""
    check_int("steps", steps, minimum=1)
    check_number("shift", shift, above=0)  # NaN and inf made every time NaN
    t = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, with t broadcast from the left (b,) or (b, frames)."""
    t = t.reshape(*t.shape, *([1] * (x0.ndim - t.ndim)))
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / dt = noise - x0: what the denoiser learns to predict."""
    return noise - x0


def euler_sample(denoiser: Denoiser, noise: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Integrate dx/dt = denoiser(x, t) from grid[0] (= 1, x = noise) to grid[-1] (= 0)."""
    x = noise
    for i in range(len(grid) - 1):
        t = grid[i].expand(x.shape[0]).to(x.device)
        x = x + (grid[i + 1] - grid[i]).to(x.dtype) * denoiser(x, t)
    return x


def sde_sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    grid: torch.Tensor,
    eta: float,
    draws: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Integrate the reverse-time SDE that has the same marginals as the flow, from grid[0]
    (= 1, x = noise) to grid[-1] (= 0), by Euler-Maruyama:

        dx = (v + eta eps_hat) dt + sqrt(2 eta t |dt|) z,   eps_hat = x + (1 - t) v

    (diffusion g^2 = 2 eta t; the score of x_t = (1 - t) x0 + t eps is -eps_hat / t). Each
    step removes part of the noise the model believes x holds and adds fresh noise, which
    corrects errors of earlier steps instead of carrying them to the end; ``eta`` = 0 is
    exactly ``euler_sample``. The last step (to t = 0) is a plain Euler step, to the clean
    sample the model predicts: no noise, no correction. ``draws`` returns the
    next (x.shape) standard normal tensor (a seeded source per stream keeps batched and
    single runs equal); None draws from torch's global generator."""
    check_number("eta", eta, minimum=0, maximum=MAX_ETA)
    x = noise
    for i in range(len(grid) - 1):
        t, s = float(grid[i]), float(grid[i + 1])
        v = denoiser(x, grid[i].expand(x.shape[0]).to(x.device))
        step = (grid[i + 1] - grid[i]).to(x.dtype)
        if eta == 0 or s <= 0:
            x = x + step * v  # as euler_sample, to the bit
            continue
        eps = x + (1 - t) * v
        z = torch.randn_like(x) if draws is None else draws().to(x.device, x.dtype)
        x = x + step * (v + eta * eps) + (2 * eta * t * (t - s)) ** 0.5 * z
    return x


def classifier_free(
    conditional: torch.Tensor, unconditional: torch.Tensor, scale: float
) -> torch.Tensor:
    """Guided prediction u + scale (c - u); scale 1 is the conditional prediction."""
    return unconditional + scale * (conditional - unconditional)


def scale_contrast(latents: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Each frame's deviations from its per-channel spatial median scaled by ``factor``, one
    per sample (b,) or per frame (b, frames): latents (b, frames, c, y, x). The median (a
    frame's background, where objects are small) stays; frames of factor 1 are returned
    exactly as they were."""
    if latents.ndim != 5:
        raise ValueError(f"latents must be (b, frames, c, y, x), got shape {tuple(latents.shape)}")
    if factor.shape not in ((latents.shape[0],), tuple(latents.shape[:2])):
        raise ValueError(
            f"factor must be (b,) or (b, frames) = {tuple(latents.shape[:2])}, "
            f"got shape {tuple(factor.shape)}"
        )
    factor = factor.reshape(latents.shape[0], -1, 1, 1, 1)
    median = latents.flatten(3).median(dim=3).values[..., None, None]
    return torch.where(factor == 1, latents, median + factor * (latents - median))
