"""LARP-style discrete video tokenizer: holistic learned queries, stochastic VQ, AR prior.

A clip (b, t, 3, H, W) is cut into 3-D patches; the patch tokens and N learned *holistic*
query tokens go through a bidirectional ViT and only the query outputs are kept, so a token
describes the clip as a whole rather than one patch. Each query output is projected to a low
dimension, L2-normalised and quantised against an L2-normalised codebook: training samples the
code from softmax(cos-sim / tau) (stochastic VQ), evaluation takes the argmax, and the
straight-through estimator passes gradients. The decoder is a ViT over the N latent tokens
plus one learned query per patch; the patch-query outputs are unpatchified into the clip.

Each holistic query starts from the pooled embedding of the patches assigned to it (token i
gets patch i*P//N) and each decoder patch query from the latent tokens assigned to it. This
is an initialisation, not a constraint — every attention is still global, so tokens can carry
information about the whole clip — but it gives training a route from the start: with
randomly routed queries the autoencoder stayed at the per-position mean for hundreds of steps
(measured: latent MSE 0.26 after 300 steps against 0.10 after 125 steps with it).

With ``context_decoder`` the decoder also reads the previous clip's code vectors (their own
learned positions; a learned null context for a video's first clip), so clips decoded one
by one join up at their seams; the encoder, and so the ids, do not depend on it.

A small causal GPT prior is trained jointly: it predicts each token's code from the codes
before it (cross-entropy, small weight), which shapes the latent space to be easy for an
autoregressive generator. It is discarded at inference (``encode``/``decode`` never use it).

Losses: L1 + perceptual_weight x (1 - SSIM) + grad_weight x L1(image gradients) (no
downloaded network: SSIM keeps local structure, the gradient term keeps the worlds' edges
sharp) + VQ commitment + prior_weight x prior CE, and optionally (``gan_weight`` > 0) the
paper's patch-GAN hinge term from step ``gan_start`` on (``vidgen.tokenizers.gan``, trained
by the loop as the task's adversary).

Axis letters: ``b`` batch, ``t`` frames, ``c`` channels, ``h``/``w`` height/width, ``n``
holistic tokens, ``p`` patches, ``d`` model dim, ``e`` code dim, ``k`` codebook entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vidgen.nn.masks import block_causal_mask
from vidgen.nn.transformer import Transformer
from vidgen.tokenizers.kl import KLAutoencoder, check_float_input, foreground_weights
from vidgen.tokenizers.losses import gradient_l1, ssim
from vidgen.validate import check_depths, check_ints, check_number

NO_CONTEXT = -1  # a context row of these: the clip has no previous clip (see ``decode``)


@dataclass
class LARPConfig:
    """``channels`` x ``size`` x ``size`` inputs: RGB pixels (3, as in the paper) or the
    latents of a frozen per-frame autoencoder (``autoencoder`` names it; then the tokenizer
    sees 4 x 8 x 8 latents of 64 x 64 frames and ``LARPVideoTokenizer`` maps pixels in and
    out)."""

    channels: int = 4
    size: int = 8
    frames: int = 8
    patch_t: int = 2
    patch: int = 2
    autoencoder: str = "kl-tiny"
    dim: int = 128
    enc_depth: int = 4
    dec_depth: int = 4
    heads: int = 4
    num_tokens: int = 128
    codebook_size: int = 1024
    code_dim: int = 16
    tau: float = 0.05  # sampling temperature of the stochastic VQ (cosine logits / tau)
    stochastic: bool = True  # sample codes in training (False: nearest code, as in eval)
    entropy_weight: float = 0.0  # weight of H(per-token assignment) - H(batch assignment)
    # Training steps before quantisation starts: the autoencoder first learns to use its 16-d
    # bottleneck continuously (so encoder outputs spread out), then the codebook is
    # initialised on encoder outputs. Without it the encoder's outputs start nearly equal and
    # the codebook collapses onto one code.
    vq_warmup: int = 500
    prior_dim: int = 128
    prior_depth: int = 2
    prior_heads: int = 4
    prior_weight: float = 0.05
    commit_weight: float = 0.25
    mse_weight: float = 1.0
    # Small objects are a few latent pixels of a clip: the L1 and MSE of foreground positions
    # (summed channel distance from the frame's per-channel median above
    # foreground_threshold, in input units: ~2 for kl-tiny's scaled latents, ~0.1 for
    # pixels) are weighted by 1 + foreground_weight (0: plain means).
    foreground_weight: float = 0.0
    foreground_threshold: float = 2.0
    perceptual_weight: float = 0.0  # (1 - SSIM); for pixel inputs
    grad_weight: float = 0.0  # L1 of image gradients; for pixel inputs
    # Optional patch-GAN on the reconstructed frames (decoded to pixels by the autoencoder
    # for a latent-space LARP): hinge loss, weight gan_weight, from step gan_start on.
    gan_weight: float = 0.0
    gan_start: int = 2000
    disc_dim: int = 64
    disc_layers: int = 3
    usage_decay: float = 0.99  # EMA of code usage, for the dead-code restart
    dead_usage: float = 2e-4  # a code used less than this fraction of the time is dead
    restart_every: int = 50  # training steps between dead-code restarts (0 = never)
    # Context decoding: the decoder also reads the previous clip's tokens (learned positions
    # of their own; a learned null context for a video's first clip), so consecutive clips
    # decoded one by one join up. Training then takes videos of several clips (data.clip_len
    # a multiple of ``frames``): clip 0 is decoded without context, clip i with clip i - 1's
    # codes, and seam_weight x L1 asks each clip's first frame to step from the previous
    # clip's (detached) reconstructed last frame as the true frames do. The encoder, and so
    # the ids, are unaffected.
    context_decoder: bool = False
    seam_weight: float = 0.0

    def restart_problem(self) -> str | None:
        """Why the dead-code restart cannot work with these settings, or None. Checked when
        training starts, not when a checkpoint loads (dead_usage is read by training only)."""
        if self.restart_every and self.dead_usage > 1 / self.codebook_size:
            # Every code, evenly used, would count as dead: each restart moved the whole
            # codebook (and reset its usage below the threshold again).
            return (
                f"tokenizer.dead_usage={self.dead_usage} must not exceed an evenly used code's "
                f"share, 1/codebook_size = {1 / self.codebook_size:.3g} (e.g. "
                "0.2/codebook_size), or tokenizer.restart_every=0"
            )
        return None

    def __post_init__(self) -> None:
        check_ints(self, 1, "channels", "size", "frames", "patch_t", "patch", "dim", "heads")
        check_ints(self, 1, "enc_depth", "dec_depth", "code_dim", "prior_dim", "prior_depth")
        check_depths(self, "enc_depth", "dec_depth", "prior_depth")
        check_ints(self, 1, "prior_heads", "disc_dim", "disc_layers")
        check_depths(self, "disc_layers")
        # Widths stop growing at x 8 (layer 3): the layers past it are checked by it (a file
        # saying disc_layers=2**62 looped here for ever).
        if self.disc_dim < 8 or any(  # the patch-GAN's GroupNorms (checked when it was built)
            (w := self.disc_dim * min(2**i, 8)) % min(32, w // 4)
            for i in range(1, min(self.disc_layers, 4))
        ):
            raise ValueError(
                f"disc_dim must be >= 8 and give each patch-GAN layer's width (disc_dim x 2, "
                f"x 4, x 8) a GroupNorm of min(32, width / 4) groups (a multiple of 16 does), "
                f"got {self.disc_dim}"
            )
        check_ints(self, 0, "vq_warmup", "restart_every")
        check_number("tau", self.tau, above=0)
        check_number("usage_decay", self.usage_decay, minimum=0, below=1)
        check_number("dead_usage", self.dead_usage, minimum=0, below=1)
        for name in ("entropy_weight", "prior_weight", "commit_weight", "mse_weight"):
            check_number(name, getattr(self, name), minimum=0)
        check_number("perceptual_weight", self.perceptual_weight, minimum=0)
        check_number("grad_weight", self.grad_weight, minimum=0)
        check_number("foreground_weight", self.foreground_weight, minimum=0)
        check_number("foreground_threshold", self.foreground_threshold, above=0)
        check_number("seam_weight", self.seam_weight, minimum=0)
        check_number("gan_weight", self.gan_weight, minimum=0)
        if self.foreground_weight < 0 or self.foreground_threshold <= 0:
            raise ValueError(
                "foreground_weight must be >= 0 and foreground_threshold > 0, got "
                f"{self.foreground_weight}, {self.foreground_threshold}"
            )
        if self.seam_weight < 0 or (self.seam_weight and not self.context_decoder):
            raise ValueError(
                f"seam_weight must be >= 0 and needs context_decoder=True, got "
                f"seam_weight={self.seam_weight}, context_decoder={self.context_decoder}"
            )
        if self.gan_weight < 0 or self.gan_start < 0:
            raise ValueError(
                f"gan_weight and gan_start must be >= 0, got {self.gan_weight}, {self.gan_start}"
            )
        if self.frames % self.patch_t or self.size % self.patch:
            raise ValueError(
                f"frames={self.frames} and size={self.size} must be multiples of "
                f"patch_t={self.patch_t} and patch={self.patch}"
            )
        for name in ("dim", "prior_dim"):
            heads = self.heads if name == "dim" else self.prior_heads
            if getattr(self, name) % heads:
                raise ValueError(f"{name}={getattr(self, name)} must be divisible by its heads")
        check_ints(self, 1, "num_tokens")
        check_ints(self, 2, "codebook_size")

    @property
    def on_pixels(self) -> bool:
        """RGB frames in and out (no autoencoder named): decodes are clamped to [-1, 1]. A
        LARP over latents of 3 channels is not (they are not bounded)."""
        return self.channels == 3 and not self.autoencoder

    @property
    def num_patches(self) -> int:
        return (self.frames // self.patch_t) * (self.size // self.patch) ** 2

    @property
    def patch_values(self) -> int:
        return self.patch_t * self.patch * self.patch * self.channels

    @property
    def tokens_per_frame(self) -> int:
        """Holistic tokens are not tied to frames; this is N / frames, the rate NBP sees."""
        return self.num_tokens // self.frames


LARP_CONFIGS: dict[str, LARPConfig] = {
    "test": LARPConfig(
        channels=4,
        size=4,
        frames=4,
        patch_t=2,
        patch=2,
        autoencoder="",
        dim=32,
        enc_depth=2,
        dec_depth=2,
        heads=2,
        num_tokens=8,
        codebook_size=64,
        code_dim=8,
        prior_dim=32,
        prior_depth=2,
        prior_heads=2,
        vq_warmup=0,
    ),
    # 8 frames of 64 x 64 through kl-tiny (4 x 8 x 8 latents), 128 tokens, 1024 x 16 codes.
    "tiny": LARPConfig(),
    # The paper's LARP-L shapes on pixels: 16 frames of 128 px, 1024 tokens, 8192 x 16 codes.
    "large": LARPConfig(
        channels=3,
        size=128,
        frames=16,
        patch_t=4,
        patch=8,
        autoencoder="",
        dim=768,
        enc_depth=12,
        dec_depth=12,
        heads=12,
        num_tokens=1024,
        codebook_size=8192,
        dead_usage=0.2 / 8192,  # the share tiny's 2e-4 is of its 1024 codes
        code_dim=16,
        prior_dim=768,
        prior_depth=12,
        prior_heads=12,
        perceptual_weight=0.2,
        grad_weight=0.5,
    ),
}


class StochasticVQ(nn.Module):
    """Cosine-similarity VQ: z (..., e) and codebook rows are L2-normalised; codes are
    sampled from softmax(cos / tau) with a generator, or the argmax when none is given."""

    def __init__(self, size: int, dim: int, tau: float, usage_decay: float) -> None:
        super().__init__()
        self.tau, self.usage_decay = tau, usage_decay
        self.codebook = nn.Parameter(F.normalize(torch.randn(size, dim), dim=-1))
        self.register_buffer("usage", torch.full((size,), 1.0 / size))
        # 0 during the VQ warm-up (training passes z through unquantised), 1 after.
        self.register_buffer("active", torch.ones((), dtype=torch.int64))

    def codes(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=-1)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """(..., e) unit vectors -> (..., k) cosine logits / tau, in float32 at least (under
        autocast too): in bfloat16 the cosines and logits are rounded so coarsely that about
        2% of the ids were not the nearest codeword."""
        work = torch.promote_types(z.dtype, torch.float32)
        with torch.autocast(z.device.type, enabled=False):
            return z.to(work) @ self.codes().to(work).t() / self.tau

    def forward(
        self, z: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (ids (...), quantised (..., e)): the straight-through codeword, whose value is
        exactly the chosen (normalised) codebook row."""
        ids, quantised, _ = self.quantize(z, generator)
        return ids, quantised

    def quantize(
        self, z: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward`` plus the nearest codes' ids (those ``encode`` picks), from the same
        logits: the sampled ids are the nearest ones when no generator is given."""
        z = F.normalize(z, dim=-1)
        logits = self.logits(z)
        nearest = logits.argmax(dim=-1)
        ids = nearest
        if generator is not None:
            flat = logits.reshape(-1, logits.shape[-1]).float().softmax(dim=-1)
            ids = torch.multinomial(flat, 1, generator=generator).reshape(logits.shape[:-1])
        code = self.codes()[ids]
        # code + (z - z.detach()), not z + (code - z).detach(): the value is exactly the
        # codeword (the latter rounds twice: 3e-8 off in float32, 2e-3 in bfloat16), the
        # gradient the same.
        return ids, code + (z - z.detach()), nearest

    @torch.no_grad()
    def track(self, ids: torch.Tensor) -> None:
        counts = torch.bincount(ids.flatten(), minlength=self.usage.numel()).float()
        if counts.sum() > 0:  # none: 0 / 0 made every code's usage NaN for good
            # In the buffer's dtype: a model cast to bfloat16/float64 failed here in training.
            share = (counts / counts.sum()).to(self.usage.dtype)
            self.usage.lerp_(share, 1.0 - self.usage_decay)


class Prior(nn.Module):
    """Causal GPT over code vectors: output i predicts code i from codes < i."""

    def __init__(self, cfg: LARPConfig) -> None:
        super().__init__()
        self.inp = nn.Linear(cfg.code_dim, cfg.prior_dim)
        self.bos = nn.Parameter(torch.randn(cfg.prior_dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(cfg.num_tokens, cfg.prior_dim) * 0.02)
        self.body = Transformer(cfg.prior_dim, cfg.prior_depth, cfg.prior_heads)
        self.head = nn.Linear(cfg.prior_dim, cfg.code_dim)
        self.register_buffer("mask", block_causal_mask(cfg.num_tokens, 1), persistent=False)

    def forward(self, quantised: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """quantised (b, n, e) -> logits (b, n, k) over the codebook ``codes`` (k, e): the
        head's output dotted with each code, so the prior learns its own sharpness."""
        x = self.inp(quantised)[:, :-1]
        x = torch.cat([self.bos.expand(x.shape[0], 1, -1), x], dim=1) + self.pos
        h = self.body(x, self.mask[..., : x.shape[1], : x.shape[1]])
        return self.head(h) @ codes.t()


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


class LARPTokenizer(nn.Module):
    """Clips (b, t, 3, H, W) in [-1, 1] <-> N token ids (b, N) in [0, codebook_size)."""

    # What decides the ids ``encode`` gives: these config fields and these parameters (the
    # decoder, the prior and the usage statistics do not), and the code (bump the version
    # when it changes what the encoder computes from the same weights).
    ENCODER_VERSION: ClassVar[int] = 1
    ENCODER_SETTINGS: ClassVar[tuple[str, ...]] = (
        "channels",
        "size",
        "frames",
        "patch_t",
        "patch",
        "dim",
        "enc_depth",
        "heads",
        "num_tokens",
        "codebook_size",
        "code_dim",
    )
    ENCODER_TENSORS: ClassVar[tuple[str, ...]] = (
        "patch_in.",
        "patch_pos",
        "queries",
        "encoder.",
        "to_code.",
        "quantizer.codebook",
    )

    # Parameters a fine-tune (``init=``) may add to a trained model that lacks them (when
    # its config creates them): they start from their initial values.
    ADDED_BY_FINE_TUNES: ClassVar[tuple[str, ...]] = ("context_pos", "context_null")

    def __init__(self, config: LARPConfig) -> None:
        super().__init__()
        cfg = self.config = config
        self.patch_in = nn.Linear(cfg.patch_values, cfg.dim)
        self.patch_pos = nn.Parameter(torch.randn(cfg.num_patches, cfg.dim))
        self.queries = nn.Parameter(torch.randn(cfg.num_tokens, cfg.dim) * 0.1)
        self.encoder = Transformer(cfg.dim, cfg.enc_depth, cfg.heads)
        self.to_code = nn.Linear(cfg.dim, cfg.code_dim)
        self.quantizer = StochasticVQ(cfg.codebook_size, cfg.code_dim, cfg.tau, cfg.usage_decay)
        self.from_code = nn.Linear(cfg.code_dim, cfg.dim)
        self.latent_pos = nn.Parameter(torch.randn(cfg.num_tokens, cfg.dim))
        self.patch_query = nn.Parameter(torch.randn(cfg.num_patches, cfg.dim) * 0.1)
        self.decoder = Transformer(cfg.dim, cfg.dec_depth, cfg.heads)
        self.patch_out = nn.Linear(cfg.dim, cfg.patch_values)
        if cfg.context_decoder:  # the previous clip's tokens, read by the decoder
            self.context_pos = nn.Parameter(torch.randn(cfg.num_tokens, cfg.dim))
            self.context_null = nn.Parameter(torch.zeros(cfg.dim))
        self.prior = Prior(cfg)
        # Token i starts from the patches i*P//N covers; patch j from the tokens assigned to
        # it (see the module docstring). Fixed, so not saved.
        owner = torch.arange(cfg.num_tokens) * cfg.num_patches // cfg.num_tokens
        assign = F.one_hot(owner, cfg.num_patches).float()  # (n, p)
        gather = assign.t().clone()
        empty = gather.sum(1) == 0  # more patches than tokens: take the nearest token
        nearest = torch.arange(cfg.num_patches) * cfg.num_tokens // cfg.num_patches
        # gather[empty, nearest[empty]] = 1, without data-dependent indexing (a model built
        # on the meta device, to check a checkpoint's shapes first, cannot index by mask).
        gather = gather + empty[:, None].float() * F.one_hot(nearest, cfg.num_tokens).float()
        self.register_buffer("query_init", assign, persistent=False)
        self.register_buffer("patch_init", gather / gather.sum(1, keepdim=True), persistent=False)

    # --- patches --------------------------------------------------------------------

    def patchify(self, video: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        expected = (cfg.frames, cfg.channels, cfg.size, cfg.size)
        if video.ndim != 5 or tuple(video.shape[1:]) != expected:
            raise ValueError(
                f"video must be (b, {', '.join(map(str, expected))}), got {tuple(video.shape)}"
            )
        # Frames in [-1, 1] on pixels; a latent-space model's scaled latents have no such bound.
        check_float_input("video", video, self.patch_in.weight.dtype, video=cfg.on_pixels)
        return rearrange(
            video,
            "b (t pt) c (h ph) (w pw) -> b (t h w) (pt ph pw c)",
            pt=cfg.patch_t,
            ph=cfg.patch,
            pw=cfg.patch,
        )

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        side = cfg.size // cfg.patch
        return rearrange(
            patches,
            "b (t h w) (pt ph pw c) -> b (t pt) c (h ph) (w pw)",
            h=side,
            w=side,
            pt=cfg.patch_t,
            ph=cfg.patch,
            pw=cfg.patch,
        )

    # --- the three halves ---------------------------------------------------------------

    def embed(self, video: torch.Tensor) -> torch.Tensor:
        """Unquantised code vectors (b, n, e) of the holistic queries."""
        patches = self.patch_in(self.patchify(video)) + self.patch_pos  # (b, p, d)
        queries = self.queries + torch.einsum("np,bpd->bnd", self.query_init, patches)
        x = torch.cat([patches, queries], dim=1)
        return self.to_code(self.encoder(x)[:, -self.config.num_tokens :])  # queries only

    def decode_codes(
        self,
        quantised: torch.Tensor,
        context: torch.Tensor | None = None,
        has_context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Code vectors (b, n, e) -> clip (b, t, 3, H, W), unclamped. A context decoder also
        reads ``context`` (b, n, e), the previous clips' code vectors, in the rows where
        ``has_context`` (b,) bool, and its null context elsewhere (everywhere without a
        context)."""
        cfg = self.config
        if not cfg.context_decoder and context is not None:
            raise ValueError("this LARP has no context decoder (context_decoder=False)")
        latents = self.from_code(quantised) + self.latent_pos
        patch_queries = self.patch_query + torch.einsum("pn,bnd->bpd", self.patch_init, latents)
        parts = [latents, patch_queries]
        if cfg.context_decoder:
            ctx = self.context_null.expand_as(latents)
            if context is not None:
                ctx = torch.where(has_context[:, None, None], self.from_code(context), ctx)
            parts.insert(0, ctx + self.context_pos)
        h = self.decoder(torch.cat(parts, dim=1))[:, -cfg.num_patches :]  # patch queries only
        return self.unpatchify(self.patch_out(h))

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Deterministic ids (b, N): each token's nearest codeword by cosine."""
        ids, _ = self.quantizer(self.embed(video))
        return ids

    def encoder_fingerprint(self, autoencoder: str | None = None) -> str:
        """Identifies the ids ``encode`` gives (see ``ENCODER_SETTINGS``/``ENCODER_TENSORS``)
        of inputs made by the autoencoder whose fingerprint is ``autoencoder``: a model
        trained on these ids stays valid when only the decoder or the prior change."""
        from vidgen.checkpoint import module_fingerprint

        return module_fingerprint(
            self,
            self.ENCODER_TENSORS,
            self.config,
            self.ENCODER_SETTINGS,
            kind="larp",
            version=self.ENCODER_VERSION,
            autoencoder=autoencoder,
        )

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """ids (b, N) -> clip (b, t, c, s, s) (pixels are clamped to [-1, 1]). ``context``
        (b, N): the ids of each clip's previous clip, for a context decoder; a row of
        ``NO_CONTEXT`` (a video's first clip) decodes without one, as does ``None``."""
        k = self.config.codebook_size
        ids = self._checked_ids(ids)
        codes = self.quantizer.codes()
        if context is None:
            out = self.decode_codes(codes[ids])
        else:
            if context.shape != ids.shape or not _is_integer(context):
                raise ValueError(
                    f"context must be integer ids of the shape of ids {tuple(ids.shape)}, got "
                    f"{context.dtype} {tuple(context.shape)}"
                )
            context = context.long()
            none = context == NO_CONTEXT
            has = ~none.all(1)
            valid = (context >= 0) & (context < k)
            if not bool(torch.where(has[:, None], valid, none).all()):
                raise ValueError(
                    f"each context row must be all ids in [0, {k}) or all NO_CONTEXT ({NO_CONTEXT})"
                )
            out = self.decode_codes(codes[ids], codes[context.clamp_min(0)], has)
        return out.clamp(-1, 1) if self.config.on_pixels else out

    @torch.no_grad()
    def decode_video(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (b, m, N) of m consecutive clips -> (b, m t, c, s, s): each clip decoded with
        the previous one's ids as its context (a context decoder; the first clip without),
        all clips in one batch."""
        n = self.config.num_tokens
        if ids.dim() != 3 or ids.shape[2] != n or not _is_integer(ids):
            raise ValueError(
                f"ids must be integer (batch, clips, num_tokens={n}) for decode_video, got "
                f"{ids.dtype} {tuple(ids.shape)} (one clip's ids (batch, {n}) go to decode)"
            )
        ids = ids.long()  # NO_CONTEXT (-1) in uint8 ids was 255, a real code
        b, m = ids.shape[:2]
        context = None
        if self.config.context_decoder:
            context = torch.full_like(ids, NO_CONTEXT)
            context[:, 1:] = ids[:, :-1]
            context = context.reshape(b * m, n)
        flat = self.decode(ids.reshape(b * m, n), context)
        return flat.reshape(b, m * flat.shape[1], *flat.shape[2:])

    def prior_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(b, n, k): position i's distribution over code i given codes < i."""
        codes = self.quantizer.codes()
        return self.prior(codes[self._checked_ids(ids)], codes)

    def _checked_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` (b, N) as int64 within the codebook, or a ValueError naming them."""
        n, k = self.config.num_tokens, self.config.codebook_size
        if ids.ndim != 2 or ids.shape[1] != n or not _is_integer(ids):
            raise ValueError(f"ids must be integer (b, {n}), got {ids.dtype} {tuple(ids.shape)}")
        # int64 first: uint8 ids would index as a mask, int16 ones not at all, and a narrow
        # dtype would wrap the codebook size in the range check (1024 is 0 in uint8).
        ids = ids.long()
        if bool(((ids < 0) | (ids >= k)).any()):  # one check (one device sync)
            raise ValueError(f"ids must lie in [0, {k}), got {int(ids.min())}..{int(ids.max())}")
        return ids

    def forward(
        self, video: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Losses and metrics on ``video``; codes are sampled when a generator is given.
        ``z`` (b, n, e) is the batch's normalised encoder output (for dead-code restarts)."""
        cfg = self.config
        if video.ndim == 5 and (video.shape[0] == 0 or video.shape[1] == 0):
            # Losses of nothing are NaN (0 / 0), and were trained on without a word.
            raise ValueError(f"video must hold frames, got shape {tuple(video.shape)}")
        b, m = video.shape[0], 1
        if cfg.context_decoder and video.ndim == 5 and video.shape[1] % cfg.frames == 0:
            # m consecutive clips: decoded as a video is, each reading the one before.
            m = video.shape[1] // cfg.frames
            video = video.reshape(b * m, cfg.frames, *video.shape[2:])
        z = F.normalize(self.embed(video), dim=-1)
        # Sampled codes in training only: evaluation takes the nearest (as ``encode`` does).
        sample = cfg.stochastic and self.training and generator is not None
        # Usage (dead codes, perplexity) counts the codes ``encode`` would pick: a code that
        # is only ever sampled, never the nearest, is dead to every model trained on the ids.
        ids, quantised, nearest = self.quantizer.quantize(z, generator if sample else None)
        if not bool(self.quantizer.active):
            quantised = z  # VQ warm-up: the bottleneck is continuous
        if self.training:
            self.quantizer.track(nearest)
        if m > 1:  # clip i reads clip i - 1's codes; clip 0 (rolled onto from m - 1) none
            context = quantised.reshape(b, m, *quantised.shape[1:]).roll(1, dims=1).flatten(0, 1)
            has = (torch.arange(b * m, device=video.device) % m) != 0
            recon = self.decode_codes(quantised, context, has)
        else:
            recon = self.decode_codes(quantised)
        flat_r, flat_v = recon.flatten(0, 1), video.flatten(0, 1)
        if cfg.foreground_weight:
            weight = foreground_weights(flat_v, cfg.foreground_weight, cfg.foreground_threshold)
            l1 = ((flat_r - flat_v).abs() * weight).mean()
            mse = ((flat_r - flat_v).pow(2) * weight).mean()
        else:
            l1 = (flat_r - flat_v).abs().mean()
            mse = F.mse_loss(flat_r, flat_v)
        zero = torch.zeros((), device=z.device)
        structural = 1.0 - ssim(flat_r, flat_v) if cfg.perceptual_weight else zero
        grad = gradient_l1(flat_r, flat_v) if cfg.grad_weight else zero
        commit = (z - quantised.detach()).pow(2).sum(-1).mean()  # pulls z to its code
        codebook = (z.detach() - self.quantizer.codes()[ids]).pow(2).sum(-1).mean()
        prior_ce = F.cross_entropy(
            self.prior(quantised, self.quantizer.codes()).flatten(0, 1), ids.flatten()
        )
        entropy = self._entropy_loss(z) if cfg.entropy_weight else zero
        seam = self._seam_loss(recon, video, m) if m > 1 and cfg.seam_weight else zero
        loss = (
            cfg.entropy_weight * entropy
            + cfg.seam_weight * seam
            + l1
            + cfg.mse_weight * mse
            + cfg.perceptual_weight * structural
            + cfg.grad_weight * grad
            + codebook
            + cfg.commit_weight * commit
            + cfg.prior_weight * prior_ce
        )
        with torch.no_grad():
            usage = torch.bincount(nearest.flatten(), minlength=cfg.codebook_size).float()
            p = usage / usage.sum()
            perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
        return {
            "loss": loss,
            "recon": recon,  # (b, t, c, h, w), with its graph: for an adversarial term
            "z": z.detach(),
            "l1": l1,
            "mse": mse,
            "commit": commit,
            "prior_ce": prior_ce,
            "seam": seam,
            "perplexity": perplexity,
            "dead_codes": (self.quantizer.usage < cfg.dead_usage).float().sum(),
        }

    @staticmethod
    def _seam_loss(recon: torch.Tensor, video: torch.Tensor, m: int) -> torch.Tensor:
        """L1 between the reconstructed and the true step from each clip's last frame to the
        next clip's first, the earlier clip's reconstruction detached (the later clip, which
        reads the earlier one's tokens, is the one asked to join up)."""
        recon = recon.reshape(-1, m, *recon.shape[1:])
        video = video.reshape(-1, m, *video.shape[1:])
        step = recon[:, 1:, 0] - recon[:, :-1, -1].detach()
        return (step - (video[:, 1:, 0] - video[:, :-1, -1])).abs().mean()

    def _entropy_loss(self, z: torch.Tensor) -> torch.Tensor:
        """Mean per-token assignment entropy minus the entropy of the batch's mean
        assignment: low when each token is confident and the batch uses many codes."""
        probs = self.quantizer.logits(z).flatten(0, -2).float().softmax(dim=-1)  # (m, k)
        per_token = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean()
        mean = probs.mean(0)
        return per_token + (mean * torch.log(mean.clamp_min(1e-12))).sum()

    @torch.no_grad()
    def restart_dead_codes(
        self, z: torch.Tensor, generator: torch.Generator, everything: bool = False
    ) -> torch.Tensor:
        """Move codes whose usage EMA fell below ``dead_usage`` (or all codes, with
        ``everything``: the data-dependent initialisation) onto encoder outputs ``z`` (m, e)
        drawn at random, plus a little noise; returns the indices of the codes moved (the
        trainer resets their optimizer moments and EMA rows). Codes then sit where the
        encoder's outputs are, which is what keeps the codebook from collapsing."""
        usage = self.quantizer.usage
        dead = (
            torch.arange(usage.numel(), device=usage.device)
            if everything
            else torch.nonzero(usage < self.config.dead_usage).flatten()
        )
        if dead.numel() == 0 or z.numel() == 0:
            return dead[:0]
        z = F.normalize(z.reshape(-1, z.shape[-1]).float(), dim=-1)
        pick = torch.randint(0, z.shape[0], (dead.numel(),), generator=generator)
        noise = torch.randn(dead.numel(), z.shape[1], generator=generator)
        new = F.normalize(z[pick.to(z.device)] + 0.01 * noise.to(z.device), dim=-1)
        self.quantizer.codebook[dead] = new.to(self.quantizer.codebook.dtype)
        usage[dead] = 1.0 / self.config.codebook_size
        return dead


class LARPVideoTokenizer(nn.Module):
    """Pixels in, token ids out, and back: the frozen per-frame autoencoder named by the
    LARP config (or none, for a pixel-space LARP) around the LARP tokenizer.

    encode: frames (b, t, 3, H, W) in [-1, 1] -> ids (b, N); decode: ids -> frames."""

    def __init__(self, larp: LARPTokenizer, autoencoder: KLAutoencoder | None) -> None:
        super().__init__()
        if (autoencoder is None) != larp.config.on_pixels:
            raise ValueError("a latent-space LARP needs its autoencoder; a pixel one none")
        if autoencoder is not None:
            kl, cfg = autoencoder.config, larp.config
            if (kl.latent_channels, kl.latent_size) != (cfg.channels, cfg.size):
                raise ValueError(
                    f"the autoencoder makes latents of {kl.latent_channels} channels at "
                    f"{kl.latent_size}x{kl.latent_size}; this LARP reads {cfg.channels} at "
                    f"{cfg.size}x{cfg.size}"
                )
        self.larp, self.autoencoder = larp.eval(), autoencoder
        if autoencoder is not None:
            autoencoder.eval()
        # The checkpoint files it was loaded from (``from_pretrained``): what its ids and
        # frames depend on, for provenance and resume checks, and the sha256s of the bytes
        # loaded from each.
        self.files: list[Path] = []
        self.file_sha256: list[str] = []

    @property
    def config(self) -> LARPConfig:
        return self.larp.config

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> LARPVideoTokenizer:
        from vidgen import checkpoint
        from vidgen.tokenizers.kl import KLConfig

        ckpt = checkpoint.load(name_or_path, expected_config=LARPConfig)
        larp = ckpt.build(LARPTokenizer, LARPConfig)
        autoencoder = None
        if larp.config.autoencoder:
            source = checkpoint.companion(larp.config.autoencoder, ckpt.path)
            kl = checkpoint.load(source, expected_config=KLConfig)
            autoencoder = kl.build(KLAutoencoder, KLConfig)
            # Trained on the latents of one encoder: another under the same name (retrained,
            # replaced) would turn the same frames into other ids without a word. Cards from
            # before the fingerprint was recorded pass.
            trained = ckpt.card.get("autoencoder_fingerprint")
            if trained is not None and trained != autoencoder.encoder_fingerprint():
                raise checkpoint.CheckpointError(
                    f"{ckpt.path} was trained on the latents of an autoencoder with encoder "
                    f"fingerprint {trained}, but {source} has "
                    f"{autoencoder.encoder_fingerprint()}: restore the autoencoder it was "
                    "trained with, or train it again on this one"
                )
        try:
            tokenizer = cls(larp, autoencoder)
        except ValueError as err:
            raise checkpoint.CheckpointError(f"{ckpt.path}: {err}") from err
        loaded = [ckpt] + ([kl] if larp.config.autoencoder else [])
        tokenizer.files = [c.path for c in loaded]
        tokenizer.file_sha256 = [c.sha256 for c in loaded]
        return tokenizer

    def encoder_fingerprint(self) -> str:
        """The LARP's encoder fingerprint over its autoencoder's (pixels -> ids)."""
        ae = None if self.autoencoder is None else self.autoencoder.encoder_fingerprint()
        return self.larp.encoder_fingerprint(ae)

    @torch.no_grad()
    def to_input(self, video: torch.Tensor) -> torch.Tensor:
        return video if self.autoencoder is None else self.autoencoder.encode(video)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Frames (b, frames, 3, H, W) in [-1, 1] -> ids (b, N) (the autoencoder checks the
        frames' size, the LARP their number)."""
        frames = self.larp.config.frames
        if video.ndim != 5 or video.shape[1] != frames:  # said in latents' shapes before
            raise ValueError(
                f"video must be (b, {frames}, channels, height, width) frames, got "
                f"{tuple(video.shape)}"
            )
        return self.larp.encode(self.to_input(video))

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """ids (b, N) -> frames; ``context`` as in ``LARPTokenizer.decode``."""
        return self._to_frames(self.larp.decode(ids, context))

    @torch.no_grad()
    def decode_video(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (b, m, N) of consecutive clips -> frames (b, m t, 3, H, W)."""
        return self._to_frames(self.larp.decode_video(ids))

    def _to_frames(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.autoencoder is None else self.autoencoder.decode(out).clamp(-1, 1)


def unigram_entropy(ids: torch.Tensor, codebook_size: int) -> float:
    """Entropy (nats) of the empirical code distribution of ``ids``."""
    p = torch.bincount(ids.flatten(), minlength=codebook_size).float()
    p = p / p.sum()
    return float(-(p * torch.log(p.clamp_min(1e-12))).sum())


@torch.no_grad()
def prior_cross_entropy(model: LARPTokenizer, ids: torch.Tensor) -> float:
    """Mean cross-entropy (nats) of the prior on ``ids`` (b, N)."""
    logits = model.prior_logits(ids)
    return float(F.cross_entropy(logits.flatten(0, 1), ids.flatten().long()))


def codebook_usage(ids: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Fraction of codes used, perplexity, and dead codes (never used) in ``ids``."""
    counts = torch.bincount(ids.flatten(), minlength=codebook_size)
    return {
        "used_fraction": float((counts > 0).float().mean()),
        "perplexity": math.exp(unigram_entropy(ids, codebook_size)),
        "dead_codes": int((counts == 0).sum()),
    }
