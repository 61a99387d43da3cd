"""Executors: the orchestrator's handle on one generator worker, in process or on Ray.

Calls return handles; ``wait`` says which are done; ``result`` returns a value or raises
(a dead or timed-out worker raises an error the orchestrator treats as a failure).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import ray

from vidgen.generators import GenerationRequest, StreamSnapshot, check_dtype
from vidgen.generators.base import dtype_name
from vidgen.validate import check_int, check_number
from workers.actor import ClipOut, GeneratorWorker, remote_reason, start_actor

log = logging.getLogger(__name__)


class ExecutorFailed(RuntimeError):
    """The executor died or timed out; its streams must be restored elsewhere."""


class Executor(Protocol):
    name: str
    info: dict[str, Any]

    def open(self, key: int, request: GenerationRequest, timeout: float | None = None) -> None:
        """Open stream ``key``; past ``timeout`` seconds (None: no limit) raise a
        ``TimeoutError``, leaving the executor to be killed."""
        ...

    def restore(self, key: int, snapshot: StreamSnapshot, timeout: float | None = None) -> None: ...

    def close(self, key: int) -> None: ...

    def step(self, keys: list[int], epochs: list[int], snapshot_keys: list[int]) -> Any: ...

    def decode(self, clips: list[ClipOut]) -> Any: ...

    def wait(self, handles: list[Any], timeout: float | None, first: bool = False) -> list[Any]:
        """The handles that are done: after ``timeout`` seconds, or as soon as one is when
        ``first``. Handles of other executors of the same class may be passed too."""
        ...

    def result(self, handle: Any) -> Any: ...

    def recover(self) -> None: ...

    def kill(self) -> None: ...


@dataclass
class _Done:
    value: Any = None
    error: BaseException | None = None


class LocalExecutor:
    """The in-process twin: calls a ``GeneratorWorker`` directly (handles come back done)."""

    def __init__(self, worker: GeneratorWorker, name: str = "local") -> None:
        self.worker, self.name = worker, name
        self.info = worker.ready()

    @staticmethod
    def _call(fn: Callable[..., Any], *args: Any) -> _Done:
        try:
            return _Done(value=fn(*args))
        except Exception as err:  # surfaced by result(), as a remote error would be
            return _Done(error=err)

    def open(self, key: int, request: GenerationRequest, timeout: float | None = None) -> None:
        self.worker.open(key, request)  # in-process: nothing to wait for

    def restore(self, key: int, snapshot: StreamSnapshot, timeout: float | None = None) -> None:
        self.worker.restore(key, snapshot)

    def close(self, key: int) -> None:
        self.worker.close(key)

    def step(self, keys: list[int], epochs: list[int], snapshot_keys: list[int]) -> _Done:
        return self._call(self.worker.step, keys, epochs, snapshot_keys)

    def decode(self, clips: list[ClipOut]) -> _Done:
        return self._call(self.worker.decode, clips)

    @staticmethod
    def wait(handles: list[Any], timeout: float | None, first: bool = False) -> list[Any]:
        return list(handles)

    def result(self, handle: _Done) -> Any:
        if handle.error is not None:
            raise handle.error
        return handle.value

    def recover(self) -> None:
        return None

    def kill(self) -> None:
        return None


class RayExecutor:
    """A ``GeneratorActor``. ``recover`` waits for Ray to restart a dead actor (when it was
    created with ``max_restarts``) and raises if it stays dead."""

    def __init__(
        self,
        model: str,
        max_streams: int = 8,
        threads: int = 1,
        max_restarts: int = 0,
        ready_timeout: float = 120.0,
        name: str = "",
        dtype: str = "float32",
    ) -> None:
        dtype = dtype_name(check_dtype(dtype))  # here, not as an actor that fails to start
        # Ray's -1 (restart forever) read as "no restarts" in kill and recover; None as a
        # timeout started the actor, then failed its first recover.
        max_restarts = check_int("max_restarts", max_restarts, minimum=0)
        # Taken by the actor as they came: 2.5 or -1 failed its start as a load error.
        max_streams = check_int("max_streams", max_streams, minimum=1)
        threads = check_int("threads", threads, minimum=0)  # 0: torch's own count
        ready_timeout = check_number("ready_timeout (seconds)", ready_timeout, above=0)
        self._killed_pid: int | None = None  # the process kill() was last sent to
        self.model, self.max_streams, self.threads = model, max_streams, threads
        self.max_restarts, self.ready_timeout, self.dtype = max_restarts, ready_timeout, dtype
        self.handle, self.info = start_actor(
            model, max_streams, threads, max_restarts, ready_timeout, dtype=dtype
        )
        self._given_name = name
        self.name = name or f"actor-{self.info['pid']}"

    # An actor runs its calls one at a time: an open or restore waits for the step in flight
    # on it, so one that hangs would hang the caller too without a timeout.
    def open(self, key: int, request: GenerationRequest, timeout: float | None = None) -> None:
        ray.get(self.handle.open.remote(key, request), timeout=timeout)

    def restore(self, key: int, snapshot: StreamSnapshot, timeout: float | None = None) -> None:
        ray.get(self.handle.restore.remote(key, snapshot), timeout=timeout)

    def close(self, key: int) -> None:
        self.handle.close.remote(key)

    def step(self, keys: list[int], epochs: list[int], snapshot_keys: list[int]) -> Any:
        return self.handle.step.remote(keys, epochs, snapshot_keys)

    def decode(self, clips: list[ClipOut]) -> Any:
        return self.handle.decode.remote(clips)

    @staticmethod
    def wait(handles: list[Any], timeout: float | None, first: bool = False) -> list[Any]:
        if first:  # block until one is done, then take every other that is done too
            ready, rest = ray.wait(handles, num_returns=1, timeout=timeout, fetch_local=False)
            if ready and rest:
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0, fetch_local=False)
                ready = ready + more
        else:
            ready, _ = ray.wait(
                handles, num_returns=len(handles), timeout=timeout, fetch_local=False
            )
        # The caller's own objects: over a Ray client (ray://) ray.wait hands back new refs,
        # equal to those given but not the same, and the orchestrator, which matches finished
        # work by identity, never saw a step come back (a render hung).
        own = {handle: handle for handle in handles}
        return [own.get(ref, ref) for ref in ready]

    def result(self, handle: Any) -> Any:
        return ray.get(handle)

    def recover(self) -> None:
        if self.max_restarts <= 0:
            raise ExecutorFailed(f"{self.name} died and was created without restarts")
        # While Ray restarts the actor, calls fail at once with ActorUnavailableError
        # ("the actor is restarting"): ask again until it answers or the timeout passes.
        # ActorDiedError (restarts used up) is final.
        # A kill is asynchronous: an idle actor answers before it lands (its decode thread
        # hung, say), and that dying process is not the restarted one (its streams would
        # fail at once, a second failure for one fault). Wait for another process.
        deadline = time.monotonic() + self.ready_timeout
        while True:
            try:
                left = max(0.1, deadline - time.monotonic())
                info = ray.get(self.handle.ready.remote(), timeout=left)
                if info["pid"] != self._killed_pid:
                    self.info, self._killed_pid = info, None
                    return
                if time.monotonic() > deadline:
                    raise ExecutorFailed(
                        f"{self.name} was killed but its process {info['pid']} still answers "
                        f"after {self.ready_timeout:g} s"
                    )
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
            except ray.exceptions.RayActorError as err:
                if not err.actor_init_failed:
                    raise
                # Restarted, but its model did not load again (the file removed or changed
                # since): one line, not Ray's remote traceback.
                raise ExecutorFailed(
                    f"{self.name} restarted but could not load model {self.model!r}: "
                    f"{remote_reason(err)}"
                ) from None
            time.sleep(0.2)

    def kill(self) -> None:
        self._killed_pid = self.info["pid"]
        ray.kill(self.handle, no_restart=self.max_restarts <= 0)

    def retire(self) -> None:
        """Kill the actor for good (no restart), whatever ``max_restarts`` says."""
        try:
            ray.kill(self.handle, no_restart=True)
        except Exception as err:  # already gone
            log.debug("killing %s: %s", self.name, err)

    def replacement(self) -> RayExecutor:
        """A new actor with the same settings (for a worker that did not come back). The old
        one is retired first, so that its GPU is free for the new one."""
        self.retire()
        return RayExecutor(
            self.model,
            self.max_streams,
            self.threads,
            self.max_restarts,
            self.ready_timeout,
            name=self._given_name,
            dtype=self.dtype,
        )
