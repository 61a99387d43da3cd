"""TokenClipGenerator: the clip-generator contract over LARP tokens and the next-block
transformer.

A clip is one LARP token sequence (N tokens for the tokenizer's clip of frames), made block
by block: every ``step`` runs ``blocks_per_clip`` batched block steps over all given streams,
each reading its stream's cached clips, then appends the finished clips' K/V. Streams that
use classifier-free guidance hold a second, unconditional cache slot (its K/V differ, since
conditions are added to every input position), and both rows run in the same batch.

A request with ``reencode`` has each sampled clip decoded and tokenised again before it
becomes context (its K/V are written by a teacher-forced replay of the new tokens, which are
also what the stream emits): the model then always continues tokens of the kind the encoder
makes, as in training, rather than its own off-manifold samples. It costs a decode, an
encode and a replay per clip, for those streams only.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
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
    check_dtype,
    check_frames_and_label,
    check_guidance,
    check_open,
    check_token_ids,
    check_tokenizer,
    check_truth,
    closed_on_error,
    leading_actions,
    own_request,
    seeded,
    setting,
)
from vidgen.models.nbp import ClipCond, NBPConfig, NextBlockTransformer, Partial
from vidgen.nn.cache import KVCache
from vidgen.nn.conditioning import NULL
from vidgen.sampling.tokens import guide_logits, sample_tokens
from vidgen.tokenizers.larp import NO_CONTEXT, LARPVideoTokenizer

BOS = -1


@dataclass
class _Rows:
    """A stream's cache slots (conditional first), its previous block of tokens, and its
    previous clip's tokens (the decoding context of the next clip, for a LARP with a context
    decoder)."""

    slots: list[int]
    prev: torch.Tensor  # (B,) int64; BOS before the first clip
    last: torch.Tensor | None = None  # (N,) int64; None before the first clip


def _rows_of(partial: Partial, rows: list[int]) -> Partial:
    """The K/V of some batch rows of a clip made so far."""
    if rows == list(range(partial.k[0].shape[0])):
        return partial
    index = torch.tensor(rows, device=partial.k[0].device)
    k, k_rot, v = (
        [t.index_select(0, index) for t in ts] for ts in (partial.k, partial.k_rot, partial.v)
    )
    return Partial(k, k_rot, v)


def _cat_rows(first: Partial, second: Partial) -> Partial:
    """The K/V of the batch rows of ``first`` followed by those of ``second``."""
    k, k_rot, v = (
        [torch.cat(pair) for pair in zip(a, b, strict=True)]
        for a, b in ((first.k, second.k), (first.k_rot, second.k_rot), (first.v, second.v))
    )
    return Partial(k, k_rot, v)


class TokenClipGenerator:
    """Streams of clips of LARP tokens from a ``NextBlockTransformer``, decoded by the LARP.

    ``max_streams`` sizes the preallocated cache; ``guidance`` is the default of requests that
    leave theirs unset. ``dtype`` (``DTYPES``: float32 or bfloat16) is what the transformer,
    the tokenizer and the cache run in; logits are sampled in float32. The generator takes
    the modules given as its own: they are moved to ``device`` and ``dtype`` in place (give
    each generator its own copies).
    """

    family = "tokens"
    default_tokenizer = "larp-tiny"  # of a checkpoint whose card names none

    def __init__(
        self,
        model: NextBlockTransformer,
        tokenizer: LARPVideoTokenizer,
        max_streams: int = 8,
        device: torch.device | str = "cpu",
        name: str = "",
        guidance: float = DEFAULT_GUIDANCE,
        dtype: torch.dtype | str = torch.float32,
    ) -> None:
        cfg: NBPConfig = model.config
        tok = tokenizer.config
        if (cfg.tokens_per_clip, cfg.vocab, cfg.frames_per_clip) != (
            tok.num_tokens,
            tok.codebook_size,
            tok.frames,
        ):
            raise ValueError(
                f"NBP expects {cfg.tokens_per_clip} tokens of {cfg.vocab} codes per clip of "
                f"{cfg.frames_per_clip} frames; the tokenizer makes {tok.num_tokens} of "
                f"{tok.codebook_size} per {tok.frames} frames"
            )
        self.dtype = check_dtype(dtype)
        self.device = torch.device(device)
        self.model = model.to(self.device, self.dtype).eval()
        self.tokenizer = tokenizer.to(self.device, self.dtype).eval()
        self.config = cfg
        self.clip_len = tok.frames
        self.name = name
        self.guidance = check_guidance(guidance)
        size = tokenizer.autoencoder.config.image_size if tokenizer.autoencoder else tok.size
        self.frame_shape = (size, size, 3)
        # Guided streams use two slots, so the cache holds twice the streams it serves.
        self.cache = KVCache(model.cache_spec(2 * max_streams, self.dtype), self.device)
        self._streams: dict[int, Stream] = {}
        self._rows: dict[int, _Rows] = {}
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
    ) -> TokenClipGenerator:
        ckpt = checkpoint.load(name_or_path, expected_config=NBPConfig)
        model = ckpt.build(NextBlockTransformer, NBPConfig)
        tok_name = checkpoint.companion(
            ckpt.card.get("tokenizer", cls.default_tokenizer), ckpt.path
        )
        tokenizer = LARPVideoTokenizer.from_pretrained(tok_name)
        check_tokenizer(str(name_or_path), ckpt.card, tok_name, tokenizer.encoder_fingerprint())
        guidance = ckpt.card.get("guidance", DEFAULT_GUIDANCE)
        gen = cls(
            model,
            tokenizer,
            max_streams,
            device,
            name=checkpoint.spelled(name_or_path),
            guidance=guidance,
            dtype=dtype,
        )
        gen.companion_files = list(tokenizer.files)
        gen.companion_sha256 = list(tokenizer.file_sha256)
        gen.sha256 = ckpt.sha256
        return gen

    # --- streams ------------------------------------------------------------------------

    def _check(self, request: GenerationRequest) -> int:
        cfg = self.config
        if self.name and not checkpoint.same_checkpoint(request.model, self.name):
            # Its frames would come from these weights under the other model's name.
            raise ValueError(
                f"the request is for model {request.model!r}; this generator is {self.name!r}"
            )
        if request.contrast not in (None, 1):
            raise ValueError(
                f"contrast applies to diffusion models only; {self.name or 'this model'} is a "
                f"token model (got contrast={request.contrast})"
            )
        check_frames_and_label(request, self.clip_len, cfg.num_classes)
        check_actions(request, cfg.num_actions, cfg.action_dim)
        if request.top_k > cfg.vocab:  # kept every code: the frames of top_k=0, silently
            raise ValueError(
                f"top_k must be at most the model's {cfg.vocab} codes (0: off), got {request.top_k}"
            )
        if request.context is not None:
            context = np.asarray(request.context)
            if tuple(context.shape[1:]) != self.frame_shape or len(context) % self.clip_len:
                raise ValueError(
                    f"context must be whole clips of {self.clip_len} frames of shape "
                    f"{self.frame_shape}, got {context.shape}"
                )
        return request.frames // self.clip_len

    def _guided(self, request: GenerationRequest) -> bool:
        has_cond = request.label is not None or request.actions is not None
        return has_cond and setting(request, "guidance", self.guidance) != 1.0

    def open(self, request: GenerationRequest) -> Stream:
        request = own_request(request)  # checked as the stream will hold it
        num_clips = self._check(request)
        stream = self._new_stream(request, clip=0, num_clips=num_clips)
        if request.context is not None:
            with closed_on_error(self, stream):
                self._write_context(stream, np.asarray(request.context))
        return stream

    def _new_stream(self, request: GenerationRequest, clip: int, num_clips: int) -> Stream:
        """A stream of ``request``, which is already the stream's own copy (``open`` and
        ``restore`` take it before checking it)."""
        slots = [self.cache.add_stream()]
        if self._guided(request):
            try:
                slots.append(self.cache.add_stream())
            except RuntimeError:
                self.cache.remove_stream(slots[0])
                raise
        stream = Stream(
            id=next(self._ids), request=request, slot=slots[0], clip=clip, num_clips=num_clips
        )
        self._streams[stream.id] = stream
        self._rows[stream.id] = _Rows(slots, torch.full((self.config.block,), BOS))
        return stream

    @torch.no_grad()
    def _write_context(self, stream: Stream, frames: np.ndarray) -> None:
        clips = len(frames) // self.clip_len
        # Every clip, oldest first (as in the diffusion family): evicted clips still shaped
        # the K/V of those after them, and each clip reads the last block of the one before.
        # Converted clip by clip: memory does not grow with the context's length.
        for j in range(clips):
            piece = frames[j * self.clip_len : (j + 1) * self.clip_len]
            video = to_model_range(piece)[None].to(self.device, self.dtype)
            tokens = self.tokenizer.encode(video)[0]
            self._replay(stream, tokens, clip=-(clips - j))

    def close(self, stream: Stream) -> None:
        """Free the stream's slots; a stream already closed (or another generator's) is
        left alone."""
        if self._streams.get(stream.id) is stream:
            del self._streams[stream.id]
            for slot in self._rows.pop(stream.id).slots:
                self.cache.remove_stream(slot)

    # --- conditioning -------------------------------------------------------------------------

    def _cond(
        self, streams: Sequence[Stream], clips: Sequence[int]
    ) -> tuple[ClipCond, list[int], torch.Tensor]:
        """The batch of rows (each stream's conditional row, then the unconditional rows of
        guided streams): its clip conditions, cache slots, and which rows are unconditional."""
        cfg = self.config
        rows = [(s, k, False) for s, k in zip(streams, clips, strict=True)]
        rows += [
            (s, k, True)
            for s, k in zip(streams, clips, strict=True)
            if len(self._rows[s.id].slots) == 2
        ]
        labels = torch.tensor(
            [NULL if s.request.label is None else s.request.label for s, _, _ in rows]
        )
        uncond = torch.tensor([u for _, _, u in rows])
        actions = None
        if cfg.num_actions or cfg.action_dim:
            actions = torch.stack([self._clip_actions(s, k) for s, k, _ in rows])
        slots = [self._rows[s.id].slots[1 if u else 0] for s, _, u in rows]
        drop = uncond[:, None].to(self.device)
        cond = ClipCond(
            labels=labels.to(self.device) if cfg.num_classes else None,
            actions=None if actions is None else actions.to(self.device),
            drop_label=drop,
            drop_actions=drop,
        )
        return cond, slots, uncond

    def _clip_actions(self, stream: Stream, clip: int) -> torch.Tensor:
        cfg = self.config
        return leading_actions(
            stream.request, clip, cfg.frames_per_clip, cfg.num_actions, cfg.action_dim
        )

    # --- the step -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, streams: list[Stream]) -> list[ClipLatents]:
        """One clip of tokens for each stream, block by block, all streams batched."""
        check_open(self._streams, streams)
        if not streams:
            return []
        cfg, b = self.config, len(streams)
        cond, slots, uncond = self._cond(streams, [s.clip for s in streams])
        clip_cond = self.model.clip_condition(cond, len(slots), self.device)
        owner = self._owners(streams)
        prev = torch.stack([self._rows[streams[i].id].prev for i in owner]).to(self.device)
        scale = torch.tensor(
            [setting(s.request, "guidance", self.guidance) for s in streams], device=self.device
        )
        partial, made = Partial(), []
        context = self.model.prepare_context(self.cache, slots)  # shared by all block steps
        for j in range(cfg.blocks_per_clip):
            logits, partial = self.model.step_block(prev, clip_cond, context, partial)
            logits = self._guide(logits.float(), owner, uncond, scale, b)
            block = torch.stack(
                [
                    sample_tokens(
                        logits[i],
                        seeded(s.request.seed, s.clip, f"block{j}"),
                        s.request.temperature,
                        s.request.top_k,
                        s.request.top_p,
                    )
                    for i, s in enumerate(streams)
                ]
            )  # (b, B)
            made.append(block)
            prev = block[owner]
        tokens = torch.cat(made, dim=1)  # (b, N)
        contexts = [self._rows[s.id].last for s in streams]
        again = [i for i, s in enumerate(streams) if s.request.reencode]
        if again:  # re-tokenised before anything is written: a failure here changes no stream
            frames = self._decode_ids(tokens[again], [contexts[i] for i in again])
            tokens[again] = self.tokenizer.encode(frames.to(self.dtype))
        keep = [r for r, i in enumerate(owner) if i not in again]
        # The sampled clips' K/V, computed while they were made, and the re-tokenised clips'
        # K/V by a teacher-forced replay, appended in one commit: a failure anywhere before
        # its end changes no stream (two commits left the first one's streams a clip ahead).
        write = _rows_of(partial, keep) if keep else None
        write_slots = [slots[r] for r in keep]
        if again:
            redo = [streams[i] for i in again]
            replayed, replay_slots = self._replay_partial(
                redo, tokens[again], [s.clip for s in redo]
            )
            write = replayed if write is None else _cat_rows(replayed, write)
            write_slots = replay_slots + write_slots
        self.model.commit(write, self.cache, write_slots)
        out = []
        tokens = tokens.cpu()  # each row cloned below
        for i, s in enumerate(streams):
            # Each row its own memory: a view would keep the whole batch alive wherever a
            # clip is held, and a caller's in-place change would reach this stream's state.
            self._rows[s.id].prev = tokens[i, -cfg.block :].clone()
            self._rows[s.id].last = tokens[i].clone()
            context = contexts[i] if self.tokenizer.config.context_decoder else None
            out.append(
                ClipLatents(stream=s.id, clip=s.clip, data=tokens[i].clone(), context=context)
            )
            s.clip += 1
        return out

    @staticmethod
    def _guide(
        logits: torch.Tensor, owner: list[int], uncond: torch.Tensor, scale: torch.Tensor, b: int
    ) -> torch.Tensor:
        """Per stream: its conditional logits, guided by its unconditional row if any."""
        guided = logits[:b].clone()
        for row in range(b, len(owner)):
            i = owner[row]
            guided[i] = guide_logits(logits[i], logits[row], scale[i])
        return guided

    def _replay(self, stream: Stream, tokens: torch.Tensor, clip: int) -> None:
        """Write one known clip of tokens (N,) of one stream (``_replay_batch``)."""
        self._replay_batch([stream], tokens[None], [clip])

    @torch.no_grad()
    def _replay_batch(
        self, streams: Sequence[Stream], tokens: torch.Tensor, clips: Sequence[int]
    ) -> None:
        """Write known clips of tokens (b, N), one per stream, all streams batched: the same
        block steps as ``step``, teacher-forced, so a replay reproduces the original K/V."""
        partial, slots = self._replay_partial(streams, tokens, clips)
        self.model.commit(partial, self.cache, slots)
        tokens = tokens.cpu()  # one copy to the host; each row cloned below
        for i, s in enumerate(streams):
            self._rows[s.id].prev = tokens[i, -self.config.block :].clone()
            self._rows[s.id].last = tokens[i].clone()

    def _replay_partial(
        self, streams: Sequence[Stream], tokens: torch.Tensor, clips: Sequence[int]
    ) -> tuple[Partial, list[int]]:
        """The K/V of known clips of tokens (b, N) by the teacher-forced block steps, and
        the cache slots of their rows; nothing written."""
        cfg = self.config
        cond, slots, _ = self._cond(streams, clips)
        clip_cond = self.model.clip_condition(cond, len(slots), self.device)
        owner = self._owners(streams)
        prev = torch.stack([self._rows[streams[i].id].prev for i in owner]).to(self.device)
        rows = tokens.to(self.device)[owner]
        partial = Partial()
        context = self.model.prepare_context(self.cache, slots)
        for j in range(cfg.blocks_per_clip):
            _, partial = self.model.step_block(prev, clip_cond, context, partial)
            prev = rows[:, j * cfg.block : (j + 1) * cfg.block]
        return partial, slots

    def _owners(self, streams: Sequence[Stream]) -> list[int]:
        """The stream of each row ``_cond`` makes: every stream's conditional row, then the
        unconditional rows of the guided ones."""
        guided = [i for i, s in enumerate(streams) if len(self._rows[s.id].slots) == 2]
        return list(range(len(streams))) + guided

    @torch.no_grad()
    def decode(self, clips: list[ClipLatents]) -> list[Clip]:
        if not clips:
            return []
        ids = torch.stack([c.data for c in clips])
        frames = to_uint8(self._decode_ids(ids, [c.context for c in clips])).cpu().numpy()
        # Each clip its own frames: a view would keep the whole batch's alive wherever one
        # clip is held (an orchestrator's reorder buffer).
        return [
            Clip(stream=c.stream, clip=c.clip, frames=f.copy())
            for c, f in zip(clips, frames, strict=True)
        ]

    def _decode_ids(
        self, ids: torch.Tensor, contexts: Sequence[torch.Tensor | None]
    ) -> torch.Tensor:
        """Frames (b, t, 3, H, W) in [-1, 1] of clips of ids (b, N), each decoded with its
        previous clip's ids (None: a first clip) when the LARP has a context decoder."""
        context = None
        if self.tokenizer.config.context_decoder:
            none = torch.full_like(ids[0], NO_CONTEXT, device="cpu")
            context = torch.stack([none if c is None else c.cpu() for c in contexts])
            context = context.to(self.device)
        return self.tokenizer.decode(ids.to(self.device), context).float().clamp(-1.0, 1.0)

    # --- truth ---------------------------------------------------------------------------------

    def snapshot(self, stream: Stream) -> StreamSnapshot:
        check_open(self._streams, [stream], step=False)
        rows = self._rows[stream.id]
        cache = {
            f"slot{i}.{k}": v
            for i, slot in enumerate(rows.slots)
            for k, v in self.cache.snapshot(slot).items()
        }
        cache["prev"] = rows.prev.clone()
        if rows.last is not None:
            cache["last"] = rows.last.clone()
        # A copy: a caller's edit of the snapshot's request must not reach the running stream.
        return StreamSnapshot(
            request=copy.copy(stream.request), checkpoint_clip=stream.clip, cache=cache
        )

    @torch.no_grad()
    def restore(self, snapshot: StreamSnapshot) -> Stream:
        """Reopen a stream from its truth: load the checkpoint (or open afresh when the truth
        starts at clip 0) and replay the pending clips' block steps."""
        snapshot = replace(snapshot, request=own_request(snapshot.request))
        num_clips = self._check(snapshot.request)
        cfg = self.config
        shape = (cfg.tokens_per_clip,)
        frames = cfg.frames_per_clip
        check_truth(
            snapshot, num_clips, self.clip_len, frames, "slot0.next_frame", shape, cfg.vocab
        )
        if snapshot.cache is None:
            stream = self.open(snapshot.request)
        else:
            stream = self._new_stream(
                snapshot.request, clip=snapshot.checkpoint_clip, num_clips=num_clips
            )
        with closed_on_error(self, stream):
            if snapshot.cache is not None:
                self._load(stream, snapshot.cache)
            for tokens in snapshot.pending:
                self._replay(stream, tokens, stream.clip)
                stream.clip += 1
        return stream

    def _load(self, stream: Stream, cache: dict[str, torch.Tensor]) -> None:
        rows = self._rows[stream.id]
        held = {k.split(".", 1)[0] for k in cache if k.startswith("slot")}
        if len(held) != len(rows.slots):
            raise ValueError(
                f"snapshot holds {len(held)} cache slot(s), this stream needs "
                f"{len(rows.slots)} (a second one with classifier-free guidance: was the "
                "snapshot made by a generator with another default guidance, or its "
                "request's guidance edited?)"
            )
        for i, slot in enumerate(rows.slots):
            prefix = f"slot{i}."
            tensors = {k[len(prefix) :]: v for k, v in cache.items() if k.startswith(prefix)}
            for name in ("next_frame", "chunks") if i else ():
                # The unconditional slot holds the same frames as the conditional one: one
                # a clip behind was read as this clip's context by the guided step.
                mine, first = tensors.get(name), cache.get(f"slot0.{name}")
                if mine is None or first is None or not torch.equal(mine, first):
                    raise ValueError(
                        f"snapshot slot{i}.{name} differs from slot0's: its cache slots "
                        "hold different frames"
                    )
            self.cache.load(slot, tensors)
        if "prev" not in cache:
            raise ValueError("snapshot cache has no 'prev' (not a token generator's snapshot)")
        cfg = self.config
        check_token_ids("snapshot cache 'prev'", cache["prev"], (cfg.block,), cfg.vocab, BOS)
        # BOS before anything is written, the last block written after.
        written = int(cache["slot0.next_frame"]) > 0
        if bool((cache["prev"] == BOS).any()) if written else bool((cache["prev"] != BOS).any()):
            raise ValueError(
                "snapshot cache 'prev' must be "
                + ("the last block written, with no BOS" if written else "all BOS (-1)")
                + " for a cache holding "
                + ("frames" if written else "none")
            )
        rows.prev = cache["prev"].clone()
        last = cache.get("last")
        if last is not None:
            check_token_ids("snapshot cache 'last'", last, (cfg.tokens_per_clip,), cfg.vocab)
        # The previous clip's ids are what a context decoder reads: without them the next
        # clip decoded with no context, unlike the run the snapshot came from.
        if written and last is None and self.tokenizer.config.context_decoder:
            raise ValueError(
                "snapshot cache has no 'last' (the previous clip's ids), which this "
                "tokenizer's context decoder needs for a cache holding frames"
            )
        if not written and last is not None:
            raise ValueError("snapshot cache 'last' must be absent for a cache holding no frames")
        rows.last = None if last is None else last.clone()
