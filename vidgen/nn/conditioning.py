"""Conditioning: timestep, label and action embeddings summed into one per-frame vector, and
adaLN-Zero modulation from it.

Axis letters: ``b`` batch, ``t`` frames, ``n`` tokens per frame, ``d`` model dim, ``a``
continuous action dim. Conditions are per frame, (b, t, d), so context frames (timestep 0)
and noisy frames (timestep s) of one sequence are modulated differently, and an action
conditions exactly the frame it leads to.

Null conditions for classifier-free guidance: label ``-1`` (``NO_LABEL``) is the null label;
a discrete action ``-1`` is the null action; continuous actions are dropped with a boolean
``drop`` mask. Training drops conditions by passing ``drop`` masks drawn from its own seeded
generator, so dropout is reproducible and never reads global RNG state.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vidgen.validate import values_checkable

NULL = -1  # null label / null discrete action


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """(...) float timesteps -> (..., dim) [cos | sin] features over log-spaced frequencies."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[..., None] * freqs
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    return nn.functional.pad(emb, (0, dim % 2))


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of the (diffusion) timestep through a 2-layer MLP."""

    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(...) timesteps -> (..., dim)."""
        # The features are float32: cast to the weights' dtype (a float64, bf16 or fp16 model)
        return self.mlp(sinusoidal_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedding(nn.Module):
    """Class label -> vector; row ``num_classes`` is the learned null label (``NULL``)."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """(b,) int64 labels in [0, num_classes) or NULL; ``drop`` (b,) bool -> null."""
        # A range check reads the values: made on the CPU only (values_checkable). On a GPU
        # it was a host sync in every denoising step; the generators check a request's
        # label once, before any step.
        if values_checkable(labels) and ((labels < NULL) | (labels >= self.num_classes)).any():
            raise ValueError(
                f"labels must be in [0, {self.num_classes}) or {NULL} (null), got "
                f"{labels.unique().tolist()}"
            )
        idx = torch.where(labels == NULL, self.num_classes, labels)
        if drop is not None:
            idx = torch.where(drop, self.num_classes, idx)
        return self.table(idx)


class ActionEmbedding(nn.Module):
    """Per-frame actions -> vectors. Discrete (``num_actions`` > 0): (b, t) int64 in
    [0, num_actions) or NULL. Continuous (``action_dim`` > 0): (b, t, a) float through a
    linear layer, with a learned null vector for dropped frames."""

    def __init__(self, dim: int, num_actions: int = 0, action_dim: int = 0) -> None:
        super().__init__()
        if (num_actions > 0) == (action_dim > 0):
            raise ValueError(
                "exactly one of num_actions (discrete) and action_dim (continuous) must be > 0, "
                f"got num_actions={num_actions}, action_dim={action_dim}"
            )
        self.num_actions, self.action_dim = num_actions, action_dim
        if num_actions:
            self.table = nn.Embedding(num_actions + 1, dim)
        else:
            self.proj = nn.Linear(action_dim, dim)
            self.null = nn.Parameter(torch.zeros(dim))

    def forward(self, actions: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """-> (b, t, dim). ``drop``: (b,) or (b, t) bool, frames whose action is nulled."""
        if self.num_actions:
            if actions.dtype != torch.int64 or actions.ndim != 2:
                raise ValueError(
                    f"discrete actions must be int64 (b, t), got {actions.dtype} "
                    f"{tuple(actions.shape)}"
                )
            if (
                values_checkable(actions)
                and (  # as labels above
                    (actions < NULL) | (actions >= self.num_actions)
                ).any()
            ):
                raise ValueError(f"actions must be in [0, {self.num_actions}) or {NULL} (null)")
            null = (actions == NULL) | self._dropped(actions, drop)
            return self.table(torch.where(null, self.num_actions, actions))
        if actions.ndim != 3 or actions.shape[-1] != self.action_dim:
            raise ValueError(
                f"continuous actions must be (b, t, {self.action_dim}), got {tuple(actions.shape)}"
            )
        emb = self.proj(actions.to(self.proj.weight.dtype))
        null = self._dropped(actions, drop)
        return torch.where(null[..., None], self.null.to(emb.dtype), emb)

    @staticmethod
    def _dropped(actions: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        """(b, t) bool: the frames ``drop`` nulls ((b,) drops whole rows)."""
        shape = actions.shape[:2]
        if drop is None:
            return torch.zeros(shape, dtype=torch.bool, device=actions.device)
        return (drop if drop.ndim == 2 else drop[:, None]).expand(shape)


class FrameCondition(nn.Module):
    """timestep + label + action embeddings summed into one (b, t, dim) condition per frame.
    ``num_classes`` 0 = no label input; ``num_actions`` / ``action_dim`` both 0 = no actions."""

    def __init__(
        self,
        dim: int,
        num_classes: int = 0,
        num_actions: int = 0,
        action_dim: int = 0,
        freq_dim: int = 256,
    ) -> None:
        super().__init__()
        self.timestep = TimestepEmbedding(dim, freq_dim)
        self.label = LabelEmbedding(num_classes, dim) if num_classes else None
        self.action = (
            ActionEmbedding(dim, num_actions, action_dim) if num_actions or action_dim else None
        )

    def forward(
        self,
        t: torch.Tensor,
        labels: torch.Tensor | None = None,
        actions: torch.Tensor | None = None,
        drop_label: torch.Tensor | None = None,
        drop_actions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """t: (b, t) per-frame timesteps -> (b, t, dim). Missing labels/actions are null.
        labels (b,); drop_label (b,) or per frame (b, t); drop_actions (b,) or (b, t)."""
        if t.ndim != 2:
            raise ValueError(f"t must be (b, t) per-frame times, got shape {tuple(t.shape)}")
        # One label or action for a whole batch or clip broadcast silently: name the shapes.
        if labels is not None and tuple(labels.shape) != tuple(t.shape[:1]):
            raise ValueError(
                f"labels must be (b,) = {tuple(t.shape[:1])}, one per row, got "
                f"{tuple(labels.shape)}"
            )
        if actions is not None and tuple(actions.shape[:2]) != tuple(t.shape):
            raise ValueError(
                f"actions must start with (b, t) = {tuple(t.shape)}, one per frame, got "
                f"{tuple(actions.shape)}"
            )
        if labels is not None and (labels.is_floating_point() or labels.dtype == torch.bool):
            # (a float label failed as an index in the embedding; a bool one read as 0 or 1)
            raise ValueError(f"labels must be integer class ids, got {labels.dtype}")
        for name, drop in (("drop_label", drop_label), ("drop_actions", drop_actions)):
            if drop is None:
                continue
            if tuple(drop.shape) not in (tuple(t.shape[:1]), tuple(t.shape)):
                raise ValueError(
                    f"{name} must be (b,) = {tuple(t.shape[:1])} or (b, t) = {tuple(t.shape)}, "
                    f"per row or per frame, got {tuple(drop.shape)}"
                )
            if drop.dtype != torch.bool:  # 0/1 integers failed in torch.where
                raise ValueError(f"{name} must be a bool mask (True: dropped), got {drop.dtype}")
        cond = self.timestep(t)  # (b, t, d)
        if self.label is not None:
            if labels is None:
                labels = torch.full(t.shape[:1], NULL, dtype=torch.int64, device=t.device)
            if drop_label is not None and drop_label.ndim == 2:
                # Per-frame drop (b, t): frames of one sequence can differ (context frames
                # carry the null label, the frames being denoised the real one).
                emb = self.label(labels)[:, None]  # (b, 1, d)
                null = self.label.table.weight[self.label.num_classes]
                cond = cond + torch.where(drop_label[..., None], null, emb)
            else:
                cond = cond + self.label(labels, drop_label)[:, None]
        elif labels is not None:
            raise ValueError("labels given to a model built without labels (num_classes=0)")
        if self.action is not None:
            if actions is None:
                drop_actions = torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)
                actions = self._null_actions(t.shape[:2], t.device)
            cond = cond + self.action(actions, drop_actions)
        elif actions is not None:
            raise ValueError("actions given to a model built without actions")
        return cond

    def _null_actions(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        if self.action.num_actions:
            return torch.full(shape, NULL, dtype=torch.int64, device=device)
        return torch.zeros(*shape, self.action.action_dim, device=device)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, with per-frame (b, t, d) modulation broadcast over the
    tokens of each frame of x (b, t, n, d); (b, t, 1, d) (``AdaLNModulation`` with
    ``over_tokens``) broadcasts as it is."""
    if scale.ndim < x.ndim:
        shift, scale = shift[:, :, None], scale[:, :, None]
    return x * (1 + scale) + shift


class AdaLNModulation(nn.Module):
    """cond (b, t, c) -> ``chunks`` tensors (b, t, dim) (shifts, scales, gates). The output
    layer is zero-initialised (adaLN-Zero): every gate starts at 0, so each residual branch
    starts as the identity."""

    def __init__(self, dim: int, cond_dim: int, chunks: int) -> None:
        super().__init__()
        self.chunks = chunks
        self.proj = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, chunks * dim))
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.zeros_(self.proj[1].weight)
        nn.init.zeros_(self.proj[1].bias)

    def forward(self, cond: torch.Tensor, over_tokens: bool = False) -> tuple[torch.Tensor, ...]:
        """``chunks`` tensors (b, t, dim), or with ``over_tokens`` (b, t, 1, dim), ready to
        broadcast over the tokens of each frame (one view for all, not one per use)."""
        out = self.proj(cond)
        if over_tokens:
            return out.unflatten(-1, (self.chunks, -1)).unsqueeze(-3).unbind(-2)
        return out.chunk(self.chunks, dim=-1)


class AdaLNZeroResidual(nn.Module):
    """x + gate * f(modulate(norm(x), shift, scale)): the residual branch pattern of the
    DiT blocks, with (shift, scale, gate) from the per-frame condition. x: (b, t, n, d)."""

    def __init__(self, dim: int, cond_dim: int, branch: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = AdaLNModulation(dim, cond_dim, chunks=3)
        self.branch = branch

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(cond)  # each (b, t, d)
        h = self.branch(modulate(self.norm(x), shift, scale))
        return x + gate[:, :, None] * h
