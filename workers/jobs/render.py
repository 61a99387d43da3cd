"""Batch rendering: a JSONL manifest in, one mp4 per item and ``results.jsonl`` out.

    python -m workers.jobs.render --manifest items.jsonl --out DIR [--actors N] [--address ""]

(``--address ""``: an embedded local Ray instance; the default ``auto`` joins a running
cluster, as under ``ray job submit``.)

Each manifest line is one ``GenerationRequest`` as JSON plus an ``id`` (the mp4 is
``DIR/<id>.mp4``). Items run as concurrent streams on shared actors (one group of actors per
model, models one after another, each model's actors freed before the next's start). A
malformed line (bad JSON, unknown model or key, a checkpoint that is not a generator, frames
<= 0 or over --max-frames, an id that is not a plain file name inside DIR), a request the
model refuses when its stream opens, or the items of a model whose actors are all lost for
good are recorded as errors and the rest go on.
Re-running with the same DIR skips items already recorded as ok and resumes partial ones from
their segments. Under Ray Jobs: ``ray job submit --working-dir . -- python -m
workers.jobs.render ...`` (see the README for token authentication).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from vidgen import checkpoint
from vidgen.fsutil import expand_user
from vidgen.generators import GenerationRequest, check_generator_for
from vidgen.generators.base import DTYPES
from vidgen.render_config import check_serving_limits, check_writable, load_context
from vidgen.validate import check_step_timeout
from workers.actor import remote_reason
from workers.orchestrator import NoExecutorsLeft, NoProgress, Orchestrator, SinkError
from workers.render import RenderJob, finished_render, remove_finished_parts

log = logging.getLogger("workers.jobs.render")

SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # whole (fullmatch): no "a\n"


@dataclass
class Item:
    id: str
    line: int
    request: GenerationRequest | None = None
    context: str | None = None  # an mp4, read once the model's frame size is known
    error: str | None = None
    # ``context`` as the line gives it: rows written before relative contexts were taken
    # as the manifest's record it so, and are the same item's.
    context_given: str | None = None


def parse_manifest(path: Path, out: Path, max_frames: int) -> list[Item]:
    """Every line as an Item; a bad one carries its error instead of a request."""
    items: list[Item] = []
    seen: set[str] = set()
    for n, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        # Until its own id is read and found unique, a line's rows go under a name no id
        # can take (SAFE_ID has no spaces): never mixed with another item's rows.
        item = Item(id=f"line {n}", line=n)
        items.append(item)
        try:
            try:  # a line at a time: one that is not UTF-8 is that line's error alone
                raw = line.decode("utf-8-sig")  # a BOM (Windows editors) is no error
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"the line is not UTF-8 text ({err.reason} at byte {err.start})"
                ) from None
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("a manifest line must be a JSON object")
            ident = _check_id(data.pop("id", None), out)
            if ident in seen:
                raise ValueError(f"id {ident!r} appears twice in the manifest")
            seen.add(ident)
            item.id = ident
            context = data.pop("context", None)
            request = GenerationRequest.from_json(data)
            if request.frames > max_frames:
                raise ValueError(f"frames={request.frames} is over --max-frames={max_frames}")
            # Unknown models, not generators, reencode for a diffusion model or contrast for
            # a token model fail here.
            check_generator_for(request)
            if context is not None and not isinstance(context, str):
                raise ValueError(f"context must be a path (a string), got {context!r}")
            for key in ("context_action", "context_actions"):  # refused now, not at its turn
                if context is None and getattr(request, key) is not None:
                    raise ValueError(f"{key} needs a context (the path of an mp4)")
            if context is not None:  # a relative path is the manifest's, wherever it runs
                item.context_given = context
                context = str(path.parent / expand_user(context))
                if not Path(context).is_file():
                    raise ValueError(f"context {context!r} is not a file")
            item.request, item.context = request, context
        except (
            ValueError,
            TypeError,
            RecursionError,  # a line nested too deep for json (it killed the whole batch)
            checkpoint.CheckpointError,
            OSError,
        ) as err:
            item.error = f"{type(err).__name__}: {err}"
    return items


def _check_id(value: Any, out: Path) -> str:
    if not isinstance(value, str) or not SAFE_ID.fullmatch(value):
        raise ValueError(
            f"id must be a plain file name (letters, digits, '.', '_', '-'), got {value!r}"
        )
    video = out / f"{value}.mp4"
    if video.resolve().parent != out.resolve():
        raise ValueError(f"id {value!r} would write outside {out}")
    if video.is_symlink():  # out/a.mp4 -> b.mp4: items a and b wrote one file
        raise ValueError(f"{video} is a symbolic link; an item's video must be its own file")
    return value


class Results:
    """``results.jsonl``: one line per finished item, appended and fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ok: set[str] = set()
        # ok id -> (its video's request JSON, which holds no context frames; the context path)
        self.made_for: dict[str, tuple[Any, Any]] = {}
        # id -> its last error row's (error, line): the same error again is not appended
        self.last_error: dict[str, tuple[Any, Any]] = {}
        if path.exists():
            for raw in path.read_text().splitlines():
                try:
                    row = json.loads(raw)
                except (json.JSONDecodeError, RecursionError):
                    continue  # a line cut by a crash: that item simply runs again
                # An id that is no string (a hand-edited file) names no item: a list failed
                # as a dict key and ended the batch before it ran.
                if not isinstance(row, dict) or not isinstance(row.get("id"), str):
                    continue
                self.last_error.pop(row["id"], None)
                if row.get("status") == "error":
                    self.last_error[row["id"]] = (row.get("error"), row.get("line"))
                if row.get("status") == "ok":
                    self.ok.add(row["id"])
                    provenance = row.get("provenance")
                    if isinstance(provenance, dict) and "request" in provenance:
                        made = (provenance["request"], provenance.get("context"))
                        self.made_for[row["id"]] = made

    def add(self, row: dict[str, Any]) -> bool:
        """Append a row; an error row that repeats its item's last row (a re-run failing the
        same way) is not written again. Returns whether it was written."""
        if row["status"] == "error":
            error = (row.get("error"), row.get("line"))
            if self.last_error.get(row["id"]) == error:
                return False
            self.last_error[row["id"]] = error
        else:
            self.last_error.pop(row["id"], None)
        line = json.dumps(row, sort_keys=True) + "\n"
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a line cut by a crash: never join this row to it
                    line = "\n" + line
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if row["status"] == "ok":
            self.ok.add(row["id"])
        return True


def _describe(err: BaseException) -> str:
    """``Type: message`` of an error; for an actor's error the remote one itself (Ray's
    wrapper carries the whole remote traceback, with colour codes, in its text)."""
    reason = getattr(err, "cause", None) or err
    if isinstance(reason, ray.exceptions.RayError):  # no cause kept: its text's last line
        return remote_reason(reason)
    return f"{type(reason).__name__}: {reason}"


def _ok_row(
    item_id: str, frames: int, seconds: float, path: Path, provenance: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": item_id,
        "status": "ok",
        "error": None,
        "frames": frames,
        "seconds": round(seconds, 3),
        "path": str(path),
        "provenance": provenance,
    }


def _error_row(item: Item, error: str) -> dict[str, Any]:
    return {
        "id": item.id,
        "status": "error",
        "error": error,
        "line": item.line,
        "frames": 0,
        "seconds": 0.0,
    }


def run_batch(
    items: list[Item],
    out: Path,
    executors_for: Callable[[str], list],
    segment_clips: int = 8,
    lossless: bool = False,
    snapshot_every: int = 1,
    step_timeout: float | None = None,
    replace: Callable[[Any], Any] | None = None,
    release: Callable[[list], None] | None = None,
) -> list[dict[str, Any]]:
    """Render the items (``executors_for(model)`` gives the executors of a model, one model
    after another; ``release(executors)`` is called with the model's executors, replacements
    included, once its items are all done, to free its actors for the next model;
    ``replace`` as in ``Orchestrator``); returns this run's result rows (an error row that
    repeats its item's last row in ``results.jsonl`` is returned but not written again)."""
    results = Results(out / "results.jsonl")
    rows: list[dict[str, Any]] = []
    for item in items:
        if item.error is not None and item.id not in results.ok:
            rows.append(_error_row(item, item.error))
            results.add(rows[-1])
        elif item.error is not None:  # its video is done: it stays done, but say so
            log.warning(
                "%s: skipped as done, but its manifest line (line %d) is now refused: %s",
                item.id,
                item.line,
                item.error,
            )
    for item in items:
        if item.id in results.ok and not (out / f"{item.id}.mp4").is_file():
            # Skipped all the same (its row is the record of what was made), but not silently.
            log.warning(
                "%s: skipped as done, but its video %s is gone; delete its row in "
                "results.jsonl to render it anew",
                item.id,
                out / f"{item.id}.mp4",
            )
        made = results.made_for.get(item.id)
        req = item.request
        # The request's JSON, not its fingerprint: the context frames, which the fingerprint
        # hashes, are read only when the item runs (its path is compared instead).
        context = None if item.context is None else str(item.context)
        if (
            req is not None
            and made is not None
            and (
                made[0] not in (req.to_json(), req.to_json(canonical=False))
                or made[1] not in (context, item.context_given)
            )
        ):
            log.warning(
                "%s: skipped as done, but its video was made for another request (the "
                "manifest line changed since); delete %s.mp4 and its row to render anew",
                item.id,
                item.id,
            )
    todo = [i for i in items if i.request is not None and i.id not in results.ok]
    for model in dict.fromkeys(i.request.model for i in todo):
        group = [i for i in todo if i.request.model == model]
        executors = None
        try:
            executors = executors_for(model)
            orch = Orchestrator(
                executors, snapshot_every=snapshot_every, step_timeout=step_timeout, replace=replace
            )
        except Exception as err:  # the actors could not start: this model's items fail
            log.error("no actors for %s: %s", model, err)
            if executors is not None and release is not None:  # refused: free their GPUs
                release(executors)
            for item in group:
                rows.append(_error_row(item, f"actors for {model!r}: {_describe(err)}"))
                results.add(rows[-1])
            continue
        try:
            rows += _render_group(orch, group, out, segment_clips, lossless, results)
        finally:
            if release is not None:
                release([e for e in orch.executors if e is not None])
    return rows


def _render_group(
    orch: Orchestrator,
    group: list[Item],
    out: Path,
    segment_clips: int,
    lossless: bool,
    results: Results,
) -> list[dict[str, Any]]:
    """All items of one model as concurrent streams; each is finished (joined, recorded) as
    soon as its stream is done."""
    rows: list[dict[str, Any]] = []
    waiting = list(group)
    items = {item.id: item for item in group}
    pending: dict[str, RenderJob] = {}

    def capacity() -> int:
        # No more streams at once than the live actors have slots (the rest wait their
        # turn), so a manifest of thousands of items runs in bounded memory.
        return sum(e.info.get("max_streams", 1) for e in orch.executors if e is not None)

    def admit() -> None:
        while waiting and len(pending) < max(1, capacity()):
            item = waiting.pop(0)
            try:
                request = item.request
                if item.context is not None:  # on the job's copy: the item keeps no frames
                    request = copy.copy(item.request)  # (a manifest of many held them all)
                    request.context = load_context(
                        item.context, orch.info["frame_shape"], orch.clip_len
                    )
                path = out / f"{item.id}.mp4"
                found = finished_render(
                    path,
                    request,
                    orch.info.get("sha256"),
                    lossless,
                    orch.info.get("tokenizer_sha256"),
                    orch.info.get("dtype", "float32"),
                )
                if found is not None:
                    log.info("%s: already finished at %s, no row yet: recorded", item.id, path)
                    if remove_finished_parts(path):
                        log.info("%s: removed the parts folder a kill left beside it", item.id)
                    rows.append(_ok_row(item.id, item.request.frames, 0.0, path, found))
                    results.add(rows[-1])
                    continue
                job = RenderJob(
                    request,
                    path,
                    segment_clips,
                    lossless,
                    progress=False,
                    extra_provenance={"id": item.id}
                    | ({"context": str(item.context)} if item.context is not None else {}),
                )
                job.start(orch)
                pending[item.id] = job
            except NoProgress as err:
                # Another item's stream was given up on while this one was placed (the
                # actor died under both): that item fails, this one tries again. Its own
                # (it could not be placed at all): it fails.
                if not drop(err.key, err, "given up on"):
                    rows.append(_error_row(item, _describe(err)))
                    results.add(rows[-1])
                else:
                    waiting.insert(0, item)
            except NoExecutorsLeft:
                waiting.insert(0, item)  # not this item's fault: it fails with the rest
                raise
            except (ValueError, RuntimeError, OSError) as err:
                rows.append(_error_row(item, _describe(err)))
                results.add(rows[-1])

    def finish_done() -> None:
        for item_id in [i for i, job in pending.items() if job.done]:
            job = pending.pop(item_id)
            try:
                result = job.finish()
            except (ValueError, RuntimeError, OSError) as err:  # e.g. segments that do not join
                log.error("%s: could not be finished: %s", item_id, err)
                job.abandon()  # its parts folder stays, as after a crash
                orch.forget(job.key)
                rows.append(_error_row(items[item_id], _describe(err)))
                results.add(rows[-1])
                continue
            except BaseException:  # an interrupt while it joined: its lock is let go
                job.abandon()
                raise
            rows.append(
                _ok_row(item_id, result.frames, result.seconds, result.path, result.provenance)
            )
            results.add(rows[-1])
            log.info("%s: %d frames in %.1fs", item_id, result.frames, result.seconds)

    def drop(key: int | None, cause: BaseException, why: str) -> bool:
        """The pending item of stream ``key`` (one whose segment or truth write failed, or
        whose steps kept failing): given up on (its parts folder stays for a re-run to
        resume), recorded as an error; the others go on. False if no pending item has that
        stream."""
        found = [i for i, job in pending.items() if job.key == key]
        if not found:
            return False
        log.error("%s: %s: %s", found[0], why, cause)
        pending.pop(found[0]).abandon()
        rows.append(_error_row(items[found[0]], _describe(cause)))
        results.add(rows[-1])
        return True

    try:
        admit()
        while pending:
            try:
                orch.run(until=lambda: any(job.done for job in pending.values()))
            except SinkError as err:
                if not drop(err.key, err.cause, "writing its video failed"):
                    raise  # not one of this batch's streams
            except NoProgress as err:
                if not drop(err.key, err, "given up on"):
                    raise
            finish_done()
            admit()
    except NoExecutorsLeft as err:
        # Every actor of this model is gone for good: what is finished is kept, the rest
        # fails (a re-run resumes the partial ones from their segments).
        finish_done()
        for item in [i for i in group if i.id in pending] + waiting:
            if item.id in pending:
                pending.pop(item.id).abandon()
            rows.append(_error_row(item, _describe(err)))
            results.add(rows[-1])
    except BaseException:  # anything else ends the batch: no item's stream goes on, and
        for job in pending.values():  # no lock stays held
            job.abandon()
        raise
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m workers.jobs.render", description=__doc__.splitlines()[0]
    )
    # Expanded here: a shell leaves the ~ of --out=~/renders as it is, and the items (which
    # expand it) wrote there while results.jsonl went into a folder named "~".
    parser.add_argument("--manifest", required=True, type=expand_user)
    parser.add_argument("--out", required=True, type=expand_user)
    parser.add_argument("--actors", type=int, default=1, help="actors per model")
    parser.add_argument(
        "--address",
        default="auto",
        help="'auto' (a running cluster, as under ray job submit), 'ray://...', "
        "or '' for a local instance",
    )
    parser.add_argument("--max-frames", type=int, default=100_000)
    parser.add_argument("--max-streams", type=int, default=8, help="streams per actor")
    parser.add_argument("--segment-clips", type=int, default=8)
    parser.add_argument("--snapshot-every", type=int, default=1)
    parser.add_argument("--step-timeout", type=float, default=None)
    parser.add_argument("--max-restarts", type=int, default=1)
    parser.add_argument("--lossless", action="store_true")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(DTYPES),
        help="what the actors' networks and caches run in (bfloat16: half the memory)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("actors", "max_streams", "segment_clips", "snapshot_every", "max_frames"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_restarts < 0:
        parser.error(f"--max-restarts must be >= 0, got {args.max_restarts}")
    try:
        check_serving_limits(args, flags=True)
    except ValueError as err:
        parser.error(str(err))
    try:
        check_step_timeout("--step-timeout", args.step_timeout)
    except ValueError as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not args.manifest.is_file():
        parser.error(f"--manifest {args.manifest} is not a file")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; give the folder the videos go to")
    where = args.out  # the folder, or the nearest one above it that exists (made in there)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:  # before Ray and the actors start, not at the first result row
        check_writable(where / "results.jsonl")
    except ValueError as err:
        parser.error(f"--out {args.out}: {err}")
    items = parse_manifest(args.manifest, args.out, args.max_frames)

    from workers.cluster import connect
    from workers.executors import RayExecutor

    try:
        connect(args.address)
    except (ConnectionError, ValueError) as err:  # exits 2 before --out is made
        # ValueError: an address Ray cannot parse ("foo", "host:port")
        parser.error(f"--address {args.address!r}: {err}")
    args.out.mkdir(parents=True, exist_ok=True)
    pools: dict[str, list] = {}

    def release(executors: list) -> None:  # a model's items are done: free its GPUs
        for executor in executors:
            executor.retire()

    def executors_for(model: str) -> list:
        if model not in pools:
            started: list[RayExecutor] = []
            try:
                for _ in range(args.actors):
                    started.append(
                        RayExecutor(
                            model,
                            args.max_streams,
                            max_restarts=args.max_restarts,
                            dtype=args.dtype,
                        )
                    )
            except BaseException:
                release(started)  # the ones that did start would hold their GPUs
                raise
            pools[model] = started
        return pools[model]

    start = time.perf_counter()
    rows = run_batch(
        items,
        args.out,
        executors_for,
        args.segment_clips,
        args.lossless,
        args.snapshot_every,
        args.step_timeout,
        replace=lambda failed: failed.replacement(),
        release=release,
    )
    ok = sum(r["status"] == "ok" for r in rows)
    print(
        json.dumps(
            {
                "items": len(items),
                "rendered": ok,
                "errors": len(rows) - ok,
                "seconds": round(time.perf_counter() - start, 2),
                "results": str(args.out / "results.jsonl"),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
