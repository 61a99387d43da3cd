"""The clip-generator contract shared by both model families (DESIGN.md section 3).

A *stream* is one video being generated. ``open`` starts one, ``step`` makes the next clip of
each given stream in one batched pass per denoising/block step, ``decode`` turns clips of
latents/tokens into uint8 frames (kept separate so decoding and encoding can overlap the next
step), ``snapshot``/``restore`` carry a stream's truth elsewhere, ``close`` frees it.

A stream's truth is its last cache checkpoint plus what came after it: the latents or tokens
of the clips made since, the request (conditioning), the next clip index and the seed. All
randomness is a function of (seed, clip index, purpose), so a replay reproduces it, and the
same request gives the same frames when it runs alone (or in the same batch composition).
Batched with other streams it agrees within float noise (1e-5 in the latents in float32; in
pixels, now and then one rounding step): the CPU's and GPU's kernels add in another order for
another batch size. In bfloat16 that noise is bfloat16's (up to about 1% of a latent, measured
on the CPU).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from vidgen import checkpoint
from vidgen.validate import check_int, shown

MIN_FPS = 1 / 1001  # the lowest frame rate an mp4 of vidgen can carry
MAX_FPS = 1000  # the highest (vidgen.io.MAX_FPS: Matroska's millisecond timestamps)
# The guidance of requests that leave it unset, on a model whose card names none.
DEFAULT_GUIDANCE = 2.0


@dataclass
class GenerationRequest:
    """One video to generate.

    frames: new frames to make (a multiple of the model's clip length). label: class label
    (BouncingShapes: the number of shapes) or None. actions: per frame, action t acting between
    frame t and t+1: int (frames,) for discrete actions or float (frames, A) for continuous
    ones, frames counted from the first *new* frame. So new frame t is made under action t-1,
    and the last action acts after the video ends; new frame 0 is made under ``context_action``
    (the action between the context's last frame and it; only with ``context`` and ``actions``),
    or the null action when it is unset. context: uint8 frames (T, H, W, 3) to continue from
    (whole clips). context_actions: the actions of the context's own frames, aligned to its end
    (a world model continuing a simulator's history), as ``actions`` are: one per context frame,
    entry t acting between context frame t and t+1, so the last one leads to new frame 0 (it
    is ``context_action``; give one or the other). The context's first frame is made under the
    null action, as a training sequence's is. Shorter than the context, the context's earliest
    frames are made under the null action too; longer, only the last ``len(context)`` are used
    (a simulator's whole history may be passed with its last frames as context; an mp4 context
    keeps its last whole clips). Left unset, every context frame is made under the null
    action: a history the model was not trained on. guidance: classifier-free guidance scale
    (1 = off); None = the model's own default (its checkpoint card's ``guidance``, else
    ``DEFAULT_GUIDANCE`` = 2). steps: denoising steps per clip (diffusion) — ignored by token
    models. fps: of the output file.
    temperature, top_k (0 = off), top_p (1 = off): token sampling — ignored by diffusion models.
    reencode: token models only — each sampled clip is decoded and tokenised again before it
    becomes context, and the new tokens are what the stream emits (about half the speed; closer
    to the videos the model was trained on). contrast: diffusion models only — each generated
    frame's latent deviations from its per-channel spatial median are scaled by this factor
    before the clip is emitted and written to the context (> 1 counters the contrast a clip
    loses against its context, which compounds into objects fading over long videos); None = the
    model's own default (its checkpoint card's ``contrast``, else 1 = off).
    """

    model: str = "ca2vdm-tiny"
    frames: int = 64
    seed: int = 0
    label: int | None = None
    actions: Any = None
    context: Any = None
    context_action: Any = None
    context_actions: Any = None
    guidance: float | None = None
    steps: int = 12
    fps: int = 8
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    reencode: bool = False
    contrast: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.model, os.PathLike):  # Path("x") is a file, not shipped "x"
            self.model = checkpoint.spelled(self.model)
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(
                f"model must be a shipped name or a checkpoint path, got {self.model!r}"
            )
        # Bounded: past 4,300 digits Python cannot even print an int (the fingerprint, the
        # JSON and the stream's seeds failed later, naming no field).
        self.frames = _bounded_int("frames", self.frames, 1, MAX_FRAMES)
        self.seed = _bounded_int("seed", self.seed, 0, MAX_SEED)
        self.steps = check_int("steps", self.steps, 1)
        if self.steps > MAX_STEPS:  # a typo that would stall an actor and its whole batch
            raise ValueError(f"steps must be <= {MAX_STEPS}, got {self.steps}")
        self.top_k = _bounded_int("top_k", self.top_k, 0, MAX_SEED)
        if self.label is not None:
            self.label = _bounded_int("label", self.label, 0, MAX_SEED)
        if self.guidance is not None:
            self.guidance = check_guidance(self.guidance)
        self.fps = _number("fps", self.fps)
        if self.fps < MIN_FPS:  # mp4 time bases have denominators up to 1001
            raise ValueError(f"fps must be >= 1/1001 (one frame per 1001 s), got {self.fps}")
        if self.fps > MAX_FPS:  # the video writers' limit: refused before anything is made
            raise ValueError(f"fps must be <= {MAX_FPS}, got {self.fps}")
        self.temperature = _number("temperature", self.temperature)
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(
                f"temperature must be in [0, {MAX_TEMPERATURE:g}] (0 = greedy), "
                f"got {self.temperature}"
            )
        self.top_p = _number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.reencode, bool | np.bool_):
            raise ValueError(f"reencode must be true or false, got {self.reencode!r}")
        self.reencode = bool(self.reencode)
        if self.contrast is not None:
            self.contrast = check_contrast(self.contrast)
        if self.actions is not None:
            self.actions = _array("actions", self.actions, own=True)
            if self.actions.ndim == 0 or len(self.actions) != self.frames:
                raise ValueError(
                    f"actions must have one entry per frame ({self.frames}), got "
                    f"{'a scalar' if self.actions.ndim == 0 else len(self.actions)}"
                )
            if self.actions.dtype.kind not in NUMBER_KINDS:
                raise ValueError(f"actions must be numbers, got dtype {self.actions.dtype}")
        if self.context is not None:
            self.context = _array("context", self.context, own=True)
            if (
                self.context.dtype != np.uint8
                or self.context.ndim != 4
                or self.context.shape[-1] != 3
                or self.context.shape[0] == 0
            ):
                raise ValueError(
                    f"context must be uint8 frames (T, H, W, 3) with T >= 1 (None for no "
                    f"context), got {self.context.dtype} {self.context.shape}"
                )
        if self.context_action is not None:
            # That it also needs a context is checked when the stream opens (``check_actions``):
            # manifests and saved snapshots attach the context frames after construction.
            if self.actions is None:
                raise ValueError(
                    "context_action (the action leading to the first new frame) needs actions"
                )
            self.context_action = _array("context_action", self.context_action, own=True)
            if (
                self.context_action.shape != self.actions.shape[1:]
                or self.context_action.dtype.kind not in NUMBER_KINDS
            ):
                raise ValueError(
                    f"context_action must be one action shaped like those in actions "
                    f"({self.actions.shape[1:]}), got {self.context_action.dtype} "
                    f"{self.context_action.shape}"
                )
        if self.context_actions is not None:
            # Like context_action, that it has a context is checked at open.
            if self.actions is None:
                raise ValueError(
                    "context_actions (the actions of the context's frames) needs actions"
                )
            if self.context_action is not None:
                raise ValueError(
                    "give context_action or context_actions, not both (the last of "
                    "context_actions is the action leading to the first new frame)"
                )
            self.context_actions = _array("context_actions", self.context_actions, own=True)
            if (
                self.context_actions.ndim != self.actions.ndim
                or self.context_actions.shape[1:] != self.actions.shape[1:]
                or len(self.context_actions) == 0
                or self.context_actions.dtype.kind not in NUMBER_KINDS
            ):
                raise ValueError(
                    f"context_actions must be one or more actions shaped like those in "
                    f"actions (n{', ' if self.actions.ndim > 1 else ''}"
                    f"{', '.join(map(str, self.actions.shape[1:]))}), got "
                    f"{self.context_actions.dtype} {self.context_actions.shape}"
                )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerationRequest:
        """A request from its JSON form; unknown keys are refused by name."""
        if not isinstance(data, dict):
            raise ValueError(f"a request must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown request keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_json(self, canonical: bool = True) -> dict[str, Any]:
        """JSON-ready dict (context frames are not serialised: pass a path in manifests).
        ``canonical``: numbers in one form per field, so that equal requests are equal here
        (``temperature=1`` and ``1.0``; ``fps=8.0`` and ``8``; continuous actions ``[[1, 0]]``
        and ``[[1.0, 0.0]]``), each in the form the model reads; False: as given (how
        fingerprints were made until 2026-11-30)."""
        out = asdict(self)
        if canonical:
            for key in ("guidance", "temperature", "top_p", "contrast"):
                if out[key] is not None:
                    out[key] = float(out[key])
            out["fps"] = int(self.fps) if float(self.fps).is_integer() else float(self.fps)
        # Continuous actions (2-D) reach the model as float32 (``leading_actions``): ints,
        # float64 and float32 of one value make the same frames, so one fingerprint.
        continuous = canonical and self.actions is not None and np.ndim(self.actions) == 2
        for key in ("actions", "context_action", "context_actions"):
            value = getattr(self, key)
            if value is not None and continuous:
                value = np.asarray(value, dtype=np.float32)
            out[key] = None if value is None else np.asarray(value).tolist()
        # Fields added later are left out at their defaults, as before they existed, so the
        # fingerprints of requests (and of render folders made before) stay the same.
        for key in ("context_action", "context_actions"):
            if getattr(self, key) is None:
                del out[key]
        if not self.reencode:
            del out["reencode"]
        if self.contrast is None:
            del out["contrast"]
        # Until 2026-11-30 the default guidance was 2 for every model and was written out;
        # a request that leaves it to the model has no such key (an explicit 2 keeps the
        # fingerprint it had, so ``guidance=2`` resumes a render folder started before).
        if self.guidance is None:
            del out["guidance"]
        out["context"] = None
        return out

    def fingerprint(self, canonical: bool = True, model: str | None = None) -> str:
        """sha256 of everything that determines the output frames (``canonical``: see
        ``to_json``; a render folder may hold either form), with the model named ``model``
        where given (``""``: none, where the weights' own sha256 names them)."""
        data = self.to_json(canonical)
        if model is not None:
            data["model"] = model
        payload = json.dumps(data, sort_keys=True).encode()
        digest = hashlib.sha256(payload)
        if self.context is not None:
            digest.update(np.ascontiguousarray(self.context).tobytes())
        return digest.hexdigest()


@dataclass
class Stream:
    """A video being generated on one generator: ``slot`` is its cache slot, ``clip`` the
    index of the next clip to make, ``num_clips`` how many the request needs."""

    id: int
    request: GenerationRequest
    slot: int
    clip: int
    num_clips: int

    @property
    def done(self) -> bool:
        return self.clip >= self.num_clips


@dataclass
class ClipLatents:
    """One generated clip before decoding: (frames, ...) latents or (tokens,) ids, and what
    else its decoding reads (``context``: the previous clip's ids for a LARP with a context
    decoder; None for a stream's first clip and for the other decoders)."""

    stream: int
    clip: int
    data: torch.Tensor
    context: torch.Tensor | None = None


@dataclass
class Clip:
    """Decoded frames (T, H, W, 3) uint8 of one clip."""

    stream: int
    clip: int
    frames: np.ndarray


@dataclass
class StreamSnapshot:
    """A stream's truth: the cache as it was after clip ``checkpoint_clip`` - 1 was written
    (tensors; None for a stream's very start, before any clip or context), plus the clips
    made since (``pending``, in order), and the request (which holds the seed). ``restore``
    loads the cache (or opens the request afresh) and replays the write pass for the pending
    clips."""

    request: GenerationRequest
    checkpoint_clip: int
    cache: dict[str, torch.Tensor] | None
    pending: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def start(cls, request: GenerationRequest) -> StreamSnapshot:
        """The truth of a stream that has made nothing yet."""
        return cls(request=request, checkpoint_clip=0, cache=None)

    def truncated(self, clips: int) -> StreamSnapshot:
        """The truth as of ``clips`` clips made (checkpoint_clip <= clips <= next_clip)."""
        if not self.checkpoint_clip <= clips <= self.next_clip:
            raise ValueError(
                f"cannot rewind truth at clips {self.checkpoint_clip}..{self.next_clip} to {clips}"
            )
        keep = self.pending[: clips - self.checkpoint_clip]
        return StreamSnapshot(self.request, self.checkpoint_clip, self.cache, list(keep))

    @property
    def next_clip(self) -> int:
        return self.checkpoint_clip + len(self.pending)

    def add(self, clip: ClipLatents) -> None:
        """Record a clip made after the checkpoint."""
        if clip.clip != self.next_clip:
            raise ValueError(f"expected clip {self.next_clip}, got clip {clip.clip}")
        self.pending.append(clip.data.detach().cpu())


@dataclass
class SnapshotInfo:
    """What a saved snapshot file holds besides tensors (its checkpoint "config")."""

    checkpoint_clip: int
    pending: int
    has_cache: bool
    request: str  # GenerationRequest.to_json, as JSON text


def save_snapshot(path: str | Path, snapshot: StreamSnapshot) -> Path:
    """Write a stream's truth to a safetensors file (atomically, no pickle)."""
    from vidgen import checkpoint

    tensors = {f"cache.{k}": v for k, v in (snapshot.cache or {}).items()}
    tensors.update({f"pending.{i}": t for i, t in enumerate(snapshot.pending)})
    if snapshot.request.context is not None:
        # A copy: the request's array may be read-only (torch warns of a non-writable one).
        tensors["context"] = torch.from_numpy(np.array(snapshot.request.context, order="C"))
    info = SnapshotInfo(
        checkpoint_clip=snapshot.checkpoint_clip,
        pending=len(snapshot.pending),
        has_cache=snapshot.cache is not None,
        request=json.dumps(snapshot.request.to_json()),
    )
    return checkpoint.save(path, tensors, info, card={"what": "a stream's truth"})


def load_snapshot(path: str | Path) -> StreamSnapshot:
    from vidgen import checkpoint

    ckpt = checkpoint.load(Path(path), expected_config=SnapshotInfo)
    info = ckpt.config_as(SnapshotInfo)
    try:
        check_int("checkpoint_clip", info.checkpoint_clip, minimum=0)
        check_int("pending", info.pending, minimum=0)
        held = sum(k.startswith("pending.") for k in ckpt.tensors)
        if info.pending > held:  # checked first: a forged 10**12 built a set of that size
            raise ValueError(f"its header says {info.pending} pending clips; it holds {held}")
        expected = {f"pending.{i}" for i in range(info.pending)} | {"context"}
        extra = sorted(
            k
            for k in ckpt.tensors
            if k not in expected and not (info.has_cache and k.startswith("cache."))
        )
        if extra:  # dropped silently before: a file that says less than it holds
            raise ValueError(f"tensors its header does not account for: {extra[:4]}")
        fields = json.loads(info.request)
        if "context" in ckpt.tensors:  # checked as a request's context is when it is made
            fields["context"] = ckpt.tensors["context"].numpy()
        request = GenerationRequest.from_json(fields)
        cache = {k[6:]: v for k, v in ckpt.tensors.items() if k.startswith("cache.")}
        pending = [ckpt.tensors[f"pending.{i}"] for i in range(info.pending)]
    except (KeyError, TypeError, ValueError, RecursionError) as err:
        raise checkpoint.CheckpointError(
            f"{path} is not a valid stream snapshot: {type(err).__name__}: {err}"
        ) from None
    return StreamSnapshot(request, info.checkpoint_clip, cache if info.has_cache else None, pending)


class ClipGenerator(Protocol):
    """What actors, the orchestrator and the envs rely on (both families implement it)."""

    clip_len: int
    guidance: float  # the guidance of requests that leave theirs unset

    def open(self, request: GenerationRequest) -> Stream: ...

    def step(self, streams: list[Stream]) -> list[ClipLatents]: ...

    def decode(self, clips: list[ClipLatents]) -> list[Clip]: ...

    def snapshot(self, stream: Stream) -> StreamSnapshot: ...

    def restore(self, snapshot: StreamSnapshot) -> Stream: ...

    def close(self, stream: Stream) -> None: ...


@contextmanager
def closed_on_error(generator: ClipGenerator, stream: Stream) -> Iterator[None]:
    """Close ``stream`` (freeing its cache slots) when the block raises, then re-raise: a
    stream that failed to open or restore is never left holding slots nobody can free."""
    try:
        yield
    except BaseException:
        generator.close(stream)
        raise


def check_open(open_streams: dict[int, Stream], streams: list[Stream], step: bool = True) -> None:
    """Refuse streams that are not open on this generator (closed, or another generator's
    with the same id: identity, not id, decides), one given twice (a step would write two
    clips into one stream and skip one) and, for a step, a finished one."""
    seen: set[int] = set()
    for s in streams:
        if open_streams.get(s.id) is not s:
            raise KeyError(f"stream {s.id} is not open on this generator")
        if s.id in seen:
            raise ValueError(f"stream {s.id} is given twice: each stream steps once per call")
        seen.add(s.id)
        if step and s.done:
            raise ValueError(f"stream {s.id} already has all {s.num_clips} clips")


def check_truth_counts(snapshot: StreamSnapshot, num_clips: int, name: str = "snapshot") -> int:
    """The clip counts of a snapshot to restore, whatever the generator: its checkpoint
    clip (returned) is 0 without a cache, and it holds no clips past its request's
    ``num_clips``."""
    c = check_int(f"{name}.checkpoint_clip", snapshot.checkpoint_clip, minimum=0)
    if snapshot.cache is None and c != 0:
        raise ValueError(
            f"a {name} without a cache is a stream's start (checkpoint_clip 0), got "
            f"checkpoint_clip={c}"
        )
    if c + len(snapshot.pending) > num_clips:
        raise ValueError(
            f"{name} holds clips up to {c + len(snapshot.pending)} (checkpoint_clip {c} + "
            f"{len(snapshot.pending)} pending) but its request makes {num_clips}"
        )
    return c


def check_truth(
    snapshot: StreamSnapshot,
    num_clips: int,
    clip_len: int,
    cache_frames_per_clip: int,
    next_frame: str,
    clip_shape: tuple[int, ...],
    vocab: int | None = None,
) -> None:
    """A snapshot to ``restore`` must fit the stream its request opens: a clip counter in
    range and matching its cache (whose ``next_frame`` counts the request context's clips
    of ``clip_len`` frames too), and pending clips of the generator's shape (token ids:
    integers below ``vocab``). A snapshot file is data from disk: a wrong counter would
    make clips with another clip's seeds and actions."""
    context = snapshot.request.context
    context_clips = 0 if context is None else len(context) // clip_len
    c = check_truth_counts(snapshot, num_clips)
    if snapshot.cache is not None:
        held = snapshot.cache.get(next_frame)
        expected = (context_clips + c) * cache_frames_per_clip
        if held is None or held.numel() != 1 or int(held) != expected:
            raise ValueError(
                f"snapshot cache {next_frame}={None if held is None else held.tolist()} does "
                f"not match checkpoint_clip={c} ({expected} frames with {context_clips} "
                "context clip(s))"
            )
    for i, clip in enumerate(snapshot.pending):
        if vocab is not None:
            check_token_ids(f"snapshot pending clip {i}", clip, clip_shape, vocab)
        elif (
            not isinstance(clip, torch.Tensor)
            or tuple(clip.shape) != clip_shape
            or not clip.is_floating_point()
            or not bool(clip.isfinite().all())
        ):
            # What failed: the message named the shape alone, the expected one when the
            # dtype or the values were wrong.
            if not isinstance(clip, torch.Tensor):
                got = type(clip).__name__
            else:
                got = f"{clip.dtype} {tuple(clip.shape)}"
                if tuple(clip.shape) == clip_shape and clip.is_floating_point():
                    got += " with non-finite values"
            raise ValueError(
                f"snapshot pending clip {i}: latents must be finite floats {clip_shape}, got {got}"
            )


def check_token_ids(what: str, ids: Any, shape: tuple[int, ...], vocab: int, low: int = 0) -> None:
    """Token ids from a snapshot: a tensor of ``shape``, integers in [low, vocab)."""
    if (
        not isinstance(ids, torch.Tensor)
        or tuple(ids.shape) != shape
        or ids.dtype not in (torch.int64, torch.int32)  # what an embedding takes
        or (ids.numel() and not (low <= int(ids.min()) and int(ids.max()) < vocab))
    ):
        got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        if isinstance(ids, torch.Tensor):
            got = f"{ids.dtype} {got}"
        raise ValueError(
            f"{what}: token ids must be {shape} int64 (or int32) in [{low}, {vocab}), got {got}"
        )


def check_tokenizer(name: str, card: dict[str, Any], tokenizer: str, fingerprint: str) -> None:
    """Refuse to pair generator ``name`` (its model ``card``) with a tokenizer whose encoder
    fingerprint differs from the one it was trained on: its latents or ids would mean other
    things and the videos would be noise. Cards from before fingerprints pass."""
    from vidgen.checkpoint import CheckpointError

    trained = card.get("tokenizer_fingerprint")
    if trained is not None and trained != fingerprint:
        raise CheckpointError(
            f"{name} was trained on the codes of a tokenizer with encoder fingerprint "
            f"{trained}, but {tokenizer!r} (the tokenizer it loads) has {fingerprint}: "
            "restore the tokenizer it was trained with, or train it again on this one"
        )


def check_frames_and_label(request: GenerationRequest, clip_len: int, num_classes: int) -> None:
    """The checks every generator makes of a request: whole clips, a known label."""
    if request.frames % clip_len:
        raise ValueError(f"frames must be a multiple of clip_len={clip_len}, got {request.frames}")
    if request.label is not None and num_classes == 0:
        raise ValueError(f"label must be None: this model takes no labels, got {request.label}")
    if request.label is not None and not 0 <= request.label < num_classes:
        raise ValueError(f"label must be in [0, {num_classes}) or None, got {request.label}")


def check_actions(request: GenerationRequest, num_actions: int, action_dim: int) -> None:
    """A request's actions (and ``context_action``) against a model taking ``num_actions``
    discrete actions or ``action_dim``-dim continuous ones (or neither)."""
    if request.actions is None:
        return
    acts = np.asarray(request.actions)
    _check_action_values("actions", acts, num_actions, action_dim, request.actions.shape)
    if request.context_action is not None:
        if request.context is None:
            raise ValueError(
                "context_action (the action between the context's last frame and the first "
                "new one) needs a context"
            )
        one = np.asarray(request.context_action)
        _check_action_values("context_action", one[None], num_actions, action_dim, one.shape)
    if request.context_actions is not None:
        if request.context is None:
            raise ValueError(
                "context_actions (the actions of the context's frames) needs a context"
            )
        acts = np.asarray(request.context_actions)
        _check_action_values("context_actions", acts, num_actions, action_dim, acts.shape)


def _check_action_values(
    name: str, acts: np.ndarray, num_actions: int, action_dim: int, shape: tuple[int, ...]
) -> None:
    if num_actions:
        if acts.ndim != 1 or acts.dtype.kind not in "iu":
            what = "an int" if name == "context_action" else "int (frames,)"
            raise ValueError(f"{name} must be {what} for this model, got {acts.dtype} {shape}")
        if acts.min() < 0 or acts.max() >= num_actions:
            raise ValueError(
                f"{name} must be in [0, {num_actions}), got values from {acts.min()} to "
                f"{acts.max()}"
            )
    elif action_dim:
        if acts.ndim != 2 or acts.shape[1] != action_dim:
            what = f"({action_dim},)" if name == "context_action" else f"(frames, {action_dim})"
            raise ValueError(f"{name} must be float {what} for this model, got {shape}")
        if not np.isfinite(acts).all():
            raise ValueError(f"{name} must be finite")
        # In float64: np.abs of the most negative int64 is itself (negative), which passed.
        largest = float(np.abs(acts.astype(np.float64)).max()) if acts.size else 0.0
        if largest > MAX_ACTION:  # past it, float32 activations overflow to NaN
            raise ValueError(
                f"{name} must be within +-{MAX_ACTION:g} (MAX_ACTION), got values up to {largest:g}"
            )
    else:
        raise ValueError("this model takes no actions; leave actions unset")


def leading_actions(
    request: GenerationRequest, clip: int, clip_len: int, num_actions: int, action_dim: int
) -> torch.Tensor:
    """The action leading to each frame of clip ``clip`` of a stream (training's convention,
    ``vidgen.train.diffusion.leading_actions``: frame t is made under action t-1): int64
    (clip_len,) or float (clip_len, action_dim). A context clip is ``clip`` < 0 (-1 the last);
    its frames and new frame 0 get theirs from ``context_actions`` (end-aligned) or, for new
    frame 0, ``context_action``. Frames without one get the null action (discrete) or the zero
    velocity (continuous: no movement, as training's first frames have)."""
    from vidgen.nn.conditioning import NULL

    if num_actions:
        row = torch.full((clip_len,), NULL, dtype=torch.int64)
    else:
        row = torch.zeros(clip_len, action_dim)
    acts = request.actions
    if acts is None:
        return row
    lo = clip * clip_len
    history = request.context_actions
    if history is not None:
        if request.context is not None:  # one per context frame: its first frame's is null
            history = history[-len(request.context) :]
        # Frame f (new frames from 0, context frames negative) is made under the action
        # between frames f - 1 and f; history[-1] is the one between frames -1 and 0.
        first = len(history) + lo - 1  # history's index of the action leading to frame lo
        a, b = max(first, 0), min(first + clip_len, len(history))
        if a < b:
            row[a - first : b - first] = torch.tensor(np.asarray(history[a:b])).to(row.dtype)
    if clip < 0:
        return row
    # torch.tensor copies: the request's arrays are read-only, which as_tensor warns about.
    given = torch.tensor(np.asarray(acts[max(lo - 1, 0) : lo + clip_len - 1]))
    if lo == 0:
        row[1:] = given.to(row.dtype)
        if request.context_action is not None:
            row[0] = torch.tensor(np.asarray(request.context_action)).to(row.dtype)
    else:
        row[:] = given.to(row.dtype)
    return row


def _array(name: str, value: Any, own: bool = False) -> np.ndarray:
    """``value`` as a numpy array in native byte order; ``own``: a read-only copy (a
    request's actions are part of its fingerprint and of every snapshot of its stream: a
    caller reusing its buffer must not change them under a running stream)."""
    try:
        array = np.array(value) if own else np.asarray(value)
    except (ValueError, TypeError) as err:  # e.g. rows of different lengths
        raise ValueError(f"{name} must be a rectangular array of numbers: {err}") from err
    if not array.dtype.isnative:  # e.g. a big-endian .npy: torch refuses it mid-step
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype.kind == "f" and array.dtype.itemsize > 8:  # long double: torch has none
        array = array.astype(np.float64)  # (failed at the first step; beyond range: inf)
    if own:
        array.flags.writeable = False
    return array


def own_request(request: GenerationRequest) -> GenerationRequest:
    """The stream's own copy of ``request``, checked again: a caller that changes or reuses
    its object after ``open`` (a field set after construction skips the checks) changes
    neither the running stream nor its snapshots (its actions and context are copies)."""
    if not isinstance(request, GenerationRequest):
        raise ValueError(f"request must be a GenerationRequest, got {type(request).__name__}")
    return replace(request)


def request_fingerprints(request: GenerationRequest, *aliases: Any) -> set[str]:
    """The fingerprints a record of ``request`` (a render folder's guard, a truth, a sidecar)
    may hold: of the request with its model as given and as each of ``aliases`` names it
    (``""``: no model, how render folders record it since 2026-12-02), each in both number
    forms (``to_json``). Aliases are taken as they come: a caller passing any has checked that
    the weights are the same (their sha256)."""
    names = {request.model, *(a for a in aliases if isinstance(a, str))}
    return {request.fingerprint(form, name) for name in names for form in (True, False)}


def _bounded_int(name: str, value: Any, minimum: int, maximum: int) -> int:
    value = check_int(name, value, minimum)
    if value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {shown(value)}")
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:  # an int past float range (JSON allows 10**400) overflows rather than failing
        finite = bool(np.isfinite(float(value)))
    except OverflowError:
        finite = False
    if not finite:
        raise ValueError(f"{name} must be finite, got {value}")
    return int(value) if isinstance(value, int | np.integer) else float(value)


# numpy dtype kinds of numbers: signed and unsigned ints, floats (not bool, timedelta, ...).
NUMBER_KINDS = "iuf"
# Far past any sensible continuous action (velocities of a few pixels per frame; normalised
# controls near 1), and far below where float32 activations overflow (1e15 made black
# videos without a word).
MAX_ACTION = 1e4
# Denoising steps per clip: samplers use 1-100; more is a typo that would stall an actor.
MAX_STEPS = 1000
MAX_SEED = 2**64 - 1  # numpy's and torch's generators take 64-bit seeds
MAX_FRAMES = 2**53  # any JSON reader holds an integer exactly up to here
# Far past any useful setting (guidance is used at 1-10, contrast near 1): a larger value is a
# typo, and one past float32's range made NaN videos without a word.
MAX_GUIDANCE = 100.0
# Token sampling past this is uniform noise in all but name (at 1e39 float32 logits / T are
# 0: uniform sampling, without a word).
MAX_TEMPERATURE = 100.0
MAX_CONTRAST = 10.0


def check_guidance(value: Any) -> float:
    """A classifier-free guidance scale (``GenerationRequest.guidance``, a model's default):
    a finite number in [0, ``MAX_GUIDANCE``] (1 = off)."""
    value = _number("guidance", value)
    if value < 0:
        raise ValueError(f"guidance must be >= 0 (1 = off), got {value}")
    if value > MAX_GUIDANCE:
        raise ValueError(f"guidance must be <= {MAX_GUIDANCE:g} (1 = off), got {value}")
    return value


def setting(request: GenerationRequest, name: str, default: float) -> float:
    """The value of a request's optional setting (``guidance``, ``contrast``) a stream uses on
    a model whose default is ``default``: the request's own, else the model's."""
    value = getattr(request, name)
    return default if value is None else value


def check_contrast(value: Any) -> float:
    """A latent contrast factor (``GenerationRequest.contrast``, a model's default): a finite
    number in (0, ``MAX_CONTRAST``], as a float."""
    value = float(_number("contrast", value))
    if not value > 0:
        raise ValueError(f"contrast must be > 0 (1 = off), got {value}")
    if value > MAX_CONTRAST:
        raise ValueError(f"contrast must be <= {MAX_CONTRAST:g} (1 = off), got {value}")
    return value


# The dtypes a generator's networks can run in (``dtype`` of ``load_generator``, actors and
# renders). The sampler's arithmetic, the noise and the clips it returns stay float32, so a
# stream's truth is the same kind of data in either; bfloat16 halves the weights and the cache
# and runs the fast tensor-core paths on GPUs. float16 is left out: its range overflows in
# attention scores and adaLN products that bfloat16 (float32's range) keeps.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_dtype(value: Any) -> torch.dtype:
    """A generator's ``dtype``: one of ``DTYPES``' names (``"bfloat16"``) or its torch dtype."""
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {value!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """The ``DTYPES`` name of a dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    return str(dtype).removeprefix("torch.")


def derived_seed(seed: int, clip: int, purpose: str) -> int:
    """A 63-bit seed for one random draw of one clip of a stream."""
    digest = hashlib.sha256(f"{seed}/{clip}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded(seed: int, clip: int, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(seed, clip, purpose))


def generate_video(generator: ClipGenerator, request: GenerationRequest) -> Iterator[Clip]:
    """The in-process loop: open a stream, step and decode clip by clip, close. Memory is
    O(window) whatever the length."""
    stream = generator.open(request)
    try:
        while not stream.done:
            (latents,) = generator.step([stream])
            (clip,) = generator.decode([latents])
            yield clip
    finally:
        generator.close(stream)
