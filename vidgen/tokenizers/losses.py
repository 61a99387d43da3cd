"""Reconstruction losses that need no downloaded network.

SSIM compares local means, contrasts and correlations in a Gaussian window, so it penalises
blur and texture loss that L1 averages away; the gradient loss compares finite differences,
which keeps the edges of the worlds' flat-coloured objects sharp. Both are differentiable and
work on (N, C, H, W) images in [-1, 1].
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # (1, 1, k, k)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM of two (N, C, H, W) batches in [-1, 1] (computed on [0, 1])."""
    x, y = (x + 1) / 2, (y + 1) / 2
    channels = x.shape[1]
    # A copy: the cached window itself, made under inference_mode once, failed every later
    # backward through it ("inference tensors cannot be saved for backward").
    kernel = _gaussian_window(window, sigma).to(x, copy=True).expand(channels, 1, window, window)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, padding=window // 2, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (num / den).mean()


def gradient_l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical finite differences of two (N, C, H, W) batches."""
    dx = (x[..., :, 1:] - x[..., :, :-1]) - (y[..., :, 1:] - y[..., :, :-1])
    dy = (x[..., 1:, :] - x[..., :-1, :]) - (y[..., 1:, :] - y[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(x.clamp(-1, 1).float(), y.float())
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))
