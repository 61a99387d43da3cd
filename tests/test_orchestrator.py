"""The orchestrator's own logic with in-process executors (no Ray): order, truth, failures,
backpressure, segmented resumable renders."""

import json

import numpy as np
import pytest

from tests.models import save_test_generators
from vidgen.generators import GenerationRequest, generate_video, load_generator
from vidgen.io import read_metadata, read_video
from workers.actor import GeneratorWorker
from workers.executors import ExecutorFailed, LocalExecutor
from workers.orchestrator import Orchestrator, QueueSink
from workers.render import parts_folder, render


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


def reference(model: str, request: GenerationRequest) -> np.ndarray:
    gen = load_generator(model, max_streams=1)
    return np.concatenate([c.frames for c in generate_video(gen, request)])


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


class Crash(RuntimeError):
    pass


def test_an_interrupted_render_resumes_from_its_segments(model, tmp_path):
    req = request_for(model, frames=48)
    out = tmp_path / "v.mp4"
    orch = Orchestrator(local(model))

    def crash_after_two_segments(until=None, poll=0.05):
        run(until=lambda: len(list(parts_folder(out).glob("seg_*.mp4"))) >= 2)
        raise Crash

    run, orch.run = orch.run, crash_after_two_segments
    with pytest.raises(Crash):
        render(orch, req, out, segment_clips=2, lossless=True, progress=False)
    assert not out.exists() and parts_folder(out).exists()
    result = render(
        Orchestrator(local(model)), req, out, segment_clips=2, lossless=True, progress=False
    )
    clip_len = Orchestrator(local(model)).clip_len
    assert result.resumed_frames == 2 * 2 * clip_len  # two segments of 2 clips were reused
    np.testing.assert_array_equal(read_video(out).numpy(), reference(model, req))


def test_resuming_with_another_request_is_refused(model, tmp_path):
    out = tmp_path / "v.mp4"
    parts_folder(out).mkdir()
    (parts_folder(out) / "request.sha256").write_text("0" * 64)
    with pytest.raises(ValueError, match="different request"):
        render(Orchestrator(local(model)), request_for(model), out, progress=False)


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
