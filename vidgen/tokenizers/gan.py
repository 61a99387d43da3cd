"""Patch-GAN discriminator and hinge losses (the adversarial term of VQGAN-style tokenizers).

The discriminator sees single frames (N, C, H, W) and returns a map of logits, one per
overlapping patch, so it judges local texture and edges rather than the whole scene; the
hinge losses are those of VQGAN (Esser et al. 2021). Everything is defined here and trained
from scratch with the tokenizer: no downloaded weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """``layers`` stride-2 4x4 convolutions (width doubling up to 8 x ``dim``, GroupNorm,
    LeakyReLU 0.2) and a 3x3 convolution to one logit per patch: (N, C, H, W) ->
    (N, 1, H / 2**layers, W / 2**layers)."""

    def __init__(self, channels: int = 3, dim: int = 64, layers: int = 3) -> None:
        super().__init__()
        if layers < 1 or dim < 8:
            raise ValueError(f"need layers >= 1 and dim >= 8, got layers={layers}, dim={dim}")
        blocks: list[nn.Module] = []
        width_in = channels
        for i in range(layers):
            width = dim * min(2**i, 8)
            blocks.append(nn.Conv2d(width_in, width, 4, stride=2, padding=1))
            if i > 0:  # as in PatchGAN, no normalisation on the first layer
                blocks.append(nn.GroupNorm(min(32, width // 4), width))
            blocks.append(nn.LeakyReLU(0.2))
            width_in = width
        blocks.append(nn.Conv2d(width_in, 1, 3, padding=1))
        self.net = nn.Sequential(*blocks)
        self.layers = layers

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.ndim != 4:
            raise ValueError(f"frames must be (N, C, H, W), got shape {tuple(frames.shape)}")
        if min(frames.shape[-2:]) < 2**self.layers:
            raise ValueError(
                f"frames of {tuple(frames.shape[-2:])} pixels are too small for "
                f"{self.layers} stride-2 layers (need >= {2**self.layers})"
            )
        return self.net(frames)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: push real logits above +1 and fake ones below -1."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator side: raise the discriminator's logits on reconstructions."""
    return -fake_logits.mean()
