"""Ca2-VDM-style causal video DiT whose context K/V are computed once and shared by every
denoising step.

Glossary of axis letters: ``b`` batch (streams), ``t`` frames, ``n`` tokens per frame (latent
patches), ``d`` model dim, ``h`` heads, ``e`` head dim, ``w`` cached frame slots, ``c``
latent channels, ``y``/``x`` latent height/width, ``p`` patch side.

A block is adaLN-Zero-gated (per frame) spatial self-attention within each frame, causal
temporal self-attention per token location across frames, and an MLP. Temporal attention is
the only place frames meet, so a finished clip's temporal K/V at every layer are all a later
clip needs from it: ``write`` computes them once (the clip enters as context, lightly
re-noised at ``prefix_t``) and appends them to the ``KVCache``; ``forward`` on the next clip's
noisy latents reads that cache at every denoising step and never changes it.

Conditioning per frame: timestep + label + action (action t-1 leads to frame t). Context
frames carry the timestep ``prefix_t`` and the null label, so the cache is the same whatever
label or guidance the clip being denoised uses; classifier-free guidance only changes the
noisy clip's condition.

The reference that tests and the benchmark compare against is ``forward_history``: one
forward over the whole history with the *banded* frame mask (DESIGN.md section 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vidgen.nn.attention import attention
from vidgen.nn.cache import CacheSpec, KVCache
from vidgen.nn.conditioning import NULL, AdaLNModulation, FrameCondition, modulate
from vidgen.nn.rope import RoPE1D, Rotation, apply_rope
from vidgen.validate import check_depths, check_ints, check_number, values_checkable


@dataclass
class Ca2VDMConfig:
    latent_channels: int = 4
    latent_size: int = 8
    patch: int = 2
    dim: int = 128
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    clip_len: int = 8
    window: int = 24  # context frames kept in the cache (whole clips)
    num_classes: int = 5  # labels 0..num_classes-1 (BouncingShapes: the number of shapes)
    num_actions: int = 0  # discrete actions (AgentWorld: 5); 0 = none
    action_dim: int = 0  # continuous action size; 0 = none
    prefix_t: float = 0.05  # flow time of the light noise on context frames
    # Training against drift: each context clip is noised at a flow time drawn from
    # U(prefix_t, context_noise_max), given to the model as its timestep, so the model learns
    # not to trust its history blindly; inference keeps prefix_t. 0 = always prefix_t.
    context_noise_max: float = 0.0
    # Training against drift with the model's own errors (error recycling, as in Stable
    # Video Infinity): each context clip is, with this probability, replaced by the model's
    # one-step estimate of it from a noisy copy at a flow time drawn from
    # U(0, context_recycle_t), made in a no-grad teacher-forced pass (+1 forward per step);
    # the targets stay the real clips. 0 = off.
    context_recycle: float = 0.0
    context_recycle_t: float = 0.5
    # Training against the fading of long videos (the loss of latent contrast that a request's
    # ``contrast`` counters at inference): each context clip's deviations from its frames'
    # per-channel spatial medians are scaled by a factor drawn from U(1 - context_fade, 1),
    # so the model learns to restore faded objects; the targets stay the real clips. 0 = off.
    context_fade: float = 0.0
    # Training: foreground latent positions (summed channel distance from the frame's
    # per-channel spatial median, its background, over foreground_threshold: 14-38% of
    # kl-tiny's BouncingShapes positions at 1) weigh 1 + foreground_weight times the rest in
    # the flow loss, normalised to mean 1 (``kl.foreground_weights``, as the tokenizers'
    # option), so small objects are not lost in a mean over the background. 0 = off.
    foreground_weight: float = 0.0
    foreground_threshold: float = 1.0
    label_dropout: float = 0.1  # training: p(label -> null), for classifier-free guidance
    action_dropout: float = 0.1
    # Training, for a model taking both a label and actions: p(both -> null together), on top
    # of the drops above, which are independent (both at once: 1%). It trains the pass
    # guidance subtracts, which drops both. Nothing is drawn for a model taking one.
    joint_dropout: float = 0.1

    def __post_init__(self) -> None:
        check_ints(self, 1, "latent_channels", "latent_size", "patch", "dim", "depth", "heads")
        check_depths(self, "depth")
        check_ints(self, 1, "clip_len", "window")
        check_ints(self, 0, "num_classes", "num_actions", "action_dim")
        check_number("mlp_ratio", self.mlp_ratio, above=0)
        check_number("prefix_t", self.prefix_t, minimum=0, below=1)
        check_number("label_dropout", self.label_dropout, minimum=0, maximum=1)
        check_number("action_dropout", self.action_dropout, minimum=0, maximum=1)
        check_number("joint_dropout", self.joint_dropout, minimum=0, maximum=1)
        if self.latent_size % self.patch:
            raise ValueError(
                f"latent_size={self.latent_size} must be a multiple of patch={self.patch}"
            )
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(f"dim={self.dim} / heads={self.heads} must be an even head dim")
        if self.window % self.clip_len:
            raise ValueError(
                f"window={self.window} must be whole clips of clip_len={self.clip_len}"
            )
        if self.context_noise_max and not self.prefix_t <= self.context_noise_max < 1:
            raise ValueError(
                f"context_noise_max must be 0 (off) or in [prefix_t={self.prefix_t}, 1), "
                f"got {self.context_noise_max}"
            )
        if not 0.0 <= self.context_recycle <= 1.0:
            raise ValueError(f"context_recycle must be in [0, 1], got {self.context_recycle}")
        if not 0.0 < self.context_recycle_t < 1.0:
            raise ValueError(f"context_recycle_t must be in (0, 1), got {self.context_recycle_t}")
        if not 0.0 <= self.context_fade < 1.0:
            raise ValueError(f"context_fade must be in [0, 1) (0 = off), got {self.context_fade}")
        if not (self.foreground_weight >= 0 and self.foreground_threshold > 0):
            raise ValueError(
                "foreground_weight must be >= 0 (0 = off) and foreground_threshold > 0, got "
                f"{self.foreground_weight}, {self.foreground_threshold}"
            )

    @property
    def tokens_per_frame(self) -> int:
        return (self.latent_size // self.patch) ** 2

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def window_clips(self) -> int:
        return self.window // self.clip_len


CA2VDM_CONFIGS: dict[str, Ca2VDMConfig] = {
    "test": Ca2VDMConfig(
        latent_size=4,
        patch=2,
        dim=32,
        depth=2,
        heads=2,
        clip_len=2,
        window=4,
        num_classes=5,
        num_actions=5,
    ),
    "tiny": Ca2VDMConfig(dim=128, depth=6, heads=4),
    "base": Ca2VDMConfig(dim=384, depth=12, heads=6),
    # The paper's DiT-XL shapes: 28 layers, hidden 1152, 16 heads, patch 2.
    "xl": Ca2VDMConfig(dim=1152, depth=28, heads=16),
}


@dataclass
class Cond:
    """Conditioning of the frames a call covers. labels: (b,) int64 (``NULL`` = none);
    actions: per frame, the action that *leads to* that frame (b, t) int64 or (b, t, a)
    float, or None; t: flow time per frame (b, t) in [0, 1]."""

    t: torch.Tensor
    labels: torch.Tensor | None = None
    actions: torch.Tensor | None = None
    drop_label: torch.Tensor | None = None
    drop_actions: torch.Tensor | None = None


@dataclass
class Context:
    """The cached context of a batch of streams, read once per clip and shared by all its
    denoising steps: per layer, keys already rotated to their window-relative positions and
    values, ((b n), h, w, e); which slots hold frames; where the clip starts."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    valid: torch.Tensor  # (b, w) bool
    all_valid: bool  # every slot full: no key padding needed
    start: torch.Tensor  # (b,) window-relative position of the clip's first frame

    # Per layer, [context | clip] K/V buffers reused by every denoising step (only the clip's
    # part is rewritten), and the joined attention mask: no re-concatenation per step.
    _joined: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def clip_positions(self, frames: int) -> torch.Tensor:
        return self.start[:, None] + torch.arange(frames, device=self.start.device)

    def join(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's context keys/values followed by the clip's ``k``/``v`` ((b n), h, t,
        e). Without autograd the joined tensors are buffers kept for the next step."""
        if torch.is_grad_enabled():
            return torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        w = self.k[layer].shape[2]
        buf = self._joined.get(layer)
        if buf is None or buf[0].shape[2] != w + k.shape[2] or buf[0].dtype != k.dtype:
            buf = (torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2))
            self._joined[layer] = buf
            return buf
        buf[0][:, :, w:].copy_(k)
        buf[1][:, :, w:].copy_(v)
        return buf

    def mask(self, self_mask: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
        """[valid context slots | ``self_mask`` (t, t)] for every ((b n), 1, t, w + t)."""
        t = self_mask.shape[0]
        cached = self._masks.get(t)
        if cached is not None and torch.equal(cached[0], self_mask):
            return cached[1]
        b_n = self.valid.shape[0] * tokens_per_frame
        valid = self.valid.repeat_interleave(tokens_per_frame, dim=0)[:, None, None]
        joined = torch.cat(
            [valid.expand(-1, 1, t, -1), self_mask[None, None].expand(b_n, 1, t, t)], dim=-1
        )
        self._masks[t] = (self_mask.clone(), joined)
        return joined


@dataclass
class _Collected:
    k: list[torch.Tensor] = field(default_factory=list)  # per layer ((b n), h, t, e)
    v: list[torch.Tensor] = field(default_factory=list)


# --- layers ---------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class QKV(nn.Module):
    """Projection to per-head q, k, v with RMS-normalised q and k (stable attention).

    Returns ``qk`` (2, b, h, l, e), the normalised queries and keys together, and ``v``
    (b, h, l, e): in float32/64, q and k are normalised (and rotated, by the caller) in one
    call each instead of two, bit for bit the values of normalising each alone."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.proj = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = RMSNorm(dim // heads), RMSNorm(dim // heads)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qkv = rearrange(self.proj(x), "b l (three h e) -> three b h l e", three=3, h=self.heads)
        q_norm, k_norm = self.q_norm, self.k_norm
        if q_norm.eps != k_norm.eps or qkv.dtype not in (torch.float32, torch.float64):
            # Apart: in lower precision (autocast's too) rms_norm applies its weight before
            # rounding, which a weight applied afterwards would not match.
            return torch.stack([q_norm(qkv[0]), k_norm(qkv[1])]), qkv[2]
        weight = torch.stack([q_norm.weight, k_norm.weight]).view(2, 1, 1, 1, -1)
        # In float32/64, rms_norm multiplies by its weight last: scaling after it is the same
        # arithmetic.
        # Contiguous first: rms_norm of a strided view is slower, and the same bits.
        qk = F.rms_norm(qkv[:2].contiguous(), (qkv.shape[-1],), None, q_norm.eps) * weight
        return qk, qkv[2]


class Block(nn.Module):
    """Spatial attention, causal temporal attention with context, MLP; each adaLN-Zero."""

    def __init__(self, cfg: Ca2VDMConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.heads = cfg.heads
        self.modulation = AdaLNModulation(d, d, chunks=9)
        self.norm_s, self.norm_t, self.norm_m = (
            nn.LayerNorm(d, elementwise_affine=False, eps=1e-6) for _ in range(3)
        )
        self.spatial_qkv, self.spatial_out = QKV(d, cfg.heads), nn.Linear(d, d)
        self.temporal_qkv, self.temporal_out = QKV(d, cfg.heads), nn.Linear(d, d)
        hidden = int(d * cfg.mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d)
        )
        self.rope = RoPE1D(cfg.head_dim)

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        qk, v = self.spatial_qkv(rearrange(x, "b t n d -> (b t) n d"))  # within each frame
        y = rearrange(attention(qk[0], qk[1], v), "(b t) h n e -> b t n (h e)", b=b)
        return self.spatial_out(y)

    def temporal(
        self,
        x: torch.Tensor,
        rot: Rotation,
        self_mask: torch.Tensor | None,
        ctx: tuple[int, Context] | None,
        collect: _Collected | None,
    ) -> torch.Tensor:
        """x (b, t, n, d) attends per location to the context frames (this layer's rotated
        keys and values) and, through ``self_mask`` (t, t; None = causal), to its own frames;
        ``rot`` is the RoPE rotation of its frame positions per location, ((b n), 1, t, e/2),
        the same for every layer (``location_rotation``)."""
        b, t, n, _ = x.shape
        qk, v = self.temporal_qkv(rearrange(x, "b t n d -> (b n) t d"))  # 2, (b n), h, t, e
        if collect is not None:
            collect.k.append(qk[1])
            collect.v.append(v)
        q, k = apply_rope(qk, rot).unbind(0)  # q and k by the same rotation, in one call
        if self_mask is None and (ctx is None or ctx[1].all_valid):
            # A causal clip after a full cache (or none): every context key and its own frames
            # causally, the lower-right causal pattern, with no mask tensor (DESIGN.md
            # section 5: the fused kernels on GPUs).
            if ctx is not None:
                k, v = ctx[1].join(ctx[0], k, v)
            y = attention(q, k, v, causal=True)
            return self.temporal_out(rearrange(y, "(b n) h t e -> b t n (h e)", b=b))
        if self_mask is None:
            self_mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        needs_mask = t > 1  # frames inside the clip are causal
        if ctx is not None:
            layer, context = ctx
            k, v = context.join(layer, k, v)
            mask = context.mask(self_mask, n)
            needs_mask = needs_mask or not context.all_valid
        else:
            mask = self_mask[None, None].expand(b * n, 1, t, t)
        y = attention(q, k, v, mask=mask if needs_mask else None)
        return self.temporal_out(rearrange(y, "(b n) h t e -> b t n (h e)", b=b))

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        rot: Rotation,
        self_mask: torch.Tensor | None,
        ctx: tuple[int, Context] | None = None,
        collect: _Collected | None = None,
    ) -> torch.Tensor:
        # each (b, t, 1, d): per frame, broadcast over its tokens
        ss, sc, sg, ts, tc, tg, ms, mc, mg = self.modulation(cond, over_tokens=True)
        x = x + sg * self.spatial(modulate(self.norm_s(x), ss, sc))
        h = modulate(self.norm_t(x), ts, tc)
        x = x + tg * self.temporal(h, rot, self_mask, ctx, collect)
        return x + mg * self.mlp(modulate(self.norm_m(x), ms, mc))


# --- the model ----------------------------------------------------------------------------


class CausalVideoDiT(nn.Module):
    """Denoiser of clips of latents (b, t, c, y, x) given a KV cache of earlier clips."""

    def __init__(self, config: Ca2VDMConfig) -> None:
        super().__init__()
        cfg = self.config = config
        patch_values = cfg.patch * cfg.patch * cfg.latent_channels
        self.patch_in = nn.Linear(patch_values, cfg.dim)
        self.spatial_pos = nn.Parameter(torch.randn(cfg.tokens_per_frame, cfg.dim) * 0.02)
        self.condition = FrameCondition(cfg.dim, cfg.num_classes, cfg.num_actions, cfg.action_dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.final_modulation = AdaLNModulation(cfg.dim, cfg.dim, chunks=2)
        self.patch_out = nn.Linear(cfg.dim, patch_values)
        self.init_weights()

    def init_weights(self) -> None:
        """DiT init: adaLN-Zero gates and the output layer start at zero (a fresh model
        predicts 0); test models overwrite everything with ``vidgen.nn.randomize_``."""
        nn.init.zeros_(self.patch_out.weight)
        nn.init.zeros_(self.patch_out.bias)

    def cache_spec(self, max_streams: int = 1, dtype: torch.dtype = torch.float32) -> CacheSpec:
        cfg = self.config
        return CacheSpec(
            layers=cfg.depth,
            kv_heads=cfg.heads,
            head_dim=cfg.head_dim,
            tokens_per_frame=cfg.tokens_per_frame,
            window=cfg.window,
            dtype=dtype,
            max_streams=max_streams,
        )

    # --- tokens ---------------------------------------------------------------------

    def tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """(b, t, c, y, x) -> (b, t, n, d)."""
        p = self.config.patch
        patches = rearrange(latents, "b t c (y p1) (x p2) -> b t (y x) (p1 p2 c)", p1=p, p2=p)
        return self.patch_in(patches) + self.spatial_pos

    def untokens(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """(b, t, n, d) -> predictions (b, t, c, y, x)."""
        cfg = self.config
        shift, scale = self.final_modulation(cond)
        out = self.patch_out(modulate(self.final_norm(h), shift, scale))
        side = cfg.latent_size // cfg.patch
        return rearrange(
            out, "b t (y x) (p1 p2 c) -> b t c (y p1) (x p2)", y=side, p1=cfg.patch, p2=cfg.patch
        )

    def embed_cond(self, cond: Cond) -> torch.Tensor:
        # Flow time in [0, 1] is embedded on the usual diffusion scale of 0..1000.
        return self.condition(
            cond.t * 1000.0, cond.labels, cond.actions, cond.drop_label, cond.drop_actions
        )

    def context_cond(
        self, num_frames: int, batch: int, actions: torch.Tensor | None, device: torch.device
    ) -> Cond:
        """The condition of context frames: ``prefix_t``, null label, their actions."""
        t = torch.full((batch, num_frames), self.config.prefix_t, device=device)
        labels = (
            torch.full((batch,), NULL, dtype=torch.int64, device=device)
            if self.config.num_classes
            else None
        )
        return Cond(t=t, labels=labels, actions=actions)

    # --- cached inference -------------------------------------------------------------

    def prepare_context(self, cache: KVCache, streams: Sequence[int]) -> Context:
        """Read the cache once for a clip: rotate every cached key to its window-relative
        frame position. Every denoising step of the clip then reuses this (cache sharing)."""
        cache.spec.check_fits(self.cache_spec())
        n = self.config.tokens_per_frame
        dtype = next(self.parameters()).dtype
        rot = location_rotation(self.blocks[0].rope.angles(cache.positions(streams)), n)
        rot = rot.for_dtype(dtype)
        ks, vs = [], []
        for layer in range(len(self.blocks)):
            k, v = cache.read(layer, streams)  # (b, h, w, n, e), ring order
            # In the model's dtype: a wider cache (float64 under float32 weights) would
            # promote the joined keys past the queries' dtype.
            k, v = k.to(dtype), v.to(dtype)
            ks.append(apply_rope(rearrange(k, "b h w n e -> (b n) h w e"), rot))
            vs.append(rearrange(v, "b h w n e -> (b n) h w e"))
        valid = cache.valid(streams)
        start = cache.query_positions(streams, 1)[:, 0]
        return Context(k=ks, v=vs, valid=valid, all_valid=bool(valid.all()), start=start)

    def _run(
        self,
        x: torch.Tensor,
        cond: Cond,
        positions: torch.Tensor,
        self_mask: torch.Tensor | None,
        context: Context | None,
        collect: _Collected | None,
    ) -> torch.Tensor:
        cfg = self.config
        latent = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        if x.ndim != 5 or tuple(x.shape[2:]) != latent:  # failed in a matrix product
            raise ValueError(
                f"x must be latents (b, t, {', '.join(map(str, latent))}), got {tuple(x.shape)}"
            )
        dtype = self.patch_in.weight.dtype
        autocast = x.is_floating_point() and torch.is_autocast_enabled(x.device.type)
        if x.dtype != dtype and not autocast:  # autocast casts x itself
            raise ValueError(f"x must be {dtype} latents (the model's dtype), got {x.dtype}")
        if tuple(cond.t.shape) != tuple(x.shape[:2]):  # one row's cond broadcast over a batch
            raise ValueError(
                f"cond.t must be (b, t) = {tuple(x.shape[:2])}, one time per frame of x, got "
                f"{tuple(cond.t.shape)}"
            )
        # Flow times: 5 or NaN were embedded as they came (NaN frames out).
        if values_checkable(cond.t) and not bool(((cond.t >= 0) & (cond.t <= 1)).all()):
            raise ValueError(
                f"cond.t must be flow times in [0, 1], got values from {cond.t.min().item():g} "
                f"to {cond.t.max().item():g}"
            )
        c = self.embed_cond(cond)
        h = self.tokens(x)
        # The same rotation for every layer: its trigonometry (and its conversion to the
        # dtype it is applied in) once per forward.
        rot = location_rotation(self.blocks[0].rope.angles(positions), h.shape[2])
        rot = rot.for_dtype(h.dtype)
        for layer, block in enumerate(self.blocks):
            ctx = None if context is None else (layer, context)
            h = block(h, c, rot, self_mask, ctx, collect)
        return self.untokens(h, c)

    def forward(
        self,
        x: torch.Tensor,
        cond: Cond,
        cache: KVCache | Context | None = None,
        streams: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Prediction (flow velocity) for the noisy clip ``x`` (b, t, c, y, x) given the
        cached context of ``streams`` (one per batch row), or a ``Context`` prepared from it
        once for all the clip's denoising steps. Never changes the cache."""
        context = self._context(x, cache, streams)
        if context is not None:
            self._check_clip(x)
        # The clip's own frames are causal: no frame mask (None; see ``Block.temporal``).
        return self._run(x, cond, self._clip_positions(x, context), None, context, None)

    @torch.no_grad()
    def write(
        self,
        latents: torch.Tensor,
        cache: KVCache,
        streams: Sequence[int],
        actions: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> None:
        """The write pass: a finished clip (b, t, c, y, x) enters as context (re-noised at
        ``prefix_t`` with ``noise``, if given), its temporal K/V are computed at every layer
        against the current cache, and appended (evicting whole clips past the window)."""
        self._check_clip(latents)
        pt = self.config.prefix_t
        x = latents if noise is None else (1 - pt) * latents + pt * noise
        cond = self.context_cond(x.shape[1], x.shape[0], actions, x.device)
        context = self._context(x, cache, streams)
        collect = _Collected()
        self._run(x, cond, self._clip_positions(x, context), None, context, collect)
        n = self.config.tokens_per_frame
        k = torch.stack([rearrange(k, "(b n) h t e -> b h t n e", n=n) for k in collect.k])
        v = torch.stack([rearrange(v, "(b n) h t e -> b h t n e", n=n) for v in collect.v])
        cache.append(streams, k, v)

    def _check_clip(self, x: torch.Tensor) -> None:
        """The cache holds whole clips and evicts by them: a 'clip' of another length would
        make it hold chunks the banded reference (and training) never sees."""
        if x.ndim != 5 or x.shape[1] != self.config.clip_len:
            raise ValueError(
                f"a clip must be (b, clip_len={self.config.clip_len}, c, y, x) when a cache is "
                f"read or written, got {tuple(x.shape)}"
            )

    def _context(
        self, x: torch.Tensor, cache: KVCache | Context | None, streams: Sequence[int] | None
    ) -> Context | None:
        if isinstance(cache, Context) and cache.valid.shape[0] != x.shape[0]:
            # (failed in a concatenation of the joined keys, naming neither)
            raise ValueError(
                f"the context was prepared for {cache.valid.shape[0]} streams, x has "
                f"{x.shape[0]} rows"
            )
        if cache is None or isinstance(cache, Context):
            return cache
        if streams is None or len(streams) != x.shape[0]:
            raise ValueError(f"streams must name one cache stream per batch row ({x.shape[0]})")
        return self.prepare_context(cache, streams)

    def _clip_positions(self, x: torch.Tensor, context: Context | None) -> torch.Tensor:
        """The (b, t) frame positions of the clip ``x`` after its context (or none)."""
        t = x.shape[1]
        if context is None:
            return torch.arange(t, device=x.device).expand(x.shape[0], t)
        return context.clip_positions(t).to(x.device)

    # --- the reference: one forward over the whole history ---------------------------------

    def forward_history(
        self,
        x: torch.Tensor,
        cond: Cond,
        frame_mask: torch.Tensor,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predictions for every frame of x (b, T, ...) with temporal attention restricted by
        ``frame_mask`` (T, T) (e.g. ``history_mask``) and absolute frame positions."""
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        return self._run(x, cond, positions, frame_mask, None, None)


def location_rotation(angles: torch.Tensor, n: int) -> Rotation:
    """The rotation of frame angles (b, t, e/2) for each of the ``n`` locations of a frame,
    ((b n), 1, t, e/2), as temporal attention's per-location rows are laid out."""
    return Rotation.of(angles.repeat_interleave(n, dim=0)[:, None])


def history_mask(
    num_frames: int, clip_len: int, window_clips: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """(T, T) frame mask of the banded whole-history reference: frame f of clip c sees the
    ``window_clips`` clips before c and the frames of c up to f (DESIGN.md section 3)."""
    from vidgen.nn.masks import banded_block_mask

    return banded_block_mask(num_frames, 1, window_clips, group_size=clip_len, device=device)[0, 0]


def teacher_forcing_mask(
    num_clips: int, clip_len: int, window_clips: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """(2T, 2T) frame mask for training on [clean clips; noisy copies of the same clips]:
    clean frames see the banded history of clean frames; the noisy copy of clip c sees the
    clean clips c-window..c-1 and its own noisy frames causally. Every noisy clip is then
    trained exactly as inference will run it, all in one forward."""
    t = num_clips * clip_len
    clean = history_mask(t, clip_len, window_clips, device)
    idx = torch.arange(t, device=device)
    clip = idx // clip_len
    sees_context = (clip[None, :] < clip[:, None]) & (clip[None, :] >= clip[:, None] - window_clips)
    own = (clip[None, :] == clip[:, None]) & (idx[None, :] <= idx[:, None])
    top = torch.cat([clean, torch.zeros_like(clean)], dim=1)
    bottom = torch.cat([sees_context, own], dim=1)
    return torch.cat([top, bottom], dim=0)
