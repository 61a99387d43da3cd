"""Rendering one video to an mp4 through the orchestrator, in resumable segments.

Clips are written to segment files of ``segment_clips`` clips each, in a hidden folder beside
the output (``.<out name>.parts/``), each named by its first clip (``part_<clip>.mp4``, so a
re-run with another ``segment_clips`` still joins them in order); every segment is flushed
atomically and the stream's truth is saved right after it. The folder is made only once the
orchestrator has accepted the request, so a request it refuses leaves nothing behind.
Interrupted and re-run with the same ``out`` and request, a render restores the stream from
its saved truth and continues after the last whole segment (generation is deterministic, so a
segment that was written but whose truth was not saved is simply made again, identically).
At the end the segments are joined without re-encoding, the provenance goes into the mp4
metadata and a sidecar ``<out>.json``, and the folder is removed.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import vidgen
from vidgen.checkpoint import CheckpointError
from vidgen.fsutil import expand_user, publish, target, temp_beside, temp_stem
from vidgen.generators import Clip, GenerationRequest
from vidgen.generators.base import load_snapshot, request_fingerprints, save_snapshot
from vidgen.io import VideoWriter, concat_videos, probe_video
from vidgen.render_config import check_out, parts_folder
from vidgen.validate import check_int
from workers.orchestrator import NoProgress, Orchestrator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RenderResult:
    path: Path
    frames: int
    seconds: float
    resumed_frames: int
    provenance: dict[str, Any]

    @property
    def frames_per_second(self) -> float:
        return (self.frames - self.resumed_frames) / max(self.seconds, 1e-9)


class IncompleteRender(RuntimeError):
    """A render's stream is done but its segments do not hold every clip (a write failed):
    nothing is published; its parts folder stays for a re-run to resume from."""


class SegmentSink:
    """Writes a stream's clips to numbered segment files; calls ``on_flush(clips)`` after
    each segment is safely on disk."""

    def __init__(
        self,
        folder: Path,
        fps: int,
        segment_clips: int,
        first_clip: int,
        on_flush: Callable[[int], None],
        lossless: bool = False,
        on_clip: Callable[[Clip], None] | None = None,
    ) -> None:
        self.folder, self.fps, self.segment_clips = folder, fps, segment_clips
        self.on_flush, self.on_clip, self.lossless = on_flush, on_clip, lossless
        self.clips = first_clip
        self.writer: VideoWriter | None = None
        self.in_segment = 0
        self.failed: BaseException | None = None

    def room(self) -> int:
        return 1 << 30  # writes synchronously; the orchestrator's queue bound applies

    def put(self, clip: Clip) -> None:
        if clip.clip != self.clips:
            raise RuntimeError(f"expected clip {self.clips}, got clip {clip.clip}")
        if self.failed is not None:
            # A write failed part way: the open segment holds part of a clip; taking the
            # clip again would write it twice. The render resumes from its last truth.
            raise RuntimeError(f"a segment write failed before: {self.failed}")
        if self.writer is None:
            path = self.folder / segment_name(self.clips)
            self.writer = VideoWriter(path, fps=self.fps, lossless=self.lossless)
        try:
            self.writer.write(clip.frames)
        except BaseException as err:
            self.failed = err
            self.writer.abort()
            self.writer = None
            raise
        if self.on_clip is not None:
            self.on_clip(clip)
        self.clips += 1
        self.in_segment += 1
        if self.in_segment == self.segment_clips:
            self._flush()

    def finish(self) -> None:
        if self.writer is not None:
            self._flush()

    def abort(self) -> None:
        """Discard the segment being written (its temp file, now, not when the collector
        frees the writer) and take no more clips: the render resumes from its last truth."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
            self.failed = self.failed or RuntimeError("the render was abandoned")

    def _flush(self) -> None:
        try:
            self.writer.close()
        except BaseException as err:  # the segment never reached its name: its clips are
            self.failed = err  # not on disk, and the render must not count them
            self.writer.abort()
            self.writer = None
            raise
        self.writer, self.in_segment = None, 0
        try:
            self.on_flush(self.clips)
        except BaseException as err:  # the segment is out but its truth is not: a clip
            self.failed = err  # given again would go into the next segment twice
            raise


TRUTH_FILE = "truth.safetensors"  # a render's resume point, in its parts folder


def segment_name(first_clip: int) -> str:
    return f"part_{first_clip:09d}.mp4"


def segments(folder: Path) -> list[Path]:
    """The segment files of a parts folder, in clip order."""
    return sorted(folder.glob("part_*.mp4"))


def _guards(
    request: GenerationRequest,
    model_sha256: str | None,
    lossless: bool,
    tokenizer_sha256: str | None = None,
    dtype: str = "float32",
) -> dict[str, str]:
    """What a parts folder is made with (file name -> content): a resume must match each."""
    guards = {
        # Without the model's name where its weights' sha256 is known (a guard of its own): a
        # resume may name it another way, or from another folder (a project moved).
        "request.sha256": request.fingerprint(model="" if model_sha256 else None),
        "lossless": str(bool(lossless)).lower(),
        "dtype": dtype,
    }
    if model_sha256:
        guards["model.sha256"] = model_sha256
    if tokenizer_sha256:
        guards["tokenizer.sha256"] = tokenizer_sha256
    return guards


def _fingerprints(request: GenerationRequest, weighed: bool, *aliases: Any) -> set[str]:
    """``request_fingerprints`` with ``aliases`` of its model where the weights are checked
    by their sha256 (``weighed``), else of the request as named only."""
    return request_fingerprints(request, *aliases) if weighed else request_fingerprints(request)


def _saved_model(truth_path: Path) -> str | None:
    """The model as the saved truth's request names it (None where it cannot be read)."""
    try:
        return load_snapshot(truth_path).request.model
    except (CheckpointError, OSError, ValueError):
        return None


def _resume_point(
    folder: Path, request: GenerationRequest, guards: dict[str, str], clip_len: int
) -> tuple[Any, int]:
    """(saved truth or None, clips already on disk); drops segments past the saved truth.
    Reads (and prunes) an existing folder only: nothing is created here. A folder with a
    truth made for another request, with other weights under the same model name or path,
    or with the other ``lossless`` setting (segments of two codecs do not join) is refused;
    a guard file an older folder lacks is not checked. One without a truth holds nothing to
    resume: its segments (made after the last truth) are dropped, whatever its guards say."""
    if not folder.exists():
        return None, 0
    if any(folder.glob("seg_*.mp4")):
        raise ValueError(
            f"{folder} holds segments of an older vidgen (seg_*.mp4); delete it to render anew"
        )
    truth_path = folder / TRUTH_FILE
    if not truth_path.exists():
        # Nothing to resume (stopped before its first segment's truth was saved): its guards
        # are written anew, and a segment saved without its truth is made again. Refusing
        # it kept the corrected command (another label, say) from running.
        for seg in segments(folder):
            seg.unlink()
        return None, 0
    found = {n: (folder / n).read_text().strip() for n in guards if (folder / n).exists()}
    if "request.sha256" in found:  # folders from before the dtype guard were float32 ones
        found.setdefault("dtype", "float32")
    changed = {n for n, value in found.items() if value != guards[n]}
    if "model.sha256" in changed:  # first: a link to a retrained file is no other request
        raise ValueError(
            f"{folder} holds a render made with other weights of {request.model!r} (sha256 "
            f"{found['model.sha256'][:16]}, now {guards['model.sha256'][:16]}); delete it or "
            "choose another out"
        )
    # Folders started before fingerprints were canonical hold the request's number forms,
    # and before 2026-12-02 the model as that render named it (the truth's request says how).
    # The same weights, whatever their name: where the folder's own guard says so (one made
    # before the weights were guarded must name the model as this render does).
    weighed = "model.sha256" in found
    if "request.sha256" in changed and found["request.sha256"] not in _fingerprints(
        request, weighed, "", _saved_model(truth_path)
    ):
        raise ValueError(
            f"{folder} holds a render of a different request; delete it or choose another out"
        )
    if "tokenizer.sha256" in changed:
        raise ValueError(
            f"{folder} holds a render made with another tokenizer of {request.model!r} (a "
            "tokenizer file it names was changed since, e.g. a decoder fine-tuned in place); "
            "delete it or choose another out"
        )
    if "dtype" in changed:
        raise ValueError(
            f"{folder} holds a render made in {found['dtype']}, this one runs in "
            f"{guards['dtype']}: resume with dtype={found['dtype']} (a video's frames would "
            "change numerics midway), or delete it"
        )
    if "lossless" in changed:
        raise ValueError(
            f"{folder} holds segments written with lossless={found['lossless']}: resume with "
            "the same setting (segments of two codecs do not join), or delete it"
        )
    truth = load_snapshot(truth_path)
    done = truth.next_clip
    # Checked before any segment is removed below: the guard names the request, but the
    # truth is what a resume continues from (its request, seeds included).
    if truth.request.fingerprint() not in _fingerprints(request, weighed, truth.request.model):
        raise ValueError(
            f"{truth_path} is the truth of a different request than its folder's "
            f"(seed {truth.request.seed}, label {truth.request.label}); delete {folder} "
            "to render anew"
        )
    if done > request.frames // clip_len:
        raise ValueError(
            f"{truth_path} holds clips up to {done}, past the request's "
            f"{request.frames // clip_len}; delete {folder} to render anew"
        )
    # Named as this render names it: the generators refuse a model of another name.
    truth = replace(truth, request=replace(truth.request, model=request.model))
    # Segments are renamed into place whole, and the truth is saved after each one, so every
    # segment that starts before `done` is complete; a later one was made after the saved
    # truth and is dropped (it will be made again, identically).
    for seg in segments(folder):
        if int(seg.stem.split("_")[1]) >= done:
            seg.unlink()
    _check_contiguous(folder, clip_len, done)
    return truth, done


def _check_contiguous(folder: Path, clip_len: int, clips: int) -> None:
    """The segments must hold clips 0 .. ``clips`` - 1, each once, in order: a folder left
    part-removed by a kill, or written by two renders at once, could hold a truth with a
    segment missing before it, and joining around the gap would publish a short video."""
    expected = 0
    for seg in segments(folder):
        first = int(seg.stem.split("_")[1])
        if first != expected:
            raise ValueError(
                f"{folder} is missing clips {expected}..{first - 1} (a segment removed, or "
                "two renders of this out at once): delete it to render anew"
            )
        expected += probe_video(seg).num_frames // clip_len
    if expected != clips:
        raise ValueError(
            f"{folder} holds clips 0..{expected - 1}, not the {clips} its truth says: delete "
            "it to render anew"
        )


def _busy(out: Path) -> ValueError:
    return ValueError(
        f"out={str(out)!r} is being rendered by another process right now (it holds "
        f"{lock_file(out).name}); wait for it or choose another out"
    )


def _lock(out: Path) -> int | None:
    """An exclusive lock on ``.<out name>.lock`` beside ``out`` for one render's lifetime:
    two renders of one out at once would write each other's segments. None where there is
    no ``fcntl`` (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux or macOS
        return None
    path = lock_file(out)
    tries = 3  # ``check_not_rendering`` holds it for an instant: not a render
    while True:
        created = not path.exists()
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
        try:
            _flock(fcntl, fd, out)
        except ValueError:  # no locks on this file system
            os.close(fd)
            if created:
                path.unlink(missing_ok=True)
            raise
        except OSError:
            os.close(fd)
            tries -= 1
            if tries:
                time.sleep(0.05)
                continue
            raise _busy(out) from None
        # Its holder removes the file before it lets go: a lock won on a file no longer
        # at ``path`` locks nothing anyone else sees, so take the one there now.
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def check_not_rendering(out: str | Path) -> None:
    """Raise the ValueError of ``_lock`` if another process is rendering ``out`` (or the
    target of a symlinked ``out``) right now: a command can say so before it starts Ray and
    its actors, instead of after. Takes no lock (``RenderJob.start`` does) and creates no
    file."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux or macOS
        return
    out = expand_user(out)  # as the render will lock it (``check_out``)
    for path in dict.fromkeys((out, target(out))):
        try:
            fd = os.open(lock_file(path), os.O_RDWR)
        except OSError:  # no lock file: no render holds it
            continue
        try:
            _flock(fcntl, fd, path)
        except OSError:
            raise _busy(path) from None
        finally:
            os.close(fd)  # closing lets go of a lock won here


def _flock(fcntl: Any, fd: int, out: Path) -> None:
    """Lock ``fd`` (non-blocking): OSError when another process holds it; ValueError when
    the file system does not lock files (ENOLCK, EOPNOTSUPP: Lustre, some NFS mounts), which
    was taken for another render holding it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise ValueError(
            f"out={str(out)!r}: its folder's file system does not lock files ({err}): render "
            "into a local folder, or one mounted with locks"
        ) from err


def _remove_stale_temps(out: Path, folder: Path) -> None:
    """Temporary files a killed render left: every hidden file in its parts folder (segments
    and truths being written; safetensors' own temp files, from before checkpoints were
    written into our own), and the joined video's and
    sidecar's beside ``out`` (``.<temp stem>.<8 hex>.tmp[.mp4]``: a long stem's temp stem
    ends in a hash of it, so they are never another out's)."""
    if not folder.is_dir():
        # The joined video and sidecar are written while the parts folder still exists: no
        # folder, no leftovers of them (and no scan of a batch's ever larger output folder).
        return
    for path in folder.iterdir():
        if path.name.startswith(".") and path.is_file():
            path.unlink(missing_ok=True)
    # The sidecar's beside out; the video's beside out, or beside its target when out is a
    # symlink (``temp_beside`` writes where ``publish`` will rename to).
    for beside in dict.fromkeys((out, target(out))):
        stem = temp_stem(beside)  # a long name's carries a hash of it: never another out's
        # The joined video's temp name ends in out's own suffix, which may be ".MP4".
        pattern = re.compile(rf"\.{re.escape(stem)}\.[0-9a-f]{{8}}\.tmp(\.mp4)?", re.IGNORECASE)
        for path in beside.parent.glob(f".{glob.escape(stem)}.*.tmp*"):
            if pattern.fullmatch(path.name) and path.is_file():
                path.unlink(missing_ok=True)


def lock_file(out: Path) -> Path:
    return parts_folder(out).with_suffix(".lock")


class RenderJob:
    """One request rendered to one mp4 through a (shared) orchestrator: ``start`` submits
    the stream (resuming from the parts folder if there is one), ``finish`` joins the
    segments once the stream is done."""

    def __init__(
        self,
        request: GenerationRequest,
        out: str | Path,
        segment_clips: int = 8,
        lossless: bool = False,
        progress: bool = True,
        extra_provenance: dict[str, Any] | None = None,
    ) -> None:
        self.out = check_out(out)
        check_int("segment_clips", segment_clips, minimum=1)  # 1.5 never ended a segment
        if not isinstance(request, GenerationRequest):  # failed later as an AttributeError
            raise ValueError(f"request must be a GenerationRequest, got {type(request).__name__}")
        if not isinstance(lossless, bool | np.bool_):  # "false" guarded its folder as true
            raise ValueError(f"lossless must be True or False, got {lossless!r}")
        # A plain bool: numpy's went into the provenance, which json could not write after
        # every clip was made.
        lossless = bool(lossless)
        if extra_provenance is not None:  # checked now, not at the join after the render
            try:
                if not isinstance(extra_provenance, dict) or not all(
                    isinstance(k, str) for k in extra_provenance
                ):
                    raise TypeError("not a dict with str keys")
                json.dumps(extra_provenance, allow_nan=False)
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"extra_provenance must be a dict with str keys that JSON can write, got "
                    f"{extra_provenance!r} ({err})"
                ) from None
        self.request, self.segment_clips, self.lossless = request, segment_clips, lossless
        self.progress, self.extra = progress, extra_provenance
        self.folder = parts_folder(self.out)
        self.key: int | None = None
        self.done_before = 0
        self.result: RenderResult | None = None  # once finished

    def start(self, orchestrator: Orchestrator) -> int:
        self.orchestrator = orchestrator
        # A symlinked out writes (and cleans temp files) beside its target: a render of the
        # target itself, or of another link to it, must not run at the same time.
        self._locks: list[tuple[Path, int | None]] = []
        try:
            for path in dict.fromkeys((self.out, target(self.out))):
                self._locks.append((path, _lock(path)))
            return self._start(orchestrator)
        except BaseException:
            self._unlock()
            raise

    def _unlock(self) -> None:
        for path, fd in reversed(getattr(self, "_locks", [])):
            if fd is not None:
                lock_file(path).unlink(missing_ok=True)  # while held: no one else uses it
                os.close(fd)
        self._locks = []

    def _start(self, orchestrator: Orchestrator) -> int:
        self.result = None
        _remove_stale_temps(self.out, self.folder)  # under the lock: no one else writes them
        info = orchestrator.info
        guards = _guards(
            self.request,
            info.get("sha256"),
            self.lossless,
            info.get("tokenizer_sha256"),
            info.get("dtype", "float32"),
        )
        truth, self.done_before = _resume_point(
            self.folder, self.request, guards, orchestrator.clip_len
        )
        if self.done_before:
            log.info("resuming %s after %d clips already on disk", self.out, self.done_before)
        clip_len = orchestrator.clip_len
        self.bar = tqdm(
            total=self.request.frames,
            initial=self.done_before * clip_len,
            unit="frame",
            # None: off where stderr is no terminal (a log, a pipe), as every other bar.
            disable=None if self.progress else True,
            desc=self.out.name,
        )
        sink = SegmentSink(
            self.folder,
            self.request.fps,
            self.segment_clips,
            self.done_before,
            self._save_truth,
            self.lossless,
            on_clip=lambda clip: self.bar.update(len(clip.frames)),
        )
        self.started = time.perf_counter()
        self.sink = sink
        try:
            self.key = orchestrator.submit(self.request, sink=sink, truth=truth)
            self.folder.mkdir(parents=True, exist_ok=True)
            for name, value in guards.items():
                path = self.folder / name
                if not path.exists() or path.read_text().strip() != value:
                    _write_text(path, value)  # atomic: a kill must not leave an empty guard
        except BaseException:
            self.bar.close()
            if self.key is not None:  # submitted: it would go on writing into the folder,
                orchestrator.cancel(self.key)  # unlocked and without all its guards
                self.key = None
            raise
        return self.key

    def _save_truth(self, clips: int) -> None:
        truth = self.orchestrator.streams[self.key].truth_at(clips)
        save_snapshot(self.folder / TRUTH_FILE, truth)

    def abandon(self) -> None:
        """Give up on this render (its stream cannot go on, or the caller stopped): its
        stream is cancelled (left in a shared orchestrator, it would go on writing into
        this folder) and the parts folder stays for a re-run to resume from."""
        self.bar.close()
        if self.key is not None:
            self.orchestrator.cancel(self.key)
        sink = getattr(self, "sink", None)
        if sink is not None:
            sink.abort()  # under the lock: the temp segment is this render's
        self._unlock()

    @property
    def done(self) -> bool:
        if self.key is None:
            return False
        stream = self.orchestrator.streams.get(self.key)
        return stream is None or stream.done  # None: finished and forgotten

    def finish(self) -> RenderResult:
        """Join the segments into ``out`` (the stream must be done); called again, the same
        result (its parts folder is gone by then)."""
        if self.result is not None:
            return self.result
        seconds = time.perf_counter() - self.started
        self.bar.close()
        extra = {"lossless": self.lossless, **(self.extra or {})}
        provenance = _provenance(self.orchestrator, self.request, extra)
        # Contiguity was checked when the folder was resumed; since then this render (holding
        # the lock) appended segments in clip order, which its sink enforces. A sink whose
        # last write failed holds fewer: never publish a short video.
        clips = self.request.frames // self.orchestrator.clip_len
        sink = self.sink
        if sink.failed is not None or sink.writer is not None or sink.clips != clips:
            raise IncompleteRender(
                f"{self.out}: its segments do not hold all {clips} clips (a write failed: "
                f"{sink.failed}); the parts folder stays, run again to resume"
            )
        sidecar = self.out.with_suffix(".json")
        try:  # the join writes a second copy of the video: where a full disk is likeliest
            # An earlier render's sidecar goes first: a stop between the join and the write
            # below left the new video beside it (its provenance is in its own comment tag,
            # and the truth stays until the sidecar is written: a re-run joins again).
            sidecar.unlink(missing_ok=True)
            concat_videos(
                segments(self.folder),
                self.out,
                metadata={"comment": json.dumps(provenance, sort_keys=True)},
            )
            _write_json(sidecar, provenance)
        except OSError as err:
            raise IncompleteRender(
                f"{self.out}: joining its segments failed ({err}); the parts folder stays, "
                "run again to resume"
            ) from err
        # The truth goes first: a kill part way through the removal must not leave a truth
        # whose segments are gone (a re-run would join what is left over the whole video).
        (self.folder / TRUTH_FILE).unlink(missing_ok=True)
        shutil.rmtree(self.folder)
        self.orchestrator.forget(self.key)
        self._unlock()
        self.result = RenderResult(
            self.out,
            self.request.frames,
            seconds,
            self.done_before * self.orchestrator.clip_len,
            provenance,
        )
        return self.result


def render(
    orchestrator: Orchestrator,
    request: GenerationRequest,
    out: str | Path,
    segment_clips: int = 8,
    lossless: bool = False,
    progress: bool = True,
    extra_provenance: dict[str, Any] | None = None,
) -> RenderResult:
    """Render ``request`` to ``out`` (resuming a render interrupted at the same ``out``)."""
    job = RenderJob(request, out, segment_clips, lossless, progress, extra_provenance)
    job.start(orchestrator)
    try:
        given_up: set[int] = set()
        while True:  # other streams of the orchestrator may wait
            try:
                orchestrator.run(until=lambda: job.done)
                break
            except NoProgress as err:
                # Another stream given up on (on a shared orchestrator): its owner hears of
                # it when it drives the loop; this render goes on.
                if err.key == job.key or err.key in given_up:
                    raise
                given_up.add(err.key)
                log.warning("%s: another stream was given up on (%s); going on", job.out, err)
        return job.finish()
    except BaseException:
        job.abandon()  # the parts folder stays for a re-run to resume from
        raise


def _provenance(
    orchestrator: Orchestrator, request: GenerationRequest, extra: dict[str, Any] | None
) -> dict[str, Any]:
    info = orchestrator.info
    return {
        "vidgen_version": vidgen.__version__,
        "model": request.model,
        "model_sha256": info.get("sha256"),
        "tokenizer_sha256": info.get("tokenizer_sha256"),
        "seed": request.seed,
        "request": request.to_json(),
        "request_sha256": request.fingerprint(),
        # What the video was made with: the request's own, else the model's default; 1 (no
        # unconditional pass) where it conditions on neither a label nor actions.
        "guidance": (
            1.0
            if request.label is None and request.actions is None
            else request.guidance
            if request.guidance is not None
            else info.get("guidance")
        ),
        "contrast": request.contrast if request.contrast is not None else info.get("contrast"),
        "dtype": info.get("dtype", "float32"),
        **(extra or {}),
    }


def finished_render(
    out: Path,
    request: GenerationRequest,
    model_sha256: str | None,
    lossless: bool,
    tokenizer_sha256: str | None = None,
    dtype: str = "float32",
) -> dict[str, Any] | None:
    """The provenance of a render of ``request`` already finished at ``out`` (its mp4 and
    sidecar there, no resume point in its parts folder; same request, weights and
    ``lossless``), else None: a batch item killed after its video was joined but before its
    result row was written is recorded, not rendered again. A parts folder left without its
    truth (a kill while ``finish`` removed it: the truth goes first) holds nothing to resume
    from; the finished video stands."""
    sidecar = out.with_suffix(".json")
    resumable = (parts_folder(out) / TRUTH_FILE).exists()
    if not (out.is_file() and sidecar.is_file()) or resumable:
        return None
    try:
        provenance = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(provenance, dict)
        or provenance.get("request_sha256")
        not in _fingerprints(request, model_sha256 is not None, provenance.get("model"))
        or provenance.get("model_sha256") != model_sha256
        or provenance.get("lossless") != lossless
        # Sidecars written before 2026-11-30 (later) do not name it: not checked.
        or provenance.get("tokenizer_sha256", tokenizer_sha256) != tokenizer_sha256
        # Sidecars written before the dtype was recorded are float32 renders.
        or provenance.get("dtype", "float32") != dtype
    ):
        return None
    return provenance


def remove_finished_parts(out: Path) -> bool:
    """Remove the parts folder a kill left beside the finished render at ``out`` (killed
    while ``finish`` removed it, after its truth: nothing in it to resume), with the
    render's lock file and temp files, under that lock; whether it was removed. Call it
    once ``finished_render`` found the video standing: the folder held a second copy of the
    video, and nothing else would ever remove it. Left alone while another process holds
    the lock, or once a truth is back in it (a render of it started since)."""
    out = check_out(out)
    folder = parts_folder(out)
    if not folder.is_dir() or (folder / TRUTH_FILE).exists():
        return False
    try:
        fd = _lock(out)
    except ValueError:  # rendered right now (or no locks here): not ours to remove
        return False
    try:
        if (folder / TRUTH_FILE).exists():
            return False
        _remove_stale_temps(out, folder)
        shutil.rmtree(folder)
        return True
    finally:
        if fd is not None:
            lock_file(out).unlink(missing_ok=True)  # while held, as ``_unlock`` does
            os.close(fd)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    _write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_text(path: Path, text: str) -> None:
    tmp = temp_beside(path, suffix=".tmp")
    try:
        tmp.write_text(text)
        publish(tmp, path)
    finally:  # a failed write (a full disk) leaves no temp file behind
        tmp.unlink(missing_ok=True)
