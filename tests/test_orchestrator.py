"""The orchestrator's own logic with in-process executors (no Ray): order, truth, failures,
backpressure, segmented resumable renders."""

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from tests.models import reference, save_test_generators
from vidgen import checkpoint
from vidgen.generators import Clip, GenerationRequest, load_generator
from vidgen.io import read_metadata, read_video
from workers.actor import GeneratorWorker
from workers.executors import ExecutorFailed, LocalExecutor
from workers.orchestrator import NoProgress, Orchestrator, QueueSink, SinkError
from workers.render import parts_folder, render, segment_name


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return save_test_generators(tmp_path_factory.mktemp("models"))


@pytest.fixture(params=["diffusion", "tokens"])
def model(request, models) -> str:
    return models[request.param]


def request_for(model: str, **kwargs) -> GenerationRequest:
    base = dict(model=model, frames=32, seed=3, label=2, steps=2, guidance=2.0)
    base.update(kwargs)
    return GenerationRequest(**base)


def local(model: str, n: int = 1) -> list[LocalExecutor]:
    return [LocalExecutor(GeneratorWorker(model, max_streams=4), f"local{i}") for i in range(n)]


class Flaky(LocalExecutor):
    """Fails the step calls whose number is in ``fail_at`` (as a killed actor would)."""

    def __init__(self, worker, fail_at: set[int]) -> None:
        super().__init__(worker)
        self.fail_at, self.calls = fail_at, 0

    def step(self, keys, epochs, snapshot_keys):
        self.calls += 1
        if self.calls in self.fail_at:
            self.worker.streams.clear()  # the actor's state is gone with it
            return self._call(_raise)
        return super().step(keys, epochs, snapshot_keys)


def _raise():
    raise ExecutorFailed("killed")


def frames_of(orch: Orchestrator, key: int) -> np.ndarray:
    return np.concatenate([c.frames for c in orch.clips(key)])


def run_giving_up(orch: Orchestrator, tries: int, named: set | None = None) -> set:
    """Run ``orch`` to the end, cancelling each stream a ``NoProgress`` names (given up on);
    returns the keys named (added to ``named``). Fails if ``tries`` runs do not finish it."""
    named = set() if named is None else named
    for _ in range(tries):
        try:
            orch.run()
            return named
        except NoProgress as err:
            named.add(err.key)
            orch.cancel(err.key)
    raise AssertionError(f"not finished after {tries} runs; streams given up on: {named}")


def assert_as_alone(got: np.ndarray, alone: np.ndarray) -> None:
    """Frames of a stream batched with others against the same stream alone: the contract
    allows 1e-5 in the latents, which can move a rare pixel by a step of rounding (the CPU's
    kernels for another batch size add in another order)."""
    assert got.shape == alone.shape
    diff = np.abs(got.astype(int) - alone.astype(int))
    assert diff.max() <= 2 and (diff == 0).mean() > 0.999, (diff.max(), (diff != 0).mean())


def test_clips_arrive_in_order_and_equal_in_process_generation(model):
    req = request_for(model)
    orch = Orchestrator(local(model))
    clips = list(orch.clips(orch.submit(req)))
    assert [c.clip for c in clips] == list(range(len(clips)))
    np.testing.assert_array_equal(np.concatenate([c.frames for c in clips]), reference(model, req))


def test_streams_spread_over_executors_and_stay_independent(model):
    orch = Orchestrator(local(model, 2))
    reqs = [request_for(model, seed=s, frames=40) for s in (1, 2, 3)]
    keys = [orch.submit(r) for r in reqs]
    assert sorted(orch.streams[k].executor for k in keys) == [0, 0, 1]
    with pytest.raises(RuntimeError, match="drained"):
        orch.run()  # nobody takes the clips: the queues fill and the streams wait
    for key, req in zip(keys, reqs, strict=True):
        # Batched with another stream: equal to the single run within float tolerance,
        # which after decoding is at most a level or two of uint8 on a few pixels.
        diff = np.abs(frames_of(orch, key).astype(int) - reference(model, req))
        assert diff.max() <= 2 and (diff == 0).mean() > 0.99


@pytest.mark.parametrize("snapshot_every", [1, 3])
def test_failures_lose_and_duplicate_nothing(model, snapshot_every):
    req = request_for(model, frames=48)
    flaky = Flaky(GeneratorWorker(model, max_streams=4), fail_at={2, 4, 7})
    orch = Orchestrator([flaky], snapshot_every=snapshot_every)
    key = orch.submit(req)
    got = frames_of(orch, key)
    assert orch.failures == 3
    np.testing.assert_array_equal(got, reference(model, req))


def _ray_error(name: str) -> BaseException:
    import ray.exceptions as rex

    if name == "OutOfMemoryError":  # Ray's memory monitor killed the actor mid-call
        return rex.OutOfMemoryError("Task was killed due to the node running low on memory.")
    if name == "ObjectReconstructionFailedError":  # the result was lost with its node
        return rex.ObjectReconstructionFailedError("0" * 56)
    return rex.NodeDiedError("node 1 died")


@pytest.mark.parametrize(
    "error", ["OutOfMemoryError", "ObjectReconstructionFailedError", "NodeDiedError"]
)
def test_ray_errors_of_an_actor_gone_are_failures_not_bugs(model, error):
    """Ray raises these, not a RayActorError, when its memory monitor kills an actor or a
    finished step's result is lost with its node: they ended the render as if the request
    were at fault, with the failover never tried."""

    def killed():
        raise _ray_error(error)

    class Killed(Flaky):
        def step(self, keys, epochs, snapshot_keys):
            self.calls += 1
            if self.calls in self.fail_at:
                self.worker.streams.clear()  # the actor's state is gone with it
                return self._call(killed)
            return LocalExecutor.step(self, keys, epochs, snapshot_keys)

    req = request_for(model, frames=24)
    orch = Orchestrator([Killed(GeneratorWorker(model, max_streams=4), fail_at={2})])
    got = frames_of(orch, orch.submit(req))
    assert orch.failures == 1
    np.testing.assert_array_equal(got, reference(model, req))


def test_stale_results_are_dropped(model):
    orch = Orchestrator(local(model))
    key = orch.submit(request_for(model, frames=16))
    orch._schedule()
    (work,) = orch.work
    orch.work.clear()
    orch.streams[key].epoch += 1  # the stream was restored while the step was in flight
    orch._update(work)
    assert orch.streams[key].accepted == 0 and not orch.work


def test_a_slow_consumer_holds_its_stream_back(model):
    orch = Orchestrator(local(model), queue_clips=2)
    key = orch.submit(request_for(model, frames=64), sink=QueueSink(capacity=2))
    for _ in range(10):  # nobody takes clips from the queue
        orch._schedule()
        orch._execute_and_update(0.0)
    s = orch.streams[key]
    assert len(s.sink.queue) == 2 and s.accepted <= 4 and not s.done


def test_render_writes_the_video_with_provenance(model, tmp_path):
    req = request_for(model, frames=40)
    out = render(
        Orchestrator(local(model)),
        req,
        tmp_path / "v.mp4",
        segment_clips=2,
        lossless=True,
        progress=False,
    )
    np.testing.assert_array_equal(read_video(out.path).numpy(), reference(model, req))
    meta = json.loads(read_metadata(out.path)["comment"])
    sidecar = json.loads((tmp_path / "v.json").read_text())
    assert meta == sidecar and meta["seed"] == 3 and len(meta["model_sha256"]) == 64
    assert not parts_folder(out.path).exists()
    # The guidance and contrast it was made with, also where the request left them to the
    # model (its card's defaults: the test models' 2 and 1; here 1.5 set on the generator).
    assert (meta["guidance"], meta["contrast"]) == (req.guidance, 1.0)
    worker = GeneratorWorker(model, max_streams=4)
    worker.generator.guidance = 1.5  # as a card's "guidance" would set it
    executor = LocalExecutor(worker)
    unset = request_for(model, frames=8, guidance=None)
    render(Orchestrator([executor]), unset, tmp_path / "u.mp4", lossless=True, progress=False)
    meta = json.loads((tmp_path / "u.json").read_text())
    assert "guidance" not in meta["request"] and meta["guidance"] == 1.5


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize(
    ("first_size", "crash_after", "second_size"),
    [(2, 2, 2), (1, 3, 3)],  # the second: resumed with another segment size
)
def test_an_interrupted_render_resumes_from_its_segments(
    model, tmp_path, first_size, crash_after, second_size
):
    """Segments are named by their first clip: a re-run (with the same or another
    ``segment_clips``) keeps what is on disk and joins everything in order."""
    req = request_for(model, frames=56)
    out = tmp_path / "v.mp4"
    orch = Orchestrator(local(model))

    def crash_after_segments(until=None, poll=0.05):
        run(until=lambda: len(list(parts_folder(out).glob("part_*.mp4"))) >= crash_after)
        raise Crash

    run, orch.run = orch.run, crash_after_segments
    with pytest.raises(Crash):
        render(orch, req, out, segment_clips=first_size, lossless=True, progress=False)
    assert not out.exists() and parts_folder(out).exists()
    result = render(
        Orchestrator(local(model)),
        req,
        out,
        segment_clips=second_size,
        lossless=True,
        progress=False,
    )
    # The segments written before the crash were reused.
    assert result.resumed_frames == crash_after * first_size * orch.clip_len
    np.testing.assert_array_equal(read_video(out).numpy(), reference(model, req))


def test_resuming_with_another_request_is_refused(model, tmp_path):
    out = tmp_path / "v.mp4"
    render_until_a_segment(Orchestrator(local(model)), request_for(model, frames=48), out)
    other = request_for(model, frames=48, seed=4)
    with pytest.raises(ValueError, match="different request"):
        render(Orchestrator(local(model)), other, out, progress=False)


def test_a_folder_stopped_before_its_first_truth_does_not_block_another_request(model, tmp_path):
    """Stopped before a segment's truth was saved (Ctrl-C at once), a parts folder holds
    its guards and maybe a segment, but nothing to resume: a re-run with a corrected
    request (or lossless) was refused as 'a different request'."""
    out = tmp_path / "v.mp4"
    folder = parts_folder(out)
    folder.mkdir()
    for name, value in (("request.sha256", "0" * 64), ("lossless", "true"), ("dtype", "x")):
        (folder / name).write_text(value)
    stray = folder / segment_name(0)  # saved, its truth not yet: made again
    stray.write_bytes(b"not this request's clips")
    req = request_for(model, frames=16)
    result = render(Orchestrator(local(model)), req, out, lossless=True, progress=False)
    assert result.resumed_frames == 0 and not folder.exists()
    np.testing.assert_array_equal(read_video(out).numpy(), reference(model, req))


def render_until_a_segment(orch: Orchestrator, req: GenerationRequest, out: Path) -> None:
    """A render killed once its first segment is on disk (its parts folder stays)."""
    run = orch.run

    def crash_after_a_segment(until=None, poll=0.05):
        run(until=lambda: any(parts_folder(out).glob("part_*.mp4")))
        raise Crash

    orch.run = crash_after_a_segment
    with pytest.raises(Crash):
        render(orch, req, out, segment_clips=1, progress=False)


def test_a_truth_that_does_not_fit_its_folder_is_refused_before_a_segment_goes(model, tmp_path):
    """The guard file names the request, but the truth was never compared with it: a truth
    of another request was resumed (the rest made from its seed, published as this one's);
    and a truth saying clip -5 had every segment deleted before it was refused."""
    from vidgen.generators.base import load_snapshot, save_snapshot

    req = request_for(model, frames=32)
    out = tmp_path / "v.mp4"
    render_until_a_segment(Orchestrator(local(model)), req, out)
    folder = parts_folder(out)
    truth = load_snapshot(folder / "truth.safetensors")
    kept = sorted(p.name for p in folder.glob("part_*.mp4"))
    assert kept and truth.next_clip >= 1
    other = dataclasses.replace(truth.request, seed=999)
    for bad, message in (
        (dataclasses.replace(truth, request=other), "truth of a different request"),
        (dataclasses.replace(truth, checkpoint_clip=-5), "checkpoint_clip must be >= 0"),
        (dataclasses.replace(truth, checkpoint_clip=999), "past the request's"),
    ):
        save_snapshot(folder / "truth.safetensors", bad)
        with pytest.raises((ValueError, checkpoint.CheckpointError), match=message):
            render(Orchestrator(local(model)), req, out, progress=False)
        assert sorted(p.name for p in folder.glob("part_*.mp4")) == kept


def test_a_render_resumes_with_its_model_named_another_way(model, tmp_path, monkeypatch):
    """A relative and an absolute path (or a shipped name and its path) are one model: the
    resume was refused as "a different request", and a finished item's record was not
    found. The weights' sha256 says which model made it."""
    from workers.render import finished_render

    monkeypatch.chdir(tmp_path)
    shutil.copyfile(model, tmp_path / "m.safetensors")
    relative, absolute = "m.safetensors", str(tmp_path / "m.safetensors")
    out = tmp_path / "v.mp4"
    render_until_a_segment(Orchestrator(local(relative)), request_for(relative, frames=48), out)
    done = len(list(parts_folder(out).glob("part_*.mp4")))
    req = request_for(absolute, frames=48)
    orch = Orchestrator(local(absolute))
    result = render(orch, req, out, lossless=False, progress=False)
    assert done and result.resumed_frames == done * orch.clip_len
    assert len(read_video(out)) == 48
    sha, tok = checkpoint.file_sha256(absolute), orch.info.get("tokenizer_sha256")
    assert finished_render(out, request_for(relative, frames=48), sha, False, tok) is not None
    assert finished_render(out, request_for(relative, frames=40), sha, False, tok) is None
    # The same weights under another name are the same model; other weights are not.
    assert (
        finished_render(out, request_for("x.safetensors", frames=48), "0" * 64, False, tok) is None
    )


def test_a_render_resumes_after_its_project_folder_moved(models, tmp_path, monkeypatch):
    """The guard held the model's absolute path for a while: a project renamed (or mounted
    elsewhere) was 'a different request'. The weights' sha256 names the model; a link moved
    to other weights is said as such, not as another request."""
    model = models["diffusion"]
    old, new = tmp_path / "projA", tmp_path / "projB"
    old.mkdir()
    shutil.copyfile(model, old / "m.safetensors")
    (old / "latest.safetensors").symlink_to("m.safetensors")
    monkeypatch.chdir(old)
    req = request_for("latest.safetensors", frames=24)
    render_until_a_segment(Orchestrator(local("latest.safetensors")), req, old / "v.mp4")
    old.rename(new)
    monkeypatch.chdir(new)
    absolute = request_for(str(new / "m.safetensors"), frames=24)  # and named another way
    orch = Orchestrator(local(absolute.model))
    result = render(orch, absolute, new / "v.mp4", progress=False)
    assert result.resumed_frames > 0 and len(read_video(new / "v.mp4")) == 24
    # A link moved to retrained weights: their sha256 says so first.
    render_until_a_segment(Orchestrator(local("latest.safetensors")), req, new / "w.mp4")
    shutil.copyfile(model, new / "m2.safetensors")
    checkpoint.update_card(new / "m2.safetensors", {"note": "trained further"})
    (new / "latest.safetensors").unlink()
    (new / "latest.safetensors").symlink_to("m2.safetensors")
    with pytest.raises(ValueError, match="other weights of 'latest.safetensors'"):
        render(Orchestrator(local("latest.safetensors")), req, new / "w.mp4", progress=False)


def test_a_folder_without_a_weights_guard_names_its_model(models, tmp_path, monkeypatch):
    """A folder made before the weights were guarded holds no model.sha256: the model's name
    is all that ties it to its weights, so a resume under another name (other weights) is
    another request, not an alias."""
    model = models["diffusion"]
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(model, tmp_path / "m.safetensors")
    shutil.copyfile(model, tmp_path / "b.safetensors")
    checkpoint.update_card(tmp_path / "b.safetensors", {"note": "other weights"})
    render_until_a_segment(
        Orchestrator(local("m.safetensors")),
        request_for("m.safetensors", frames=24),
        tmp_path / "v.mp4",
    )
    for guard in ("model.sha256", "tokenizer.sha256"):
        (parts_folder(tmp_path / "v.mp4") / guard).unlink(missing_ok=True)
    other = request_for("b.safetensors", frames=24)
    with pytest.raises(ValueError, match="a different request"):
        render(Orchestrator(local("b.safetensors")), other, tmp_path / "v.mp4", progress=False)


def test_an_unconditional_render_records_guidance_1(model, tmp_path):
    """Without a label or actions nothing is guided (one pass): the sidecar said the
    model's default guidance."""
    req = request_for(model, frames=8, label=None, guidance=None)
    render(Orchestrator(local(model)), req, tmp_path / "u.mp4", lossless=True, progress=False)
    assert json.loads((tmp_path / "u.json").read_text())["guidance"] == 1.0


def test_resuming_with_other_weights_under_the_same_path_is_refused(model, tmp_path):
    """The request names the model by path, so only the weights' hash tells a retrained
    file apart: its clips must not be joined to the old ones."""
    weights = tmp_path / "model.safetensors"
    shutil.copyfile(model, weights)
    req = request_for(str(weights), frames=48)
    out = tmp_path / "v.mp4"
    orch = Orchestrator(local(str(weights)))

    render_until_a_segment(orch, req, out)
    checkpoint.update_card(weights, {"note": "trained further"})  # new bytes, same path
    with pytest.raises(ValueError, match="other weights of .*delete it"):
        render(Orchestrator(local(str(weights))), req, out, progress=False)


@pytest.mark.parametrize("family", ["diffusion", "tokens"])
def test_resuming_after_its_tokenizer_changed_is_refused(family, tmp_path):
    """A decoder fine-tuned in place keeps the encoder fingerprint, so the generator still
    loads: only the tokenizer file's hash tells its frames apart from the old ones, which
    were joined to them (frames 0-7 of one decoder, 8-31 of another)."""
    model = save_test_generators(tmp_path / "models")[family]
    req = request_for(model, frames=48)
    out = tmp_path / "v.mp4"
    orch = Orchestrator(local(model))
    assert orch.info["tokenizer_sha256"]

    render_until_a_segment(orch, req, out)
    tokenizer = checkpoint.load(model).card["tokenizer"]
    checkpoint.update_card(tokenizer, {"note": "decoder tuned"})  # new bytes, same path
    with pytest.raises(ValueError, match="another tokenizer of .*delete it"):
        render(Orchestrator(local(model)), req, out, progress=False)


def test_parts_of_an_older_vidgen_are_refused(model, tmp_path):
    """Segments named by index (before they were named by first clip) cannot be placed
    safely: refused with the fix, rather than joined in a wrong order."""
    out = tmp_path / "v.mp4"
    parts_folder(out).mkdir()
    (parts_folder(out) / "seg_000001.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="older vidgen .*delete it"):
        render(Orchestrator(local(model)), request_for(model), out, progress=False)


@pytest.mark.parametrize(("char", "count"), [("v", 246), ("\U0001f600", 62), ("\u6f22", 80)])
def test_a_render_to_a_long_valid_name_works(models, tmp_path, char, count):
    """An output name near the 255-byte limit: its parts folder and temporary files get
    shortened names (distinct for names that differ only at the end; cut by bytes: 62
    emoji were cut to 100 characters, 400 bytes, "File name too long")."""
    model = models["diffusion"]
    out = tmp_path / (char * count + ".mp4")
    assert parts_folder(out) != parts_folder(tmp_path / (char * (count - 1) + "w.mp4"))
    assert parts_folder(tmp_path / "v.mp4").name == ".v.mp4.parts"  # short names as before
    # Names that fitted when cut by characters keep the folder they had (a render under way).
    assert parts_folder(tmp_path / ("\u00e9" * 110 + ".mp4")).name.startswith("." + "\u00e9" * 100)
    req = request_for(model, frames=16)
    done = render(Orchestrator(local(model)), req, out, segment_clips=1, progress=False)
    assert done.path == out and not parts_folder(out).exists()
    assert read_video(out).shape[0] == 16


def test_a_long_names_leftover_temps_are_removed_and_no_other_outs(models, tmp_path):
    """Temp files of stems of 64 bytes or more were left for good (their cut names could
    have been another out's): a long stem's temp names now end in a hash of it."""
    from vidgen.fsutil import temp_beside

    model = models["diffusion"]
    out = tmp_path / ("x" * 70 + ".mp4")
    other = tmp_path / ("x" * 70 + "y.mp4")  # the same first 64 bytes
    mine = temp_beside(out, suffix=".tmp.mp4")  # a join killed part way
    theirs = temp_beside(other, suffix=".tmp.mp4")
    parts_folder(out).mkdir()  # a render of it was under way
    req = request_for(model, frames=8)
    render(Orchestrator(local(model)), req, out, progress=False)
    assert not mine.exists() and theirs.exists()


def test_an_upper_case_outs_leftover_temps_are_removed(models, tmp_path):
    """The joined video's temp name ends in out's own suffix: `.MP4` ones were left for good
    (the pattern knew only `.mp4`)."""
    from vidgen.fsutil import temp_beside

    model = models["diffusion"]
    out = tmp_path / "x.MP4"
    left = temp_beside(out, suffix=".tmp.MP4")  # a join killed part way
    parts_folder(out).mkdir()
    render(Orchestrator(local(model)), request_for(model, frames=8), out, progress=False)
    assert not left.exists() and read_video(out).shape[0] == 8


def test_a_manifest_line_not_utf8_or_with_a_bad_context_is_that_lines_error(models, tmp_path):
    """A byte that is not UTF-8 anywhere in the manifest took the whole batch down (a
    UnicodeDecodeError traceback); a context that is not a string was a TypeError that did
    not name it. A byte-order mark is no error."""
    from workers.jobs.render import parse_manifest

    good = {"model": models["diffusion"], "frames": 8, "steps": 2}
    manifest = tmp_path / "items.jsonl"
    manifest.write_bytes(
        b"\xef\xbb\xbf"
        + json.dumps({"id": "a", **good}).encode()
        + b'\n{"id": "b\xff"}\n'
        + json.dumps({"id": "c", **good, "context": 5}).encode()
        + b"\n"
        + json.dumps({"id": "d", **good}).encode()
        + b"\n"
        + json.dumps({"id": "e", **good, "actions": [0] * 8, "context_actions": [1]}).encode()
        + b"\n"
    )
    items = parse_manifest(manifest, tmp_path, max_frames=1000)
    assert [(i.id, i.error) for i in items if i.error is None] == [("a", None), ("d", None)]
    errors = {i.line: i.error for i in items if i.error}
    assert "not UTF-8 text" in errors[2] and "context must be a path" in errors[3]
    assert "context_actions needs a context" in errors[5]


def test_a_symlinked_outs_leftover_temps_are_removed_beside_its_target(models, tmp_path):
    """A join killed part way left its temp file beside the link's target, where the next
    render's cleanup never looked."""
    from vidgen.fsutil import temp_beside

    model = models["diffusion"]
    (tmp_path / "store").mkdir()
    real = tmp_path / "store" / "real.mp4"
    real.write_bytes(b"an older video")
    out = tmp_path / "v.mp4"
    out.symlink_to(real)
    joined = temp_beside(out, suffix=".tmp.mp4")  # beside the target, as publish writes
    sidecar = temp_beside(out.with_suffix(".json"))
    assert joined.parent == real.parent and sidecar.parent == tmp_path
    parts_folder(out).mkdir()  # a render of it was under way
    render(Orchestrator(local(model)), request_for(model, frames=8), out, progress=False)
    assert not joined.exists() and not sidecar.exists()
    assert out.is_symlink() and read_video(out).shape[0] == 8  # written through the link
    # Its target is locked too: a render of the target itself (or of another link to it)
    # running now would have its temp files cleaned away by this one.
    from workers.render import _lock, lock_file

    held = _lock(real)
    try:
        with pytest.raises(ValueError, match="being rendered by another process"):
            render(Orchestrator(local(model)), request_for(model, frames=8), out, progress=False)
        assert not lock_file(out).exists()  # the link's own lock, taken first, was given back
    finally:
        lock_file(real).unlink()
        os.close(held)


def test_batch_items_beyond_the_actor_slots_wait_their_turn(models, tmp_path):
    from workers.jobs.render import parse_manifest, run_batch

    model = models["diffusion"]
    lines = [
        json.dumps(
            {
                "id": f"v{i}",
                "model": model,
                "frames": 8 * (1 + i % 2),
                "seed": i,
                "steps": 2,
                "label": 1,
            }
        )
        for i in range(5)
    ]
    manifest = tmp_path / "items.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    items = parse_manifest(manifest, out, max_frames=1000)
    executor = LocalExecutor(GeneratorWorker(model, max_streams=2))
    rows = run_batch(items, out, lambda m: [executor], lossless=True)
    assert sorted(r["id"] for r in rows if r["status"] == "ok") == [f"v{i}" for i in range(5)]
    assert executor.worker.streams == {}  # every slot was given back
    for item in items:
        # Batched with another stream: equal to the alone-run within float noise (DESIGN.md
        # section 3: bit-identical only in the same batch composition).
        got = read_video(out / f"{item.id}.mp4").numpy().astype(int)
        want = reference(model, item.request).astype(int)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 2 and (got != want).mean() < 1e-3


def test_a_batch_item_done_for_another_request_is_skipped_with_a_warning(models, tmp_path, caplog):
    """An ok row whose manifest line changed since kept its old video without a word."""
    from workers.jobs.render import parse_manifest, run_batch

    model = models["diffusion"]
    manifest, out = tmp_path / "items.jsonl", tmp_path / "out"
    out.mkdir()
    executor = LocalExecutor(GeneratorWorker(model, max_streams=2))
    from vidgen.io import VideoWriter

    start = tmp_path / "start.mp4"
    with VideoWriter(start, lossless=True) as writer:
        writer.write(np.full((8, 32, 32, 3), 90, np.uint8))
    line = {"id": "a", "model": model, "frames": 8, "seed": 1, "steps": 2, "label": 1}
    # "b" continues a video: its frames are read only when it runs (its ok row must still
    # match its unchanged line on a re-run).
    other = {**line, "id": "b", "context": str(start)}
    for seed, warned in ((1, False), (1, False), (2, True)):
        text = json.dumps({**line, "seed": seed}) + "\n" + json.dumps(other) + "\n"
        manifest.write_text(text)
        caplog.clear()
        items = parse_manifest(manifest, out, 1000)
        run_batch(items, out, lambda m: [executor])
        assert ("a: skipped as done, but" in caplog.text) == warned
        assert "b: skipped" not in caplog.text
        # The context frames went to the job's copy of the request, not the item (a batch of
        # many such items held every one's frames until it ended).
        assert all(item.request.context is None for item in items)
    # An ok row whose video was deleted was skipped without a word.
    assert "is gone" not in caplog.text
    (out / "a.mp4").unlink()
    caplog.clear()
    assert run_batch(parse_manifest(manifest, out, 1000), out, lambda m: [executor]) == []
    assert f"a: skipped as done, but its video {out / 'a.mp4'} is gone" in caplog.text


def test_a_batch_item_whose_video_is_a_link_is_refused(tmp_path, monkeypatch):
    """out/a.mp4 -> b.mp4 passed (it resolves inside --out): items a and b wrote one file,
    and a's row and sidecar described b's video. And --out=~/x (which a shell leaves as it
    is) put results.jsonl in a folder named "~" while the items expanded it."""
    from workers.jobs.render import build_parser, parse_manifest

    out = tmp_path / "out"
    out.mkdir()
    (out / "b.mp4").write_bytes(b"b's video")
    (out / "a.mp4").symlink_to("b.mp4")
    line = {"model": "ca2vdm-tiny", "frames": 8}
    manifest = tmp_path / "items.jsonl"
    manifest.write_text(json.dumps({"id": "a", **line}) + "\n" + json.dumps({"id": "b", **line}))
    a, b = parse_manifest(manifest, out, 1000)
    assert "out/a.mp4 is a symbolic link" in a.error and b.error is None
    monkeypatch.setenv("HOME", str(tmp_path))
    args = build_parser().parse_args(["--manifest=~/items.jsonl", "--out=~/renders"])
    assert args.out == tmp_path / "renders" and args.manifest == manifest


def test_a_batchs_bad_lines_never_mix_their_rows_with_another_items(models, tmp_path, caplog):
    """A bad line's rows went under ``line-N``, which a real item may be called (its error
    then hidden as done); a duplicate's under the first item's id (their errors replaced each
    other as its last: two new rows each run); an id with a trailing newline passed; a line
    of a done item now refused was dropped without a word."""
    from workers.jobs.render import parse_manifest, run_batch

    model = models["diffusion"]
    manifest, out = tmp_path / "items.jsonl", tmp_path / "out"
    out.mkdir()
    executor = LocalExecutor(GeneratorWorker(model, max_streams=2))
    good = {"model": model, "frames": 8, "seed": 1, "steps": 2, "label": 1}
    lines = [
        {"id": "line-2", **good},
        "{not json",
        {"id": "a", **good, "label": 99},  # fails when it runs
        {"id": "a", **good},  # the duplicate
        {"id": "b\n", **good},
    ]
    manifest.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines))
    rows = run_batch(parse_manifest(manifest, out, 1000), out, lambda m: [executor])
    by_id = {r["id"]: r for r in rows}
    assert by_id["line-2"]["status"] == "ok" and "JSON" in by_id["line 2"]["error"]
    assert "appears twice" in by_id["line 4"]["error"] and "label" in by_id["a"]["error"]
    assert "plain file name" in by_id["line 5"]["error"]
    assert sorted(p.name for p in out.glob("*.mp4")) == ["line-2.mp4"]
    before = (out / "results.jsonl").read_text()
    run_batch(parse_manifest(manifest, out, 1000), out, lambda m: [executor])
    assert (out / "results.jsonl").read_text() == before  # the same errors: no new rows
    # The done item's line, now refused: it stays done, with a warning.
    lines[0] = {"id": "line-2", **good, "steps": 0}
    manifest.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines))
    caplog.clear()
    assert "line-2" not in {
        r["id"] for r in run_batch(parse_manifest(manifest, out, 1000), out, lambda m: [executor])
    }
    assert "line-2: skipped as done, but its manifest line (line 1) is now refused" in caplog.text


def test_a_manifests_relative_context_is_beside_the_manifest(models, tmp_path, monkeypatch, caplog):
    """It was looked for in the working directory: refused when the job ran elsewhere (as
    under Ray Jobs), or another file of that name taken."""
    from vidgen.io import VideoWriter
    from workers.jobs.render import parse_manifest

    (tmp_path / "data").mkdir()
    with VideoWriter(tmp_path / "data" / "start.mp4", lossless=True) as writer:
        writer.write(np.full((8, 32, 32, 3), 90, np.uint8))
    manifest = tmp_path / "data" / "items.jsonl"
    line = {"id": "a", "model": models["diffusion"], "frames": 8, "context": "start.mp4"}
    manifest.write_text(json.dumps(line) + "\n")
    monkeypatch.chdir(tmp_path)
    (item,) = parse_manifest(manifest, tmp_path, 1000)
    assert item.error is None and item.context == str(tmp_path / "data" / "start.mp4")
    # Done before relative contexts were the manifest's: its row records the path as given,
    # and it is the same item (no "made for another request" warning).
    from workers.jobs.render import run_batch

    out = tmp_path / "out"
    out.mkdir()
    row = {"id": "a", "status": "ok", "provenance": {"request": item.request.to_json()}}
    row["provenance"]["context"] = "start.mp4"
    (out / "results.jsonl").write_text(json.dumps(row) + "\n")
    (out / "a.mp4").write_bytes(b"its video")

    def no_actors(model):
        raise AssertionError("a done item was run again")

    with caplog.at_level("WARNING"):
        assert run_batch(parse_manifest(manifest, out, 1000), out, no_actors) == []
    assert "skipped as done" not in caplog.text


def test_a_batch_item_killed_while_its_parts_were_removed_is_not_rendered_again(models, tmp_path):
    """``finish`` unlinks the truth, then the folder: a kill between left a folder with no
    resume point, and the finished video was rendered again from clip 0; then (recorded, not
    rendered) the folder, a second copy of the video, and the lock file stayed for good."""
    from workers.jobs.render import parse_manifest, run_batch
    from workers.render import lock_file

    model = models["diffusion"]
    manifest, out = tmp_path / "items.jsonl", tmp_path / "out"
    out.mkdir()
    line = {"id": "a", "model": model, "frames": 16, "seed": 1, "steps": 2, "label": 1}
    manifest.write_text(json.dumps(line) + "\n")
    executor = LocalExecutor(GeneratorWorker(model, max_streams=2))
    run_batch(parse_manifest(manifest, out, 1000), out, lambda m: [executor])
    made = (out / "a.mp4").stat().st_mtime_ns
    (out / "results.jsonl").unlink()  # killed before its row was written ...
    folder = parts_folder(out / "a.mp4")
    folder.mkdir()  # ... and while its parts folder was removed
    (folder / "part_000000000.mp4").write_bytes((out / "a.mp4").read_bytes())
    (folder / "model.sha256").write_text("x")
    lock_file(out / "a.mp4").write_bytes(b"")
    (row,) = run_batch(parse_manifest(manifest, out, 1000), out, lambda m: [executor])
    assert row["status"] == "ok" and (out / "a.mp4").stat().st_mtime_ns == made
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.mp4", "results.jsonl"]
    # Not while another process renders that out (it holds the lock), nor with a truth in it.
    import fcntl

    from workers.render import TRUTH_FILE, remove_finished_parts

    folder.mkdir()
    with open(lock_file(out / "a.mp4"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert not remove_finished_parts(out / "a.mp4") and folder.is_dir()
    (folder / TRUTH_FILE).write_bytes(b"")
    assert not remove_finished_parts(out / "a.mp4") and folder.is_dir()


class Dead(LocalExecutor):
    """Dies for good at step call ``die_at`` (its restarts used up: ``recover`` raises)."""

    def __init__(self, worker, die_at: int) -> None:
        super().__init__(worker)
        self.die_at, self.calls, self.dead = die_at, 0, False

    def step(self, keys, epochs, snapshot_keys):
        self.calls += 1
        if self.dead or self.calls == self.die_at:
            self.dead = True
            self.worker.streams.clear()
            return self._call(_raise)
        return super().step(keys, epochs, snapshot_keys)

    def recover(self):
        if self.dead:
            raise ExecutorFailed("restarts used up")


def test_a_refused_request_leaves_no_stream_behind(model):
    """A request the generator refuses at open (label out of range) raises at submit and
    leaves nothing the loop would later step (which would fail every other stream)."""
    orch = Orchestrator(local(model))
    with pytest.raises(ValueError, match="label"):
        orch.submit(request_for(model, label=99))
    assert orch.streams == {}
    good = request_for(model, frames=16)
    np.testing.assert_array_equal(frames_of(orch, orch.submit(good)), reference(model, good))
    assert orch.streams == {}  # handed out completely: forgotten


def test_streams_of_an_executor_lost_for_good_wait_for_free_slots(model):
    """Two executors of 2 slots, 4 streams; one dies for good (no replacement): its streams
    wait for the survivor's slots instead of overfilling its cache, and every video is
    still whole and exact."""
    workers = [GeneratorWorker(model, max_streams=2) for _ in range(2)]
    dead = Dead(workers[1], die_at=2)
    orch = Orchestrator([LocalExecutor(workers[0]), dead])
    reqs = [request_for(model, seed=s, frames=24) for s in range(4)]
    keys = [orch.submit(r) for r in reqs]
    got: dict[int, list] = {key: [] for key in keys}
    for _ in range(1000):  # take clips from all streams as they come
        if not orch.streams:
            break
        for key, s in list(orch.streams.items()):
            got[key].extend(c.frames for c in s.sink.queue)
            s.sink.queue.clear()
            if s.done:
                orch.forget(key)
        orch._schedule()
        orch._execute_and_update(0.0)
    assert not orch.streams, "the streams did not finish"
    assert orch.executors[1] is None and orch.failures >= 1
    assert workers[0].streams == {}  # every slot given back
    for key, req in zip(keys, reqs, strict=True):
        diff = np.abs(np.concatenate(got[key]).astype(int) - reference(model, req))
        assert diff.max() <= 2 and (diff == 0).mean() > 0.99


def test_a_fully_made_stream_is_not_reopened_when_its_decode_is_lost(model):
    """An executor that fails after a stream's last clip was made (only its decode lost):
    the decode is redone, and the stream is not restored (nothing would ever close it)."""

    class LosesLastDecode(LocalExecutor):
        failed = False

        def decode(self, clips):
            if not self.failed and any(c.clip == 1 for c in clips):
                self.failed = True
                return self._call(_raise)
            return super().decode(clips)

    worker = GeneratorWorker(model, max_streams=4)
    orch = Orchestrator([LosesLastDecode(worker)])
    req = request_for(model, frames=2 * orch.clip_len)  # 2 clips: clip 1 is the last
    got = frames_of(orch, orch.submit(req))
    assert orch.failures == 1 and worker.streams == {}
    np.testing.assert_array_equal(got, reference(model, req))


def test_a_refused_render_leaves_no_parts_folder(model, tmp_path):
    """A request refused at submit (frames not whole clips, a label out of range) leaves no
    parts folder that would block the corrected re-run."""
    out = tmp_path / "v.mp4"
    orch = Orchestrator(local(model))
    clip_len = orch.clip_len
    for bad in (request_for(model, frames=clip_len + 1), request_for(model, label=99)):
        with pytest.raises(ValueError):
            render(orch, bad, out, progress=False)
        assert not parts_folder(out).exists() and orch.streams == {}
    good = request_for(model, frames=2 * clip_len)
    render(orch, good, out, lossless=True, progress=False)
    np.testing.assert_array_equal(read_video(out).numpy(), reference(model, good))
    assert orch.streams == {}  # the finished render's stream was forgotten


def test_batch_goes_on_past_bad_items_and_frees_each_models_actors(models, tmp_path):
    """A manifest mixing both models, an item the generator refuses at open, a model that
    is not a generator and a model whose actors all die: the good items render, the others
    are recorded as errors, and each model's executors are released before the next."""
    from workers.jobs.render import parse_manifest, run_batch

    rows_in = [
        {"id": "good-d", "model": models["diffusion"], "frames": 16, "label": 1, "steps": 2},
        {"id": "bad-label", "model": models["diffusion"], "frames": 16, "label": 99},
        {"id": "good-t", "model": models["tokens"], "frames": 16, "label": 1},
        {"id": "re-t", "model": models["tokens"], "frames": 16, "label": 1, "reencode": True},
        {"id": "not-gen", "model": "kl-tiny", "frames": 16},
        {"id": "re-d", "model": models["diffusion"], "frames": 16, "reencode": True},
    ]
    manifest = tmp_path / "items.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows_in) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    items = parse_manifest(manifest, out, max_frames=1000)
    assert "not a generator" in next(i.error for i in items if i.id == "not-gen")
    assert "reencode applies to token models only" in next(i.error for i in items if i.id == "re-d")
    released, made = [], {}

    def executors_for(m):
        made[m] = [LocalExecutor(GeneratorWorker(m, max_streams=2))]
        return made[m]

    rows = run_batch(items, out, executors_for, lossless=True, release=released.append)
    status = {r["id"]: r["status"] for r in rows}
    assert status == {
        "good-d": "ok",
        "bad-label": "error",
        "good-t": "ok",
        "re-t": "ok",
        "not-gen": "error",
        "re-d": "error",
    }
    assert "label" in next(r["error"] for r in rows if r["id"] == "bad-label")
    # The re-tokenising item reached its stream: the same seed, other frames.
    assert not np.array_equal(read_video(out / "good-t.mp4"), read_video(out / "re-t.mp4"))
    assert [r[0] for r in released] == [made[models["diffusion"]][0], made[models["tokens"]][0]]
    assert not any(out.glob(".*.parts"))
    # Run again: the errors are this run's rows too, but the same error is not appended twice.
    written = (out / "results.jsonl").read_text().splitlines()
    again = run_batch(parse_manifest(manifest, out, 1000), out, executors_for)
    assert sorted(r["id"] for r in again) == ["bad-label", "not-gen", "re-d"]
    assert (out / "results.jsonl").read_text().splitlines() == written
    # Another error for an item (its manifest line changed) is a new row.
    rows_in[1]["label"] = 98
    manifest.write_text("\n".join(json.dumps(r) for r in rows_in) + "\n")
    run_batch(parse_manifest(manifest, out, 1000), out, executors_for)
    after = [json.loads(r) for r in (out / "results.jsonl").read_text().splitlines()]
    assert len(after) == len(written) + 1 and "98" in after[-1]["error"]

    # Every actor of the model dies for good: its items are errors, the run does not crash.
    lines = [
        {"id": f"d{i}", "model": models["diffusion"], "frames": 24, "seed": i} for i in range(3)
    ]
    manifest.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    out2 = tmp_path / "out2"
    out2.mkdir()
    dying = Dead(GeneratorWorker(models["diffusion"], max_streams=2), die_at=2)
    rows = run_batch(parse_manifest(manifest, out2, 1000), out2, lambda m: [dying])
    assert sorted(r["id"] for r in rows) == ["d0", "d1", "d2"]
    assert all(r["status"] == "error" and "no executor is left" in r["error"] for r in rows)


def test_a_moved_streams_decode_lost_again_is_redone(models):
    """Executor 1 dies for good while decoding stream X (X moves: it waits for executor 0's
    only slot); then executor 0 fails X's redone decode once. Every decode still comes
    back, and X is whole and exact."""
    model = models["diffusion"]

    class DiesOnDecode(LocalExecutor):
        dead = False

        def decode(self, clips):
            self.dead = True
            self.worker.streams.clear()
            return self._call(_raise)

        def step(self, *args):
            return self._call(_raise) if self.dead else super().step(*args)

        def recover(self):
            if self.dead:
                raise ExecutorFailed("restarts used up")

    class FailsDecodeOnce(LocalExecutor):
        target, failed = None, False

        def decode(self, clips):
            if not self.failed and any(c.key == self.target for c in clips):
                self.failed = True
                return self._call(_raise)
            return super().decode(clips)

    e0 = FailsDecodeOnce(GeneratorWorker(model, max_streams=1))
    orch = Orchestrator([e0, DiesOnDecode(GeneratorWorker(model, max_streams=1))])
    reqs = [request_for(model, seed=s, frames=3 * orch.clip_len) for s in (1, 2)]
    sinks = [QueueSink(100), QueueSink(100)]
    keys = [orch.submit(r, sink=k) for r, k in zip(reqs, sinks, strict=True)]
    e0.target = keys[1]
    orch.run()
    assert orch.failures == 2 and e0.failed
    for req, sink in zip(reqs, sinks, strict=True):
        np.testing.assert_array_equal(
            np.concatenate([c.frames for c in sink.queue]), reference(model, req)
        )


def test_an_executor_lost_while_items_are_admitted_fails_them_all_cleanly(models, tmp_path):
    """The only executor dies for good while the batch opens its second item, and its
    replacement cannot start: every item gets an error row (none is left unrecorded),
    nothing raises, and the model's executors are still released."""
    from workers.jobs.render import parse_manifest, run_batch

    model = models["diffusion"]

    class DiesAtSecondOpen(LocalExecutor):
        opens, dead = 0, False

        def open(self, key, req, timeout=None):
            self.opens += 1
            if self.opens == 2:
                self.dead = True
                self.worker.streams.clear()
                raise ExecutorFailed("died")
            return super().open(key, req)

        def recover(self):
            if self.dead:
                raise ExecutorFailed("restarts used up")

    def cannot_replace(failed):
        raise RuntimeError("no GPU is free for a new actor")

    manifest = tmp_path / "items.jsonl"
    lines = [{"id": f"d{i}", "model": model, "frames": 16, "seed": i} for i in range(3)]
    manifest.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    released = []
    executor = DiesAtSecondOpen(GeneratorWorker(model, max_streams=2))
    rows = run_batch(
        parse_manifest(manifest, out, 1000),
        out,
        lambda m: [executor],
        replace=cannot_replace,
        release=released.append,
    )
    assert sorted(r["id"] for r in rows) == ["d0", "d1", "d2"]
    assert all(r["status"] == "error" and "NoExecutorsLeft" in r["error"] for r in rows)
    assert released == [[]]  # called, with no executor left to free


def test_batch_main_releases_a_partly_started_pool(models, tmp_path, monkeypatch, capsys):
    """`--actors 2` where the second actor cannot start: the first is retired (it would keep
    its GPU from the next model), the model's items are error rows, the job ends normally."""
    import workers.cluster
    import workers.executors
    from workers.jobs.render import main

    retired = []

    class Fake:
        made = 0

        def __init__(self, model, max_streams, max_restarts=0, dtype="float32"):
            Fake.made += 1
            if Fake.made == 2:
                raise RuntimeError("no GPU free for actor 2")

        def retire(self):
            retired.append(self)

    monkeypatch.setattr(workers.executors, "RayExecutor", Fake)
    monkeypatch.setattr(workers.cluster, "connect", lambda address: False)
    manifest = tmp_path / "items.jsonl"
    manifest.write_text(json.dumps({"id": "a", "model": models["diffusion"], "frames": 16}) + "\n")
    out = tmp_path / "out"
    assert main(["--manifest", str(manifest), "--out", str(out), "--actors", "2"]) == 0
    assert len(retired) == 1 and Fake.made == 2
    (row,) = [json.loads(r) for r in (out / "results.jsonl").read_text().splitlines()]
    assert row["status"] == "error" and "no GPU free for actor 2" in row["error"]
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["errors"] == 1


def test_an_actor_restarted_while_idle_is_noticed_and_its_stream_restored(model):
    """Ray restarts a crashed actor (max_restarts) while nothing is in flight: it comes back
    without its streams. The next step's StreamsLost is a failure, not a crash of the loop."""
    req = request_for(model, frames=48)
    (executor,) = local(model)
    orch = Orchestrator([executor], queue_clips=2)
    key = orch.submit(req, sink=QueueSink(capacity=2))
    clips = orch.clips(key)
    first = next(clips)  # the queue fills and the stream waits: the actor is idle
    executor.worker = GeneratorWorker(model, max_streams=4)  # the restarted process
    got = np.concatenate([first.frames] + [c.frames for c in clips])
    assert orch.failures == 1
    np.testing.assert_array_equal(got, reference(model, req))


def test_a_failure_while_restoring_opens_no_stream_twice(model):
    """A second failure inside the first one's re-placing places the executor's streams
    again; a stream still at clip 0 is opened again, which must not leak its first slot."""

    class DiesTwice(LocalExecutor):
        fail_next_step, restores = False, 0

        def step(self, keys, epochs, snapshot_keys):
            if self.fail_next_step:
                self.fail_next_step = False
                self.worker = GeneratorWorker(model, max_streams=4)  # state gone with it
                return self._call(_raise)
            return super().step(keys, epochs, snapshot_keys)

        def restore(self, key, snapshot, timeout=None):
            self.restores += 1
            if self.restores == 1:
                raise ExecutorFailed("died again while restoring")
            super().restore(key, snapshot)

    executor = DiesTwice(GeneratorWorker(model, max_streams=4))
    orch = Orchestrator([executor], queue_clips=2)
    reqs = [request_for(model, frames=24, seed=s) for s in (1, 2)]
    a = orch.submit(reqs[0])
    orch._schedule()
    orch._execute_and_update(0.0)  # a has made clip 0; b below has made nothing
    b = orch.submit(reqs[1])
    executor.fail_next_step = True
    orch._schedule()
    orch._execute_and_update(0.0)
    assert orch.failures == 2
    worker = executor.worker
    assert sorted(worker.streams) == [a, b]
    assert len(worker.generator._streams) == 2  # one generator stream per placed stream
    for key, req in zip((a, b), reqs, strict=True):
        assert_as_alone(frames_of(orch, key), reference(model, req))  # a and b batched


class _Delayed(LocalExecutor):
    """A step is done ``delay`` s after it was submitted (``wait`` answers as ray.wait does:
    what is done now); ``kill`` loses the worker's state as a killed actor does."""

    def __init__(self, worker, delay: float, name: str, hang_at: int = 0) -> None:
        super().__init__(worker, name)
        self.delay, self.kills, self.model = delay, 0, worker.model_name
        # Step call hang_at takes 60 s instead: far past the timeout, so a stalled test process
        # cannot see it finish before the loop looks at it (it is killed and never waited for).
        self.hang_at, self.steps = hang_at, 0

    def step(self, keys, epochs, snapshot_keys):
        self.steps += 1
        handle = super().step(keys, epochs, snapshot_keys)
        handle.at = time.monotonic() + (60.0 if self.steps == self.hang_at else self.delay)
        return handle

    def decode(self, clips):
        handle = super().decode(clips)
        handle.at = time.monotonic()
        return handle

    @staticmethod
    def wait(handles, timeout, first=False):
        end = time.monotonic() + (timeout or 0.0)
        while True:
            done = [h for h in handles if h.at <= time.monotonic()]
            if done or time.monotonic() >= end:
                return done
            time.sleep(0.002)

    def kill(self):
        self.kills += 1
        self.worker = GeneratorWorker(self.model, max_streams=4)


class _SlowSink(QueueSink):
    """A sink whose writes take a while (a segment encoded to a slow disk)."""

    def put(self, clip) -> None:
        time.sleep(0.4)
        super().put(clip)


def test_only_steps_still_running_past_the_timeout_are_killed(model):
    """The loop's own slow work (here: sink writes longer than the timeout) does not make a
    finished step late; a step that really runs past the timeout is killed and its stream
    restored, and the video is the same either way."""
    req = request_for(model, frames=24)
    quick = _Delayed(GeneratorWorker(model, max_streams=4), 0.01, "quick")
    orch = Orchestrator([quick], step_timeout=0.3)
    key = orch.submit(req, sink=_SlowSink(capacity=64))
    orch.run()
    assert quick.kills == 0 and orch.failures == 0
    np.testing.assert_array_equal(
        np.concatenate([c.frames for c in orch.streams[key].sink.queue]), reference(model, req)
    )

    stuck = _Delayed(GeneratorWorker(model, max_streams=4), 0.01, "stuck", hang_at=2)
    orch = Orchestrator([stuck], step_timeout=0.3)
    got = frames_of(orch, orch.submit(req))
    assert stuck.kills == 1 and orch.failures == 1
    np.testing.assert_array_equal(got, reference(model, req))


class _Serial(_Delayed):
    """An actor's one-call-at-a-time: an open or restore waits for the step in flight, and
    raises TimeoutError (as ``ray.get`` does) when that would take past its timeout."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.timeouts, self.in_flight = [], []

    def _queue_behind_steps(self, timeout):
        self.timeouts.append(timeout)
        busy_until = max((h.at for h in self.in_flight if h.at > time.monotonic()), default=0.0)
        wait = busy_until - time.monotonic()
        if timeout is not None and wait > timeout:
            time.sleep(timeout)
            raise TimeoutError(f"open waited {timeout}s for a step")
        time.sleep(max(0.0, wait))

    def step(self, keys, epochs, snapshot_keys):
        handle = super().step(keys, epochs, snapshot_keys)
        self.in_flight.append(handle)
        return handle

    def open(self, key, request, timeout=None):
        self._queue_behind_steps(timeout)
        super().open(key, request)

    def restore(self, key, snapshot, timeout=None):
        self._queue_behind_steps(timeout)
        super().restore(key, snapshot)

    def kill(self):
        super().kill()
        self.in_flight.clear()


def test_an_open_behind_a_hung_step_times_out_and_the_actor_is_killed(model):
    """A stream submitted while its actor's step hangs: the open (which waits for that step)
    gives up after 2 x step_timeout instead of blocking the loop for good, the actor is
    killed and both streams come out whole."""
    first, second = request_for(model, frames=32, seed=1), request_for(model, frames=24, seed=2)
    stuck = _Serial(GeneratorWorker(model, max_streams=4), 0.01, "stuck", hang_at=2)
    orch = Orchestrator([stuck], step_timeout=0.3)
    a = orch.submit(first, sink=QueueSink(capacity=64))
    orch.run(until=lambda: stuck.steps >= 2)  # step 2, the hung one, is in flight
    started = time.monotonic()
    b = orch.submit(second, sink=QueueSink(capacity=64))
    assert time.monotonic() - started < 30  # not the 60 s of the hung step
    assert stuck.timeouts[-2:] == [0.6, 0.6]  # the open that timed out, then the retry
    assert stuck.kills == 1 and orch.failures == 1
    orch.run()
    for key, req in ((a, first), (b, second)):
        got = np.concatenate([c.frames for c in orch.streams[key].sink.queue])
        assert_as_alone(got, reference(model, req))  # batched with each other


def test_an_abandoned_iterator_frees_its_stream_and_render_waits_only_for_its_own(model, tmp_path):
    """A caller that stops taking a stream's clips (a break) releases it and its slot; a
    render on an orchestrator with another stream nobody is reading still finishes."""
    orch = Orchestrator(local(model))
    (executor,) = orch.executors
    clips = orch.clips(orch.submit(request_for(model, frames=48)))
    next(clips)
    clips.close()  # what dropping the iterator (a break out of a for loop) does
    assert orch.streams == {} and executor.worker.streams == {}
    unread = orch.submit(request_for(model, frames=48, seed=9))  # its queue fills, then waits
    good = request_for(model, frames=24)
    render(orch, good, tmp_path / "v.mp4", lossless=True, progress=False)
    # Both were batched with each other while they ran together.
    assert_as_alone(read_video(tmp_path / "v.mp4").numpy(), reference(model, good))
    assert list(orch.streams) == [unread]
    assert_as_alone(
        frames_of(orch, unread), reference(model, request_for(model, frames=48, seed=9))
    )


def test_resuming_with_the_other_lossless_setting_is_refused(models, tmp_path):
    model = models["diffusion"]
    req = request_for(model, frames=48)
    out = tmp_path / "v.mp4"
    orch = Orchestrator(local(model))

    def crash_after_a_segment(until=None, poll=0.05):
        run(until=lambda: any(parts_folder(out).glob("part_*.mp4")))
        raise Crash

    run, orch.run = orch.run, crash_after_a_segment
    with pytest.raises(Crash):
        render(orch, req, out, segment_clips=1, lossless=True, progress=False)
    with pytest.raises(ValueError, match="lossless=true: resume with the same setting"):
        render(Orchestrator(local(model)), req, out, progress=False)
    render(Orchestrator(local(model)), req, out, lossless=True, progress=False)
    np.testing.assert_array_equal(read_video(out).numpy(), reference(model, req))


def test_a_batch_item_that_cannot_be_joined_is_an_error_and_the_rest_go_on(
    models, tmp_path, monkeypatch
):
    from workers import render as render_module
    from workers.jobs.render import Results, parse_manifest, run_batch

    join = render_module.concat_videos

    def join_fails_for_a(paths, out, **kwargs):
        if Path(out).name == "a.mp4":
            raise OSError("disk full")
        return join(paths, out, **kwargs)

    monkeypatch.setattr(render_module, "concat_videos", join_fails_for_a)
    lines = [
        {"id": i, "model": models["diffusion"], "frames": 16, "label": 1, "steps": 2, "seed": s}
        for s, i in enumerate("ab")
    ]
    manifest = tmp_path / "items.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").write_text('{"id": "x", "status": "o')  # cut by a crash
    rows = run_batch(
        parse_manifest(manifest, out, max_frames=1000),
        out,
        lambda m: [LocalExecutor(GeneratorWorker(m, max_streams=2))],
    )
    assert {r["id"]: r["status"] for r in rows} == {"a": "error", "b": "ok"}
    error = next(r["error"] for r in rows if r["id"] == "a")
    assert "IncompleteRender" in error and "joining its segments failed (disk full)" in error
    assert (out / "b.mp4").exists() and parts_folder(out / "a.mp4").exists()
    assert Results(out / "results.jsonl").ok == {"b"}  # no row joined to the cut line


def test_a_step_that_always_fails_is_given_up_on_and_progress_resets_the_count(model, tmp_path):
    """The loop restored and retried a stream whose step always failed forever (with
    replacement, one new actor per try); failures separated by progress are not counted
    together, and a render that gives up keeps its finished segments."""

    req = request_for(model, frames=48)  # 6 clips
    # Failures at calls 2, 4, 6, 8: each followed by a good step.
    # (max_streams 8: Flaky drops the worker's streams but not their cache slots)
    spaced = Flaky(GeneratorWorker(model, max_streams=8), fail_at={2, 4, 6, 8})
    orch = Orchestrator([spaced], max_failures=2)
    np.testing.assert_array_equal(frames_of(orch, orch.submit(req)), reference(model, req))
    # From call 3 on every step fails: given up at the max_failures-th in a row.
    poison = Flaky(GeneratorWorker(model, max_streams=4), fail_at=set(range(3, 100)))
    orch = Orchestrator([poison], max_failures=3)
    out = tmp_path / "v.mp4"
    with pytest.raises(NoProgress, match="3 executor failures in a row"):
        render(orch, req, out, segment_clips=1, progress=False)
    assert poison.calls == 5  # 2 good steps, then 3 failed ones; no more
    assert not out.exists() and len(list(parts_folder(out).glob("*.mp4"))) == 2
    with pytest.raises(ValueError, match="max_failures"):
        Orchestrator(local(model), max_failures=0)
    with pytest.raises(ValueError, match="step_timeout"):
        Orchestrator(local(model), step_timeout=-1)


class _BrokenOnce(QueueSink):
    """Raises on its second put (a write error), then works."""

    def __init__(self) -> None:
        super().__init__(capacity=64)  # holds a whole test video
        self.puts = 0

    def put(self, clip):
        self.puts += 1
        if self.puts == 2:
            raise OSError("disk full")
        super().put(clip)


def test_a_clip_whose_sink_raised_is_delivered_on_the_next_run(model):
    """The frames were taken out before the sink had them: a sink error lost that clip for
    good and the next run stalled waiting for it."""
    req = request_for(model, frames=32)
    orch = Orchestrator(local(model))
    sink = _BrokenOnce()
    key = orch.submit(req, sink=sink)
    with pytest.raises(SinkError, match="OSError: disk full"):
        orch.run()
    orch.run()
    assert [c.clip for c in sink.queue] == list(range(orch.streams[key].num_clips))
    got = np.concatenate([c.frames for c in sink.queue])
    np.testing.assert_array_equal(got, reference(model, req))
    orch.forget(key)


def test_clips_checks_its_key_when_called(model):
    orch = Orchestrator(local(model))
    with pytest.raises(KeyError, match="stream 12345 is unknown"):
        orch.clips(12345)  # not at the first next()


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--actors", "0"),
        ("--segment-clips", "0"),
        ("--max-frames", "-5"),
        ("--max-streams", "0"),
        ("--snapshot-every", "0"),
        ("--max-restarts", "-1"),
        ("--step-timeout", "-1"),
        ("--step-timeout", "inf"),  # an OverflowError in Ray's wait took the batch down
        ("--max-streams", "99999999999999999999"),  # failed inside each actor
        ("--max-restarts", "99999999999999999999"),
    ],
)
def test_batch_flags_are_checked_before_anything_runs(tmp_path, capsys, flag, value):
    """Each became one error row per item (or, for --step-timeout, every step overdue) and
    an exit code of 0."""
    from workers.jobs.render import main

    manifest = tmp_path / "items.jsonl"
    manifest.write_text('{"id": "a", "model": "ca2vdm-tiny", "frames": 16}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["--manifest", str(manifest), "--out", str(tmp_path / "out"), flag, value])
    assert exit_info.value.code == 2
    assert f"{flag} must be" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_batch_out_that_is_a_file_exits_2_before_ray(tmp_path, capsys, monkeypatch):
    """It was a FileExistsError traceback (exit 1) once Ray had started."""
    import workers.cluster
    from workers.jobs.render import main

    monkeypatch.setattr(workers.cluster, "connect", lambda address: pytest.fail("connected"))
    manifest = tmp_path / "items.jsonl"
    manifest.write_text('{"id": "a", "model": "ca2vdm-tiny", "frames": 16}\n')
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        main(["--manifest", str(manifest), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--out" in err and "is a file" in err


@pytest.mark.parametrize(
    "refusal",
    [
        ConnectionError("Could not find any running Ray instance."),
        ValueError("Invalid address format: foo"),  # Ray's for an address it cannot parse
    ],
)
def test_a_batch_with_no_cluster_at_its_address_makes_no_out_folder(
    refusal, tmp_path, capsys, monkeypatch
):
    import workers.cluster
    from workers.jobs.render import main

    def no_cluster(address):
        raise refusal

    monkeypatch.setattr(workers.cluster, "connect", no_cluster)
    manifest = tmp_path / "items.jsonl"
    manifest.write_text('{"id": "a", "model": "ca2vdm-tiny", "frames": 16}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["--manifest", str(manifest), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert str(refusal) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_actors_refusal_is_recorded_as_the_refusal_not_rays_traceback():
    from ray.exceptions import RayTaskError

    from workers.jobs.render import _describe

    cause = ValueError("label must be in [1, 4], got 99")
    trace = "Traceback (most recent call last):\n  File actor.py\n\x1b[36mray::open\x1b[39m"
    wrapped = RayTaskError("GeneratorWorker.open", trace, cause).as_instanceof_cause()
    assert _describe(wrapped) == "ValueError: label must be in [1, 4], got 99"
    assert _describe(OSError("disk full")) == "OSError: disk full"


def test_a_worker_step_with_bad_arguments_changes_no_stream(model):
    """Epochs and snapshot keys were checked after the generator had stepped: the stream
    advanced and its clip was lost."""
    worker = GeneratorWorker(model, max_streams=2)
    worker.open(0, request_for(model, frames=16))
    for epochs, snaps, message in (([], [], "epochs must have one entry"), ([0], [7], "snapshot")):
        with pytest.raises(ValueError, match=message):
            worker.step([0], epochs, snaps)
        assert worker.streams[0].clip == 0
    assert [c.clip for c in worker.step([0], [0], [0]).clips] == [0]


def test_a_request_for_another_model_is_refused(models):
    """Its frames would come from these executors' weights, labelled as the other model's."""
    orch = Orchestrator(local(models["diffusion"]))
    with pytest.raises(ValueError, match="these executors serve"):
        orch.submit(request_for(models["tokens"], frames=16))
    assert orch.streams == {}
    same = request_for(str(Path(models["diffusion"]).resolve()), frames=16)  # another spelling
    orch.cancel(orch.submit(same))


def test_an_interrupted_render_frees_its_stream_and_a_gap_in_its_segments_is_refused(
    model, tmp_path
):
    """An interrupted render left its stream in the shared orchestrator, which the next
    render drove on into the old folder; a folder whose truth outlived a segment (a kill
    while it was removed) was joined around the gap into a short video."""
    req = request_for(model, frames=32)
    out = tmp_path / "v.mp4"
    orch = Orchestrator(local(model))
    run = orch.run

    def crash_after_segments(until=None, poll=0.05):
        run(until=lambda: len(list(parts_folder(out).glob("part_*.mp4"))) >= 2)
        raise Crash

    orch.run = crash_after_segments
    with pytest.raises(Crash):
        render(orch, req, out, segment_clips=1, lossless=True, progress=False)
    assert orch.streams == {}  # cancelled, its slot freed
    orch.run = run
    other = tmp_path / "w.mp4"
    render(orch, request_for(model, frames=16, seed=4), other, lossless=True, progress=False)
    assert len(list(parts_folder(out).glob("part_*.mp4"))) == 2  # untouched by that render
    sorted(parts_folder(out).glob("part_*.mp4"))[0].unlink()
    with pytest.raises(ValueError, match="missing clips 0..0"):
        render(Orchestrator(local(model)), req, out, lossless=True, progress=False)
    assert not out.exists()


def test_two_renders_of_one_out_at_once_are_refused(model, tmp_path):
    from workers.render import RenderJob, lock_file

    out = tmp_path / "v.mp4"
    orch = Orchestrator(local(model))
    first = RenderJob(request_for(model, frames=16), out, progress=False)
    first.start(orch)
    second = RenderJob(request_for(model, frames=16), out, progress=False)
    with pytest.raises(ValueError, match="being rendered by another process"):
        second.start(orch)
    orch.run(until=lambda: first.done)
    first.finish()
    assert not lock_file(out).exists() and not parts_folder(out).exists()
    assert len(read_video(out)) == 16


def test_a_segment_write_that_failed_is_not_written_twice(tmp_path):
    from workers.render import SegmentSink

    flushed = []
    sink = SegmentSink(tmp_path, 8, 4, 0, flushed.append, lossless=True)
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    sink.put(Clip(0, 0, frames))
    with pytest.raises(ValueError):
        sink.put(Clip(0, 1, np.zeros((2, 8, 8, 3), np.uint8)))  # another size: refused
    with pytest.raises(RuntimeError, match="a segment write failed before"):
        sink.put(Clip(0, 1, frames))
    assert not list(tmp_path.glob("part_*.mp4")) and not flushed


def test_a_step_result_or_decode_that_arrives_twice_is_applied_once(model):
    """DESIGN.md section 6's guards beyond the epoch: a step result for a clip already in
    the truth (same epoch) and frames of a clip already delivered (a re-decode after a
    failover racing the first) are dropped, so each clip reaches the sink once."""
    orch = Orchestrator(local(model))
    key = orch.submit(request_for(model, frames=16), sink=QueueSink(capacity=64))
    orch._schedule()
    (step,) = orch.work
    orch.work.clear()
    out = orch.executors[0].result(step.handle)
    orch._apply_step(step, out)
    orch._apply_step(step, out)  # the same result again
    s = orch.streams[key]
    assert s.accepted == 1 and s.truth.next_clip == 1
    (decode,) = orch.work
    orch.work.clear()
    frames = orch.executors[0].result(decode.handle)
    orch._apply_frames(decode, frames)
    orch._apply_frames(decode, frames)  # a duplicate decode of the delivered clip
    assert [c.clip for c in s.sink.queue] == [0] and s.delivered == 1 and not s.frames
    orch.run()
    assert [c.clip for c in s.sink.queue] == list(range(s.num_clips))


def test_a_batch_item_finished_but_not_recorded_is_recorded_not_rendered_again(models, tmp_path):
    """A kill after an item's video was joined (parts folder gone) but before its row was
    written: the re-run finds the mp4 and its sidecar and records them; another request or
    the other lossless setting under the same id renders anew."""
    from workers.jobs.render import parse_manifest, run_batch

    line = {"id": "a", "model": models["diffusion"], "frames": 16, "steps": 2}
    manifest = tmp_path / "items.jsonl"
    manifest.write_text(json.dumps(line) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    steps = []

    def executors_for(m):
        worker = GeneratorWorker(m, max_streams=2)
        real = worker.step
        worker.step = lambda *args: steps.append(1) or real(*args)
        return [LocalExecutor(worker)]

    (first,) = run_batch(parse_manifest(manifest, out, 1000), out, executors_for, lossless=True)
    made = len(steps)
    (out / "results.jsonl").unlink()  # as if killed before the row was written
    (again,) = run_batch(parse_manifest(manifest, out, 1000), out, executors_for, lossless=True)
    assert again["status"] == "ok" and len(steps) == made  # nothing rendered
    assert again["provenance"] == first["provenance"] and again["frames"] == 16
    (out / "results.jsonl").unlink()
    (other,) = run_batch(parse_manifest(manifest, out, 1000), out, executors_for)  # lossy
    assert other["status"] == "ok" and len(steps) == 2 * made


def test_a_render_removes_the_temp_files_a_killed_one_left(model, tmp_path):
    """A SIGKILL mid-write leaves hidden temp files (a segment, a truth, the joined video,
    the sidecar) that nothing would ever remove; another out's are left alone."""
    out = tmp_path / "v.mp4"
    folder = parts_folder(out)
    folder.mkdir()
    stale = [
        folder / ".part_000000000.0123abcd.tmp.mp4",
        folder / ".tmpk2j3h4",  # safetensors' own, left by older versions
        tmp_path / ".v.0123abcd.tmp.mp4",
        tmp_path / ".v.89abcdef.tmp",
    ]
    others = [tmp_path / ".v.x.0123abcd.tmp.mp4", tmp_path / ".w.0123abcd.tmp.mp4"]
    for path in stale + others:
        path.write_bytes(b"x" * 100)
    render(Orchestrator(local(model)), request_for(model, frames=8), out, progress=False)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in others)


def test_an_abandoned_render_discards_its_open_segment_at_once(model, tmp_path):
    """abandon() left the open segment's writer (and its hidden temp file) to the cyclic
    collector (job -> sink -> on_clip -> job); a resume then renders the video exactly."""
    import gc

    from workers.render import RenderJob

    out, request = tmp_path / "v.mp4", request_for(model, frames=24)
    orch = Orchestrator(local(model))
    job = RenderJob(request, out, segment_clips=4, lossless=True, progress=False)
    job.start(orch)
    orch.run(until=lambda: job.sink.clips == 2)  # two clips in the open segment
    gc.disable()  # the collector would close it in its own time
    try:
        job.abandon()
        assert not [p.name for p in parts_folder(out).iterdir() if p.name.startswith(".")]
    finally:
        gc.enable()
    with pytest.raises(RuntimeError, match="abandoned"):
        job.sink.put(Clip(0, 2, np.zeros((8, 32, 32, 3), np.uint8)))
    render(Orchestrator(local(model)), request, out, lossless=True, progress=False)
    np.testing.assert_array_equal(read_video(out).numpy(), reference(model, request))


def test_a_truth_that_failed_to_save_does_not_let_a_clip_in_twice(model, tmp_path):
    """The segment was out but its truth save raised: the clip, given again by the next
    run, went into the next segment a second time."""
    from workers.render import SegmentSink

    saved = []

    def save(clips):
        if clips == 2:
            raise OSError("disk full")
        saved.append(clips)

    sink = SegmentSink(tmp_path, 8, 1, 0, save, lossless=True)
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    sink.put(Clip(0, 0, frames))
    with pytest.raises(OSError, match="disk full"):
        sink.put(Clip(0, 1, frames))
    with pytest.raises(RuntimeError):
        sink.put(Clip(0, 1, frames))  # the same clip again
    with pytest.raises(RuntimeError, match="expected clip 0, got clip 1"):
        SegmentSink(tmp_path / "b", 8, 1, 0, save).put(Clip(0, 1, frames))
    assert saved == [1]


def test_the_render_lock_is_not_won_on_a_file_its_holder_removed(tmp_path, monkeypatch):
    """B opened the lock file, then A removed it and let go, then B's flock succeeded on
    the removed file while C could lock a new one: two holders. A lock counts only on the
    file at its path, so B takes that one."""
    import fcntl
    import os

    from workers.render import _lock, lock_file

    out = tmp_path / "v.mp4"
    a = _lock(out)
    real, calls = fcntl.flock, []

    def a_lets_go_first(fd, op):
        if not calls:  # between B's open and B's flock
            lock_file(out).unlink()
            os.close(a)
        calls.append(fd)
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", a_lets_go_first)
    b = _lock(out)
    assert len(calls) == 2  # the lock won on the removed file was given up, and retried
    assert os.fstat(b).st_ino == os.stat(lock_file(out)).st_ino
    monkeypatch.undo()
    with pytest.raises(ValueError, match="being rendered by another process"):
        _lock(out)  # C does not get it
    os.close(b)


def test_an_address_where_nothing_answers_is_named_at_once(monkeypatch):
    """address=127.0.0.1:1 with no cluster there: Ray retried for minutes (a render hung,
    then took half a minute more to die on SIGTERM)."""
    import socket

    import workers.cluster as cluster

    inits = []
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster.ray, "init", lambda **kwargs: inits.append(kwargs))
    monkeypatch.setattr(cluster.ray, "cluster_resources", lambda: {})
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        start = time.monotonic()
        with pytest.raises(ConnectionError, match=f"nothing answers at 127.0.0.1:{port}"):
            cluster.connect(address)
        assert time.monotonic() - start < 5 and not inits
    with socket.socket() as listening:  # a cluster there: Ray is asked to join it
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        assert cluster.connect(address) is True and inits[-1]["address"] == address
    assert cluster.connect("auto") is True  # no host:port: Ray finds it


def test_connecting_keeps_the_callers_sigterm_handler(monkeypatch):
    """ray.init puts its own SIGTERM handler (sys.exit(15)) over the caller's, so a `vidgen
    render` stopped by SIGTERM left through SystemExit, past the Ctrl-C handling that keeps
    its segments and says how to resume. connect puts the caller's handler back; with none
    set (the default) Ray's stays."""
    import signal

    import workers.cluster as cluster

    def rays_handler(signum, frame):
        raise SystemExit(signum)

    def fake_init(**kwargs):  # what ray.init does to the handler, on the main thread
        signal.signal(signal.SIGTERM, rays_handler)

    def callers_handler(signum, frame):
        raise KeyboardInterrupt

    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster.ray, "init", fake_init)
    monkeypatch.setattr(cluster.ray, "cluster_resources", lambda: {})
    before = signal.getsignal(signal.SIGTERM)
    try:
        for address in ("", "auto"):
            signal.signal(signal.SIGTERM, callers_handler)
            assert cluster.connect(address) is True
            assert signal.getsignal(signal.SIGTERM) is callers_handler
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        assert cluster.connect("auto") is True
        assert signal.getsignal(signal.SIGTERM) is rays_handler
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_local_ray_start_that_times_out_is_tried_again(monkeypatch):
    """Ray's fixed 30 s node registration can miss on a loaded machine; connect("") tries a
    local start again (after a shutdown) up to `attempts` times, and other errors at once."""
    import subprocess
    import sys

    import workers.cluster as cluster

    calls, shutdowns, spawned, others = [], [], [], []
    timeout = Exception("The current node timed out during startup. This could happen ...")

    def fake_init(**kwargs):
        calls.append(kwargs)
        if len(calls) <= failures:
            # A failed start leaves its node's processes running, unknown to ray.shutdown.
            ray_file = os.path.join(os.path.dirname(cluster.ray.__file__), "_private", "node.py")
            cmd = [sys.executable, "-c", "import time; time.sleep(120)", ray_file]
            spawned.append(subprocess.Popen(cmd))
            # Not Ray's, though "ray" is in its command line: another thread's child started
            # meanwhile is left alone.
            bystander = [sys.executable, "-c", "import time; time.sleep(120)", "--array-size=3"]
            others.append(subprocess.Popen(bystander))
            raise error

    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster.ray, "init", fake_init)
    monkeypatch.setattr(cluster.ray, "shutdown", lambda: shutdowns.append(1))
    monkeypatch.setattr(cluster.ray, "cluster_resources", lambda: {})

    failures, error = 2, timeout
    assert cluster.connect("", num_cpus=2, num_gpus=1) is True
    assert len(calls) == 3 and len(shutdowns) == 2
    assert calls[-1]["address"] == "local" and calls[-1]["num_gpus"] == 1
    assert len(spawned) == 2 and all(p.wait(timeout=10) is not None for p in spawned)
    assert len(others) == 2 and all(p.poll() is None for p in others)
    for p in others:
        p.kill()
        p.wait()
    others.clear()

    calls.clear()
    spawned.clear()
    failures = 3
    with pytest.raises(Exception, match="timed out during startup"):
        cluster.connect("", attempts=3)
    assert len(calls) == 3  # the last try's processes are stopped too
    assert len(spawned) == 3 and all(p.wait(timeout=10) is not None for p in spawned)

    calls.clear()
    spawned.clear()
    failures, error = 1, ValueError("bad num_gpus")
    with pytest.raises(ValueError, match="bad num_gpus"):
        cluster.connect("")
    assert len(calls) == 1
    for p in spawned + others:  # not a startup timeout: left alone (here: by the test)
        p.kill()
        p.wait()


def test_many_failures_in_a_row_end_in_no_progress_not_a_recursion_error(model):
    """Each failure while restoring a failed executor's streams nested one more _fail: past
    about 500 failures (max_failures=1000) that was a RecursionError, not NoProgress."""

    class RestoreAlwaysFails(LocalExecutor):
        steps = 0

        def step(self, keys, epochs, snapshot_keys):
            self.steps += 1
            if self.steps == 2:  # dies; comes back (recover) without its streams
                self.worker = GeneratorWorker(model, max_streams=4)
                return self._call(_raise)
            return super().step(keys, epochs, snapshot_keys)

        def restore(self, key, snapshot, timeout=None):
            raise ExecutorFailed("died while restoring")

    executor = RestoreAlwaysFails(GeneratorWorker(model, max_streams=4))
    orch = Orchestrator([executor], max_failures=1000)
    key = orch.submit(request_for(model, frames=24))
    with pytest.raises(NoProgress, match="1000 executor failures in a row"):
        frames_of(orch, key)
    assert orch.failures == 1000


class _HungDecode(_Delayed):
    """Decode call number ``hang`` never ends (the actor's decode thread is stuck)."""

    def __init__(self, *args, hang: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hang, self.decodes = hang, 0

    def decode(self, clips):
        self.decodes += 1
        handle = super().decode(clips)
        if self.decodes == self.hang:
            handle.at = time.monotonic() + 600.0
        return handle


@pytest.mark.parametrize("hang", [1, 3])
def test_a_hung_decode_is_timed_out_like_a_step(models, hang):
    """With nothing else in flight (the last clip's decode, or the first's while the stream
    waits on its queue), a decode that never ended stalled the loop for good: it now gets 2 x
    step_timeout from when it started running, then its executor is killed and it is redone."""
    model = models["diffusion"]
    req = request_for(model, frames=24)
    stuck = _HungDecode(GeneratorWorker(model, max_streams=4), 0.01, "stuck", hang=hang)
    orch = Orchestrator([stuck], step_timeout=0.3, queue_clips=1)
    started = time.monotonic()
    got = frames_of(orch, orch.submit(req))
    assert time.monotonic() - started < 60
    assert stuck.kills == 1 and orch.failures == 1
    np.testing.assert_array_equal(got, reference(model, req))


def test_a_stream_waiting_for_its_reader_is_not_given_up_while_its_executor_makes_clips(models):
    """Y's reader is away (its queue is full, so it is not stepped); its executor dies now
    and then and makes clips for Z between deaths. Those deaths are not "in a row" for Y:
    before, its third one raised NoProgress and stopped both streams."""
    model = models["diffusion"]

    class DiesEveryThirdStep(LocalExecutor):
        steps = 0

        def step(self, keys, epochs, snapshot_keys):
            self.steps += 1
            if self.steps % 3 == 0:  # a transient death: back at once, without its streams
                self.worker = GeneratorWorker(model, max_streams=4)
                return self._call(_raise)
            return super().step(keys, epochs, snapshot_keys)

    executor = DiesEveryThirdStep(GeneratorWorker(model, max_streams=4))
    orch = Orchestrator([executor], max_failures=3, queue_clips=2)
    ry, rz = request_for(model, frames=24, seed=1), request_for(model, frames=64, seed=2)
    y = orch.submit(ry, sink=QueueSink(capacity=2))
    z = orch.submit(rz, sink=QueueSink(capacity=64))
    orch.run(until=lambda: orch.streams[z].done)  # nobody reads Y meanwhile
    assert orch.failures >= 3 and orch.streams[y].delivered == 2
    got_y = frames_of(orch, y)
    got_z = np.concatenate([c.frames for c in orch.streams[z].sink.queue])
    for got, req in ((got_y, ry), (got_z, rz)):
        diff = np.abs(got.astype(int) - reference(model, req))
        assert diff.max() <= 2 and (diff == 0).mean() > 0.99  # batched vs alone


def test_no_progress_for_one_stream_leaves_the_others_whole(model):
    """A dies decoding Q's only clip, and again restoring P (a nested failure): P is given
    up on (max_failures=2). The decode lost with A is redone before NoProgress is raised, so
    once P is cancelled (as a failed render's abandon does) Q still finishes. Before, Q's
    clip was never decoded again and run() said nothing could run."""

    class DiesDecodingThenRestoring(LocalExecutor):
        decodes = restores = 0

        def decode(self, clips):
            self.decodes += 1
            if self.decodes == 1:
                self.worker = GeneratorWorker(model, max_streams=4)
                return self._call(_raise)
            return super().decode(clips)

        def restore(self, key, snapshot, timeout=None):
            self.restores += 1
            if self.restores == 1:
                self.worker = GeneratorWorker(model, max_streams=4)
                raise ExecutorFailed("died again while restoring")
            super().restore(key, snapshot)

    executor = DiesDecodingThenRestoring(GeneratorWorker(model, max_streams=4))
    orch = Orchestrator([executor], max_failures=2)
    rp, rq = request_for(model, frames=48, seed=1), request_for(model, frames=8, seed=2)
    p = orch.submit(rp, sink=QueueSink(capacity=64))
    q = orch.submit(rq, sink=QueueSink(capacity=64))
    with pytest.raises(NoProgress):
        orch.run()
    orch.cancel(p)
    orch.run()
    got = np.concatenate([c.frames for c in orch.streams[q].sink.queue])
    diff = np.abs(got.astype(int) - reference(model, rq))
    assert diff.max() <= 2 and (diff == 0).mean() > 0.99  # batched vs alone


def test_a_last_segment_that_failed_to_close_is_never_published_short(model, tmp_path, monkeypatch):
    """The close of the last, partial segment raised inside the sink's finish: the stream
    still counted as done, and finish joined the segments on disk into a short video,
    removing the parts folder a re-run would resume from."""
    import workers.render as R
    from vidgen.io import VideoWriter

    clip = load_generator(model, 1).clip_len
    req = request_for(model, frames=10 * clip)
    last = 8  # segments of 4 clips: the last one (clips 8 and 9) is partial
    real_close, failed = VideoWriter.close, []

    def close(self):
        if self.path.name == R.segment_name(last) and not failed:
            failed.append(self.path)
            self.abort()
            raise OSError("disk full")
        return real_close(self)

    monkeypatch.setattr(VideoWriter, "close", close)
    orch = Orchestrator(local(model))
    out = tmp_path / "v.mp4"
    job = R.RenderJob(req, out, segment_clips=4, lossless=True, progress=False)
    job.start(orch)
    with pytest.raises(SinkError, match="disk full"):
        orch.run(until=lambda: job.done)
    orch.run(until=lambda: job.done)  # as a caller retrying after a sink error does
    assert failed and job.done
    with pytest.raises(R.IncompleteRender, match="do not hold all 10 clips"):
        job.finish()
    job.abandon()
    assert not out.exists() and parts_folder(out).exists()
    monkeypatch.setattr(VideoWriter, "close", real_close)
    again = render(Orchestrator(local(model)), req, out, segment_clips=4, lossless=True)
    np.testing.assert_array_equal(read_video(again.path).numpy(), reference(model, req))


def test_a_start_that_fails_after_submitting_leaves_no_stream_behind(model, tmp_path, monkeypatch):
    """A guard write failed after the stream was submitted: the stream went on writing
    segments into the unlocked folder, without that guard."""
    import workers.render as R

    real = R._write_text

    def write_text(path, text):
        if path.name == "model.sha256":
            raise OSError("disk full")
        return real(path, text)

    monkeypatch.setattr(R, "_write_text", write_text)
    orch = Orchestrator(local(model))
    job = R.RenderJob(request_for(model, frames=16), tmp_path / "a.mp4", 1, progress=False)
    with pytest.raises(OSError, match="disk full"):
        job.start(orch)
    assert orch.streams == {} and not R.lock_file(tmp_path / "a.mp4").exists()
    monkeypatch.setattr(R, "_write_text", real)
    render(orch, request_for(model, frames=16, seed=7), tmp_path / "b.mp4", progress=False)
    assert not any(parts_folder(tmp_path / "a.mp4").glob("part_*"))


def test_one_batch_items_write_error_fails_that_item_alone(models, tmp_path, monkeypatch):
    """A truth save that raised (disk full) escaped the batch: no row for any item, and the
    other items' locks stayed held."""
    import workers.render as R
    from workers.jobs.render import parse_manifest, run_batch

    model = models["diffusion"]
    real = R.save_snapshot

    def save(path, truth):
        if ".a.mp4.parts" in str(path):
            raise OSError("disk full")
        return real(path, truth)

    monkeypatch.setattr(R, "save_snapshot", save)
    lines = [
        {"id": i, "model": model, "frames": 16, "label": 1, "steps": 2, "seed": s}
        for s, i in enumerate("abc")
    ]
    manifest = tmp_path / "items.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    out = tmp_path / "out"
    out.mkdir()

    def executors_for(m):
        return [LocalExecutor(GeneratorWorker(m, max_streams=2))]

    rows = run_batch(parse_manifest(manifest, out, 1000), out, executors_for, segment_clips=1)
    status = {r["id"]: r["status"] for r in rows}
    assert status == {"a": "error", "b": "ok", "c": "ok"}
    assert "OSError: disk full" in next(r["error"] for r in rows if r["id"] == "a")
    assert not list(out.glob("*.lock")) and parts_folder(out / "a.mp4").exists()
    monkeypatch.setattr(R, "save_snapshot", real)  # room again: the re-run resumes a
    (row,) = run_batch(parse_manifest(manifest, out, 1000), out, executors_for, segment_clips=1)
    assert row["id"] == "a" and row["status"] == "ok"


def test_queue_clips_must_hold_a_clip(model):
    with pytest.raises(ValueError, match="queue_clips must be >= 1, got 0"):
        Orchestrator(local(model), queue_clips=0)


class _DiesOnSeed(LocalExecutor):
    """A step that holds a stream of seed ``poison`` kills the actor (it comes back at once,
    empty): that stream's own steps always fail, whatever it is batched with."""

    def __init__(self, model: str, poison: int, max_streams: int = 4) -> None:
        super().__init__(GeneratorWorker(model, max_streams=max_streams))
        self.model, self.poison, self.max_streams = model, poison, max_streams

    def step(self, keys, epochs, snapshot_keys):
        streams = self.worker.streams
        if any(k in streams and streams[k].request.seed == self.poison for k in keys):
            self.worker = GeneratorWorker(self.model, max_streams=self.max_streams)
            return self._call(_raise)
        return super().step(keys, epochs, snapshot_keys)


def _poisoned_pair(model: str):
    """A good stream Q and a poison one P (seed 666) on one ``_DiesOnSeed`` executor:
    (executor, orchestrator, Q's request, Q's key, P's key)."""
    executor = _DiesOnSeed(model, poison=666)
    orch = Orchestrator([executor], max_failures=3)
    rq = request_for(model, frames=32, seed=1)
    q = orch.submit(rq, sink=QueueSink(capacity=64))
    p = orch.submit(request_for(model, frames=32, seed=666), sink=QueueSink(capacity=64))
    return executor, orch, rq, q, p


def test_no_progress_names_the_stream_whose_steps_fail_not_its_batch(models):
    """Q and poison P stepped in one batch: every failure counted against both, NoProgress
    named whichever came first (Q) and left Q at max_failures, so after P was cancelled Q's
    next failure-free run still raised. Now the batch's streams go one at a time after a
    failure: P is named, and Q finishes with its own frames."""

    model = models["diffusion"]
    _, orch, rq, q, p = _poisoned_pair(model)
    with pytest.raises(NoProgress, match=f"stream {p} went through 3") as caught:
        orch.run()
    assert caught.value.key == p and orch.streams[q].failures == 0
    orch.cancel(p)
    orch.run()
    got = np.concatenate([c.frames for c in orch.streams[q].sink.queue])
    assert_as_alone(got, reference(model, rq))


def test_a_batch_item_whose_steps_always_fail_fails_alone(models, tmp_path):
    """A poison item made every item of its model an error row (NoProgress is a
    NoExecutorsLeft: "every actor is gone"), those on healthy actors and those waiting
    included, on every re-run."""
    from workers.jobs.render import parse_manifest, run_batch

    model = models["diffusion"]
    lines = [
        {"id": "good-a", "model": model, "frames": 24, "seed": 1, "steps": 2},
        {"id": "poison", "model": model, "frames": 24, "seed": 666, "steps": 2},
        {"id": "good-c", "model": model, "frames": 24, "seed": 3, "steps": 2},
    ]
    manifest = tmp_path / "items.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    executors = [_DiesOnSeed(model, poison=666, max_streams=1) for _ in range(2)]
    rows = run_batch(parse_manifest(manifest, out, 1000), out, lambda m: executors, lossless=True)
    status = {r["id"]: r["status"] for r in rows}
    assert status == {"good-a": "ok", "poison": "error", "good-c": "ok"}
    error = next(r["error"] for r in rows if r["id"] == "poison")
    assert "executor failures in a row (on 2 executors)" in error  # tried on the other too
    for item in ("good-a", "good-c"):
        req = request_for(model, frames=24, seed=int(item == "good-c") * 2 + 1, label=None)
        assert_as_alone(read_video(out / f"{item}.mp4").numpy(), reference(model, req))


def _finish_all(orch: Orchestrator, keys: list[int]) -> dict[int, np.ndarray]:
    """Run every stream to its end; the frames of each (all sinks hold every clip)."""
    orch.run()
    return {k: np.concatenate([c.frames for c in orch.streams[k].sink.queue]) for k in keys}


@pytest.mark.parametrize("replaced", [False, True])
def test_an_executor_that_fails_every_step_is_retired_and_its_streams_finish(models, replaced):
    """An actor that restarts but fails every step wore out every stream placed on it: each
    was stepped alone until it reached max_failures and was given up on (a review's batch:
    6 of 8 items errors). Now a stream at max_failures on it moves to the other executor, and
    once one has made a clip there, the executor's next failure (past max_failures in a row)
    retires it (replaced when it can be, else dropped while another is left): no stream is
    lost."""
    model = models["diffusion"]
    broken = Flaky(GeneratorWorker(model, max_streams=8), fail_at=set(range(1, 1000)))
    good = LocalExecutor(GeneratorWorker(model, max_streams=8))
    fresh: list[LocalExecutor] = []

    def replace(failed):
        fresh.append(LocalExecutor(GeneratorWorker(model, max_streams=8)))
        return fresh[-1]

    orch = Orchestrator([broken, good], max_failures=3, replace=replace if replaced else None)
    reqs = [request_for(model, frames=24, seed=s) for s in range(4)]
    keys = [orch.submit(r, sink=QueueSink(capacity=64)) for r in reqs]
    assert {orch.streams[k].executor for k in keys} == {0, 1}  # half on the broken one
    got = _finish_all(orch, keys)
    for key, req in zip(keys, reqs, strict=True):
        assert_as_alone(got[key], reference(model, req))
    # Its streams fail in turn until one moved off it makes a clip on the other; its next
    # failure (more than max_failures in a row) retires it: 5 failed steps, never more.
    assert broken.calls == 5
    assert orch.executors[0] is (fresh[0] if replaced else None)
    assert len(fresh) == int(replaced)


def test_a_batch_on_an_actor_that_fails_every_step_has_no_error_rows(models, tmp_path):
    """The review's batch (one of two actors restarts but fails every step): its items were
    given up on one by one. Now the actor is dropped and every item is rendered."""
    from workers.jobs.render import parse_manifest, run_batch

    model = models["diffusion"]
    lines = [{"id": f"v{s}", "model": model, "frames": 16, "seed": s, "steps": 2} for s in range(4)]
    manifest = tmp_path / "items.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    # (max_streams 8: Flaky drops the worker's streams but not their cache slots)
    broken = Flaky(GeneratorWorker(model, max_streams=8), fail_at=set(range(1, 1000)))
    executors = [broken, LocalExecutor(GeneratorWorker(model, max_streams=8))]
    rows = run_batch(parse_manifest(manifest, out, 1000), out, lambda m: executors, lossless=True)
    assert {r["id"]: r["status"] for r in rows} == {f"v{s}": "ok" for s in range(4)}
    assert broken.calls == 5
    for s in range(4):
        req = request_for(model, frames=16, seed=s, label=None)
        assert_as_alone(read_video(out / f"v{s}.mp4").numpy(), reference(model, req))


def test_a_stream_that_fails_max_failures_times_on_one_executor_moves_to_another(models):
    """Three failures in a row on one executor, with another healthy one there, gave the
    stream up: its steps may not be what fails. It is moved and finishes; the executor,
    with steps coming back between its failures, stays."""
    model = models["diffusion"]
    flaky = Flaky(GeneratorWorker(model, max_streams=8), fail_at={2, 3, 4})
    good = LocalExecutor(GeneratorWorker(model, max_streams=8))
    orch = Orchestrator([flaky, good], max_failures=3)
    req = request_for(model, frames=32, seed=5)
    key = orch.submit(req, sink=QueueSink(capacity=64))
    assert orch.streams[key].executor == 0
    got = _finish_all(orch, [key])[key]
    np.testing.assert_array_equal(got, reference(model, req))  # alone both times: exact
    assert flaky.calls == 4 and orch.executors[0] is flaky and orch.failures == 3
    # A second stream is placed on the flaky executor again (it is not retired).
    req2 = request_for(model, frames=16, seed=6)
    key2 = orch.submit(req2, sink=QueueSink(capacity=64))
    assert orch.streams[key2].executor == 0
    np.testing.assert_array_equal(_finish_all(orch, [key2])[key2], reference(model, req2))


def test_a_moved_stream_with_no_other_slot_free_goes_back_rather_than_wait_for_ever(models):
    """A stream moved off the executor it failed on waits for a slot elsewhere; when the
    only other executor's streams wait for a reader that reads the moved stream first,
    nothing could run (RuntimeError). It goes back to its executor instead, once: failing
    max_failures more times there gives it up."""

    model = models["diffusion"]
    flaky = Flaky(GeneratorWorker(model, max_streams=8), fail_at={2, 3, 4})
    full = LocalExecutor(GeneratorWorker(model, max_streams=1))
    orch = Orchestrator([flaky, full], max_failures=3)
    req = request_for(model, frames=32, seed=5)
    key = orch.submit(req)
    other = orch.submit(request_for(model, frames=64, seed=6))  # 8 clips: blocks at 4
    assert (orch.streams[key].executor, orch.streams[other].executor) == (0, 1)
    np.testing.assert_array_equal(frames_of(orch, key), reference(model, req))
    assert flaky.calls == 3 + req.frames // orch.clip_len and orch.failures == 3  # back on it
    list(orch.clips(other))
    # Back on the executor it failed on and failing there again: given up on.
    again = Flaky(GeneratorWorker(model, max_streams=8), fail_at=set(range(2, 100)))
    orch = Orchestrator([again, LocalExecutor(GeneratorWorker(model, max_streams=1))])
    key = orch.submit(req)
    orch.submit(request_for(model, frames=64, seed=6))
    with pytest.raises(NoProgress, match="6 executor failures in a row \\(on 1 executor\\)"):
        frames_of(orch, key)
    assert again.calls == 7  # a good step, 3 failures, moved back, 3 more


def test_poison_streams_one_after_another_do_not_retire_a_healthy_executor(models, tmp_path):
    """An executor's failures in a row were counted across poison streams given up on: a
    second poison stream's first failure retired an executor that fails on nothing else
    (with one executor and a replace that cannot start an actor: every later item lost)."""
    from workers.jobs.render import parse_manifest, run_batch

    model = models["diffusion"]
    a, b = _DiesOnSeed(model, poison=666), _DiesOnSeed(model, poison=666)
    orch = Orchestrator([a, b], max_failures=3)
    for _ in range(2):
        p = orch.submit(request_for(model, frames=16, seed=666), sink=QueueSink(capacity=64))
        assert orch.streams[p].executor == 0
        with pytest.raises(NoProgress, match="on 2 executors"):
            orch.run()
        orch.cancel(p)
    assert orch.executors == [a, b]

    lines = [{"id": i, "model": model, "frames": 16, "seed": 666, "steps": 2} for i in ("p", "q")]
    lines.append({"id": "good", "model": model, "frames": 16, "seed": 1, "steps": 2})
    manifest = tmp_path / "items.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    out = tmp_path / "out"
    out.mkdir()

    def cannot_replace(failed):
        raise RuntimeError("no GPU free for a new actor")

    only = [_DiesOnSeed(model, poison=666, max_streams=1)]
    rows = run_batch(
        parse_manifest(manifest, out, 1000), out, lambda m: only, replace=cannot_replace
    )
    assert {r["id"]: r["status"] for r in rows} == {"p": "error", "q": "error", "good": "ok"}


class _KnowsSeeds:
    """Records the seed of each stream opened or restored on it, by key, in ``seeds``."""

    seeds: dict[int, int]

    def open(self, key, request, timeout=None):
        self.seeds[key] = request.seed
        super().open(key, request, timeout)

    def restore(self, key, snapshot, timeout=None):
        self.seeds[key] = snapshot.request.seed
        super().restore(key, snapshot, timeout)


class _DecodeDies(_KnowsSeeds, LocalExecutor):
    """Decoding any clip of a stream of seed ``poison`` kills the actor (it comes back
    empty); ``deaths`` counts them. ``seeds``: each stream's seed, shared by the executors
    (a clip may be decoded on another executor than the one that made it)."""

    def __init__(self, model: str, poison: int, seeds: dict[int, int]) -> None:
        super().__init__(GeneratorWorker(model, max_streams=4))
        self.model, self.poison, self.deaths, self.seeds = model, poison, 0, seeds

    def decode(self, clips):
        if any(self.seeds.get(c.key) == self.poison for c in clips):
            self.deaths += 1
            self.worker = GeneratorWorker(self.model, max_streams=4)
            return self._call(_raise)
        return super().decode(clips)


def test_a_clip_that_kills_every_decode_gives_up_its_stream_alone(models):
    """P's one clip kills any actor that decodes it. Its decode went back to the executor it
    was moved off (all made: no slot to find), so it was never given up on and wore actors
    out; the clips it was decoded with (a step's clips decode together) named an innocent
    batch-mate; and once given up on, its decode was redone at every later failure, for
    ever. Now its decodes go alone, it is given up on after max_failures failures on each
    of two executors, and a later run names it again without killing anything."""

    model = models["diffusion"]
    seeds: dict[int, int] = {}
    a, b = _DecodeDies(model, 666, seeds), _DecodeDies(model, 666, seeds)
    orch = Orchestrator([a, b], max_failures=3)
    rq = request_for(model, frames=orch.clip_len * 6, seed=1)
    q = orch.submit(rq, sink=QueueSink(capacity=64))
    p = orch.submit(request_for(model, frames=orch.clip_len, seed=666), sink=QueueSink(64))
    with pytest.raises(NoProgress, match=f"stream {p} went through 6 .* \\(on 2 executors\\)"):
        orch.run()
    assert a.deaths + b.deaths == 6 and orch.executors == [a, b]
    with pytest.raises(NoProgress, match=f"stream {p} "):
        orch.run()
    assert a.deaths + b.deaths == 6
    got = np.concatenate([c.frames for c in orch.streams[q].sink.queue])
    assert_as_alone(got, reference(model, rq))


def test_a_moved_stream_whose_decode_kills_the_other_executor_is_given_up(models):
    """P, moved off A and waiting for B's one slot, had its decode redone on B: it killed B
    again and again (P was not on B, so never blamed there) while B's own stream stalled."""

    model = models["diffusion"]
    seeds: dict[int, int] = {}
    a, b = _DecodeDies(model, 666, seeds), _DecodeDies(model, 666, seeds)
    b.info = dict(b.info, max_streams=1)
    orch = Orchestrator([a, b], max_failures=3)
    p = orch.submit(request_for(model, frames=orch.clip_len * 4, seed=666), sink=QueueSink(64))
    rq = request_for(model, frames=orch.clip_len * 6, seed=1)
    q = orch.submit(rq, sink=QueueSink(capacity=64))
    assert [orch.streams[k].executor for k in (p, q)] == [0, 1]
    with pytest.raises(NoProgress, match=f"stream {p} .*\\(on 2 executors\\)"):
        orch.run()
    assert (a.deaths, b.deaths) == (3, 3)
    orch.cancel(p)
    orch.run()
    got = np.concatenate([c.frames for c in orch.streams[q].sink.queue])
    assert_as_alone(got, reference(model, rq))


def test_two_poison_streams_at_once_do_not_retire_a_healthy_executor(models):
    """P1 moved off A (waiting for a full B) and P2 failing on A made A's failures in a row
    pass max_failures for two streams: A was retired, though only poison fails on it."""
    model = models["diffusion"]
    a = _DiesOnSeed(model, poison=666, max_streams=8)
    b = _DiesOnSeed(model, poison=666, max_streams=8)
    b.info = dict(b.info, max_streams=2)
    orch = Orchestrator([a, b], max_failures=3)
    n = orch.clip_len
    q = orch.submit(request_for(model, frames=n * 4, seed=1), sink=QueueSink(64))
    orch.submit(request_for(model, frames=n * 12, seed=2), sink=QueueSink(64))
    p1 = orch.submit(request_for(model, frames=n * 4, seed=666), sink=QueueSink(64))
    orch.submit(request_for(model, frames=n * 12, seed=3), sink=QueueSink(64))
    p2 = orch.submit(request_for(model, frames=n * 4, seed=666, label=1), sink=QueueSink(64))
    assert [orch.streams[k].executor for k in (q, p1, p2)] == [0, 0, 0]
    assert run_giving_up(orch, tries=3) == {p1, p2} and orch.executors == [a, b]


class _FailsOnceFor(LocalExecutor):
    """Fails ``times`` times (transient deaths), on its first steps that hold stream ``key``;
    ``failed``: how many it has."""

    def __init__(self, worker, key: int, times: int = 1) -> None:
        super().__init__(worker)
        self.key, self.failed, self.times = key, 0, times

    def step(self, keys, epochs, snapshot_keys):
        if self.failed < self.times and self.key in keys:
            self.failed += 1
            self.worker.streams.clear()
            return self._call(_raise)
        return super().step(keys, epochs, snapshot_keys)


def test_streams_of_a_retired_executor_keep_no_failures_from_it(models):
    """A stream that failed twice on an executor later retired as broken arrived on the
    other one with those failures: one transient failure there gave it up."""
    model = models["diffusion"]
    broken = Flaky(GeneratorWorker(model, max_streams=8), fail_at=set(range(1, 1000)))
    other = _FailsOnceFor(GeneratorWorker(model, max_streams=8), key=2)
    orch = Orchestrator([broken, other], max_failures=3)
    reqs = [request_for(model, frames=orch.clip_len * 4, seed=s) for s in range(4)]
    keys = [orch.submit(r, sink=QueueSink(64)) for r in reqs]
    assert [orch.streams[k].executor for k in keys] == [0, 1, 0, 1]
    orch.run()
    assert other.failed and orch.executors[0] is None
    for key, req in zip(keys, reqs, strict=True):
        got = np.concatenate([c.frames for c in orch.streams[key].sink.queue])
        assert_as_alone(got, reference(model, req))


def test_retiring_a_broken_executor_forgives_only_the_failures_on_it():
    """The bookkeeping of a broken executor's retirement: a stream keeps the failures it had
    elsewhere (a poison's deaths on healthy actors), and a move keeps counting failures since
    it, unless the move was away from the broken executor."""
    from workers.orchestrator import _count_failure, _forgive, _move_off, _Stream

    broken, a, b = object(), object(), object()

    def stream(failed: list[object], moved_after: int = 0) -> _Stream:
        s = _Stream(key=1, request=None, num_clips=4, sink=None, executor=0)
        for i, e in enumerate(failed):  # with Orchestrator._fail's own bookkeeping
            if i == moved_after and moved_after:
                _move_off(s, failed[i - 1])
            _count_failure(s, e)
        s.decode_failed = True
        return s

    s = stream([a, broken, a, broken])
    _forgive(s, broken)
    assert (s.failures, s.failed_on, s.decode_failed) == (2, [a], True)
    _forgive(s, b)  # never failed there: nothing changes
    assert s.failures == 2
    s = stream([broken, a, a, broken, b], moved_after=3)  # moved off a after 3 failures
    _forgive(s, broken)  # one before the move, one after: 1 failure since the move left
    assert (s.failures, s.moved_at, s.avoid) == (3, 2, a)
    s = stream([broken, broken, broken, a], moved_after=3)  # moved off the broken one
    _forgive(s, broken)
    assert (s.failures, s.moved_at, s.avoid, s.failed_on) == (1, 0, None, [a])
    # Moved off the broken one after failures elsewhere too: still moved (no second move and
    # a fresh allowance for a poison), counting the 2 failures since the move.
    s = stream([a, a, broken, b, b], moved_after=3)
    _forgive(s, broken)
    assert (s.failures, s.moved_at, s.avoid, s.failed_on) == (4, 2, None, [a, b])
    s = stream([broken, broken])  # all its failures there: as if it had made progress
    _forgive(s, broken)
    assert (s.failures, s.failed_on, s.decode_failed) == (0, [], False)
    s = stream([broken, a])
    s.stuck = True  # given up on: keeps what NoProgress said
    _forgive(s, broken)
    assert s.failures == 2


class _Broken(_Delayed):
    """Every step fails ``delay`` s after it was submitted (a fresh worker of ``max_streams``,
    as a restarted actor); ``recover`` raises after ``restarts`` recoveries (a Ray actor's
    restarts used up; None: never)."""

    def __init__(
        self, model: str, delay: float = 0.0, restarts: int | None = None, max_streams: int = 8
    ) -> None:
        super().__init__(GeneratorWorker(model, max_streams=max_streams), delay, "broken")
        self.restarts, self.recovered, self.max_streams = restarts, 0, max_streams

    def step(self, keys, epochs, snapshot_keys):
        self.steps += 1
        self.worker = GeneratorWorker(self.model, max_streams=self.max_streams)
        handle = self._call(_raise)
        handle.at = time.monotonic() + self.delay
        return handle

    def recover(self):
        if self.restarts is not None and self.recovered >= self.restarts:
            raise ExecutorFailed("restarts used up")
        self.recovered += 1


def test_streams_keep_no_failures_from_a_broken_executor_that_did_not_come_back(models):
    """An executor found broken is retired; its streams' failures on it were cleared only
    when it recovered first. One whose restarts ran out then handed its failures on: S,
    failed once there, was given up on after two transient failures on the healthy one
    (3 in a row, on both executors)."""
    model = models["diffusion"]
    broken = _Broken(model, delay=0.6, restarts=5)
    other = _FailsOnceFor(GeneratorWorker(model, max_streams=8), key=4, times=2)
    orch = Orchestrator([broken, other], max_failures=3)
    reqs = [request_for(model, frames=orch.clip_len * 4, seed=s) for s in range(6)]
    keys = [orch.submit(r, sink=QueueSink(64)) for r in reqs]
    assert [orch.streams[k].executor for k in keys] == [0, 1, 0, 1, 0, 1]
    orch.run()
    # Streams 0 and 2 failed 3 times each on it and made clips on the other, which retired
    # it (its sixth step in flight); recovering it then failed (restarts used up).
    assert broken.steps == 6 and broken.recovered == 5 and orch.executors[0] is None
    assert other.failed == 2
    for key, req in zip(keys, reqs, strict=True):
        got = np.concatenate([c.frames for c in orch.streams[key].sink.queue])
        assert_as_alone(got, reference(model, req))


class _Actor(LocalExecutor):
    """As a Ray actor: a call still in flight when the actor dies fails with it (a decode
    taken after a step that killed the actor fails too). A step holding a stream of seed
    ``poison`` kills it."""

    def __init__(self, model: str, poison: int) -> None:
        super().__init__(GeneratorWorker(model, max_streams=4))
        self.model, self.poison, self.life, self.deaths = model, poison, 0, 0

    def _stamped(self, done):
        done.life = self.life
        return done

    def step(self, keys, epochs, snapshot_keys):
        if any(
            k in self.worker.streams and self.worker.streams[k].request.seed == self.poison
            for k in keys
        ):
            self.life, self.deaths = self.life + 1, self.deaths + 1
            self.worker = GeneratorWorker(self.model, max_streams=4)
            return self._stamped(self._call(_raise))
        return self._stamped(super().step(keys, epochs, snapshot_keys))

    def decode(self, clips):
        return self._stamped(super().decode(clips))

    def result(self, handle):
        if handle.life != self.life and handle.error is None:
            raise ExecutorFailed("the actor died while this call ran")
        return super().result(handle)


def _given_up_after_three_deaths(orch: Orchestrator, actor: _Actor, poison: int) -> None:
    """The poison stream is given up on after killing the actor 3 times (max_failures); the
    others then finish."""

    with pytest.raises(NoProgress) as caught:
        orch.run()
    assert caught.value.key == poison and actor.deaths == 3
    orch.cancel(poison)
    orch.run()


def test_a_decode_beside_a_poison_step_is_not_blamed_for_it(models):
    """A's decode was in flight when poison P's step (stepped alone) killed the actor: the
    decode's failure came first, blamed A and dropped P's step unblamed, clip after clip,
    until A was given up on. A suspect's step now waits for the decodes on its actor."""

    model = models["diffusion"]
    actor = _Actor(model, poison=666)
    orch = Orchestrator([actor], max_failures=3)
    ra = request_for(model, frames=orch.clip_len * 2, seed=1)
    a = orch.submit(ra, sink=QueueSink(64))
    p = orch.submit(request_for(model, frames=orch.clip_len * 2, seed=666), sink=QueueSink(64))
    _given_up_after_three_deaths(orch, actor, p)
    got = np.concatenate([c.frames for c in orch.streams[a].sink.queue])
    assert_as_alone(got, reference(model, ra))


def test_a_broken_executor_found_out_after_its_streams_left_is_retired(models):
    """The broken executor's two streams were moved off before a clip on the other proved
    it broken; nothing failed on it after, so it was never retired, its failures stayed
    with its streams (one transient failure elsewhere gave one up), and it took the next
    stream submitted."""
    model = models["diffusion"]
    broken = Flaky(GeneratorWorker(model, max_streams=8), fail_at=set(range(1, 1000)))
    other = _Delayed(GeneratorWorker(model, max_streams=8), 0.3, "slow")
    orch = Orchestrator([broken, other], max_failures=3)
    reqs = [request_for(model, frames=orch.clip_len * 4, seed=s) for s in range(4)]
    keys = [orch.submit(r, sink=QueueSink(64)) for r in reqs]
    assert [orch.streams[k].executor for k in keys] == [0, 1, 0, 1]
    orch.run()
    assert orch.executors[0] is None
    for key, req in zip(keys, reqs, strict=True):
        got = np.concatenate([c.frames for c in orch.streams[key].sink.queue])
        assert_as_alone(got, reference(model, req))


def test_one_stream_moved_long_ago_and_a_poison_stream_retire_nothing(models):
    """X failed 3 times in a row for S (by chance); S moved and made a clip elsewhere, so X
    counted as proven broken, idle, with its count kept. A poison stream's first failure
    on X later retired it."""

    class FlakyThenPoison(_DiesOnSeed):
        calls = 0

        def step(self, keys, epochs, snapshot_keys):
            self.calls += 1
            if self.calls in (2, 3, 4):
                self.worker = GeneratorWorker(self.model, max_streams=self.max_streams)
                return self._call(_raise)
            return super().step(keys, epochs, snapshot_keys)

    model = models["diffusion"]
    x = FlakyThenPoison(model, poison=666, max_streams=8)
    y = _DiesOnSeed(model, poison=666, max_streams=8)
    orch = Orchestrator([x, y], max_failures=3)
    s = orch.submit(request_for(model, frames=orch.clip_len * 4, seed=5), sink=QueueSink(64))
    orch.run()
    assert orch.streams[s].done and orch.executors[0] is x
    p = orch.submit(request_for(model, frames=orch.clip_len * 2, seed=666), sink=QueueSink(64))
    assert orch.streams[p].executor == 0
    with pytest.raises(NoProgress, match=f"stream {p} "):
        orch.run()
    assert orch.executors == [x, y]


def test_a_poison_step_beside_another_streams_decode_is_blamed(models):
    """P's first step, batched with A's, killed the actor while A's decode was in flight:
    the decode's failure was handled first (it was submitted first) and blamed A alone, P's
    step was dropped unblamed. A then made a clip alone (its count cleared), joined P's batch
    again beside its next decode, and so on: the actor died again and again and P was never
    given up on. An executor's death now blames every stream whose work died with it."""

    class Bounded(_Actor):
        def step(self, keys, epochs, snapshot_keys):
            if self.deaths >= 12:
                raise RuntimeError("the poison stream was never given up on")
            return super().step(keys, epochs, snapshot_keys)

    model = models["diffusion"]
    actor = Bounded(model, poison=666)
    orch = Orchestrator([actor], max_failures=3)
    ra = request_for(model, frames=orch.clip_len * 4, seed=1)
    a = orch.submit(ra, sink=QueueSink(64))
    orch.run(until=lambda: any(w.kind == "decode" for w in orch.work))
    assert [w.kind for w in orch.work] == ["decode"]  # A's first clip, not yet decoded
    p = orch.submit(request_for(model, frames=orch.clip_len * 2, seed=666), sink=QueueSink(64))
    _given_up_after_three_deaths(orch, actor, p)
    got = np.concatenate([c.frames for c in orch.streams[a].sink.queue])
    assert_as_alone(got, reference(model, ra))


def test_a_stream_leaving_an_executor_that_came_back_holding_it_frees_its_slot(models):
    """An actor restarted by Ray can take an open or restore of a stream before the
    orchestrator has handled its death; when that death then gave the stream up (or moved
    it), the stream was marked unplaced but stayed open there, its slot taken for good: the
    next stream's open raised 'cache is full' out of run(). Here the executor's failures
    leave its streams open, as such a restarted actor holds them."""

    class KeepsStreams(LocalExecutor):
        def step(self, keys, epochs, snapshot_keys):
            streams = self.worker.streams
            if any(streams[k].request.seed == 666 for k in keys if k in streams):
                return self._call(_raise)
            return super().step(keys, epochs, snapshot_keys)

    model = models["diffusion"]
    executor = KeepsStreams(GeneratorWorker(model, max_streams=1))
    orch = Orchestrator([executor], max_failures=3)
    p = orch.submit(request_for(model, frames=orch.clip_len, seed=666), sink=QueueSink(64))
    with pytest.raises(NoProgress, match=f"stream {p} "):
        orch.run()
    assert p not in executor.worker.streams
    orch.cancel(p)
    ra = request_for(model, frames=orch.clip_len * 2, seed=3)
    a = orch.submit(ra, sink=QueueSink(64))
    orch.run()
    got = np.concatenate([c.frames for c in orch.streams[a].sink.queue])
    assert_as_alone(got, reference(model, ra))


class _ActorDecodeDies(_KnowsSeeds, _Actor):
    """An ``_Actor`` whose decode of a clip of seed ``poison`` kills it when it runs: that
    decode and every call in flight with it (the decodes queued behind it included) fail."""

    def __init__(self, model: str, poison: int) -> None:
        super().__init__(model, poison)
        self.seeds: dict[int, int] = {}
        self.dying = False

    def step(self, keys, epochs, snapshot_keys):
        return self._stamped(LocalExecutor.step(self, keys, epochs, snapshot_keys))

    def decode(self, clips):
        self.dying |= any(self.seeds.get(c.key) == self.poison for c in clips)
        return super().decode(clips)

    def result(self, handle):
        if self.dying:  # the poison decode ran: the actor dies under everything in flight
            self.dying = False
            self.life, self.deaths = self.life + 1, self.deaths + 1
            self.worker = GeneratorWorker(self.model, max_streams=4)
        return super().result(handle)


def test_decodes_queued_behind_a_poison_decode_are_not_blamed_for_it(models):
    """After a failed decode, each stream with failures has its clips decoded alone, one
    call after another on the same actor, which runs them in order: P's decode kills it and
    G's, queued behind, dies with it. Blaming every call in flight (a step's death beside a
    decode) blamed G at each of P's deaths and gave it up with P; only the step and the
    first decode in flight were running."""
    model = models["diffusion"]
    actor = _ActorDecodeDies(model, poison=666)
    orch = Orchestrator([actor], max_failures=3)
    p = orch.submit(request_for(model, frames=orch.clip_len, seed=666), sink=QueueSink(64))
    rg = request_for(model, frames=orch.clip_len * 3, seed=1)
    g = orch.submit(rg, sink=QueueSink(64))
    _given_up_after_three_deaths(orch, actor, p)
    got = np.concatenate([c.frames for c in orch.streams[g].sink.queue])
    assert_as_alone(got, reference(model, rg))


def test_a_clip_is_made_only_once_decoded_after_a_decode_failed(model):
    """A stream whose decode died with its actor is under suspicion until a clip of it is
    decoded: its steps going well cleared its failures, so a stream whose every decode
    kills an actor (its steps fine, its decodes sent elsewhere while it waited for a slot)
    killed up to 20 actors in a fuzz of Ray-like actors (at most 2 x max_failures = 6
    otherwise)."""
    orch = Orchestrator(local(model))
    key = orch.submit(request_for(model, frames=32), sink=QueueSink(64))
    s = orch.streams[key]
    s.failures, s.decode_failed = 2, True  # as after its decode died with two actors
    orch._schedule()
    orch._execute_and_update(0.0)
    assert (s.accepted, s.delivered, s.failures) == (1, 0, 2)  # made, not decoded yet
    orch._schedule()
    orch._execute_and_update(0.0)
    assert (s.delivered, s.failures, s.decode_failed) == (1, 0, False)


class _RayLike(LocalExecutor):
    """As a Ray actor: a step is done one wait after it was submitted; a step holding a stream
    of seed ``poison`` kills the actor, and an open/restore submitted while that step is
    still running queues behind it and dies with it (RayActorError)."""

    def __init__(self, model: str, poison: int) -> None:
        super().__init__(GeneratorWorker(model, max_streams=4))
        self.model, self.poison, self.doomed, self.deaths, self.raced = model, poison, None, 0, 0

    def step(self, keys, epochs, snapshot_keys):
        streams = self.worker.streams
        if any(k in streams and streams[k].request.seed == self.poison for k in keys):
            self.worker = GeneratorWorker(self.model, max_streams=4)
            self.deaths += 1
            handle = self.doomed = self._call(_raise)
        else:
            handle = super().step(keys, epochs, snapshot_keys)
        handle.waits = 1
        return handle

    def decode(self, clips):
        handle = super().decode(clips)
        handle.waits = 0
        return handle

    @staticmethod
    def wait(handles, timeout, first=False):
        done = [h for h in handles if h.waits <= 0]
        for h in handles:
            h.waits -= 1
        return done

    def result(self, handle):
        if handle is self.doomed:
            self.doomed = None
        return super().result(handle)

    def _behind_the_step(self):
        if self.doomed is not None:
            self.raced += 1
            raise ExecutorFailed("the actor died while this call waited behind a step")

    def open(self, key, request, timeout=None):
        self._behind_the_step()
        super().open(key, request, timeout)

    def restore(self, key, snapshot, timeout=None):
        self._behind_the_step()
        super().restore(key, snapshot, timeout)

    def recover(self):
        self.doomed = None  # restarted: later calls run on the new process


def test_a_restore_behind_a_poison_step_is_not_blamed_for_it(models):
    """S failed 3 times on A (by chance) and moved to B, where poison P's step was in
    flight: S's restore queued behind it and died with it, S took the blame and P's failed
    step was dropped unblamed, every time: S was given up on. The step's streams are
    blamed now; P moves to A (where it runs) and both finish."""
    model = models["diffusion"]
    a = Flaky(GeneratorWorker(model, max_streams=4), fail_at={1, 2, 3})
    b = _RayLike(model, poison=666)
    orch = Orchestrator([a, b], max_failures=3)
    rs = request_for(model, frames=orch.clip_len * 2, seed=1)
    s = orch.submit(rs, sink=QueueSink(64))
    rp = request_for(model, frames=orch.clip_len * 2, seed=666)
    p = orch.submit(rp, sink=QueueSink(64))
    assert [orch.streams[k].executor for k in (s, p)] == [0, 1]
    orch.run()
    assert b.raced >= 1 and b.deaths == 3
    for key, req in ((s, rs), (p, rp)):
        got = np.concatenate([c.frames for c in orch.streams[key].sink.queue])
        np.testing.assert_array_equal(got, reference(model, req))


def test_a_stream_moved_off_a_broken_executor_prefers_a_healthy_one(models):
    """Moved off broken A, S went to the least loaded executor, broken B, and was given up
    on after failing there too, while healthy C had room."""
    model = models["diffusion"]
    healthy = LocalExecutor(GeneratorWorker(model, max_streams=8))
    a = Flaky(GeneratorWorker(model, max_streams=8), fail_at=set(range(1, 1000)))
    b = Flaky(GeneratorWorker(model, max_streams=8), fail_at=set(range(1, 1000)))
    orch = Orchestrator([healthy, a, b], max_failures=3)
    reqs = [request_for(model, frames=orch.clip_len * 3, seed=s) for s in range(4)]
    keys = [orch.submit(r, sink=QueueSink(64)) for r in reqs]
    assert [orch.streams[k].executor for k in keys] == [0, 1, 2, 0]  # B less loaded than C
    orch.run()
    assert (a.calls, b.calls) == (3, 3)  # each stream's 3 failures, then never again
    for key, req in zip(keys, reqs, strict=True):
        got = np.concatenate([c.frames for c in orch.streams[key].sink.queue])
        assert_as_alone(got, reference(model, req))


def test_a_submit_goes_to_an_executor_with_a_free_slot(model):
    """With unequal max_streams the least loaded executor may be full: the third stream
    went to the 1-slot executor (tied at one stream each) and was refused, with 7 slots
    free on the other."""
    small = LocalExecutor(GeneratorWorker(model, max_streams=1))
    large = LocalExecutor(GeneratorWorker(model, max_streams=8))
    orch = Orchestrator([small, large])
    reqs = [request_for(model, frames=orch.clip_len * 2, seed=s) for s in range(3)]
    keys = [orch.submit(r, sink=QueueSink(64)) for r in reqs]
    assert [orch.streams[k].executor for k in keys] == [0, 1, 1]
    got = _finish_all(orch, keys)
    for key, req in zip(keys, reqs, strict=True):
        assert_as_alone(got[key], reference(model, req))


def test_a_moved_stream_waits_for_a_healthy_slot_rather_than_take_a_broken_one(models):
    """A fuzz of two broken actors and one healthy one with a single slot: S, moved off
    broken B while the healthy one was busy, took the free slot of broken A, failed there
    3 times and was given up on. It now fails there once (an executor it had not failed
    on), then waits for the healthy slot, and both streams finish."""
    model = models["diffusion"]
    a = Flaky(GeneratorWorker(model, max_streams=8), fail_at=set(range(1, 1000)))
    b = Flaky(GeneratorWorker(model, max_streams=8), fail_at=set(range(1, 1000)))
    healthy = LocalExecutor(GeneratorWorker(model, max_streams=1))
    orch = Orchestrator([a, b, healthy], max_failures=3)
    reqs = [request_for(model, frames=orch.clip_len * 2, seed=s) for s in range(2)]
    keys = [orch.submit(r, sink=QueueSink(64)) for r in reqs]
    assert [orch.streams[k].executor for k in keys] == [0, 1]
    orch.run()
    assert (a.calls, b.calls) == (4, 3)  # 3 failures on its own each; S once on A
    for key, req in zip(keys, reqs, strict=True):
        got = np.concatenate([c.frames for c in orch.streams[key].sink.queue])
        assert_as_alone(got, reference(model, req))


def test_a_stream_waiting_for_a_slot_gets_it_before_a_new_submit(models):
    """S, moved off broken B, waited for healthy H's only slot; when H's stream finished,
    the next submit (a batch admits one as each item finishes) took the slot first, and
    so on for as long as items came."""
    model = models["diffusion"]
    healthy = LocalExecutor(GeneratorWorker(model, max_streams=1))
    broken = Flaky(GeneratorWorker(model, max_streams=8), fail_at=set(range(1, 1000)))
    orch = Orchestrator([healthy, broken], max_failures=3)
    reqs = [request_for(model, frames=orch.clip_len * 2, seed=s) for s in range(3)]
    t = orch.submit(reqs[0], sink=QueueSink(64))
    s = orch.submit(reqs[1], sink=QueueSink(64))
    assert (orch.streams[t].executor, orch.streams[s].executor) == (0, 1)
    orch.run(until=lambda: orch.streams[t].done)
    assert broken.calls == 3 and orch.streams[s].avoid is broken
    u = orch.submit(reqs[2], sink=QueueSink(64))
    assert (orch.streams[s].executor, orch.streams[u].executor) == (0, 1)
    got = _finish_all(orch, [t, s, u])
    for key, req in zip((t, s, u), reqs, strict=True):
        assert_as_alone(got[key], reference(model, req))


def test_a_moved_stream_prefers_an_actor_a_poison_stream_failed_over_a_broken_one(models):
    """A fuzz: P (poison) and G failed 3 times each on broken actors and were moved; P's
    first step on the healthy actor killed it, so no actor had 0 failures in a row and G
    went to the least loaded, broken one, where it was given up on. It now goes to the one
    with the fewest failures in a row, the healthy one, and finishes."""

    model = models["diffusion"]
    healthy = _DiesOnSeed(model, poison=666, max_streams=3)
    a, b = _Broken(model, max_streams=1), _Broken(model, max_streams=1)
    orch = Orchestrator([a, healthy, b], max_failures=3)
    rp = request_for(model, frames=orch.clip_len, seed=666)
    rh = request_for(model, frames=orch.clip_len, seed=1)
    rg = request_for(model, frames=orch.clip_len, seed=0)
    p, h, g = (orch.submit(r, sink=QueueSink(64)) for r in (rp, rh, rg))
    assert [orch.streams[k].executor for k in (p, h, g)] == [0, 1, 2]
    with pytest.raises(NoProgress) as caught:
        orch.run()
    assert caught.value.key == p
    orch.cancel(p)
    orch.run()
    for key, req in ((h, rh), (g, rg)):
        got = np.concatenate([c.frames for c in orch.streams[key].sink.queue])
        assert_as_alone(got, reference(model, req))


def test_a_stream_after_a_failed_reopen_is_still_moved(models):
    """Q's re-open failed while P (whose steps kill A, not B) was at max_failures: the loop
    went on from Q's failure and reopened P on A without moving it."""

    class ReopenFailsOnce(_DiesOnSeed):
        deaths, reopen_failed = 0, False

        def step(self, keys, epochs, snapshot_keys):
            done = super().step(keys, epochs, snapshot_keys)
            self.deaths += done.error is not None
            return done

        def restore(self, key, snapshot, timeout=None):
            if snapshot.request.seed == 1 and self.deaths == 3 and not self.reopen_failed:
                self.reopen_failed = True
                self.worker = GeneratorWorker(self.model, max_streams=self.max_streams)
                raise ExecutorFailed("died while restoring")
            super().restore(key, snapshot, timeout)

    model = models["diffusion"]
    a = ReopenFailsOnce(model, poison=666)
    b = LocalExecutor(GeneratorWorker(model, max_streams=4))
    orch = Orchestrator([a, b], max_failures=3)
    rq = request_for(model, frames=orch.clip_len * 4, seed=1)
    q = orch.submit(rq, sink=QueueSink(capacity=64))
    orch.submit(request_for(model, frames=orch.clip_len * 30, seed=9), sink=QueueSink(64))
    p = orch.submit(request_for(model, frames=orch.clip_len * 4, seed=666), sink=QueueSink(64))
    assert [orch.streams[k].executor for k in (q, p)] == [0, 0]
    orch.run()
    assert a.reopen_failed and a.deaths == 3  # moved after its third: never on A again
    assert orch.executors[0] is a  # Q's steps come back on it
    for key, seed in ((q, 1), (p, 666)):
        got = np.concatenate([c.frames for c in orch.streams[key].sink.queue])
        assert_as_alone(got, reference(model, request_for(model, frames=len(got), seed=seed)))


def test_an_open_or_restore_gets_time_for_the_clips_it_encodes_or_replays(models):
    """The limit was 2 x step_timeout whatever the work: an open that encodes a long
    context (or a restore that replays many clips) timed out every time, killing the actor
    and every stream on it."""
    model = models["diffusion"]
    executor = _Serial(GeneratorWorker(model, max_streams=4), 0.0, "serial")
    orch = Orchestrator([executor], step_timeout=0.5, snapshot_every=4)
    context = np.zeros((5 * orch.clip_len, 32, 32, 3), np.uint8)  # 5 clips
    a = orch.submit(request_for(model, frames=16, context=context), sink=QueueSink(64))
    assert executor.timeouts == [(2 + 5) * 0.5]
    b = orch.submit(request_for(model, frames=48, seed=4), sink=QueueSink(64))
    assert executor.timeouts[-1] == 2 * 0.5
    orch.run(until=lambda: orch.streams[b].accepted == 3)  # 3 clips since its checkpoint
    executor.kill()
    executor.timeouts.clear()
    orch._fail(0, ExecutorFailed("killed"), [])  # restores both from their truths
    by_key = dict(zip(sorted(orch.streams), executor.timeouts, strict=True))
    assert by_key[b] == (2 + 3) * 0.5
    truth = orch.streams[a].truth_at(orch.streams[a].accepted)
    assert truth.cache is None  # no checkpoint yet: the context is encoded again
    assert by_key[a] == (2 + 5 + len(truth.pending)) * 0.5
    orch.run()


def test_a_decode_that_raises_a_bug_is_submitted_again(model):
    """A decode error that is no executor failure reached the caller after its work was
    dropped: the clip was never decoded again and the next run said nothing could run."""

    class DecodeBugOnce(LocalExecutor):
        decodes = 0

        def decode(self, clips):
            self.decodes += 1
            if self.decodes == 1:
                return self._call(lambda: (_ for _ in ()).throw(RuntimeError("decoder bug")))
            return super().decode(clips)

    orch = Orchestrator([DecodeBugOnce(GeneratorWorker(model, max_streams=4))])
    req = request_for(model, frames=24)
    key = orch.submit(req, sink=QueueSink(capacity=64))
    with pytest.raises(RuntimeError, match="decoder bug"):
        orch.run()
    orch.run()
    got = np.concatenate([c.frames for c in orch.streams[key].sink.queue])
    np.testing.assert_array_equal(got, reference(model, req))


def test_an_iterator_dropped_before_its_first_clip_frees_its_stream(model):
    import gc

    executor = LocalExecutor(GeneratorWorker(model, max_streams=1))
    orch = Orchestrator([executor])
    clips = orch.clips(orch.submit(request_for(model, frames=16)))
    del clips
    gc.collect()
    # Its slot is free for the next stream (before, the cache was full for good).
    key = orch.submit(request_for(model, frames=16, seed=4))
    assert list(orch.streams) == [key] and list(executor.worker.streams) == [key]
    frames_of(orch, key)
    assert orch.streams == {}
    # run() with nothing left but a dropped iterator's stream: nothing to do, no error (it
    # raised "nothing can run").
    dropped = orch.clips(orch.submit(request_for(model, frames=16, seed=5)))
    del dropped
    gc.collect()
    orch.run()
    assert orch.streams == {} and executor.worker.streams == {}


def test_an_iterator_that_ended_with_an_error_leaves_its_stream_alone(models):
    """The natural retry: NoProgress about another stream ends the iterator; cancel that
    one and iterate again. Dropping the ended iterator cancelled its (healthy) stream."""

    model = models["diffusion"]
    orch = Orchestrator([_DiesOnSeed(model, poison=666)], max_failures=3)
    rq = request_for(model, frames=32, seed=1)
    q = orch.submit(rq)
    orch.submit(request_for(model, frames=32, seed=666), sink=QueueSink(capacity=64))
    got = []
    while True:
        try:
            for clip in orch.clips(q):
                got.append(clip.frames)
            break
        except NoProgress as err:
            orch.cancel(err.key)
    assert_as_alone(np.concatenate(got), reference(model, rq))


def test_a_stream_given_up_on_is_parked_not_stepped_again(models):
    """Not cancelled after NoProgress, the stuck stream was placed again at once, stepped
    alone, killed the actor and raised again, run after run, while the good stream waited."""

    model = models["diffusion"]
    executor, orch, rq, q, p = _poisoned_pair(model)
    with pytest.raises(NoProgress):
        orch.run()
    failures = orch.failures
    for _ in range(2):  # the others finish; the stuck one is named again, never stepped
        with pytest.raises(NoProgress, match=f"stream {p} went through 3") as caught:
            orch.run()
        assert caught.value.key == p
    assert orch.failures == failures and p not in executor.worker.streams
    got = np.concatenate([c.frames for c in orch.streams[q].sink.queue])
    assert_as_alone(got, reference(model, rq))
    with pytest.raises(NoProgress):
        next(orch.clips(p))


def test_a_submit_caught_in_another_streams_no_progress_holds_no_slot(models):
    """B's open kills the actor, and X's restore then fails until X is given up on: the
    NoProgress about X left B open on the worker, untracked, its slot taken for good."""

    model = models["diffusion"]

    class DiesOpening(LocalExecutor):
        """Its next ``fails[call]`` opens or restores kill it (it comes back empty)."""

        def __init__(self, worker) -> None:
            super().__init__(worker)
            self.fails = {"open": 0, "restore": 0}

        def _maybe_die(self, call):
            if self.fails[call]:
                self.fails[call] -= 1
                self.worker = GeneratorWorker(model, max_streams=2)
                raise ExecutorFailed(f"died in {call}")

        def open(self, key, request, timeout=None):
            self._maybe_die("open")
            super().open(key, request)

        def restore(self, key, snapshot, timeout=None):
            self._maybe_die("restore")
            super().restore(key, snapshot)

    executor = DiesOpening(GeneratorWorker(model, max_streams=2))
    orch = Orchestrator([executor], max_failures=2)
    x = orch.submit(request_for(model, frames=48, seed=1), sink=QueueSink(capacity=64))
    orch.run(until=lambda: orch.streams[x].accepted == 1)
    executor.fails.update(open=1, restore=2)
    with pytest.raises(NoProgress) as caught:
        orch.submit(request_for(model, frames=24, seed=2), sink=QueueSink(capacity=64))
    assert caught.value.key == x and list(orch.streams) == [x]
    assert executor.worker.streams == {}
    orch.cancel(x)
    keys = [orch.submit(request_for(model, frames=24, seed=s)) for s in (3, 4)]  # 2 slots
    for key in keys:
        frames_of(orch, key)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"snapshot_every": 0}, "snapshot_every must be >= 1"),
        ({"snapshot_every": 2.5}, "snapshot_every must be an int"),
        ({"queue_clips": 2.5}, "queue_clips must be an int"),
        ({"max_failures": 1.5}, "max_failures must be an int"),
    ],
)
def test_orchestrator_counts_must_be_whole(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Orchestrator(local(model), **kwargs)


def test_a_render_segment_of_a_fraction_of_a_clip_is_refused(model, tmp_path):
    with pytest.raises(ValueError, match="segment_clips must be an int"):
        orch = Orchestrator(local(model))
        render(orch, request_for(model), tmp_path / "v.mp4", segment_clips=1.5)


def test_checkpoints_leave_the_context_on_the_actor_and_restores_still_have_it(model):
    """Every checkpoint sent the whole request back from the actor, context frames
    included (0.26 MB a step for a 0.25 MB context against a 0.01 MB cache)."""
    import pickle

    worker = GeneratorWorker(model, max_streams=2)
    clip_len = worker.generator.clip_len
    context = np.random.default_rng(0).integers(0, 256, (4 * clip_len, 32, 32, 3), np.uint8)
    req = request_for(model, frames=4 * clip_len, context=context)
    worker.open(0, req)
    out = worker.step([0], [0], [0])
    assert out.snapshots[0].request is None and out.snapshots[0].cache is not None
    assert len(pickle.dumps(out)) < context.nbytes / 2
    # The orchestrator's truth holds the request, context included: a restore after the
    # actor dies continues the same video.
    orch = Orchestrator([Flaky(GeneratorWorker(model, max_streams=4), fail_at={3})])
    key = orch.submit(req, sink=QueueSink(capacity=64))
    orch.run()
    assert orch.failures == 1
    got = np.concatenate([c.frames for c in orch.streams[key].sink.queue])
    np.testing.assert_array_equal(got, reference(model, req))


def test_a_moved_stream_is_not_kept_on_a_broken_actor_by_a_poison_streams_old_count(models):
    """A review: P (poison) failed 3 times on healthy H0 and left it, so idle H0 kept a
    count of 3 failures in a row. G, moved off broken B1, went to broken B3 (count 0) and,
    after each failure there, back to B3 (count 1, 2: below H0's 3) until it was given up
    on, with H0's slots free. An executor it has not failed on now comes first."""

    model = models["diffusion"]
    h0 = _DiesOnSeed(model, poison=666, max_streams=3)
    b1 = _Broken(model, max_streams=2)
    h2 = _DiesOnSeed(model, poison=666, max_streams=1)
    b3 = _Broken(model, max_streams=3)
    orch = Orchestrator([h0, b1, h2, b3], max_failures=3)
    rp = request_for(model, frames=orch.clip_len * 2, seed=666)
    rg = request_for(model, frames=orch.clip_len * 2, seed=1)
    p = orch.submit(rp, sink=QueueSink(64))
    g = orch.submit(rg, sink=QueueSink(64))
    assert [orch.streams[k].executor for k in (p, g)] == [0, 1]
    with pytest.raises(NoProgress) as caught:
        orch.run()
    assert caught.value.key == p
    orch.cancel(p)
    orch.run()  # G finishes (on H0, healthy and idle)
    got = np.concatenate([c.frames for c in orch.streams[g].sink.queue])
    assert_as_alone(got, reference(model, rg))


def test_a_moved_stream_does_not_wait_while_an_idle_healthy_actor_has_free_slots(models):
    """A review: P (poison) failed 3 times on X and left it (X idle, 4 slots free, its count
    of failures in a row at 3). S, moved off broken B, waited for H's one slot (count 0)
    for as long as H's long stream T ran, while X could run it at once."""
    model = models["diffusion"]
    x = _DiesOnSeed(model, poison=666, max_streams=4)
    b = _Broken(model, max_streams=4)
    h = LocalExecutor(GeneratorWorker(model, max_streams=1))
    orch = Orchestrator([x, b, h], max_failures=3)
    n = orch.clip_len
    p = orch.submit(request_for(model, frames=n * 2, seed=666), sink=QueueSink(64))
    s = orch.submit(request_for(model, frames=n * 2, seed=1), sink=QueueSink(64))
    t = orch.submit(request_for(model, frames=n * 40, seed=2), sink=QueueSink(64))
    assert [orch.streams[k].executor for k in (p, s, t)] == [0, 1, 2]

    try:
        orch.run(until=lambda: orch.streams[t].accepted >= 20)
    except NoProgress as err:  # P, wherever it goes: given up on
        assert err.key == p
        orch.cancel(p)
        orch.run(until=lambda: orch.streams[t].accepted >= 20)
    assert orch.streams[s].accepted > 0  # S ran on X before T was done


def test_a_stream_sent_back_while_a_reader_waits_takes_an_untried_actor(models):
    """A review: G, moved off broken B1, skipped H3 (idle, 1 slot, one failure in a row:
    poison P's) for H2 (0 failures, full with T, whose queue fills while the caller reads
    P). Nothing could run, so G was sent back, to the least loaded executor, B1, and given
    up on there; H3 stayed idle."""

    model = models["diffusion"]
    x0 = _DiesOnSeed(model, poison=666, max_streams=2)
    b1 = _Broken(model, max_streams=3)
    h2 = _DiesOnSeed(model, poison=666, max_streams=1)
    h3 = _DiesOnSeed(model, poison=666, max_streams=1)
    orch = Orchestrator([x0, b1, h2, h3], max_failures=3, queue_clips=2)
    n = orch.clip_len
    p = orch.submit(request_for(model, frames=n * 4, seed=666), sink=QueueSink(2))
    rg = request_for(model, frames=n * 2, seed=1)
    g = orch.submit(rg, sink=QueueSink(2))
    t = orch.submit(request_for(model, frames=n * 5, seed=2), sink=QueueSink(2))
    assert [orch.streams[k].executor for k in (p, g, t)] == [0, 1, 2]
    with pytest.raises(NoProgress) as caught:
        list(orch.clips(p))
    assert caught.value.key == p, f"stream {caught.value.key} (G) given up on, not P"
    orch.cancel(p)
    got = [c.frames for c in orch.clips(g)]
    assert_as_alone(np.concatenate(got), reference(model, rg))


def test_a_join_that_fails_on_a_full_disk_keeps_the_parts_to_resume_from(model, tmp_path):
    """A full disk at the join (a second copy of the whole video) escaped as a raw OSError
    (a traceback from `vidgen render`): it is an IncompleteRender, the parts stay, and the
    same render resumes and publishes."""
    import errno

    import workers.render as render_module
    from workers.render import IncompleteRender

    req = request_for(model, frames=16)
    out = tmp_path / "v.mp4"
    real = render_module.concat_videos

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    render_module.concat_videos = full
    try:
        with pytest.raises(IncompleteRender, match="joining its segments failed.*No space"):
            render(Orchestrator(local(model)), req, out, 1, lossless=True, progress=False)
    finally:
        render_module.concat_videos = real
    assert parts_folder(out).exists() and not out.exists()
    done = render(Orchestrator(local(model)), req, out, segment_clips=1, lossless=True)
    np.testing.assert_array_equal(read_video(done.path).numpy(), reference(model, req))


def test_render_names_with_undecodable_bytes_and_file_systems_without_locks(
    model, tmp_path, monkeypatch
):
    """A file name not in UTF-8 crashed parts_folder (UnicodeEncodeError); a file system
    that does not lock files (ENOLCK) was taken for another render holding the lock."""
    import errno
    import fcntl
    import os

    from workers.render import _write_text, check_not_rendering, lock_file

    odd = tmp_path / os.fsdecode(b"caf\xe9.mp4")
    assert parts_folder(odd).name == os.fsdecode(b".caf\xe9.mp4.parts")
    long = tmp_path / (os.fsdecode(b"\xe9" * 150) + ".mp4")
    assert len(os.fsencode(parts_folder(long).name)) < 255

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(ValueError, match="file system does not lock files"):
        render(Orchestrator(local(model)), request_for(model, frames=8), tmp_path / "x.mp4")
    assert not lock_file(tmp_path / "x.mp4").exists()  # the lock file it made is gone
    lock_file(tmp_path / "x.mp4").touch()
    with pytest.raises(ValueError, match="file system does not lock files"):
        check_not_rendering(tmp_path / "x.mp4")
    monkeypatch.undo()
    lock_file(tmp_path / "x.mp4").unlink()

    def full(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match="No space"):
        _write_text(tmp_path / "guard", "x")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temp file left behind


def test_a_render_is_published_beside_a_stream_given_up_on_before(models, tmp_path):
    """The loop left with the render's stream done and raised an older NoProgress of
    another stream (left uncancelled, as allowed): the finished render was abandoned, and
    every re-run failed the same way until that stream was cancelled."""
    model = models["diffusion"]
    orch = Orchestrator([_DiesOnSeed(model, poison=666)], max_failures=1)
    bad = orch.submit(request_for(model, frames=16, seed=666))
    with pytest.raises(NoProgress):
        orch.run()
    req = request_for(model, frames=16, seed=1)
    out = tmp_path / "v.mp4"
    result = render(orch, req, out, lossless=True, progress=False)
    assert result.frames == 16 and not parts_folder(out).exists()
    np.testing.assert_array_equal(read_video(out).numpy(), reference(model, req))
    assert orch.streams[bad].stuck  # still there for its owner
    with pytest.raises(NoProgress, match="given up on before"):
        orch.run()


def test_a_stream_has_one_iterator_at_a_time(models):
    """A second iterator split the clips with the first, and the first one dropped before
    it started cancelled the stream under the second ('waits for its sink to be drained')."""
    model = models["diffusion"]
    orch = Orchestrator(local(model))
    key = orch.submit(request_for(model, frames=16))
    first = orch.clips(key)
    with pytest.raises(ValueError, match="being read by another iterator"):
        orch.clips(key)
    del first  # dropped before its first clip: its cancel is queued ...
    frames = np.concatenate([c.frames for c in orch.clips(key)])  # ... and taken back
    np.testing.assert_array_equal(frames, reference(model, request_for(model, frames=16)))
    # Another stream's new iterator leaves a dropped one's cancel be (the list it goes to
    # was replaced, and the dropped stream kept its slot and filled its queue).
    a, b = orch.submit(request_for(model, frames=16)), orch.submit(request_for(model, frames=16))
    dropped, reader = orch.clips(a), orch.clips(b)
    del dropped
    assert len(list(reader)) == 16 // orch.clip_len
    assert a not in orch.streams
    # One closed before it started, then another: the first, collected later, is no drop.
    key = orch.submit(request_for(model, frames=16))
    closed = orch.clips(key)
    closed.close()
    second = orch.clips(key)
    next(second)
    del closed
    assert len(list(second)) == 16 // orch.clip_len - 1
    # A cancel under a reader is said as such.
    key = orch.submit(request_for(model, frames=16))
    reader = orch.clips(key)
    next(reader)
    orch.cancel(key)
    with pytest.raises(RuntimeError, match=f"stream {key} was cancelled"):
        list(reader)


def test_an_iterator_collected_inside_the_loop_is_cancelled_after_it(models):
    """The garbage collector closes an abandoned started iterator wherever it runs; its
    cancel inside the loop's pass over the streams failed the run ('dictionary changed size
    during iteration'). Here the collection runs inside an executor's restore."""
    import gc

    class CollectsOnRestore(LocalExecutor):
        def restore(self, key, snapshot, timeout=None):
            gc.collect()
            super().restore(key, snapshot, timeout)

    model = models["diffusion"]
    dies = Flaky(GeneratorWorker(model, max_streams=3), fail_at={2})
    dies.recover = lambda: _raise()  # gone for good: its streams move to the other
    survivor = CollectsOnRestore(GeneratorWorker(model, max_streams=4))
    orch = Orchestrator([dies, survivor])
    a = orch.submit(request_for(model, frames=16, seed=1))
    d = orch.submit(request_for(model, frames=16, seed=4))
    orch.submit(request_for(model, frames=16, seed=2))
    orch.submit(request_for(model, frames=16, seed=3))
    assert orch.streams[a].executor == 0 and orch.streams[d].executor == 1

    class Cycle:
        pass

    enabled = gc.isenabled()
    gc.disable()
    try:
        holder = Cycle()
        holder.me, holder.reader = holder, orch.clips(d)
        next(holder.reader)  # started, then abandoned in a cycle: freed by a collection
        del holder
        frames = np.concatenate([c.frames for c in orch.clips(a)])
    finally:
        if enabled:
            gc.enable()
    # Batched with the others on the survivor (CI once saw one pixel a step off).
    assert_as_alone(frames, reference(model, request_for(model, frames=16, seed=1)))
    assert d not in orch.streams  # cancelled by the loop after the collection


def test_a_falsy_sink_is_used(models):
    """``sink or QueueSink()``: a sink with a __len__ of clips so far (0 at submit) was
    replaced by a hidden queue, and the run stalled."""
    model = models["diffusion"]

    class Collect:
        def __init__(self):
            self.clips = []

        def __len__(self):
            return len(self.clips)

        def room(self):
            return 1 << 30

        def put(self, clip):
            self.clips.append(clip)

        def finish(self):
            pass

    sink = Collect()
    orch = Orchestrator(local(model))
    orch.submit(request_for(model, frames=16), sink=sink)
    orch.run()
    assert len(sink) == 16 // orch.clip_len


def test_a_queue_sink_without_room_is_refused():
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        QueueSink(0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_streams": 2.5}, "max_streams must be an int"),
        ({"max_streams": 0}, "max_streams must be >= 1"),
        ({"threads": -1}, "threads must be >= 0"),
        ({"threads": "4"}, "threads must be an int"),
    ],
)
def test_a_ray_executor_names_a_bad_setting_before_an_actor_starts(kwargs, message):
    """They reached the actor, whose start failed as a model-load error."""
    from workers.executors import RayExecutor

    with pytest.raises(ValueError, match=message):
        RayExecutor("ca2vdm-tiny", **kwargs)


def test_finishing_a_render_job_again_gives_its_result(models, tmp_path):
    from workers.render import RenderJob

    model = models["diffusion"]
    orch = Orchestrator(local(model))
    job = RenderJob(request_for(model, frames=8), tmp_path / "v.mp4", progress=False)
    job.start(orch)
    orch.run(until=lambda: job.done)
    first = job.finish()
    assert job.finish() is first and first.path.is_file()


def test_the_orchestrator_keeps_its_own_copy_of_a_request(model):
    """Its truth held the caller's object: a caller that reused it (a new seed for the next
    video) changed every clip restored after a failure. A truth of another request is
    refused at submit (it went on with that request's stream, labelled as this one)."""
    req = request_for(model, frames=24)
    expected = reference(model, req)
    flaky = Flaky(GeneratorWorker(model, max_streams=4), fail_at={3})
    orch = Orchestrator([flaky])
    key = orch.submit(req)
    req.seed = 99  # the caller's next video
    frames = np.concatenate([c.frames for c in orch.clips(key)])
    assert orch.failures == 1
    np.testing.assert_array_equal(frames, expected)
    from vidgen.generators import StreamSnapshot

    other = StreamSnapshot.start(request_for(model, frames=24, seed=4))
    with pytest.raises(ValueError, match="the truth is of another request"):
        orch.submit(request_for(model, frames=24), truth=other)


def test_a_resume_point_submitted_twice_gives_the_same_clips_and_a_complete_one_finishes(
    models,
):
    """The stream appended the clips it made to the caller's snapshot (its pending list),
    so the same resume point submitted again started later and skipped clips. A truth
    already at the stream's end never finished its sink; a truth that is not a snapshot
    (a path) failed with an AttributeError."""
    model = models["diffusion"]
    req = request_for(model, frames=24)
    orch = Orchestrator(local(model))
    key = orch.submit(req)
    clips = orch.clips(key)
    next(clips), next(clips)
    point = orch.streams[key].truth_at(2)
    clips.close()
    assert point.next_clip == 2 and len(point.pending) == 0
    expected, n = reference(model, req), req.frames // orch.clip_len
    for _ in range(2):
        again = Orchestrator(local(model))
        got = list(again.clips(again.submit(req, truth=point)))
        assert [c.clip for c in got] == list(range(2, n))
        frames = np.concatenate([c.frames for c in got])
        np.testing.assert_array_equal(frames, expected[2 * orch.clip_len :])
        assert point.next_clip == 2 and len(point.pending) == 0
    # A complete truth: no clip to make, and the sink is told it is finished.
    orch = Orchestrator(local(model))
    key = orch.submit(req, sink=QueueSink(n))
    orch.run()
    complete = orch.streams[key].truth_at(n)
    sink = QueueSink(4)
    again = Orchestrator(local(model))
    done = again.submit(req, sink=sink, truth=complete)
    assert again.streams[done].done and sink.finished and list(again.clips(done)) == []
    with pytest.raises(ValueError, match="truth must be a StreamSnapshot .* got str"):
        again.submit(req, truth="truth.safetensors")


def test_lossless_must_be_a_bool():
    """lossless="false" guarded a new parts folder as lossless=true, failed at the first
    clip's write, and the corrected call was then refused by that guard."""
    from workers.render import RenderJob

    req = GenerationRequest(model="m", frames=8)
    for bad in ("false", 1, None):
        with pytest.raises(ValueError, match="lossless must be True or False"):
            RenderJob(req, Path("v.mp4"), lossless=bad)
    # numpy's bool (a pandas row's) went into the provenance, which json could not write
    # at the join, after every clip was made.
    job = RenderJob(req, Path("v.mp4"), lossless=np.True_)
    assert job.lossless is True


def test_render_job_arguments_are_checked_before_the_render():
    """extra_provenance json could not write failed at the join, after every clip (the
    earlier render's sidecar already deleted); a request of another type failed as an
    AttributeError."""
    from workers.render import RenderJob

    req = GenerationRequest(model="m", frames=8)
    for bad in ({"source": Path("/data/x.mp4")}, {"n": np.int64(3)}, [("k", "v")], {1: "a"}):
        with pytest.raises(ValueError, match="extra_provenance must be a dict with str keys"):
            RenderJob(req, Path("v.mp4"), extra_provenance=bad)
    RenderJob(req, Path("v.mp4"), extra_provenance={"source": "/data/x.mp4", "n": 3})
    with pytest.raises(ValueError, match="request must be a GenerationRequest, got dict"):
        RenderJob({"model": "m", "frames": 8}, Path("v.mp4"))


def test_a_render_stopped_before_its_sidecar_leaves_no_other_renders_sidecar(model, tmp_path):
    """Rendered over an earlier render, a stop between the join and the sidecar's write
    left the new video beside the earlier request's sidecar (eval read its label)."""
    import workers.render

    out, sidecar = tmp_path / "v.mp4", tmp_path / "v.json"
    render(Orchestrator(local(model)), request_for(model, frames=8, label=1), out, progress=False)
    assert json.loads(sidecar.read_text())["request"]["label"] == 1
    write_json = workers.render._write_json

    def stopped(path, data):
        raise KeyboardInterrupt

    workers.render._write_json = stopped
    req = request_for(model, frames=8, label=3)
    try:
        with pytest.raises(KeyboardInterrupt):
            render(Orchestrator(local(model)), req, out, progress=False)
    finally:
        workers.render._write_json = write_json
    assert not sidecar.exists()  # no sidecar rather than the wrong one
    assert json.loads(read_metadata(out)["comment"])["request"]["label"] == 3
    result = render(Orchestrator(local(model)), req, out, progress=False)  # joined again
    assert result.resumed_frames == 8 and json.loads(sidecar.read_text())["request"]["label"] == 3


def test_a_batch_interrupted_while_joining_an_item_lets_go_of_its_lock(models, tmp_path):
    """finish() ran after the item left ``pending``: an interrupt there skipped the batch's
    cleanup, and the render's lock stayed held (a later run_batch in the same process
    failed the item as 'being rendered by another process')."""
    from workers.jobs.render import parse_manifest, run_batch
    from workers.render import RenderJob, lock_file

    model = models["diffusion"]
    manifest = tmp_path / "items.jsonl"
    line = {"id": "a", "model": model, "frames": 8, "seed": 0, "steps": 2, "label": 1}
    manifest.write_text(json.dumps(line) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    items = parse_manifest(manifest, out, max_frames=1000)
    executor = LocalExecutor(GeneratorWorker(model, max_streams=2))
    finish = RenderJob.finish

    def stopped(self):
        raise KeyboardInterrupt

    RenderJob.finish = stopped
    try:
        with pytest.raises(KeyboardInterrupt):
            run_batch(items, out, lambda m: [executor], lossless=True)
    finally:
        RenderJob.finish = finish
    assert not lock_file(out / "a.mp4").exists()
    rows = run_batch(items, out, lambda m: [executor], lossless=True)
    assert [r["status"] for r in rows] == ["ok"]


def test_a_manifest_line_nested_too_deep_is_that_lines_error(models, tmp_path):
    """json's RecursionError escaped parse_manifest and ended the whole batch."""
    from workers.jobs.render import parse_manifest

    good = {"id": "a", "model": models["diffusion"], "frames": 8}
    manifest = tmp_path / "items.jsonl"
    manifest.write_text("[" * 100_000 + "\n" + json.dumps(good) + "\n")
    bad, fine = parse_manifest(manifest, tmp_path, max_frames=1000)
    assert "RecursionError" in bad.error and fine.error is None


def test_results_rows_whose_id_is_no_string_are_passed_over(tmp_path):
    """A hand-edited results.jsonl row with a list id failed as a dict key (TypeError) and
    ended the batch before it ran; a row nested too deep for json, likewise."""
    from workers.jobs.render import Results

    path = tmp_path / "results.jsonl"
    rows = [
        {"id": ["a"], "status": "ok"},
        {"id": 7, "status": "error", "error": "x"},
        {"id": "b", "status": "ok"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n" + "[" * 100_000 + "\n")
    results = Results(path)
    assert results.ok == {"b"} and results.last_error == {}


def test_ray_wait_hands_back_the_callers_own_handles(monkeypatch):
    """Over a Ray client (ray://) ray.wait returns new refs, equal to those given but not
    the same objects; the orchestrator matches finished work by identity, so it never saw a
    step come back and the render hung."""
    import workers.executors
    from workers.executors import RayExecutor

    class Ref:  # a ClientObjectRef: equal and hashed by its id
        def __init__(self, ident):
            self.ident = ident

        def __eq__(self, other):
            return isinstance(other, Ref) and other.ident == self.ident

        def __hash__(self):
            return hash(self.ident)

    def client_wait(refs, num_returns, timeout, fetch_local):
        copies = [Ref(r.ident) for r in refs]
        return copies[:num_returns], copies[num_returns:]

    monkeypatch.setattr(workers.executors.ray, "wait", client_wait)
    handles = [Ref(1), Ref(2), Ref(3)]
    for first in (False, True):
        ready = RayExecutor.wait(handles, timeout=0, first=first)
        assert len(ready) == 3 and all(any(r is h for h in handles) for r in ready)


class _DiesWithoutComingBack(LocalExecutor):
    """Its second step fails and ``recover`` cannot bring it back (a restarted actor still
    loading past its ready timeout); counts its retires."""

    def __init__(self, worker, name):
        super().__init__(worker, name)
        self.calls, self.retired = 0, 0

    def step(self, keys, epochs, snaps):
        self.calls += 1
        if self.calls == 2:
            self.worker.streams.clear()
            return self._call(lambda: (_ for _ in ()).throw(ExecutorFailed("actor died")))
        return super().step(keys, epochs, snaps)

    def recover(self):
        raise TimeoutError("the restarted actor did not answer in ready_timeout")

    def retire(self):
        self.retired += 1


@pytest.mark.parametrize("replace", [None, "none", "a worker"])
def test_an_executor_that_does_not_come_back_is_retired(models, replace):
    """Dropped without a retire (no replace, or one that gave None), an actor that came back
    behind the orchestrator's back kept its GPU. A replace that returned a worker, not an
    executor, failed half-way through the failure's handling, and every later run with it."""
    model = models["diffusion"]
    dying = _DiesWithoutComingBack(GeneratorWorker(model, max_streams=4), "dying")
    replacer = {
        None: None,
        "none": lambda failed: None,
        "a worker": lambda failed: GeneratorWorker(model, max_streams=4),
    }[replace]
    orch = Orchestrator([dying, *local(model)], replace=replacer)
    req = request_for(model)
    key = orch.submit(req)
    frames = np.concatenate([c.frames for c in orch.clips(key)])
    assert dying.retired >= 1 and orch.executors[0] is None
    np.testing.assert_allclose(frames, reference(model, req), atol=2)


def test_serving_arguments_are_checked_by_name(models, monkeypatch):
    from workers import cluster

    model = models["diffusion"]
    executor = local(model)[0]
    with pytest.raises(ValueError, match="same executor more than once"):
        Orchestrator([executor, executor])  # its slots were counted twice
    with pytest.raises(ValueError, match="replace must be callable"):
        Orchestrator([executor], replace=True)
    orch = Orchestrator([executor])
    with pytest.raises(ValueError, match=r"sink must have room\(\), put\(clip\) and finish"):
        orch.submit(request_for(model, frames=8), sink=0)
    assert executor.worker.streams == {}  # it held its slot for good
    with pytest.raises(ValueError, match="poll must be >= 0"):
        orch.run(poll=-1)
    for kwargs, message in (
        ({"max_streams": 2.5}, "max_streams must be an int"),
        ({"threads": -1}, "threads must be >= 0"),
    ):
        with pytest.raises(ValueError, match=message):
            GeneratorWorker(model, **kwargs)
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: True)  # never connects here
    for args, kwargs, message in (
        ((None,), {}, "address must be a string"),
        (("",), {"num_cpus": 0}, "num_cpus must be >= 1"),
        (("",), {"num_gpus": -1}, "num_gpus must be >= 0"),
        (("auto",), {"num_cpus": 2}, "num_cpus sizes a local instance"),
        (("",), {"attempts": 0}, "attempts must be >= 1"),  # Ray never started
        (("",), {"attempts": 1.5}, "attempts must be an int"),
    ):
        with pytest.raises(ValueError, match=message):
            cluster.connect(*args, **kwargs)


def test_the_in_process_worker_leaves_the_callers_torch_threads_alone(models):
    """A GeneratorWorker set torch's thread count (1) for its whole process: right for an
    actor, wrong for the in-process twin behind LocalExecutor."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        GeneratorWorker(models["diffusion"], max_streams=1, threads=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_batch_whose_out_cannot_be_written_exits_before_ray_starts(tmp_path, capsys, monkeypatch):
    """A read-only --out failed only at the first result row, after the actors started."""
    import tempfile

    import workers.cluster
    from workers.jobs.render import main

    connected = []
    monkeypatch.setattr(workers.cluster, "connect", lambda address: connected.append(address))
    made_in = []

    def read_only(dir=None, **kwargs):
        made_in.append(Path(dir))
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    manifest = tmp_path / "items.jsonl"
    manifest.write_text('{"id": "a", "model": "ca2vdm-tiny", "frames": 16}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["--manifest", str(manifest), "--out", str(tmp_path / "new" / "out")])
    assert exit_info.value.code == 2 and not connected
    assert made_in == [tmp_path]  # the nearest folder that exists, where out would be made
    assert "cannot be written: Permission denied" in capsys.readouterr().err


def test_a_step_that_raises_after_stepping_restores_its_streams(models):
    """A snapshot (or the result) failing after the worker made the clips: the worker was a
    clip ahead, every later step's clips were dropped as out of turn until the stream ended
    there, and its restore then counted a failure. Its streams are now placed again from
    their truths at the next run."""
    model = models["diffusion"]
    req = request_for(model, frames=16)
    [executor] = local(model)
    worker, calls, steps = executor.worker, {"n": 0}, []
    snapshot, step = worker.generator.snapshot, worker.step

    def failing_snapshot(stream):
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("no memory for the cache's copy")
        return snapshot(stream)

    def counted_step(keys, epochs, snaps):
        steps.append(keys)
        return step(keys, epochs, snaps)

    worker.generator.snapshot, worker.step = failing_snapshot, counted_step
    orch = Orchestrator([executor])
    key = orch.submit(req, sink=QueueSink(64))
    with pytest.raises(MemoryError):
        orch.run()
    orch.run()
    got = np.concatenate([c.frames for c in orch.streams[key].sink.queue])
    np.testing.assert_array_equal(got, reference(model, req))
    clips = req.frames // orch.clip_len
    assert len(steps) == clips + 1 and orch.failures == 0  # the failed step alone again


def test_a_sinks_finish_that_raised_is_called_again_by_the_next_run(models):
    """SinkError says a run delivers it again: the stream counted as done, so the next run
    returned at once and the sink was never finished."""
    model = models["diffusion"]

    class FinishFailsOnce(QueueSink):
        def __init__(self):
            super().__init__(capacity=64)
            self.calls = 0

        def finish(self):
            self.calls += 1
            if self.calls == 1:
                raise OSError("upload failed")
            super().finish()

    orch = Orchestrator(local(model))
    sink = FinishFailsOnce()
    orch.submit(request_for(model, frames=8), sink=sink)
    with pytest.raises(SinkError, match="upload failed"):
        orch.run()
    orch.run()
    assert sink.calls == 2 and sink.finished
    orch.run()
    assert sink.calls == 2  # once finished, not again


def test_a_sink_given_to_two_streams_is_refused(models):
    model = models["diffusion"]
    orch = Orchestrator(local(model))
    sink = QueueSink(64)
    first = orch.submit(request_for(model, frames=8), sink=sink)
    with pytest.raises(ValueError, match=f"sink is already the sink of stream {first}"):
        orch.submit(request_for(model, frames=8, seed=4), sink=sink)  # clips mixed in one
    orch.run()
    assert [c.stream for c in sink.queue] == [first] * 4


def test_a_truth_whose_counts_do_not_fit_its_request_is_refused_at_submit(models):
    """Past the request's clips it finished the sink with none; without a cache but past
    clip 0 it was opened afresh, the first clips made again and dropped."""
    import torch

    from vidgen.generators import StreamSnapshot

    model = models["diffusion"]
    req = request_for(model, frames=8)
    orch = Orchestrator(local(model))
    past = StreamSnapshot(req, 0, None, [torch.zeros(2, 4, 4, 4)] * 5)
    with pytest.raises(ValueError, match="truth holds clips up to 5 .* makes 4"):
        orch.submit(req, truth=past)
    with pytest.raises(ValueError, match="a truth without a cache is a stream's start"):
        orch.submit(req, truth=StreamSnapshot(req, checkpoint_clip=2, cache=None))
    assert not orch.streams


def test_a_truth_of_another_request_names_what_differs(models):
    from vidgen.generators import StreamSnapshot

    model = models["diffusion"]
    orch = Orchestrator(local(model))
    other = StreamSnapshot.start(request_for(model, frames=8, steps=3))
    with pytest.raises(ValueError, match="they differ in steps \\(truth: seed 3, label 2"):
        orch.submit(request_for(model, frames=8), truth=other)


def test_a_replacement_already_in_use_is_not_taken(models):
    """replace returning a live executor put one executor in two places: its slots were
    counted twice and the run ended on its full cache."""
    model = models["diffusion"]
    good = local(model)[0]
    dying = Flaky(GeneratorWorker(model, max_streams=4), fail_at={2})
    dying.recover = lambda: _raise()  # it does not come back
    orch = Orchestrator([good, dying], replace=lambda failed: good)
    reqs = [request_for(model, frames=8, seed=s) for s in range(4)]
    keys = [orch.submit(r, sink=QueueSink(64)) for r in reqs]
    orch.run()
    assert orch.executors[0] is good and orch.executors[1] is None
    for key, req in zip(keys, reqs, strict=True):
        got = np.concatenate([c.frames for c in orch.streams[key].sink.queue])
        assert_as_alone(got, reference(model, req))


def test_no_progress_from_failing_decodes_names_the_decode(models):
    model = models["diffusion"]

    class DecodeDies(LocalExecutor):
        def decode(self, clips):
            self.worker.streams.clear()
            return self._call(_raise)

    orch = Orchestrator([DecodeDies(GeneratorWorker(model, max_streams=4))], max_failures=2)
    orch.submit(request_for(model, frames=4), sink=QueueSink(16))
    with pytest.raises(NoProgress, match="a step or a decode of its clips that always fails"):
        orch.run()
