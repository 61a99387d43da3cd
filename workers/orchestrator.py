"""Orchestrator: videos of any length from clip generators on actors, in order, exactly once.

The loop is schedule -> execute -> update (STYLE.md rule 9):

- schedule: for every healthy executor with no step in flight, take the active streams placed
  on it whose sinks have room (bounded queues: a slow consumer holds its stream back) and
  submit one batched step, asking for a full snapshot of the streams whose checkpoint is due.
- execute: wait for any step or decode in flight (with the step timeout, if configured).
- update: a step result is applied only if its epoch is the stream's current one: its clips
  join the stream's truth and are sent to decode; decoded clips are handed to the sink in
  clip order. A dead actor (``RayActorError``) or a step past its timeout advances the epoch
  of every stream on it and restores them, from their truth, on the restarted actor or on a
  healthy one; results of a superseded epoch are dropped. Steps run with Ray task retries off,
  so nothing is applied twice: no frame is lost, none is written twice.

The orchestrator owns each stream's truth (DESIGN.md section 3): the last checkpoint (a full
cache snapshot, taken every ``snapshot_every`` clips) plus the clips made since. Executors are
``LocalExecutor`` (the in-process twin: a ``GeneratorWorker`` called directly) or
``RayExecutor`` (a ``GeneratorActor``); the loop is the same for both.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from vidgen.checkpoint import same_checkpoint
from vidgen.generators import Clip, GenerationRequest, StreamSnapshot
from vidgen.generators.base import check_truth_counts, own_request, request_fingerprints
from vidgen.validate import check_int, check_number, check_step_timeout
from workers.actor import ClipOut, StepOut, StreamsLost
from workers.executors import Executor, ExecutorFailed

log = logging.getLogger(__name__)

UNPLACED = -1  # a stream's executor while it waits for a free slot (its executor was lost)


_DRAINED = (
    "nothing can run: every unfinished stream waits for its sink to be drained (take clips "
    "with Orchestrator.clips(key), or give the streams sinks that write) or for a free slot "
    "held by such a stream"
)


# What an executor reports that decides its frames: streams move between executors on
# failures, so every executor of one orchestrator must agree on all of them.
SAME_FRAMES = (
    "model",
    "sha256",
    "tokenizer_sha256",
    "clip_len",
    "frame_shape",
    "dtype",
    "guidance",
    "contrast",
)


def _differ(info: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """The ``SAME_FRAMES`` keys whose values differ between two executors' infos."""
    return [k for k in SAME_FRAMES if info.get(k) != other.get(k)]


def _retire(executor: Executor) -> None:
    """Stop an executor for good (a Ray actor is not restarted; a local one has nothing to
    stop)."""
    getattr(executor, "retire", executor.kill)()


class SinkError(RuntimeError):
    """A stream's sink raised (a segment or truth write failed): ``key`` is the stream,
    ``cause`` the sink's error. The stream keeps the clip; a run delivers it again."""

    def __init__(self, key: int, cause: BaseException) -> None:
        super().__init__(f"stream {key}'s sink failed: {type(cause).__name__}: {cause}")
        self.key, self.cause = key, cause


class ExecutorChanged(RuntimeError):
    """An executor came back from a restart making other frames (``SAME_FRAMES``)."""


class ExecutorBroken(RuntimeError):
    """Two streams blamed in an executor's failures in a row (no step came back on it since)
    have made clips on other executors since: it is retired (replaced, or dropped while
    another executor is left) rather than restarted again."""


class NoExecutorsLeft(RuntimeError):
    """Every executor failed and none could be replaced: the streams cannot go on."""


class NoProgress(NoExecutorsLeft):
    """Stream ``key`` was in the work of ``max_failures`` executor failures in a row without
    making a clip in between (a step that always fails or always exceeds ``step_timeout``),
    and as many again after it was moved to another executor (where there is one): retrying
    forever would start actor after actor. After a batch fails, its streams are stepped one
    at a time until each makes a clip, so the stream named is the one whose own steps fail;
    the move keeps a bad executor from being taken for a bad stream. The other streams are
    restored as after any failure and go on at the next ``run``; this one is parked, never
    placed or stepped again: a later ``run`` raises NoProgress for it again once the others
    are done (``cancel`` it to give up on it; its truth stays for a resume)."""

    def __init__(self, message: str, key: int | None = None) -> None:
        super().__init__(message)  # one argument: a pickled copy is rebuilt (key None)
        self.key = key


# --- sinks ----------------------------------------------------------------------------------


class Sink(Protocol):
    """Receives a stream's clips in order. ``room`` is how many more clips it takes now."""

    def room(self) -> int: ...

    def put(self, clip: Clip) -> None: ...

    def finish(self) -> None: ...


class QueueSink:
    """A bounded queue of clips for a caller to take (``Orchestrator.clips``)."""

    def __init__(self, capacity: int = 4) -> None:
        # 0 took no clip, and every run failed as if no reader drained it
        self.capacity = check_int("capacity", capacity, minimum=1)
        self.queue: deque[Clip] = deque()
        self.finished = False

    def room(self) -> int:
        return self.capacity - len(self.queue)

    def put(self, clip: Clip) -> None:
        self.queue.append(clip)

    def finish(self) -> None:
        self.finished = True


# --- streams ----------------------------------------------------------------------------------


@dataclass
class _Stream:
    key: int
    request: GenerationRequest
    num_clips: int
    sink: Sink
    executor: int  # index into Orchestrator.executors, or UNPLACED
    epoch: int = 0
    # Truth: checkpoints in order, each with the clips made after it (StreamSnapshot.pending).
    truths: list[StreamSnapshot] = field(default_factory=list)
    accepted: int = 0  # clips in the truth
    delivered: int = 0  # clips handed to the sink
    finished: bool = False  # its sink's finish() returned (a run calls it again until then)
    failures: int = 0  # executor failures it went through since it last made progress
    failed_on: list[Any] = field(default_factory=list)  # the executors of those failures
    failed_times: dict[int, int] = field(default_factory=dict)  # id(executor) -> how many
    failed_before_move: dict[int, int] = field(default_factory=dict)  # failed_times then
    avoid: Any = None  # the executor it failed max_failures times on: placed elsewhere
    moved_at: int = 0  # its failures in a row when it was moved (once; 0: not moved): it
    # gets max_failures more
    decode_failed: bool = False  # a decode of its clips failed since it last made progress
    stuck: bool = False  # given up on (NoProgress): parked, never placed or stepped again
    # (weakref, finalizer) of the iterator of ``Orchestrator.clips`` reading it
    reader: tuple[Any, Any] | None = None
    frames: dict[int, np.ndarray] = field(default_factory=dict)  # decoded, not delivered
    to_decode: dict[int, ClipOut] = field(default_factory=dict)  # accepted, frames not back

    @property
    def truth(self) -> StreamSnapshot:
        return self.truths[-1]

    @property
    def done(self) -> bool:
        return self.delivered >= self.num_clips

    def truth_at(self, clips: int) -> StreamSnapshot:
        """The truth as of ``clips`` clips made (for saving a resume point)."""
        for snap in reversed(self.truths):
            if snap.checkpoint_clip <= clips:
                return snap.truncated(clips)
        raise ValueError(f"no checkpoint at or before clip {clips}")


@dataclass
class _Work:
    kind: str  # "step" | "decode"
    executor: int
    handle: Any
    keys: list[int]
    epochs: list[int]
    started: float
    clips: list[ClipOut] = field(default_factory=list)
    # Submission order: an executor runs its decodes one at a time, in this order.
    order: int = field(default_factory=lambda: next(_ORDER))


_ORDER = itertools.count()


def _busy_while(method: Callable[..., Any]) -> Callable[..., Any]:
    """Marks the orchestrator busy during ``method``: an iterator the garbage collector
    closes then (its GeneratorExit handler runs wherever the collector interrupts) has its
    stream cancelled after, not while the streams are gone over."""

    @functools.wraps(method)
    def busy(self: Orchestrator, *args: Any, **kwargs: Any) -> Any:
        self._busy += 1
        try:
            return method(self, *args, **kwargs)
        finally:
            self._busy -= 1

    return busy


class Orchestrator:
    """Drives streams on executors (see the module docstring).

    ``executors``: the workers to use; ``snapshot_every``: clips between full checkpoints of
    a stream's cache; ``step_timeout``: seconds after which a step counts as failed (None:
    only actor death counts), and, times 2 plus the clips it replays or context clips it
    encodes, the most an open or restore of a stream may take (it waits for the step in
    flight on its actor); ``queue_clips``: clips a stream may
    have made but not yet delivered to its sink; ``replace``: called with a failed executor
    that could not be recovered, returns a new executor (or None to drop it; its streams
    move to the others as their slots allow, waiting their turn when all are full);
    ``max_failures``: at this many failures in a row of a stream's own work (its steps in a
    batch that failed, then alone; its decodes; its opens), with no clip made between them,
    the stream is moved to another executor if all its failures were on one and another is
    left, with ``max_failures`` more tries there (back to its own, once, if it would wait
    there for a slot with nothing else able to run), and given up on (``NoProgress``)
    otherwise. An executor is retired (``replace``d, or dropped while others are left) once
    two streams blamed in its failures in a row have made clips on other executors: an actor
    that restarts but fails every step would otherwise wear out every stream placed on it.
    Keep it at 3 or more where an executor can fail by itself now and then: after a batch
    fails, each of its streams takes one more failure alone before it is cleared.

    Each executor holds at most its ``max_streams`` streams at once: a ``submit`` past that
    is refused by the generator (its cache is full), so submit at most that many and the
    next ones as streams finish.

    A finished stream stays in ``streams`` (its sink's truth) until ``forget`` releases it;
    ``clips`` forgets the streams it has handed out completely.
    """

    def __init__(
        self,
        executors: list[Executor],
        snapshot_every: int = 1,
        step_timeout: float | None = None,
        queue_clips: int = 4,
        replace: Callable[[Executor], Executor | None] | None = None,
        max_failures: int = 3,
    ) -> None:
        if not executors:
            raise ValueError("the orchestrator needs at least one executor")
        if len({id(e) for e in executors}) != len(executors):  # its slots counted twice
            raise ValueError("executors holds the same executor more than once")
        if replace is not None and not callable(replace):  # failed as "not replaced" later
            raise ValueError(f"replace must be callable or None, got {replace!r}")
        step_timeout = check_step_timeout("step_timeout", step_timeout)
        # 0 made every run fail as if no sink were drained; snapshot_every 0 or less was
        # taken as 1 without a word, 2.5 never snapshotted
        check_int("queue_clips", queue_clips, minimum=1)
        check_int("snapshot_every", snapshot_every, minimum=1)
        check_int("max_failures", max_failures, minimum=1)
        self.max_failures = max_failures
        self.executors: list[Executor | None] = list(executors)
        self.snapshot_every = snapshot_every
        self.step_timeout = step_timeout
        self.queue_clips = queue_clips
        self.replace = replace
        self.streams: dict[int, _Stream] = {}
        self.work: list[_Work] = []
        self._decode_ended: dict[int, float] = {}  # when each executor's last decode ended
        self.failures = 0
        self._failed_in_a_row: dict[int, int] = {}  # per executor, since a step came back
        self._failed_streams: dict[int, set[int]] = {}  # the streams blamed in those failures
        # Per executor, the streams blamed in those failures that made a clip on another
        # executor since: the executor failed, not they (a poison stream never does).
        self._proven: dict[int, set[int]] = {}
        self._keys = itertools.count()
        self._dropped: list[int] = []  # streams of iterators dropped before their first clip
        self._busy = 0  # depth of the loop's own work (see ``_busy_while``)
        # What every executor of this model reports alike (clip length, frame shape, sha256),
        # kept here so it stays known whichever executors are later lost.
        self.info: dict[str, Any] = dict(executors[0].info)
        for i, executor in enumerate(executors[1:], 1):
            differ = _differ(self.info, executor.info)
            if differ:  # a stream restored on it would change its frames mid-video
                raise ValueError(
                    f"executors 0 and {i} would make different frames: they differ in {differ}"
                )
        self.clip_len = self.info["clip_len"]

    # --- streams -------------------------------------------------------------------------

    @_busy_while
    def submit(
        self,
        request: GenerationRequest,
        sink: Sink | None = None,
        truth: StreamSnapshot | None = None,
    ) -> int:
        """Start a stream (or resume one from a saved ``truth``); returns its key. If it
        raises (a refused request, or a NoProgress about another stream given up on while
        this one was placed), the request was not submitted and holds no slot."""
        # Its own copies: a caller that reuses its request object (a new seed for the next
        # video) changed the clips restored after a failure.
        request = own_request(request)
        if sink is not None and not all(
            callable(getattr(sink, name, None)) for name in ("room", "put", "finish")
        ):  # every run failed, and the stream held its slot for good
            raise ValueError(
                f"sink must have room(), put(clip) and finish() (a Sink), got {type(sink).__name__}"
            )
        other = next(
            (s.key for s in self.streams.values() if s.sink is sink and not s.finished), None
        )
        if sink is not None and other is not None:  # two streams' clips mixed in one
            raise ValueError(
                f"sink is already the sink of stream {other}: each stream needs its own"
            )
        if truth is not None:
            if not isinstance(truth, StreamSnapshot):  # a path: an AttributeError below
                raise ValueError(
                    "truth must be a StreamSnapshot (load_snapshot(path) of a saved one), got "
                    f"{type(truth).__name__}"
                )
            # Its own pending list too: the clips this stream makes were appended to the
            # caller's snapshot, and the same resume point submitted again skipped them.
            truth = replace(truth, request=own_request(truth.request), pending=list(truth.pending))
            named = truth.request.model  # the same file under another name is the same model
            same = same_checkpoint(named, request.model)
            if not same or truth.request.fingerprint() not in request_fingerprints(
                request, named
            ):  # it would go on with another request's stream, labelled as this one
                theirs, ours = truth.request.to_json(), request.to_json()
                differ = [k for k in sorted({*theirs, *ours}) if theirs.get(k) != ours.get(k)]
                if same:  # the same weights under another name
                    differ = [k for k in differ if k != "model"]
                raise ValueError(
                    f"the truth is of another request than the one submitted: they differ in "
                    f"{', '.join(differ) or 'context frames'} (truth: seed {truth.request.seed}, "
                    f"label {truth.request.label}; submitted: seed {request.seed}, label "
                    f"{request.label})"
                )
        served = self.info.get("model")
        if served is not None and not same_checkpoint(request.model, served):
            # Another model's request would be made by these weights and labelled as its own.
            raise ValueError(
                f"the request is for model {request.model!r}; these executors serve {served!r}"
            )
        if request.frames % self.clip_len:
            raise ValueError(
                f"frames must be a multiple of clip_len={self.clip_len}, got {request.frames}"
            )
        if truth is not None:
            # A truth past the request's clips finished its sink with none; one without a
            # cache but past clip 0 was opened afresh, its first clips made again and dropped.
            check_truth_counts(truth, request.frames // self.clip_len, "truth")
        # Slots of dropped streams are freed, and streams waiting for one take theirs, first:
        # a slot freed by a finished stream would otherwise go to each new submit while a
        # stream moved off a failing executor waited for it.
        self._cancel_dropped()
        self._place_waiting()
        key = next(self._keys)
        truth = truth if truth is not None else StreamSnapshot.start(request)
        # The least loaded executor with a free slot (with unequal max_streams the least
        # loaded one may be full), else the least loaded one, which refuses it.
        placed = self._least_loaded(with_room=True)
        stream = _Stream(
            key=key,
            request=request,
            num_clips=request.frames // self.clip_len,
            sink=sink if sink is not None else QueueSink(self.queue_clips),  # an empty
            # sink may be falsy (a __len__ of clips so far), and was replaced unseen
            executor=self._least_loaded() if placed is None else placed,
            truths=[truth],
            accepted=truth.next_clip,
            delivered=truth.next_clip,
        )
        self.streams[key] = stream
        if stream.done:  # a complete truth: nothing to make, but its sink is finished
            try:
                self._deliver(stream)
            except BaseException:
                self.streams.pop(key, None)  # not submitted, as a refused request is not
                raise
        else:
            try:
                self._place(stream)
            except BaseException:
                # Refused (a request the generator rejects, a full cache), or placed and then
                # caught in another stream's NoProgress: the stream never existed, so nothing
                # later steps it or waits for it, and no worker keeps its slot.
                try:
                    self.cancel(key)
                except Exception:  # its executor is gone: nothing holds the slot
                    self.streams.pop(key, None)
                raise
        return key

    def forget(self, key: int) -> None:
        """Release a finished stream's state (its truth, a full cache snapshot): a long-lived
        orchestrator would otherwise keep one per stream it ever ran."""
        stream = self.streams.get(key)
        if stream is None:
            return
        if not stream.done:
            raise ValueError(
                f"stream {key} is not finished: {stream.delivered} of {stream.num_clips} "
                "clips delivered"
            )
        del self.streams[key]

    def _load(self) -> dict[int, int]:
        """Streams open on each live executor (made clips not yet all)."""
        load = {i: 0 for i, e in enumerate(self.executors) if e is not None}
        for s in self.streams.values():
            if s.accepted < s.num_clips and s.executor in load:
                load[s.executor] += 1
        return load

    def _least_loaded(
        self, with_room: bool = False, avoid: Any = None, tried: list[Any] | None = None
    ) -> int | None:
        """The live executor with the fewest open streams; with ``with_room``, only one that
        has a free slot (None if none has); never ``avoid`` while another is left. ``tried``
        (the executors a stream with failures failed on): one it has not failed on while
        there is one, and of those the one with the fewest failures in a row (a broken
        executor's only grow; a healthy one's are cleared by the next step that comes back,
        though one a poison stream killed and left keeps its count while idle, which is why
        an untried executor comes first, whatever its count). A moved stream (``avoid``)
        waits for an untried executor's slot while there is one."""
        load = self._load()
        if not load:
            raise NoExecutorsLeft("no executor is left to run streams on")
        others = {i: n for i, n in load.items() if self.executors[i] is not avoid}
        load = others or load

        def room(d: dict[int, int]) -> dict[int, int]:
            return {
                i: n for i, n in d.items() if n < self.executors[i].info.get("max_streams", 1 << 30)
            }

        if tried:
            untried = {
                i: n for i, n in load.items() if not any(self.executors[i] is e for e in tried)
            }
            # A moved stream waits for an untried executor's slot; one sent back (nothing
            # could run while it waited) takes any free slot, an untried one first.
            if untried and (avoid is not None or not with_room or room(untried)):
                load = untried
        if with_room:
            load = room(load)
            if not load:
                return None
        if tried:
            return min(load, key=lambda i: (self._failed_in_a_row.get(i, 0), load[i], i))
        return min(load, key=lambda i: (load[i], i))

    def _place(self, stream: _Stream) -> None:
        """Open (or restore from its truth) ``stream`` on its executor."""
        err = self._try_place(stream)
        if err is not None:
            # An open or restore queues behind the step in flight on that executor: a death
            # it shares with the calls running there is theirs (this one did no work yet).
            running = [] if _streams_lost(err) else self._running_on(stream.executor)
            if isinstance(err, TimeoutError):  # it waited for a hung step (a decode times out)
                running = [w for w in running if w.kind == "step"]
            self._fail_of(stream.executor, err, running, else_blamed=[stream.key])

    def _try_place(self, stream: _Stream) -> BaseException | None:
        """Place ``stream``; an executor failure is returned (the executor killed if it hung)."""
        executor = self.executors[stream.executor]
        truth = stream.truth_at(stream.accepted)
        # The call queues behind the step in flight on that executor (at most a step_timeout)
        # and then does about a step's work of its own, and one more per clip it replays or
        # context clip it encodes (a fixed limit timed out every open of a long context).
        timeout = None
        if self.step_timeout is not None:
            context = stream.request.context
            clips = 0 if context is None or truth.cache is not None else len(context)
            clips = -(-clips // self.clip_len) + len(truth.pending)
            timeout = (2 + clips) * self.step_timeout
        try:
            if truth.cache is None and not truth.pending:
                executor.open(stream.key, stream.request, timeout=timeout)
            else:
                executor.restore(stream.key, truth, timeout=timeout)
        except Exception as err:
            if not _is_failure(err):
                raise
            if isinstance(err, TimeoutError):  # hung: kill it, as a step past its timeout
                log.warning("open/restore on executor %s exceeded %ss", stream.executor, timeout)
                executor.kill()
            return err
        return None

    # --- the loop ----------------------------------------------------------------------------

    def run(self, until: Callable[[], bool] | None = None, poll: float = 0.05) -> None:
        """Loop until every stream is delivered (or ``until()`` is true)."""
        check_number("poll", poll, minimum=0)  # Ray refused -1 mid-loop
        while self._unfinished():
            if until is not None and until():
                return
            self._schedule()  # cancels the streams of dropped iterators first
            if not self.work:
                if self._unfinished():
                    raise RuntimeError(_DRAINED)
                break  # the last unfinished streams were a dropped iterator's
            self._execute_and_update(poll)
        # What it waits for came with the last clips: a stream given up on before is not its
        # concern (its owner hears of it when it drives the loop).
        if until is not None and until():
            return
        stuck = next((s for s in self.streams.values() if s.stuck and not s.done), None)
        if stuck is not None:
            while self.work:  # its clips already made are still delivered
                self._execute_and_update(poll)
            if not stuck.done:
                raise _no_progress(stuck, "was given up on before")

    def _unfinished(self) -> bool:
        return any((not s.done or not s.finished) and not s.stuck for s in self.streams.values())

    def clips(self, key: int) -> Iterator[Clip]:
        """The clips of stream ``key`` in order, driving the loop as needed; once all are
        handed out the stream is forgotten (``forget``). A bad ``key`` raises here, not at
        the first clip."""
        if key not in self.streams:
            raise KeyError(f"stream {key} is unknown (or finished and forgotten)")
        stream = self.streams[key]
        if not isinstance(stream.sink, QueueSink):
            raise ValueError(f"stream {key} writes to its own sink, not to an iterator")
        if stream.reader is not None:
            reader, finalizer = stream.reader[0](), stream.reader[1]
            if reader is not None and reader.gi_frame is not None:  # neither ended nor closed
                # Two would split the clips between them, and the first one dropped
                # cancelled the stream under the other.
                raise ValueError(
                    f"stream {key} is being read by another iterator: take its clips from that one"
                )
            finalizer.detach()  # one closed before it started, collected later: not a drop
        # A dropped iterator's cancel not yet done: this one takes the stream over (in place:
        # the finalizers of other streams' iterators append to this very list).
        self._dropped[:] = [k for k in self._dropped if k != key]
        clips = self._clips(key, stream)
        # An iterator dropped before its first clip never runs its GeneratorExit handler:
        # its stream is cancelled at the next submit or schedule (not inside whatever loop
        # the garbage collector interrupts). Detached once it starts: a started one cancels
        # on GeneratorExit, and one that ended with an error leaves its stream alone. Not at
        # interpreter exit: Ray may be shut down by then.
        finalizer = weakref.finalize(clips, self._dropped.append, key)
        finalizer.atexit = False
        stream.reader = (weakref.ref(clips), finalizer)
        return clips

    def _clips(self, key: int, stream: _Stream) -> Iterator[Clip]:
        stream.reader[1].detach()  # its own finalizer: a started iterator is no drop
        queue = stream.sink.queue
        try:
            while True:
                while queue:
                    yield queue.popleft()
                if self.streams.get(key) is not stream:  # cancel(key) while it was read
                    raise RuntimeError(f"stream {key} was cancelled")
                if stream.done:
                    self.forget(key)
                    return
                if stream.stuck:
                    raise _no_progress(stream, "was given up on before")
                self._schedule()
                if not self.work:
                    raise RuntimeError(_DRAINED)
                self._execute_and_update(0.05)
        except GeneratorExit:  # the caller stopped taking clips (a break, a dropped iterator)
            if self._busy:  # closed by the garbage collector inside the loop's own work,
                self._dropped.append(key)  # which goes over the streams: cancelled after
            else:
                self.cancel(key)
            raise

    def cancel(self, key: int) -> None:
        """Stop stream ``key`` now, finished or not: its executor closes it (freeing the
        slot), results still in flight for it are dropped when they arrive, its state goes."""
        stream = self.streams.pop(key, None)
        if stream is None or stream.executor == UNPLACED:
            return
        executor = self.executors[stream.executor]
        if executor is not None and stream.accepted < stream.num_clips:  # else already closed
            executor.close(key)

    def _cancel_dropped(self) -> None:
        while self._dropped:
            self.cancel(self._dropped.pop())

    @_busy_while
    def _schedule(self) -> None:
        self._cancel_dropped()
        for s in list(self.streams.values()):  # clips a sink raised on: it gets them again
            if s.delivered in s.frames or (s.done and not s.finished):  # and its finish()
                self._deliver(s)
        self._place_waiting()
        busy = {w.executor for w in self.work if w.kind == "step"}
        for index, executor in enumerate(self.executors):
            if executor is None or index in busy:
                continue
            ready = [s for s in self.streams.values() if s.executor == index and self._can_step(s)]
            if not ready:
                continue
            suspects = [s for s in ready if s.failures]
            if suspects and any(w.executor == index for w in self.work):
                # A suspect's step runs alone on its actor: a decode in flight beside a step
                # that kills the actor fails with it, and would be blamed for it.
                continue
            if suspects:
                # Streams of a failed batch go one at a time until each makes a clip: a
                # stream whose steps kill the actor then fails alone, and only it is given
                # up on (batched, every stream of the batch was counted alike).
                ready = [max(suspects, key=lambda s: (s.failures, -s.key))]
            keys = [s.key for s in ready]
            epochs = [s.epoch for s in ready]
            snaps = [s.key for s in ready if (s.accepted + 1) % self.snapshot_every == 0]
            handle = executor.step(keys, epochs, snaps)
            self.work.append(_Work("step", index, handle, keys, epochs, time.monotonic()))
        waiting = [s for s in self.streams.values() if s.executor == UNPLACED and s.avoid]
        if not self.work and any(not s.stuck for s in waiting):
            # Nothing runs while they wait for a slot elsewhere (held by streams waiting for
            # a reader that reads these first): back to the executor they failed on, where
            # max_failures more failures give them up.
            for s in waiting:
                s.avoid = None
            self._schedule()

    def _place_waiting(self) -> None:
        """Place the streams waiting for a slot (of a lost executor, or moved) where one is
        free."""
        for s in self.streams.values():
            if s.executor != UNPLACED or s.stuck:
                continue
            if s.accepted >= s.num_clips:  # all made: only its decodes remain, no slot
                s.executor = self._least_loaded(avoid=s.avoid, tried=s.failed_on)
                continue
            index = self._least_loaded(with_room=True, avoid=s.avoid, tried=s.failed_on)
            if index is None:
                continue
            s.executor = index
            self._place(s)

    def _can_step(self, s: _Stream) -> bool:
        if s.executor == UNPLACED:
            return False
        waiting = s.accepted - s.delivered  # made but not yet handed over
        return s.accepted < s.num_clips and waiting < self.queue_clips and s.sink.room() > waiting

    @_busy_while
    def _execute_and_update(self, poll: float) -> None:
        if not self.work:
            return
        # One wait over every executor's work that returns at the first result anywhere: a
        # step that finishes is answered with the next one at once (waiting on executors in
        # turn left each actor idle for up to a poll per other executor).
        groups: dict[type, list[_Work]] = {}
        for w in self.work:
            groups.setdefault(type(self.executors[w.executor]), []).append(w)
        ready: set[int] = set()
        for works in groups.values():  # once something is done, the others are only polled
            waiter = self.executors[works[0].executor]
            timeout = 0.0 if ready else poll / len(groups)
            ready |= set(map(id, waiter.wait([w.handle for w in works], timeout, first=True)))
        for work in [w for w in self.work if id(w.handle) in ready]:
            if not any(w is work for w in self.work):
                continue  # dropped by a failure handled earlier in this round
            self.work = [w for w in self.work if w is not work]
            self._update(work)
        self._check_timeouts()

    def _update(self, work: _Work) -> None:
        executor = self.executors[work.executor]
        if executor is None:
            return
        try:
            value = executor.result(work.handle)
        except Exception as err:
            if not _is_failure(err):
                # A bug, not a lost executor: the caller hears of it, and a decode taken off
                # the work list is submitted again (its clip would otherwise never come).
                if work.kind == "step":
                    self._unplace(work)
                self._redo_lost_decodes()
                raise
            # Lost decodes are redone: clips stay in to_decode.
            died = [work] if _streams_lost(err) else self._running_on(work.executor, work)
            self._fail_of(work.executor, err, died)
            return
        if work.kind == "step":
            self._apply_step(work, value)
        else:
            self._decode_ended[work.executor] = time.monotonic()  # the next one starts now
            self._apply_frames(work, value)

    def _unplace(self, work: _Work) -> None:
        """The streams of a step that raised (not an executor failure) are taken off its
        executor, to be placed again from their truths: the worker may have made their clips
        before the error (a snapshot or the result failing after the step). Left in place, it
        was a clip ahead of them, and every later step's clips were dropped as out of turn
        until the stream ended there and was lost."""
        executor = self.executors[work.executor]
        for key, epoch in zip(work.keys, work.epochs, strict=True):
            s = self.streams.get(key)
            if s is None or s.epoch != epoch or s.executor != work.executor:
                continue
            s.epoch += 1
            s.executor = UNPLACED
            if executor is not None:
                try:
                    executor.close(key)
                except Exception as err:  # it is placed anew elsewhere or after its restart
                    log.warning(
                        "executor %s could not close stream %s (%s)", work.executor, key, err
                    )

    def _running_on(self, index: int, failed: _Work | None = None) -> list[_Work]:
        """The calls that may have killed executor ``index``, which died (``failed``: a call
        of it seen failing): every call in flight on it failed with it, but only its step and
        the first of its decodes were running (decodes run one at a time, in order, beside the
        step); a call that came back before the death is not one of them. Blaming the call
        handled first alone blamed a decode beside a poison stream's first step, which went
        unblamed; blaming all of them blamed the decodes queued behind a poison decode."""
        executor = self.executors[index]
        others = [w for w in self.work if w.executor == index and w is not failed]
        done = set(map(id, executor.wait([w.handle for w in others], 0.0))) if others else set()

        def came_back(w: _Work) -> bool:
            if id(w.handle) not in done:
                return False
            try:
                executor.result(w.handle)
                return True
            except Exception:
                return False

        lost = [failed] if failed is not None else []
        lost = sorted([*lost, *(w for w in others if not came_back(w))], key=lambda w: w.order)
        decodes = [w for w in lost if w.kind == "decode"]
        return [w for w in lost if w.kind == "step"] + decodes[:1]

    def _apply_step(self, work: _Work, out: StepOut) -> None:
        self._failed_in_a_row[work.executor] = 0
        self._failed_streams[work.executor] = set()
        self._proven.pop(work.executor, None)
        accepted: list[ClipOut] = []
        proved: set[int] = set()
        for clip in out.clips:
            s = self.streams.get(clip.key)
            if s is None or clip.epoch != s.epoch or clip.clip != s.accepted:
                continue  # a superseded epoch: the stream was restored since
            for i, keys in self._failed_streams.items():
                if i != work.executor and s.key in keys:
                    self._proven.setdefault(i, set()).add(s.key)
                    proved.add(i)
            s.truth.add(_as_latents(clip))
            s.accepted += 1
            if not s.decode_failed:  # a clip whose decode killed an actor is not made yet
                _made_progress(s)
            s.to_decode[clip.clip] = clip
            accepted.append(clip)
            if clip.key in out.snapshots:  # the checkpoint, without the request it holds
                snap = out.snapshots[clip.key]
                s.truths.append(StreamSnapshot(s.request, snap.checkpoint_clip, snap.cache))
                self._forget_old_truths(s)
        if accepted:
            self._submit_decode(work.executor, accepted)
        for index in sorted(proved):  # its streams moved off it before it was found broken
            broken = self._broken(index)
            if broken:
                self._fail(index, ExecutorBroken(broken), [])

    def _submit_decode(self, index: int, clips: list[ClipOut]) -> None:
        executor = self.executors[index]
        handle = executor.decode(clips)
        self.work.append(
            _Work(
                "decode",
                index,
                handle,
                [c.key for c in clips],
                [c.epoch for c in clips],
                time.monotonic(),
                clips,
            )
        )

    def _apply_frames(self, work: _Work, frames: list[np.ndarray]) -> None:
        for clip, f in zip(work.clips, frames, strict=True):
            s = self.streams.get(clip.key)
            if s is None or clip.clip < s.delivered or clip.clip not in s.to_decode:
                continue  # delivered already (a re-decode after a failure)
            del s.to_decode[clip.clip]
            s.frames[clip.clip] = f
        for key in dict.fromkeys(c.key for c in work.clips):
            if key in self.streams:
                self._deliver(self.streams[key])

    def _deliver(self, s: _Stream) -> None:
        while s.delivered in s.frames:
            # Taken out only once the sink has it: a sink that raises keeps the clip here.
            clip = Clip(stream=s.key, clip=s.delivered, frames=s.frames[s.delivered])
            try:
                s.sink.put(clip)
            except Exception as err:  # named by stream: a caller can give up on it alone
                raise SinkError(s.key, err) from err
            del s.frames[s.delivered]
            s.delivered += 1
            _made_progress(s)
            self._forget_old_truths(s)
        if s.done and not s.finished:
            try:
                s.sink.finish()
            except Exception as err:  # called again by the next run, as a clip's put is
                raise SinkError(s.key, err) from err
            s.finished = True

    def _forget_old_truths(self, s: _Stream) -> None:
        """Keep the newest checkpoint at or before the last delivered clip, and later ones:
        enough to save a resume point for what the sink has, and to restore."""
        keep = 0
        for i, snap in enumerate(s.truths):
            if snap.checkpoint_clip <= s.delivered:
                keep = i
        del s.truths[:keep]

    # --- failures ---------------------------------------------------------------------------------

    def _check_timeouts(self) -> None:
        if self.step_timeout is None:
            return
        now = time.monotonic()
        overdue = [w for w in self.work if w.kind == "step" and now - w.started > self.step_timeout]
        # An executor decodes one call at a time, in order: only its oldest decode is running,
        # since it was submitted or since the one before it ended, and it gets 2 x step_timeout
        # (a hung decode with no step in flight otherwise stalled the loop for good).
        oldest: dict[int, _Work] = {}
        for w in self.work:
            if w.kind == "decode" and w.executor not in oldest:
                oldest[w.executor] = w
        for index, w in oldest.items():
            began = max(w.started, self._decode_ended.get(index, 0.0))
            if now - began > 2 * self.step_timeout:
                overdue.append(w)
        # Work that finished while the loop was busy elsewhere (a slow sink, a restore, a
        # replacement actor starting) is not late: its result is taken next round.
        late: dict[int, tuple[str, list[int]]] = {}
        for w in overdue:
            if not self.executors[w.executor].wait([w.handle], 0.0):
                late.setdefault(w.executor, (w.kind, []))[1].extend(w.keys)
                if w.kind == "decode":
                    self._mark_decode_failed(w.keys)
        for index, (kind, keys) in late.items():
            limit = self.step_timeout * (1 if kind == "step" else 2)
            log.warning("%s on executor %s exceeded %.1fs", kind, index, limit)
            executor = self.executors[index]
            if executor is not None:
                executor.kill()
            self._fail(index, TimeoutError(f"{kind} exceeded {limit}s"), keys)

    def _fail_of(
        self, index: int, err: BaseException, calls: list[_Work], else_blamed: Sequence[int] = ()
    ) -> None:
        """``_fail`` blaming the streams of ``calls`` (their decodes marked failed), or
        ``else_blamed`` when there are none."""
        for w in calls:
            if w.kind == "decode":
                self._mark_decode_failed(w.keys)
        blamed = list(dict.fromkeys(k for w in calls for k in w.keys))
        self._fail(index, err, blamed or list(else_blamed))

    def _fail(self, index: int, err: BaseException, blamed: list[int]) -> None:
        """Advance the epochs of the executor's streams, restore them, and redo the decodes that
        were in flight on it (whichever streams they belong to). ``blamed``: the streams whose
        work failed (a batch's, a decode's clips', the calls running on an executor that died:
        ``_running_on``; for an open or restore, those on its executor, else it); only their
        counts of failures in a row go up. A failure while re-placing is handled in the same loop
        (no recursion). A blamed stream at ``max_failures`` (since it was moved, if it was) is
        moved to another executor (all its failures on this one, another left) or not placed
        again; an executor that looks broken (``_broken``) is retired, whether it recovers or
        not, and no stream keeps a failure on it (none is given up on for them). The others are
        restored and the lost decodes redone before NoProgress names a stream given up on, so the
        state stays whole either way."""
        failure: BaseException | None = err
        stuck: list[_Stream] = []
        while failure is not None:
            last = failure
            self.failures += 1
            executor = self.executors[index]
            self._failed_in_a_row[index] = self._failed_in_a_row.get(index, 0) + 1
            self._failed_streams.setdefault(index, set()).update(blamed)
            log.warning("executor %s failed (%s); restoring its streams", index, failure)
            hit = [s for s in self.streams.values() if s.executor == index and not s.done]
            broken = self._broken(index)
            # Blamed wherever they are: a stream waiting for a slot (or placed elsewhere since)
            # whose decode ran here is blamed too.
            for s in [s for s in self.streams.values() if s.key in blamed and not s.done]:
                _count_failure(s, executor)
                if broken:  # not the streams' failures: forgiven below, none given up on
                    continue
                if s.failures - s.moved_at >= self.max_failures and not s.stuck:
                    if not s.moved_at and self._elsewhere(s):
                        # this executor may be the bad one: another, with a new count
                        _move_off(s, executor)
                    else:
                        s.stuck = True
                        stuck.append(s)
                        self._park(s, index)
            self.work = [w for w in self.work if w.executor != index]
            if broken:  # retired below, recovered or not: its failures were not the streams'
                for s in self.streams.values():
                    _forgive(s, executor)
            try:
                executor.recover()
                differ = _differ(self.info, executor.info)
                if differ:  # restarted on other weights (a file replaced in place) or settings
                    raise ExecutorChanged(f"it came back different, in {differ}")
                if broken:
                    raise ExecutorBroken(broken)
            except Exception as recover_err:
                log.warning("executor %s did not come back (%s)", index, recover_err)
                # Retired for good (changed or broken, or did not come back), before a new one
                # is asked for: one still loading after the timeout, or alive but
                # unreachable, kept its GPU (the new one's, maybe).
                try:
                    _retire(executor)
                except Exception as retire_err:
                    log.warning("executor %s could not be retired (%s)", index, retire_err)
                replacement = None
                if self.replace is not None:
                    try:
                        replacement = self.replace(executor)
                        if replacement is not None and not isinstance(
                            getattr(replacement, "info", None), dict
                        ):  # a worker, not its executor: failed half-way through this loop
                            raise TypeError(
                                f"replace returned {type(replacement).__name__}, not an "
                                "executor (with .info) or None"
                            )
                        if any(replacement is e for e in self.executors):
                            # One executor in two places: its slots counted twice, and the
                            # run ended on its full cache (or the retired one came back).
                            raise ValueError(
                                "replace returned an executor already in use (or the one "
                                "that failed), not a new one"
                            )
                    except Exception as replace_err:  # e.g. no GPU free for a new actor
                        log.warning("executor %s could not be replaced (%s)", index, replace_err)
                        replacement = None
                differ = None if replacement is None else _differ(self.info, replacement.info)
                if differ:
                    log.warning(
                        "executor %s's replacement is not used: it differs in %s", index, differ
                    )
                    _retire(replacement)
                    replacement = None
                self.executors[index] = replacement
                self._failed_in_a_row[index] = 0
                self._failed_streams[index] = set()
                self._proven.pop(index, None)
            gone, retry = self.executors[index] is None, None
            for s in hit:
                s.epoch += 1
                if gone or s.stuck or s.avoid is not None:
                    # `_schedule` places it where a slot is free (a stream with every clip
                    # made was closed by the worker: it needs no slot, only its decodes
                    # redone; a moved one not on the executor it failed on); a stuck one
                    # waits there until a `run` after NoProgress. An executor that came back
                    # may hold it (an open or restore that reached it restarted, before its
                    # death was handled here): closed, or its slot stayed taken for good.
                    if not gone:
                        self.executors[index].close(s.key)
                    s.executor = UNPLACED
                elif s.accepted < s.num_clips:  # clips left to make: open it again from its truth
                    retry = self._try_place(s)
                    if retry is not None:
                        blamed = [s.key]
                        break  # failed again: the next turn of the loop handles it
            if all(e is None for e in self.executors):
                raise NoExecutorsLeft(f"no executor is left to run streams on (last: {failure})")
            failure = retry
        self._redo_lost_decodes()
        if stuck:
            raise _no_progress(stuck[0], f"(last: {last})", self.step_timeout) from last

    def _broken(self, index: int) -> str:
        """Why executor ``index`` should be retired ('' if it should not): two or more streams
        blamed in its failures in a row (no step came back on it since) have made a clip on
        another executor since (poison streams never do), and another executor is left to
        run its streams."""
        proven = self._proven.get(index, set())
        others = any(e is not None for i, e in enumerate(self.executors) if i != index)
        if len(proven) < 2 or not others:
            return ""
        in_a_row = self._failed_in_a_row.get(index, 0)
        return (
            f"it failed {in_a_row} times in a row; {len(proven)} streams it failed go on elsewhere"
        )

    def _park(self, s: _Stream, index: int) -> None:
        """A stream given up on while placed on another executor than the failed one
        ``index`` (its decode failed there) leaves that executor: closed, never stepped."""
        if s.executor in (UNPLACED, index):
            return
        holder = self.executors[s.executor]
        if holder is not None and s.accepted < s.num_clips:
            holder.close(s.key)  # after any step in flight there, whose result is dropped
        s.epoch += 1
        s.executor = UNPLACED

    def _elsewhere(self, s: _Stream) -> bool:
        """Whether a live executor is left that ``s`` has not failed on."""
        return any(e is not None and not any(e is f for f in s.failed_on) for e in self.executors)

    def _mark_decode_failed(self, keys: list[int]) -> None:
        for key in keys:
            if key in self.streams:
                self.streams[key].decode_failed = True

    def _redo_lost_decodes(self) -> None:
        """Redo every accepted clip whose decode is no longer in flight: those lost with a
        failed executor (including the failed call itself), of whichever stream, wherever it
        is. A stream with failures to its name has its clips decoded alone (a decode batches
        the clips of a step, so a clip that kills the decoder is found, not its batch-mates),
        and one given up on after a failed decode has them left undone (they would kill
        executor after executor; its truth keeps them)."""
        in_flight = {(c.key, c.clip) for w in self.work for c in w.clips}
        redo: dict[int, dict[int, list[ClipOut]]] = {}
        for s in self.streams.values():
            if s.stuck and s.decode_failed:
                continue
            for clip in s.to_decode.values():
                if (clip.key, clip.clip) in in_flight:
                    continue
                live = s.executor != UNPLACED and self.executors[s.executor] is not None
                target = (
                    s.executor if live else self._least_loaded(avoid=s.avoid, tried=s.failed_on)
                )
                redo.setdefault(target, {}).setdefault(s.key, []).append(clip)
        for target, by_stream in redo.items():
            calm = [
                c for k, clips in by_stream.items() if not self.streams[k].failures for c in clips
            ]
            if calm:
                self._submit_decode(target, sorted(calm, key=lambda c: (c.key, c.clip)))
            for key, clips in sorted(by_stream.items()):
                if self.streams[key].failures:
                    self._submit_decode(target, sorted(clips, key=lambda c: c.clip))


def _no_progress(s: _Stream, detail: str, step_timeout: float | None = None) -> NoProgress:
    limit = "" if step_timeout is None else f" or always exceeds step_timeout={step_timeout} s"
    on = "1 executor" if len(s.failed_on) == 1 else f"{len(s.failed_on)} executors"
    # Its steps may all have come back: a decode of its clips that fails was blamed too.
    what = "a step or a decode of its clips" if s.decode_failed else "a step"
    return NoProgress(
        f"stream {s.key} went through {s.failures} executor failures in a row (on {on}) "
        f"without a clip made on it {detail}; {what} that always fails{limit} is not "
        "retried further",
        s.key,
    )


def _made_progress(s: _Stream) -> None:
    if s.stuck:  # a stream given up on keeps what NoProgress says of it
        return
    s.failures, s.avoid, s.moved_at, s.decode_failed = 0, None, 0, False
    s.failed_on.clear()
    s.failed_times.clear()
    s.failed_before_move.clear()


def _count_failure(s: _Stream, executor: Any) -> None:
    """One more failure of ``s``'s work, on ``executor``."""
    s.failures += 1
    if not any(e is executor for e in s.failed_on):
        s.failed_on.append(executor)  # referenced: its id stays its own
    s.failed_times[id(executor)] = s.failed_times.get(id(executor), 0) + 1


def _move_off(s: _Stream, executor: Any) -> None:
    """``s`` goes to another executor than ``executor``, with ``max_failures`` more tries."""
    s.avoid, s.moved_at = executor, s.failures
    s.failed_before_move = dict(s.failed_times)


def _forgive(s: _Stream, executor: Any) -> None:
    """Take back the failures ``s`` went through on ``executor``, found broken (they were
    its faults), and only those: a poison stream keeps the deaths it caused elsewhere, so
    retiring a broken actor does not give it a fresh count. A move keeps counting the failures
    since it (those on the broken executor from before it come off both counts); a move made
    for failures on the broken executor alone is undone (another may be made)."""
    if s.stuck or not any(e is executor for e in s.failed_on):
        return
    s.failures -= s.failed_times.pop(id(executor), 0)
    s.failed_on = [e for e in s.failed_on if e is not executor]
    if s.moved_at:
        s.moved_at -= s.failed_before_move.pop(id(executor), 0)
        if s.avoid is executor:  # retired: nothing left to avoid
            s.avoid = None
        if not s.moved_at:  # every failure before the move was on it
            s.avoid = None
            s.failed_before_move.clear()
    if s.failures <= 0:
        _made_progress(s)


def _as_latents(clip: ClipOut):
    from vidgen.generators import ClipLatents

    return ClipLatents(stream=clip.key, clip=clip.clip, data=clip.data, context=clip.context)


def _is_failure(err: BaseException) -> bool:
    """Errors that mean the executor is gone (not a bug in the request or the code): besides
    a dead actor or a timeout, Ray's memory monitor killing it (``OutOfMemoryError``, not an
    actor error) and a result lost with its node (``ObjectLostError``: a step counts as done
    while its result is still in that node's object store) or the node itself."""
    try:
        from ray.exceptions import (
            GetTimeoutError,
            NodeDiedError,
            ObjectLostError,
            OutOfMemoryError,
            RayActorError,
        )

        gone = RayActorError | GetTimeoutError | OutOfMemoryError | ObjectLostError | NodeDiedError
        if isinstance(err, gone):
            return True
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    return _streams_lost(err) or isinstance(err, ExecutorFailed | TimeoutError)


def _streams_lost(err: BaseException) -> bool:
    """A step on an executor that lost its streams (restarted): it is alive, only that step
    failed. A remote StreamsLost arrives as a RayTaskError that is also a StreamsLost (or,
    where Ray cannot make that class, carries it as its cause)."""
    return isinstance(err, StreamsLost) or isinstance(getattr(err, "cause", None), StreamsLost)
