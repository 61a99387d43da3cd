"""NBP-style next-block-prediction transformer over LARP tokens.

Glossary of axis letters: ``b`` batch (streams), ``l`` sequence positions, ``d`` model dim,
``h`` heads, ``e`` head dim, ``v`` vocabulary, ``w`` cached frame slots, ``n`` tokens per
frame slot, ``f`` frames of a clip.

The token sequence of a video is its clips' LARP tokens one after another (N per clip), cut
into blocks of ``block`` tokens. The input is shifted by one block: position i reads the
token at i - block (the first block of a stream reads learned BOS embeddings), so the output
at each position of block b predicts the token at the same position of block b + 1's input,
i.e. block b's own tokens, all at once. Attention is block-causal (bidirectional inside a
block) and, as for the DiT, banded by clips: a clip sees the ``window`` frames of clips
before it (DESIGN.md section 3). Block size 1 is plain next-token prediction, same code.

Inference feeds one block at a time: its B inputs attend to the cached K/V of earlier clips,
the K/V of the current clip's earlier blocks (``Partial``, a value passed in and out) and
themselves, with no mask when the cache is full, and B tokens are sampled in parallel. When
a clip is finished its blocks' K/V are exactly its write pass: they are appended to the
cache (whole-clip eviction).

Conditioning is an added per-clip embedding (label + the clip's actions), not prefix tokens:
LARP tokens are holistic, so no token belongs to one frame and per-frame action embeddings
cannot be added per token; one clip vector added to every input position of the clip keeps
the block structure, the positions and the cache layout identical with or without
conditions.
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
from vidgen.nn.conditioning import NULL
from vidgen.nn.masks import banded_block_mask
from vidgen.nn.rope import RoPE1D, Rotation, apply_rope
from vidgen.validate import check_depths, check_ints, check_number, values_checkable


@dataclass
class NBPConfig:
    vocab: int = 1024
    tokens_per_clip: int = 128
    frames_per_clip: int = 8
    block: int = 16
    dim: int = 128
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    window: int = 24  # frames of earlier clips kept in the cache (whole clips)
    num_classes: int = 5
    num_actions: int = 0
    action_dim: int = 0
    label_dropout: float = 0.1
    action_dropout: float = 0.1
    # Training, for a model taking both a label and actions: p(both -> null together), on top
    # of the drops above, which are independent (both at once: 1%). It trains the pass
    # guidance subtracts, which drops both. Nothing is drawn for a model taking one.
    joint_dropout: float = 0.1
    # Training: the fraction of *input* tokens replaced by uniformly random ones (targets stay
    # clean), so that the model learns to read a history with errors in it, as its own
    # samples are at inference (exposure bias). 0 = plain teacher forcing.
    token_noise: float = 0.0

    def __post_init__(self) -> None:
        check_ints(self, 1, "vocab", "tokens_per_clip", "frames_per_clip", "block", "window")
        check_ints(self, 1, "dim", "depth", "heads")
        check_depths(self, "depth")
        check_ints(self, 0, "num_classes", "num_actions", "action_dim")
        check_number("mlp_ratio", self.mlp_ratio, above=0)
        check_number("label_dropout", self.label_dropout, minimum=0, maximum=1)
        check_number("action_dropout", self.action_dropout, minimum=0, maximum=1)
        check_number("joint_dropout", self.joint_dropout, minimum=0, maximum=1)
        if self.num_actions and self.action_dim:
            raise ValueError(
                "num_actions (discrete) and action_dim (continuous) cannot both be > 0, got "
                f"num_actions={self.num_actions}, action_dim={self.action_dim}"
            )
        if not 0.0 <= self.token_noise < 1.0:
            raise ValueError(f"token_noise must be in [0, 1), got {self.token_noise}")
        if self.tokens_per_clip % self.block:
            raise ValueError(
                f"block={self.block} must divide tokens_per_clip={self.tokens_per_clip}"
            )
        if self.tokens_per_clip % self.frames_per_clip:
            raise ValueError("tokens_per_clip must be a multiple of frames_per_clip")
        if self.window % self.frames_per_clip:
            raise ValueError(
                f"window={self.window} must be whole clips of {self.frames_per_clip} frames"
            )
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(f"dim={self.dim} / heads={self.heads} must be an even head dim")

    @property
    def tokens_per_frame(self) -> int:
        return self.tokens_per_clip // self.frames_per_clip

    @property
    def blocks_per_clip(self) -> int:
        return self.tokens_per_clip // self.block

    @property
    def window_clips(self) -> int:
        return self.window // self.frames_per_clip

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


NBP_CONFIGS: dict[str, NBPConfig] = {
    # Matches the `test` LARP: 8 tokens of 64 codes per clip of 4 frames.
    "test": NBPConfig(
        vocab=64,
        tokens_per_clip=8,
        frames_per_clip=4,
        block=4,
        dim=32,
        depth=2,
        heads=2,
        window=8,
        num_classes=5,
        num_actions=5,
    ),
    "tiny": NBPConfig(),
    # The paper's 700M model: 24 layers, hidden 1536, 16 heads.
    "700m": NBPConfig(dim=1536, depth=24, heads=16),
}


@dataclass
class ClipCond:
    """Condition of the clips a call covers: labels (b,), actions per frame of those clips
    (b, clips * frames[, a]) or None, and per-clip drop masks (b, clips) for guidance."""

    labels: torch.Tensor | None = None
    actions: torch.Tensor | None = None
    drop_label: torch.Tensor | None = None
    drop_actions: torch.Tensor | None = None


@dataclass
class Partial:
    """K/V of the current clip's blocks so far, per layer ((b, h, l, e) each): keys as
    computed (what the cache stores) and rotated (what attention reads), and values."""

    k: list[torch.Tensor] = field(default_factory=list)
    k_rot: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)

    @property
    def length(self) -> int:
        return 0 if not self.k else self.k[0].shape[2]


@dataclass
class BlockContext:
    """The cached clips of a batch of streams, read once per clip and shared by all its
    block steps: per layer rotated keys and values (b, h, w*n, e), which keys are valid, and
    the window-relative token position where the clip starts."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    valid: torch.Tensor  # (b, w*n)
    all_valid: bool
    start: torch.Tensor  # (b,)


# --- layers ---------------------------------------------------------------------------


class ClipCondition(nn.Module):
    """label + the clip's actions -> one (b, d) vector per clip."""

    def __init__(self, cfg: NBPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.label = nn.Embedding(cfg.num_classes + 1, cfg.dim) if cfg.num_classes else None
        self.action = None
        if cfg.num_actions:
            self.action = nn.Embedding(cfg.num_actions + 1, cfg.dim)
        elif cfg.action_dim:
            self.action = nn.Linear(cfg.action_dim, cfg.dim)
        if self.action is not None:
            self.null_actions = nn.Parameter(torch.zeros(cfg.dim))
            self.action_mix = nn.Linear(cfg.frames_per_clip * cfg.dim, cfg.dim)

    def forward(self, cond: ClipCond, batch: int, clips: int, device: torch.device) -> torch.Tensor:
        """-> (b, clips, d)."""
        cfg = self.cfg
        for name in ("drop_label", "drop_actions"):
            # A (b,) mask would broadcast against (b, clips) along the wrong axis.
            mask = getattr(cond, name)
            if mask is not None and (
                mask.ndim != 2 or mask.shape[0] != batch or mask.shape[1] not in (1, clips)
            ):
                raise ValueError(
                    f"ClipCond.{name} must be (b, clips) = ({batch}, {clips}) or ({batch}, 1), "
                    f"got {tuple(mask.shape)}"
                )
        self._check(cond, batch, clips)
        # The weights' dtype (a bf16 model's inputs would be promoted to float32 by float32 zeros)
        dtype = next((p.dtype for p in self.parameters()), torch.float32)
        out = torch.zeros(batch, clips, cfg.dim, device=device, dtype=dtype)
        if self.label is not None:
            labels = (
                cond.labels
                if cond.labels is not None
                else torch.full((batch,), NULL, device=device)
            )
            idx = torch.where(labels == NULL, cfg.num_classes, labels)[:, None].expand(batch, clips)
            if cond.drop_label is not None:
                idx = torch.where(cond.drop_label, cfg.num_classes, idx)
            out = out + self.label(idx)
        if self.action is not None:
            out = out + self._actions(cond, batch, clips, device)
        return out

    def _check(self, cond: ClipCond, batch: int, clips: int) -> None:
        """Labels and actions that would broadcast (one clip's actions for every clip), be
        cut (only the first clip's read), read the null row as a real one, or be ignored by
        a model without them were all taken without a word."""
        cfg = self.cfg
        if cond.labels is not None:
            if self.label is None:
                raise ValueError("labels given to a model built without labels (num_classes=0)")
            labels = cond.labels
            if tuple(labels.shape) != (batch,) or labels.is_floating_point():
                raise ValueError(
                    f"labels must be integer (b,) = ({batch},), got {labels.dtype} "
                    f"{tuple(labels.shape)}"
                )
            # Value checks on the CPU only (values_checkable): a host sync per block step
            # on a GPU; the generators check a request's label and actions once.
            if values_checkable(labels) and bool(
                ((labels != NULL) & ((labels < 0) | (labels >= cfg.num_classes))).any()
            ):
                raise ValueError(
                    f"labels must be in [0, {cfg.num_classes}) or NULL ({NULL}), got "
                    f"{labels.tolist()}"
                )
        if cond.actions is None:
            return
        if self.action is None:
            raise ValueError("actions given to a model built without actions")
        frames = clips * cfg.frames_per_clip
        acts = cond.actions
        want = (batch, frames) if cfg.num_actions else (batch, frames, cfg.action_dim)
        if tuple(acts.shape) != want or (cfg.num_actions and acts.is_floating_point()):
            kind = "integer" if cfg.num_actions else "float"
            raise ValueError(
                f"actions must be {kind} {want} ({clips} clips of {cfg.frames_per_clip} frames), "
                f"got {acts.dtype} {tuple(acts.shape)}"
            )
        if (
            cfg.num_actions
            and values_checkable(acts)
            and bool(((acts != NULL) & ((acts < 0) | (acts >= cfg.num_actions))).any())
        ):
            raise ValueError(f"actions must be in [0, {cfg.num_actions}) or NULL ({NULL})")

    def _actions(
        self, cond: ClipCond, batch: int, clips: int, device: torch.device
    ) -> torch.Tensor:
        cfg = self.cfg
        if cond.actions is None:
            return self.null_actions.expand(batch, clips, -1)
        acts = cond.actions
        if cfg.num_actions:
            emb = self.action(torch.where(acts == NULL, cfg.num_actions, acts))
        else:
            emb = self.action(acts.to(self.action.weight.dtype))
        per_clip = rearrange(emb, "b (c f) d -> b c (f d)", f=cfg.frames_per_clip)
        mixed = self.action_mix(per_clip)  # (b, clips, d)
        drop = cond.drop_actions
        if cfg.num_actions:  # a clip with no action at all (a request without actions, a
            # context clip) is the null action, as a dropped one is: never an untrained mix
            # of null ids
            none = rearrange(acts == NULL, "b (c f) -> b c f", f=cfg.frames_per_clip).all(-1)
            drop = none if drop is None else drop | none
        if drop is not None:
            mixed = torch.where(drop[..., None], self.null_actions, mixed)
        return mixed


class Block(nn.Module):
    def __init__(self, cfg: NBPConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.qkv, self.out = nn.Linear(cfg.dim, 3 * cfg.dim), nn.Linear(cfg.dim, cfg.dim)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, cfg.dim)
        )

    def forward(
        self,
        x: torch.Tensor,
        rot: Rotation,
        context: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        keep: list | None,
    ) -> torch.Tensor:
        """x (b, l, d); rot: the RoPE rotation of its positions. context: (rotated keys,
        values) of earlier positions; keep: where to put this call's own (key, rotated key,
        value)."""
        qkv = rearrange(
            self.qkv(self.norm1(x)), "b l (three h e) -> three b h l e", three=3, h=self.heads
        )
        k, v = qkv[1], qkv[2]
        q, k_rot = apply_rope(qkv[:2], rot).unbind(0)  # q and k in one call
        if keep is not None:
            keep.append((k, k_rot, v))
        keys, values = k_rot, v
        if context is not None:
            keys = torch.cat([context[0], k_rot], dim=2)
            values = torch.cat([context[1], v], dim=2)
        y = attention(q, keys, values, mask=mask)
        x = x + self.out(rearrange(y, "b h l e -> b l (h e)"))
        return x + self.mlp(self.norm2(x))


# --- the model ------------------------------------------------------------------------------


class NextBlockTransformer(nn.Module):
    def __init__(self, config: NBPConfig) -> None:
        super().__init__()
        cfg = self.config = config
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.bos = nn.Parameter(torch.randn(cfg.block, cfg.dim) * 0.02)
        self.condition = ClipCondition(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab)
        self.rope = RoPE1D(cfg.head_dim)

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

    def inputs(self, prev: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Embeddings of the previous block's tokens (b, B); rows of -1 (or ``prev`` None)
        are a stream's first block, which reads the learned BOS embeddings."""
        if prev is None:
            return self.bos.expand(batch, -1, -1)
        self._check_tokens("prev", prev, minimum=-1)
        emb = self.embed(prev.clamp(min=0))
        return torch.where(prev[..., None] < 0, self.bos.to(emb.dtype), emb)

    # --- the reference / training forward ----------------------------------------------------

    def forward(self, tokens: torch.Tensor, cond: ClipCond) -> torch.Tensor:
        """Logits (b, T, v) for every position of whole clips of tokens (b, T): the banded
        block-causal forward over the full history (training, and the reference)."""
        cfg = self.config
        b, total = tokens.shape
        if total % cfg.tokens_per_clip:
            raise ValueError(f"tokens must be whole clips of {cfg.tokens_per_clip}, got {total}")
        self._check_tokens("tokens", tokens)
        clips = total // cfg.tokens_per_clip
        x = torch.cat([self.bos.expand(b, -1, -1), self.embed(tokens[:, : -cfg.block])], dim=1)
        c = self.condition(cond, b, clips, tokens.device)
        x = x + c.repeat_interleave(cfg.tokens_per_clip, dim=1)
        mask = banded_block_mask(
            total, cfg.block, cfg.window_clips, group_size=cfg.tokens_per_clip, device=tokens.device
        )
        rot = self._rotation(torch.arange(total, device=tokens.device), x.dtype)
        for block in self.blocks:
            x = block(x, rot, None, mask, None)
        return self.head(self.norm(x))

    def _check_tokens(self, name: str, ids: torch.Tensor, minimum: int = 0) -> None:
        """Integer ids below the vocabulary (``minimum`` -1: BOS rows too): others failed in
        the embedding as an IndexError (a device-side assert on a GPU)."""
        vocab = self.config.vocab
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"{name} must be integer token ids, got {ids.dtype}")
        if not ids.numel() or not values_checkable(ids):
            return
        if not bool(((ids >= minimum) & (ids < vocab)).all()):
            raise ValueError(
                f"{name} must be token ids in [{minimum}, {vocab}), got values from "
                f"{ids.min().item()} to {ids.max().item()}"
            )

    # --- incremental decoding -----------------------------------------------------------------

    def _rotation(self, positions: torch.Tensor, dtype: torch.dtype) -> Rotation:
        """The RoPE rotation of token ``positions``, computed once for every layer (and both
        q and k) of a call, in the dtype ``apply_rope`` works in for ``dtype``."""
        return Rotation.of(self.rope.angles(positions)).for_dtype(dtype)

    def clip_condition(self, cond: ClipCond, batch: int, device: torch.device) -> torch.Tensor:
        """(b, d): the condition vector of the one clip being made."""
        return self.condition(cond, batch, 1, device)[:, 0]

    def prepare_context(self, cache: KVCache, streams: Sequence[int]) -> BlockContext:
        """Read the cache once for a clip (rotating every cached key to its window-relative
        position); all of the clip's block steps share it."""
        cache.spec.check_fits(self.cache_spec())
        n = self.config.tokens_per_frame
        frames = cache.positions(streams)  # (b, w)
        pos = (frames[:, :, None] * n + torch.arange(n, device=frames.device)).flatten(1)
        dtype = next(self.parameters()).dtype  # a wider cache would promote the keys
        rot = self._rotation(pos[:, None], dtype)  # (b, 1, w*n, e/2)
        ks, vs = [], []
        for layer in range(len(self.blocks)):
            k, v = cache.read(layer, streams)  # (b, h, w, n, e)
            k, v = k.to(dtype), v.to(dtype)
            ks.append(apply_rope(rearrange(k, "b h w n e -> b h (w n) e"), rot))
            vs.append(rearrange(v, "b h w n e -> b h (w n) e"))
        valid = cache.valid(streams)[:, :, None].expand(-1, -1, n).flatten(1)
        start = cache.query_positions(streams, 1)[:, 0] * n
        return BlockContext(k=ks, v=vs, valid=valid, all_valid=bool(valid.all()), start=start)

    def step_block(
        self,
        prev: torch.Tensor | None,
        clip_cond: torch.Tensor,
        context: BlockContext | KVCache,
        partial: Partial,
        streams: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, Partial]:
        """Feed one block (the previous block's tokens, or BOS) of the clip being made and
        return the logits of the next block's tokens (b, B, v) and the clip's K/V so far.
        ``context`` is the clip's ``prepare_context`` (or a cache and ``streams`` to prepare
        it from). Never changes the cache."""
        cfg = self.config
        b = self._check_step(prev, clip_cond, context, partial, streams)
        if isinstance(context, KVCache):
            context = self.prepare_context(context, streams)
        if partial.length + cfg.block > cfg.tokens_per_clip:  # logits of positions past it
            raise ValueError(
                f"the clip's {cfg.tokens_per_clip} tokens are all fed ({partial.length}): "
                "commit it, then start the next with a new Partial"
            )
        x = self.inputs(prev, b) + clip_cond[:, None]
        offset = partial.length
        q_pos = context.start[:, None] + offset + torch.arange(cfg.block, device=x.device)
        rot = self._rotation(q_pos[:, None], x.dtype)  # (b, 1, B, e/2)
        mask = None
        if not context.all_valid:
            own = torch.ones(b, offset + cfg.block, dtype=torch.bool, device=x.device)
            mask = torch.cat([context.valid, own], dim=1)[:, None, None]
        out = Partial()
        for layer, block in enumerate(self.blocks):
            keys, values = context.k[layer], context.v[layer]
            if offset:
                keys = torch.cat([keys, partial.k_rot[layer]], dim=2)
                values = torch.cat([values, partial.v[layer]], dim=2)
            keep: list = []
            x = block(x, rot, (keys, values), mask, keep)
            ((k_new, k_rot_new, v_new),) = keep
            if offset:
                k_new = torch.cat([partial.k[layer], k_new], dim=2)
                k_rot_new = torch.cat([partial.k_rot[layer], k_rot_new], dim=2)
                v_new = torch.cat([partial.v[layer], v_new], dim=2)
            out.k.append(k_new)
            out.k_rot.append(k_rot_new)
            out.v.append(v_new)
        return self.head(self.norm(x)), out

    def _check_step(
        self,
        prev: torch.Tensor | None,
        clip_cond: torch.Tensor,
        context: BlockContext | KVCache,
        partial: Partial,
        streams: Sequence[int] | None,
    ) -> int:
        """The batch size b of a block step, its inputs' shapes checked against it: a
        ``prev`` of one row (or 1-D) was broadcast over every stream without a word, and
        other mismatches failed deep inside as a concatenation or einops error."""
        dim, block = self.config.dim, self.config.block
        if clip_cond.ndim != 2 or clip_cond.shape[1] != dim or not clip_cond.is_floating_point():
            raise ValueError(
                f"clip_cond must be float (b, dim={dim}) (clip_condition's), got "
                f"{clip_cond.dtype} {tuple(clip_cond.shape)}"
            )
        b = clip_cond.shape[0]
        if prev is not None and tuple(prev.shape) != (b, block):
            raise ValueError(
                f"prev must be the previous block's tokens (b, block) = ({b}, {block}), one row "
                f"per row of clip_cond, got {tuple(prev.shape)}"
            )
        if isinstance(context, KVCache):
            if streams is None or len(streams) != b:
                raise ValueError(
                    f"streams must name one cache stream per row of clip_cond ({b}), got "
                    f"{None if streams is None else len(streams)}"
                )
        elif context.valid.shape[0] != b:
            raise ValueError(
                f"context was prepared for {context.valid.shape[0]} streams, clip_cond has {b} rows"
            )
        if partial.length and partial.k[0].shape[0] != b:
            raise ValueError(
                f"partial holds the blocks of {partial.k[0].shape[0]} streams, clip_cond has "
                f"{b} rows"
            )
        return b

    def commit(self, partial: Partial, cache: KVCache, streams: Sequence[int]) -> None:
        """The write pass of a finished clip: its blocks' K/V, computed while it was made,
        are appended to the cache (evicting whole clips past the window)."""
        cfg = self.config
        if partial.length != cfg.tokens_per_clip:
            raise ValueError(
                f"a clip has {cfg.tokens_per_clip} tokens, partial has {partial.length}"
            )
        n = cfg.tokens_per_frame
        k = torch.stack([rearrange(k, "b h (f n) e -> b h f n e", n=n) for k in partial.k])
        v = torch.stack([rearrange(v, "b h (f n) e -> b h f n e", n=n) for v in partial.v])
        cache.append(streams, k, v)


def nbp_loss(
    model: NextBlockTransformer,
    tokens: torch.Tensor,
    cond: ClipCond,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Cross-entropy of next-block prediction over whole clips of tokens (b, T). With a
    ``generator`` and ``config.token_noise`` > 0, that fraction of the input tokens is
    replaced by random ones (drawn from ``generator``); the targets are the clean tokens."""
    inputs, p = tokens, model.config.token_noise
    if generator is not None and p > 0:
        dev = tokens.device
        hit = torch.rand(tokens.shape, generator=generator, device=dev) < p
        noise = torch.randint(0, model.config.vocab, tokens.shape, generator=generator, device=dev)
        inputs = torch.where(hit, noise, tokens)
    logits = model(inputs, cond)
    return F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
