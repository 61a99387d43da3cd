"""``vidgen render``: its config and the inputs a request takes from files (no Ray here)."""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vidgen.fsutil import expand_user, target
from vidgen.generators import GenerationRequest, check_dtype
from vidgen.io import VideoReadError, probe_video, read_video
from vidgen.validate import check_step_timeout, shown


def check_out(out: str | Path) -> Path:
    """A render's ``out``: an .mp4 path in an existing folder that is not itself a folder,
    nor its provenance sidecar (``<out>.json``, written at the end: found now, not then)."""
    path = expand_user(out)
    if path.suffix.lower() != ".mp4":  # ".mp4" alone has no suffix
        raise ValueError(f"out must end in .mp4, got {str(out)!r}")
    try:
        if not path.parent.is_dir():
            raise ValueError(f"out={str(out)!r}: folder {str(path.parent)!r} does not exist")
        if path.is_dir():
            raise ValueError(f"out={str(out)!r} is a folder; give the video's file name")
        sidecar = path.with_suffix(".json")
        if sidecar.is_dir():
            raise ValueError(f"out={str(out)!r}: its sidecar {sidecar.name} is a folder")
        if sidecar.is_file() and not is_provenance(sidecar):
            # Written over at the end without a word: a user's own notes.json was lost.
            raise ValueError(
                f"out={str(out)!r}: {str(sidecar)!r}, where its provenance sidecar goes, is "
                "a file vidgen did not write; move it, or choose another out"
            )
        other = sharing_the_sidecar(path)
        if other is not None:
            raise ValueError(
                f"out={str(out)!r}: {str(other)!r} is beside it, and the two would share the "
                f"provenance sidecar {sidecar.name} (and `vidgen eval` would read one's for the "
                "other); choose another name"
            )
        if path.is_symlink():  # the video is written where it points
            try:
                os.stat(path)  # a loop raises ELOOP; a dangling link (no file yet) is fine
            except OSError as err:
                if err.errno == errno.ELOOP:
                    raise ValueError(f"out={str(out)!r} is a symlink loop") from None
            pointed = target(path)
            if not pointed.parent.is_dir():
                raise ValueError(
                    f"out={str(out)!r} is a symlink to {str(pointed)!r}, whose folder does "
                    "not exist"
                )
    except OSError as err:  # e.g. a file name over the file system's 255 bytes
        raise ValueError(f"out={str(out)!r}: {err.strerror or err}") from None
    return path


def parts_folder(out: Path) -> Path:
    """``.<out's name>.parts`` beside ``out``; a name too long for that (a file name has at
    most 255 bytes) is shortened and made unique by its hash."""
    name = out.name
    raw = os.fsencode(name)  # a name not in UTF-8 (undecodable bytes) encodes too
    if len(raw) > 200:
        head = name[:100]  # as before (folders of renders under way keep their names) ...
        if len(os.fsencode(head)) > 200:  # ... unless too long in bytes: 100 emoji are 400
            head = raw[:100].decode("utf-8", "ignore")
        name = f"{head}-{hashlib.sha256(raw).hexdigest()[:12]}"
    return out.parent / f".{name}.parts"


def sharing_the_sidecar(path: Path) -> Path | None:
    """Another video (or a render of one under way: its parts folder) beside ``path`` whose
    name differs only in the case of its suffix (``v.MP4`` beside ``v.mp4``), not the same
    file (as on a case-insensitive file system): both would have the sidecar ``v.json``."""
    for m, p in itertools.product("mM", "pP"):
        suffix = f".{m}{p}4"
        if suffix == path.suffix:
            continue
        other = path.with_suffix(suffix)
        for found in (other, parts_folder(other)):
            if found.exists() and not _same_file(found, path, parts_folder(path)):
                return found
    return None


def _same_file(found: Path, *paths: Path) -> bool:
    for p in paths:
        try:
            if os.path.samefile(found, p):
                return True
        except OSError:  # not there
            pass
    return False


def is_provenance(path: Path) -> bool:
    """Whether ``path`` holds a render's provenance sidecar (vidgen's own, to write over)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and {"vidgen_version", "request_sha256"} <= data.keys()


def check_writable(out: str | Path) -> None:
    """ValueError naming ``out`` unless a file can be made in its folder (and in its
    target's, for a symlinked ``out``): a read-only folder failed only after Ray and the
    actors had started, as a failed write whose segments a re-run would resume from."""
    path = expand_user(out)
    for where in dict.fromkeys((path.parent, target(path).parent)):
        try:
            with tempfile.TemporaryFile(dir=where):
                pass
        except OSError as err:
            raise ValueError(
                f"out={str(out)!r}: its folder {str(where)!r} cannot be written: "
                f"{err.strerror or err}"
            ) from None


# Upper bounds of the serving keys: past them a value started Ray and failed inside an actor
# (max_streams: its cache slots are allocated up front; an int past C's long overflowed).
SERVING_LIMITS = {
    "actors": 1024,
    "max_streams": 1024,
    "threads": 1024,
    "segment_clips": 2**31 - 1,
    "snapshot_every": 2**31 - 1,
    "max_restarts": 10**6,
}


def check_serving_limits(obj: object, flags: bool = False) -> None:
    """ValueError naming the first of ``SERVING_LIMITS``' keys on ``obj`` (a config or parsed
    arguments) above its bound; ``flags``: named as command-line flags (``--max-streams``)."""
    for name, limit in SERVING_LIMITS.items():
        value = getattr(obj, name, None)
        if value is not None and value > limit:
            shown_name = f"--{name.replace('_', '-')}" if flags else name
            raise ValueError(f"{shown_name} must be <= {limit}, got {shown(value)}")


@dataclass
class RenderConfig:
    """``model``: shipped name or checkpoint path; ``label``: class (the number of shapes for
    the bouncing models) or null; ``actions``: a .npy of per-frame actions; ``context``: an
    mp4 to continue (resized and centre-cropped to the model's frame size); ``context_actions``:
    a .npy of the actions of the context's frames, aligned to its end (the last leads to the
    first new frame; ``GenerationRequest.context_actions``: it may cover frames before those
    kept); ``reencode``: token
    models re-tokenise each sampled clip before it becomes context; ``guidance``: the
    classifier-free guidance scale (null = the model's default); ``contrast``: diffusion
    models scale each new clip's latent contrast by it (null = the model's default);
    ``address``: ``""`` starts a local Ray instance, ``auto`` joins a running cluster,
    ``ray://host:port`` connects a client; ``dtype``: what the actors' networks run in
    (``float32``, or ``bfloat16`` for GPUs: half the memory, the fast kernels)."""

    model: str = "ca2vdm-tiny"
    frames: int = 256
    seed: int = 0
    label: int | None = None
    actions: str | None = None
    context: str | None = None
    context_actions: str | None = None
    guidance: float | None = None
    steps: int = 12
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    reencode: bool = False
    contrast: float | None = None
    fps: float = 8  # frames per second of the file (a request takes 12.5 as well)
    out: str = "video.mp4"
    actors: int = 1
    address: str = ""
    max_streams: int = 8
    threads: int = 1
    segment_clips: int = 8
    snapshot_every: int = 1
    max_restarts: int = 1
    step_timeout: float | None = None
    lossless: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        # The request's own checks (frames, seed, label, guidance, steps, fps, sampling),
        # before any actor starts; actions and context are read once the model is known.
        self.request_without_files()
        for name in ("actors", "max_streams", "segment_clips", "snapshot_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = torch's default), got {self.threads}")
        check_dtype(self.dtype)
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        check_serving_limits(self)
        self.step_timeout = check_step_timeout("step_timeout", self.step_timeout)
        out = check_out(self.out)
        for name in ("actions", "context", "context_actions"):
            value = getattr(self, name)
            if value is not None and not expand_user(value).is_file():
                raise ValueError(f"{name}={value!r} is not a file")
        if self.context is not None and _same_file(expand_user(self.context), out):
            # Read in full, then written over: the input was gone, and the same command run
            # again went on from its own output.
            raise ValueError(
                f"context={self.context!r} is the file out={self.out!r} would replace; "
                "write the continuation to another file"
            )
        if self.context_actions is not None and (self.context is None or self.actions is None):
            raise ValueError(
                "context_actions (the actions of the context's frames) needs context and actions"
            )

    def request(
        self, frame_shape: tuple[int, int, int] | None = None, clip_len: int | None = None
    ) -> GenerationRequest:
        """The request this config describes; ``frame_shape`` (the model's (H, W, 3)) and
        ``clip_len`` are needed to read a context video."""
        return self.request_without_files(
            context=load_context(self.context, frame_shape, clip_len) if self.context else None,
            **self.action_files(),
        )

    def action_files(self) -> dict[str, np.ndarray | None]:
        """``actions`` and ``context_actions`` read from their .npy files (None: unset)."""
        return {
            name: load_actions(path, name) if path else None
            for name, path in (("actions", self.actions), ("context_actions", self.context_actions))
        }

    def request_without_files(self, **files: object) -> GenerationRequest:
        return GenerationRequest(
            model=self.model,
            frames=self.frames,
            seed=self.seed,
            label=self.label,
            guidance=self.guidance,
            steps=self.steps,
            fps=self.fps,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            reencode=self.reencode,
            contrast=self.contrast,
            **files,
        )


def load_actions(path: str | Path, name: str = "actions") -> np.ndarray:
    """Per-frame actions from a .npy file (loaded without pickle); ``name`` names the key in
    errors."""
    try:
        actions = np.load(expand_user(path), allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:  # EOFError: an empty file
        raise ValueError(f"{name}={str(path)!r} is not a readable .npy array: {err}") from err
    if not isinstance(actions, np.ndarray):  # an .npz archive
        actions.close()
        raise ValueError(f"{name}={str(path)!r} must be a .npy array, got an .npz archive")
    if actions.ndim not in (1, 2):
        raise ValueError(f"{name} must be (frames,) or (frames, A), got shape {actions.shape}")
    return actions


def load_context(
    path: str | Path, frame_shape: tuple[int, ...] | None, clip_len: int | None = None
) -> np.ndarray:
    """The frames of an mp4 to continue from, resized (cover, then centre crop) to the
    model's frame size when they differ. With ``clip_len``, only its last whole clips are
    kept (the generators take a context of whole clips; the video continues from its end)."""
    size = None if frame_shape is None else tuple(frame_shape[:2])
    path = expand_user(path)
    try:
        info = probe_video(path)
        start = 0
        if clip_len is not None:
            whole = info.num_frames // clip_len * clip_len
            if whole == 0:
                raise ValueError(
                    f"context={str(path)!r} has {info.num_frames} frames; the model continues "
                    f"from whole clips of {clip_len} frames"
                )
            start = info.num_frames - whole
        return read_video(path, start=start, size=size, info=info).numpy()
    except VideoReadError as err:
        raise ValueError(f"context={str(path)!r} is not a readable video: {err}") from err
