"""GeneratorActor: one clip generator per GPU (or per CPU slot), serving many streams.

``GeneratorWorker`` is a plain class (the in-process twin, STYLE.md rule 11); the actor is the
same class under ``ray.remote``. It loads a generator by shipped name or checkpoint path,
holds the streams the orchestrator placed on it (keyed by the orchestrator's stream keys) and
advances all of them in one batched ``step``. Decoding runs in its own concurrency group, so
the orchestrator can decode clip k while the actor already computes clip k + 1.

Placement: with GPUs in the cluster each actor asks for one (Ray then sets
CUDA_VISIBLE_DEVICES so each actor sees only its own device); otherwise one CPU, with one
torch thread unless configured.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch

from vidgen import checkpoint
from vidgen.generators import (
    ClipLatents,
    GenerationRequest,
    Stream,
    StreamSnapshot,
    check_dtype,
    load_generator,
)
from vidgen.generators.base import dtype_name
from vidgen.validate import check_int

log = logging.getLogger(__name__)


class StreamsLost(RuntimeError):
    """A step named streams the worker does not hold: Ray restarted its process (an actor
    with ``max_restarts``) while it was idle, so it came back empty. The orchestrator treats
    this as the executor's failure and restores the streams from their truth."""


@dataclass
class ClipOut:
    """One clip a step made, tagged so the orchestrator can drop stale results."""

    key: int
    clip: int
    epoch: int
    data: torch.Tensor  # latents or token ids: the stream's truth
    context: torch.Tensor | None = None  # what else decoding it reads (ClipLatents.context)


@dataclass
class StepOut:
    """A step's clips, and the checkpoints asked for: each a ``StreamSnapshot`` whose
    ``request`` is None (the orchestrator holds the request; its context frames need not
    travel back with every checkpoint)."""

    clips: list[ClipOut]
    snapshots: dict[int, StreamSnapshot] = field(default_factory=dict)


def _in_actor() -> bool:
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def auto_device() -> str:
    """``cuda`` where torch sees a GPU, except in a Ray actor placed without one: Ray no
    longer hides the node's GPUs from such an actor (``CUDA_VISIBLE_DEVICES`` is left as it
    was), which then loaded onto GPU 0, beside the actors that own it."""
    if not torch.cuda.is_available():
        return "cpu"
    if _in_actor():
        return "cuda" if ray.get_gpu_ids() else "cpu"
    return "cuda"


class GeneratorWorker:
    """Holds one generator and the streams placed on it."""

    def __init__(
        self,
        model: str,
        max_streams: int = 8,
        device: str = "auto",
        threads: int = 1,
        dtype: str = "float32",
    ) -> None:
        # Checked here too: the in-process twin (LocalExecutor) has no RayExecutor before it.
        max_streams = check_int("max_streams", max_streams, minimum=1)
        threads = check_int("threads", threads, minimum=0)  # 0: torch's own count
        if device == "auto":
            device = auto_device()
        # An actor's process is its own; the in-process twin left its caller's whole process
        # at one thread.
        if device == "cpu" and threads and _in_actor():
            torch.set_num_threads(threads)
        self.model_name = model
        self.device = device
        self.max_streams = max_streams
        self.dtype = dtype_name(check_dtype(dtype))  # a name: info, guards and JSON compare it
        self.generator = load_generator(model, max_streams=max_streams, device=device, dtype=dtype)
        # The digests of the bytes the generator loaded (its model file and its tokenizer's):
        # hashing the files again read each twice, and named other bytes if one was replaced
        # after it was loaded. Its tokenizer's files matter too: a decoder fine-tuned under
        # the same path keeps the generator loading (same encoder fingerprint) but changes
        # its frames.
        self.sha256 = self.generator.sha256
        digests = self.generator.companion_sha256
        self.tokenizer_sha256 = checkpoint.combined_sha256(digests) if digests else None
        self.streams: dict[int, Stream] = {}

    def ready(self) -> dict[str, Any]:
        """Where this worker runs (also a liveness probe)."""
        gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
        return {
            "pid": os.getpid(),
            "device": self.device,
            "dtype": self.dtype,
            "gpu_ids": [str(g) for g in gpu_ids],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "model": self.model_name,
            "sha256": self.sha256,
            "tokenizer_sha256": self.tokenizer_sha256,
            "clip_len": self.generator.clip_len,
            "frame_shape": list(self.generator.frame_shape),
            "streams": sorted(self.streams),
            "max_streams": self.max_streams,
            # The settings of requests that leave theirs unset (the model card's defaults).
            "guidance": self.generator.guidance,
            "contrast": getattr(self.generator, "contrast", 1.0),
        }

    def open(self, key: int, request: GenerationRequest) -> None:
        if key in self.streams:  # placed again (a nested failure): start clean, free its slot
            self.close(key)
        self.streams[key] = self.generator.open(request)

    def restore(self, key: int, snapshot: StreamSnapshot) -> None:
        if key in self.streams:  # a retried restore after a timeout: start clean
            self.close(key)
        self.streams[key] = self.generator.restore(snapshot)

    def close(self, key: int) -> None:
        stream = self.streams.pop(key, None)
        if stream is not None:
            self.generator.close(stream)

    def step(self, keys: list[int], epochs: list[int], snapshot_keys: list[int]) -> StepOut:
        """One clip for every stream in ``keys`` (one batched pass per denoising/block step),
        then the full snapshots of ``snapshot_keys`` (the orchestrator's checkpoints). The
        arguments are checked before anything steps: a bad call changes no stream."""
        if len(epochs) != len(keys):
            raise ValueError(f"epochs must have one entry per key ({len(keys)}), got {len(epochs)}")
        if not set(snapshot_keys) <= set(keys):
            raise ValueError(
                f"snapshot_keys must be among the keys stepped, got {sorted(set(snapshot_keys))} "
                f"for keys {keys}"
            )
        lost = [k for k in keys if k not in self.streams]
        if lost:
            raise StreamsLost(
                f"this worker (pid {os.getpid()}) holds no streams {lost}: it was restarted "
                "since they were placed (or they were never opened here)"
            )
        clips: list[ClipLatents] = self.generator.step([self.streams[k] for k in keys])
        out = [
            ClipOut(key=k, clip=c.clip, epoch=e, data=c.data, context=c.context)
            for k, e, c in zip(keys, epochs, clips, strict=True)
        ]
        snaps = {}
        for k in snapshot_keys:
            snap = self.generator.snapshot(self.streams[k])
            snaps[k] = StreamSnapshot(None, snap.checkpoint_clip, snap.cache)  # type: ignore[arg-type]
        for k in keys:
            if self.streams[k].done:
                self.close(k)
        return StepOut(clips=out, snapshots=snaps)

    @ray.method(concurrency_group="decode")
    def decode(self, clips: list[ClipOut]) -> list[np.ndarray]:
        """uint8 frames (T, H, W, 3) of each clip (numpy: zero-copy through the object
        store)."""
        latents = [
            ClipLatents(stream=c.key, clip=c.clip, data=c.data, context=c.context) for c in clips
        ]
        return [c.frames for c in self.generator.decode(latents)]


GeneratorActor = ray.remote(concurrency_groups={"decode": 1})(GeneratorWorker)


def actor_resources(resources: dict[str, float] | None = None) -> dict[str, float]:
    """One GPU per actor when the cluster has GPUs, else one CPU."""
    resources = ray.cluster_resources() if resources is None else resources
    if resources.get("GPU", 0) >= 1:
        return {"num_gpus": 1, "num_cpus": 0}
    return {"num_gpus": 0, "num_cpus": 1}


class SchedulingError(RuntimeError):
    """An actor could not be placed: the message says what was asked and what exists."""


class ActorLoadError(RuntimeError):
    """An actor started but could not load its generator: the message is the remote error
    itself (its last line), without Ray's traceback."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def remote_reason(err: BaseException) -> str:
    """The exception line at the end of a Ray error's text (the remote ``Type: message``),
    without colour codes; the whole text when there is no such line."""
    lines = [line.strip() for line in _ANSI.sub("", str(err)).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def start_actor(
    model: str,
    max_streams: int = 8,
    threads: int = 1,
    max_restarts: int = 0,
    timeout: float = 120.0,
    name: str | None = None,
    dtype: str = "float32",
) -> tuple[Any, dict[str, Any]]:
    """Create a GeneratorActor and wait until it has loaded its model; returns the handle
    and its ``ready`` info. Raises ``SchedulingError`` if it is not running in ``timeout``."""
    resources = actor_resources()
    handle = GeneratorActor.options(
        **resources, max_restarts=max_restarts, max_task_retries=0, name=name
    ).remote(model, max_streams, "auto", threads, dtype)
    ready = handle.ready.remote()
    done, _ = ray.wait([ready], timeout=timeout)
    if not done:
        ray.kill(handle, no_restart=True)
        raise SchedulingError(
            f"a GeneratorActor asking for {resources} was not placed and its model loaded "
            f"after {timeout:g}s (placement or a slow load: a slow file system, a large "
            f"model); the cluster has {ray.cluster_resources()} (available now: "
            f"{ray.available_resources()})"
        )
    try:
        return handle, ray.get(ready)
    except ray.exceptions.RayActorError as err:
        if not err.actor_init_failed:
            raise
        raise ActorLoadError(
            f"a GeneratorActor could not load model {model!r}: {remote_reason(err)}"
        ) from None
