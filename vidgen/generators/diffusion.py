"""DiffusionClipGenerator: the clip-generator contract over the KL autoencoder, the causal
video DiT and the flow-matching Euler sampler.

Each ``step`` makes one clip for every given stream: all streams are denoised together, one
batched DiT call per Euler step (two with classifier-free guidance, batched as one), each
reading its stream's cached context; then one batched write pass appends the new clips' K/V.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from vidgen import checkpoint
from vidgen.data.worlds import to_model_range, to_uint8
from vidgen.generators.base import (
    DEFAULT_GUIDANCE,
    Clip,
    ClipLatents,
    GenerationRequest,
    Stream,
    StreamSnapshot,
    check_actions,
    check_contrast,
    check_dtype,
    check_frames_and_label,
    check_guidance,
    check_open,
    check_tokenizer,
    check_truth,
    closed_on_error,
    leading_actions,
    own_request,
    seeded,
    setting,
)
from vidgen.models.ca2vdm import Ca2VDMConfig, CausalVideoDiT, Cond
from vidgen.nn.cache import KVCache
from vidgen.nn.conditioning import NULL
from vidgen.sampling.flow import (
    MAX_ETA,
    classifier_free,
    scale_contrast,
    sde_sample,
    time_grid,
)
from vidgen.tokenizers.kl import KLAutoencoder, KLConfig
from vidgen.validate import check_number


class DiffusionClipGenerator:
    """Streams of clips from a ``CausalVideoDiT`` in the latent space of a ``KLAutoencoder``.

    ``max_streams`` sizes the preallocated cache (the actor's memory budget); ``time_shift``
    is the sampler's schedule shift and ``eta`` its noise (``sde_sample``: 0 = the Euler ODE
    sampler; a checkpoint card's ``eta`` when loaded); ``guidance`` and ``contrast`` the
    defaults of requests that leave theirs unset (``GenerationRequest``; a checkpoint card's
    ``guidance`` and ``contrast`` when loaded). ``dtype`` (``DTYPES``: float32 or bfloat16)
    is what the DiT, the autoencoder and the cache run in; noise, the sampler and the clip
    latents it returns stay float32. The generator takes the modules given as its own: they
    are moved to ``device`` and ``dtype`` in place (give each generator its own copies).
    """

    family = "diffusion"
    default_tokenizer = "kl-tiny"  # of a checkpoint whose card names none

    def __init__(
        self,
        model: CausalVideoDiT,
        autoencoder: KLAutoencoder,
        max_streams: int = 8,
        device: torch.device | str = "cpu",
        time_shift: float = 1.0,
        name: str = "",
        contrast: float = 1.0,
        guidance: float = DEFAULT_GUIDANCE,
        dtype: torch.dtype | str = torch.float32,
        eta: float = 0.0,
    ) -> None:
        self.contrast = check_contrast(contrast)
        self.eta = check_number("eta", eta, minimum=0, maximum=MAX_ETA)
        self.guidance = check_guidance(guidance)
        self.dtype = check_dtype(dtype)
        self.device = torch.device(device)
        self.model = model.to(self.device, self.dtype).eval()
        self.autoencoder = autoencoder.to(self.device, self.dtype).eval()
        self.config: Ca2VDMConfig = model.config
        self.clip_len = self.config.clip_len
        self.time_shift = check_number("time_shift", time_shift, above=0)
        self.name = name
        self.cache = KVCache(model.cache_spec(max_streams, self.dtype), self.device)
        self.frame_shape = (autoencoder.config.image_size, autoencoder.config.image_size, 3)
        self._streams: dict[int, Stream] = {}
        self._ids = itertools.count()
        # Checkpoint files besides the generator's own that its frames depend on (its
        # tokenizer's; set by ``from_pretrained``): resume and provenance check them too.
        self.companion_files: list[Path] = []
        # The sha256s of the bytes ``from_pretrained`` loaded: its own file's, and each
        # companion file's in order (None for a generator built from modules).
        self.sha256: str | None = None
        self.companion_sha256: list[str] = []

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        max_streams: int = 8,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
    ) -> DiffusionClipGenerator:
        """Load a shipped name (``ca2vdm-tiny``) or a checkpoint path; its model card names
        the autoencoder it was trained with."""
        ckpt = checkpoint.load(name_or_path, expected_config=Ca2VDMConfig)
        model = ckpt.build(CausalVideoDiT, Ca2VDMConfig)
        tok_name = checkpoint.companion(
            ckpt.card.get("tokenizer", cls.default_tokenizer), ckpt.path
        )
        tok = checkpoint.load(tok_name, expected_config=KLConfig)
        autoencoder = tok.build(KLAutoencoder, KLConfig)
        check_tokenizer(str(name_or_path), ckpt.card, tok_name, autoencoder.encoder_fingerprint())
        gen = cls(
            model,
            autoencoder,
            max_streams,
            device,
            name=checkpoint.spelled(name_or_path),
            contrast=ckpt.card.get("contrast", 1.0),
            guidance=ckpt.card.get("guidance", DEFAULT_GUIDANCE),
            dtype=dtype,
            eta=ckpt.card.get("eta", 0.0),
        )
        gen.companion_files, gen.companion_sha256 = [tok.path], [tok.sha256]
        gen.sha256 = ckpt.sha256
        return gen

    # --- streams ----------------------------------------------------------------------

    def _check(self, request: GenerationRequest) -> int:
        cfg = self.config
        if self.name and not checkpoint.same_checkpoint(request.model, self.name):
            # Its frames would come from these weights under the other model's name.
            raise ValueError(
                f"the request is for model {request.model!r}; this generator is {self.name!r}"
            )
        if request.reencode:
            raise ValueError(
                f"reencode applies to token models only; {self.name or 'this model'} is a "
                "diffusion model"
            )
        check_frames_and_label(request, self.clip_len, cfg.num_classes)
        check_actions(request, cfg.num_actions, cfg.action_dim)
        if request.context is not None:
            context = np.asarray(request.context)
            if tuple(context.shape[1:]) != self.frame_shape or len(context) % self.clip_len:
                raise ValueError(
                    f"context must be whole clips of {self.clip_len} frames of shape "
                    f"{self.frame_shape}, got {context.shape}"
                )
        return request.frames // self.clip_len

    def open(self, request: GenerationRequest) -> Stream:
        request = own_request(request)
        num_clips = self._check(request)
        slot = self.cache.add_stream()
        stream = Stream(id=next(self._ids), request=request, slot=slot, clip=0, num_clips=num_clips)
        self._streams[stream.id] = stream
        if request.context is not None:
            with closed_on_error(self, stream):
                self._write_context(stream, np.asarray(request.context))
        return stream

    @torch.no_grad()
    def _write_context(self, stream: Stream, frames: np.ndarray) -> None:
        clips = len(frames) // self.clip_len
        # Every clip, oldest first, as if the stream had made them: clips that leave the
        # window still shaped the K/V of those after them (the banded reference's semantics).
        # Encoded clip by clip: memory does not grow with the context's length.
        for j in range(clips):
            piece = frames[j * self.clip_len : (j + 1) * self.clip_len]
            video = to_model_range(piece)[None].to(self.device, self.dtype)  # (1, clip, 3, H, W)
            self._write([stream], self.autoencoder.encode(video), [-(clips - j)])

    def close(self, stream: Stream) -> None:
        """Free the stream's slot; a stream already closed (or another generator's) is
        left alone."""
        if self._streams.get(stream.id) is stream:
            del self._streams[stream.id]
            self.cache.remove_stream(stream.slot)

    # --- conditioning -------------------------------------------------------------------

    def _actions(self, streams: Sequence[Stream], clips: Sequence[int]) -> torch.Tensor | None:
        """(b, clip_len) leading actions of each stream's clip (``leading_actions``)."""
        cfg = self.config
        if not (cfg.num_actions or cfg.action_dim):
            return None
        rows = [
            leading_actions(stream.request, k, self.clip_len, cfg.num_actions, cfg.action_dim)
            for stream, k in zip(streams, clips, strict=True)
        ]
        return torch.stack(rows).to(self.device)

    def _labels(self, streams: Sequence[Stream]) -> torch.Tensor | None:
        if not self.config.num_classes:
            return None
        labels = [NULL if s.request.label is None else s.request.label for s in streams]
        return torch.tensor(labels, dtype=torch.int64, device=self.device)

    # --- the step -------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, streams: list[Stream]) -> list[ClipLatents]:
        """One clip for each stream. Streams with different ``steps`` are denoised in separate
        groups (the Euler grid must be shared); everything else is batched."""
        check_open(self._streams, streams)
        if not streams:
            return []
        # Every group is denoised before any is written: a step that fails part way leaves
        # every stream as it was (no clip written to a cache but never returned).
        # One write pass for all of them: a failure in it (it appends only once it has
        # computed every layer's K/V) leaves every cache and counter as it was.
        order, made = [], []
        for steps in sorted({s.request.steps for s in streams}):
            group = [s for s in streams if s.request.steps == steps]
            order += group
            made.append(self._denoise(group, steps))
        latents = torch.cat(made)
        self._write(order, latents, [s.clip for s in order])
        out: dict[int, ClipLatents] = {}
        for s, lat in zip(order, latents.cpu(), strict=True):
            # clone: each clip owns its memory (a view would keep the whole batch alive in
            # every truth, queue and pickle that holds it)
            out[s.id] = ClipLatents(stream=s.id, clip=s.clip, data=lat.clone())
            s.clip += 1
        return [out[s.id] for s in streams]

    def _denoise(self, streams: list[Stream], steps: int) -> torch.Tensor:
        """The next clip's latents (b, clip_len, c, y, x) of each stream; nothing written."""
        cfg, b, L = self.config, len(streams), self.clip_len
        clips = [s.clip for s in streams]
        shape = (L, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        noise = torch.stack(
            [torch.randn(shape, generator=seeded(s.request.seed, s.clip, "noise")) for s in streams]
        ).to(self.device)
        labels, actions = self._labels(streams), self._actions(streams, clips)
        slots = [s.slot for s in streams]
        # Guidance per stream, of what its request conditions on: a stream with neither a
        # label nor actions has nothing to guide (its conditional pass would read the zero
        # velocity of "no actions" against the null action), so its scale is 1.
        scales = [
            setting(s.request, "guidance", self.guidance)
            if s.request.label is not None or s.request.actions is not None
            else 1.0
            for s in streams
        ]
        scale = torch.tensor(scales, device=self.device)
        # From the list, not the tensor: no host sync.
        guided = (labels is not None or actions is not None) and any(g != 1 for g in scales)

        # The cache is read (and its keys rotated) once; every Euler step shares it.
        context = self.model.prepare_context(self.cache, slots + slots if guided else slots)

        def denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t_frames = t[:, None].expand(-1, L)
            x = x.to(self.dtype)  # the DiT's dtype in, float32 out: the sampler stays float32
            if not guided:
                cond = Cond(t=t_frames, labels=labels, actions=actions)
                return self.model(x, cond, context).float()
            # Conditional and unconditional rows in one batch over the same cached context.
            drop = torch.arange(2 * b, device=self.device) >= b
            cond = Cond(
                t=t_frames.repeat(2, 1),
                labels=_twice(labels),
                actions=_twice(actions),
                drop_label=drop,
                drop_actions=drop,
            )
            v = self.model(torch.cat([x, x]), cond, context).float()
            v_c, v_u = v.chunk(2)
            return classifier_free(v_c, v_u, scale.view(-1, 1, 1, 1, 1))

        # The sampler's fresh noise, like the initial noise, is drawn per stream from (seed,
        # clip): a batch of streams samples what each would alone, and a replay the same.
        # (None at eta 0, where nothing is drawn.)
        draws = None
        if self.eta:
            sources = [seeded(s.request.seed, s.clip, "sampler") for s in streams]

            def draws() -> torch.Tensor:
                return torch.stack([torch.randn(shape, generator=g) for g in sources])

        grid = time_grid(steps, self.time_shift)
        latents = sde_sample(denoiser, noise, grid, self.eta, draws)
        contrast = [setting(s.request, "contrast", self.contrast) for s in streams]
        if any(c != 1 for c in contrast):  # before the write: the context sees it too
            factor = torch.tensor(contrast, device=self.device, dtype=latents.dtype)
            latents = scale_contrast(latents, factor)
        return latents

    def _write(
        self, streams: Sequence[Stream], latents: torch.Tensor, clips: Sequence[int]
    ) -> None:
        """The write pass of finished clips; the light context noise of clip k of a stream is
        drawn from (seed, k), so a replay after ``restore`` reproduces it."""
        noise = torch.stack(
            [
                torch.randn(latents.shape[1:], generator=seeded(s.request.seed, k, "context"))
                for s, k in zip(streams, clips, strict=True)
            ]
        ).to(self.device)
        self.model.write(
            latents.to(self.dtype),
            self.cache,
            [s.slot for s in streams],
            actions=self._actions(streams, clips),
            noise=noise.to(self.dtype),
        )

    @torch.no_grad()
    def decode(self, clips: list[ClipLatents]) -> list[Clip]:
        if not clips:
            return []
        cfg = self.config
        shape = (self.clip_len, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        for c in clips:  # other shapes decoded into frames of other sizes without a word
            if tuple(c.data.shape) != shape:
                raise ValueError(
                    f"clip {c.clip} of stream {c.stream}: latents must be {shape}, got "
                    f"{tuple(c.data.shape)}"
                )
        latents = torch.stack([c.data for c in clips]).to(self.device, self.dtype)
        frames = self.autoencoder.decode(latents).float().clamp(-1, 1)
        frames = to_uint8(frames).cpu().numpy()
        # Each clip its own frames: a view would keep the whole batch's alive wherever one
        # clip is held (an orchestrator's reorder buffer).
        return [
            Clip(stream=c.stream, clip=c.clip, frames=f.copy())
            for c, f in zip(clips, frames, strict=True)
        ]

    # --- truth ---------------------------------------------------------------------------

    def snapshot(self, stream: Stream) -> StreamSnapshot:
        """The stream's cache now (a full checkpoint) and its request; clips made later are
        added to ``pending`` by whoever keeps the truth."""
        check_open(self._streams, [stream], step=False)
        return StreamSnapshot(
            request=copy.copy(stream.request),  # a caller's edit reaches not the stream
            checkpoint_clip=stream.clip,
            cache=self.cache.snapshot(stream.slot),
        )

    @torch.no_grad()
    def restore(self, snapshot: StreamSnapshot) -> Stream:
        """Reopen a stream from its truth: load the checkpoint, replay the pending clips'
        write passes; the next ``step`` continues as if nothing had happened."""
        snapshot = replace(snapshot, request=own_request(snapshot.request))
        num_clips = self._check(snapshot.request)
        cfg = self.config
        shape = (self.clip_len, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        check_truth(snapshot, num_clips, self.clip_len, self.clip_len, "next_frame", shape)
        if snapshot.cache is None:  # truth from the start: open afresh (context included)
            stream = self.open(snapshot.request)
        else:
            slot = self.cache.add_stream()
            stream = Stream(
                id=next(self._ids),
                request=snapshot.request,  # its own copy, taken above
                slot=slot,
                clip=snapshot.checkpoint_clip,
                num_clips=num_clips,
            )
            self._streams[stream.id] = stream
        with closed_on_error(self, stream):
            if snapshot.cache is not None:
                self.cache.load(stream.slot, snapshot.cache)
            for latents in snapshot.pending:
                self._write([stream], latents[None].to(self.device), [stream.clip])
                stream.clip += 1
        return stream


def _twice(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else torch.cat([x, x])
