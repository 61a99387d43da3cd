"""Weight initialisation helpers shared by the models and their tests."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Overwrite every parameter (zero-initialised gates included) with seeded random values.

    Test models use this (DESIGN.md section 4): adaLN-Zero makes a fresh model output zeros,
    and then every equivalence test passes trivially. Norm scales become 1 + noise so
    activations keep a sensible size.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std
        if name.endswith("weight") and param.ndim == 1:
            noise = noise + 1.0  # norm scales
        param.copy_(noise.to(param.dtype))
    return module
