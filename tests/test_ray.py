"""Ray's part of serving: placement, equality with in-process generation, actor deaths,
batch jobs (one shared Ray instance; the orchestrator's logic is tested in-process)."""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.models import reference, save_test_generators
from vidgen.generators import GenerationRequest, generate_video, load_generator
from vidgen.io import read_video
from workers.executors import RayExecutor
from workers.orchestrator import Orchestrator
from workers.render import render

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return save_test_generators(tmp_path_factory.mktemp("models"))


def request_for(model: str, **kwargs) -> GenerationRequest:
    base = dict(model=model, frames=48, seed=7, label=1, steps=2, guidance=2.0)
    base.update(kwargs)
    return GenerationRequest(**base)


def test_a_killed_actor_is_recovered_as_a_new_process(ray_session, models, tmp_path):
    """ray.kill is asynchronous: recover() took the answer of the idle process it had just
    killed (same pid, its streams still listed), and the next open on it failed with "the
    actor was restarted": two failures counted for one fault.

    Then the model file goes and the actor is killed once more: recover() let Ray's
    ActorDiedError through (18 lines of remote traceback with colour codes, logged as is),
    where starting the actor says why in one line. (One test: each actor start costs
    seconds.)"""
    import shutil

    from workers.executors import ExecutorFailed

    path = tmp_path / "gone.safetensors"
    shutil.copy(models["diffusion"], path)
    executor = RayExecutor(str(path), max_streams=2, max_restarts=3, ready_timeout=60)
    try:
        req = request_for(str(path), frames=16)
        for _ in range(2):
            executor.open(0, req, timeout=60)
            before = executor.info["pid"]
            executor.kill()
            executor.recover()
            assert executor.info["pid"] != before and executor.info["streams"] == []
        executor.open(0, req, timeout=60)  # the restarted process takes the stream again
        assert executor.result(executor.step([0], [0], [])).clips[0].clip == 0
        path.unlink()  # the restarted process (its last restart) finds no model
        executor.kill()
        with pytest.raises(ExecutorFailed, match="restarted but could not load model") as err:
            executor.recover()
        assert "\n" not in str(err.value) and "\x1b" not in str(err.value)
        assert "does not exist" in str(err.value)
    finally:
        executor.retire()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_restarts": -1}, "max_restarts must be >= 0"), ({"ready_timeout": None}, "ready")],
)
def test_executor_settings_ray_would_misread_are_refused(kwargs, message):
    """-1 (Ray's "restart forever") was read as no restarts by kill and recover; None as a
    timeout started the actor and failed its first recover with a TypeError."""
    with pytest.raises(ValueError, match=message):
        RayExecutor("ca2vdm-tiny", **kwargs)


def test_an_actor_placed_without_a_gpu_stays_off_the_gpus_it_can_see(monkeypatch):
    """Ray leaves CUDA_VISIBLE_DEVICES as it was for an actor asking no GPU: device "auto"
    put such an actor on GPU 0 of a node whose GPUs belong to other actors."""
    import torch

    import workers.actor as actor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert actor.auto_device() == "cuda"  # not in an actor (a LocalExecutor's worker)

    class InActor:
        def get_actor_id(self):
            return "an actor"

    monkeypatch.setattr(actor.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(actor.ray, "get_runtime_context", lambda: InActor())
    for gpus, device in (([], "cpu"), ([0], "cuda")):
        monkeypatch.setattr(actor.ray, "get_gpu_ids", lambda gpus=gpus: gpus)
        assert actor.auto_device() == device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert actor.auto_device() == "cpu"


def _checkpoint_reads(monkeypatch) -> list[Path]:
    """The checkpoint files read from now on, once per whole-file read or open."""
    import builtins

    reads: list[Path] = []
    real_read_bytes, real_open = Path.read_bytes, builtins.open

    def read_bytes(self):
        if self.suffix == ".safetensors":
            reads.append(Path(self))
        return real_read_bytes(self)

    def open_(file, mode="r", *args, **kwargs):
        path = str(file) if isinstance(file, str | os.PathLike) else ""
        if path.endswith(".safetensors") and "r" in mode:
            reads.append(Path(path))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(builtins, "open", open_)
    return reads


@pytest.mark.parametrize("family", ["diffusion", "tokens"])
def test_an_actor_reports_the_sha256s_of_the_bytes_it_loaded(family, tmp_path, monkeypatch):
    """In process (the actor's own class): the model's and its tokenizer files' sha256s are
    those ``checkpoint.load`` computed while loading them. Hashing the files again read each
    one twice, and reported other bytes for a file replaced after it was loaded (a training
    run re-exporting it)."""
    from vidgen import checkpoint
    from workers import actor

    model = save_test_generators(tmp_path / "models")[family]
    files = [Path(model), *_companions(model)]
    sha = {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    reads = _checkpoint_reads(monkeypatch)
    load_generator(model, max_streams=1)
    alone = list(reads)
    real_load = actor.load_generator

    def load_then_replace(*args, **kwargs):
        generator = real_load(*args, **kwargs)
        done = len(reads)
        for f in files:  # new bytes under the same paths, once loaded
            checkpoint.update_card(f, {"note": "re-exported"})
        del reads[done:]  # update_card's own reads
        return generator

    monkeypatch.setattr(actor, "load_generator", load_then_replace)
    reads.clear()
    worker = actor.GeneratorWorker(model, max_streams=1)
    read = list(reads)
    assert all(sha[f] != hashlib.sha256(f.read_bytes()).hexdigest() for f in files)  # replaced
    assert worker.sha256 == sha[files[0]]
    assert worker.tokenizer_sha256 == checkpoint.combined_sha256([sha[f] for f in files[1:]])
    assert sorted(read) == sorted(alone)  # nothing read besides what load_generator reads
    assert all(alone.count(f) == 1 for f in files)  # each file read once


def _companions(model: str) -> list[Path]:
    """The tokenizer files a test generator loads besides itself, in its load order."""
    from vidgen import checkpoint

    tokenizer = checkpoint.companion(checkpoint.load(model).card["tokenizer"], model)
    autoencoder = checkpoint.load(tokenizer).config.get("autoencoder")
    found = [tokenizer] + ([checkpoint.companion(autoencoder, tokenizer)] if autoencoder else [])
    return [Path(f) for f in found]


class KillingExecutor(RayExecutor):
    """Kills its actor right after handing it the steps numbered in ``kill_at``.

    A kill due while the previous one has not been noticed yet (the orchestrator has not
    recovered this actor since: ``info`` still names the killed process) waits for the next
    step. Ray would fold two kills of one incarnation into one restart, so each kill here is
    one failure to survive, however fast the steps are."""

    def __init__(self, *args, kill_at: set[int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kill_at, self.steps, self.killed_pid = set(kill_at), 0, None

    def step(self, keys, epochs, snapshot_keys):
        ref = super().step(keys, epochs, snapshot_keys)
        self.steps += 1
        if self.steps in self.kill_at:
            if self.info["pid"] == self.killed_pid:  # the last kill is not noticed yet
                self.kill_at = {k + (k >= self.steps) for k in self.kill_at}
            else:
                time.sleep(0.01)
                self.killed_pid = self.info["pid"]
                ray_kill(self)
        return ref

    def replacement(self):
        self.retire()
        fresh = KillingExecutor(
            self.model, self.max_streams, self.threads, self.max_restarts, kill_at=set()
        )
        fresh.kill_at = {s - self.steps for s in self.kill_at if s > self.steps}
        return fresh


def ray_kill(executor: RayExecutor) -> None:
    import ray

    ray.kill(executor.handle, no_restart=executor.max_restarts <= 0)


# Both ways back from a kill (a new actor; Ray's restart of the same one), each with one
# family: each kill costs an actor start of seconds, and test_orchestrator.py runs its
# in-process failure tests on both families.
@pytest.mark.parametrize(("max_restarts", "family"), [(0, "diffusion"), (3, "tokens")])
def test_killed_actors_lose_and_duplicate_nothing(
    ray_session, models, tmp_path, family, max_restarts
):
    model = models[family]
    req = request_for(model)
    executor = KillingExecutor(model, max_restarts=max_restarts, kill_at={2, 4, 6})
    orch = Orchestrator([executor], replace=lambda failed: failed.replacement())
    try:
        out = render(orch, req, tmp_path / "v.mp4", segment_clips=2, lossless=True, progress=False)
        assert orch.failures >= 3
        np.testing.assert_array_equal(read_video(out.path).numpy(), reference(model, req))
    finally:  # a failure must not leave the session's 2 logical GPUs taken
        for e in orch.executors:
            if e is not None:
                e.retire()


def test_two_actors_get_distinct_gpus_and_render_what_one_process_makes(
    ray_session, models, tmp_path
):
    model = models["diffusion"]
    req = request_for(model, frames=32)
    executors = [RayExecutor(model), RayExecutor(model)]
    try:
        a, b = executors
        assert len(a.info["gpu_ids"]) == 1 and len(b.info["gpu_ids"]) == 1
        assert a.info["gpu_ids"] != b.info["gpu_ids"]
        assert a.info["cuda_visible_devices"] != b.info["cuda_visible_devices"]
        assert a.info["device"] == "cpu"  # logical GPUs on a CPU machine
        orch = Orchestrator(executors)
        out = render(orch, req, tmp_path / "v.mp4", lossless=True, progress=False)
        np.testing.assert_array_equal(read_video(out.path).numpy(), reference(model, req))
    finally:
        for e in executors:
            e.retire()


def test_a_bfloat16_actor_renders_what_a_bfloat16_generator_makes(ray_session, models, tmp_path):
    model = models["tokens"]
    req = request_for(model, frames=16)
    executor = RayExecutor(model, dtype="bfloat16")
    try:
        assert executor.info["dtype"] == "bfloat16"
        out = render(Orchestrator([executor]), req, tmp_path / "v.mp4", lossless=True)
        assert out.provenance["dtype"] == "bfloat16"
        gen = load_generator(model, max_streams=1, dtype="bfloat16")
        alone = np.concatenate([c.frames for c in generate_video(gen, req)])
        np.testing.assert_array_equal(read_video(out.path).numpy(), alone)
        assert not np.array_equal(alone, reference(model, req))  # not a float32 video
    finally:
        executor.retire()


def test_an_actor_killed_for_good_leaves_its_streams_to_the_survivor(ray_session, models):
    """Two actors of 2 slots and 4 streams; one actor is killed (no restart, no replacement)
    mid-run: its streams wait for the survivor's slots and every video is whole and exact.
    Then the last actor is killed too: the orchestrator says no executor is left."""
    from workers.orchestrator import NoExecutorsLeft

    model = models["diffusion"]
    survivor = RayExecutor(model, max_streams=2)
    doomed = KillingExecutor(model, max_streams=2, kill_at={1})  # two more steps follow
    orch = Orchestrator([survivor, doomed])  # no `replace`: a lost actor stays lost
    reqs = [request_for(model, seed=s, frames=24) for s in range(4)]
    keys = [orch.submit(r) for r in reqs]
    try:
        for key, req in zip(keys, reqs, strict=True):
            got = np.concatenate([c.frames for c in orch.clips(key)])
            diff = np.abs(got.astype(int) - reference(model, req))
            assert diff.max() <= 2 and (diff == 0).mean() > 0.99  # batched vs alone
        assert orch.executors[1] is None and orch.failures >= 1
        assert orch.streams == {}

        last = orch.submit(request_for(model, frames=24))
        ray_kill(survivor)
        with pytest.raises(NoExecutorsLeft):
            list(orch.clips(last))
    finally:
        survivor.retire()
        doomed.retire()


class LosingExecutor(RayExecutor):
    """An actor that is up but fails every step: the step's streams are closed on it first,
    so it raises StreamsLost, as an actor restarted under each step would."""

    def step(self, keys, epochs, snapshot_keys):
        for key in keys:
            self.handle.close.remote(key)  # the actor runs its calls in order
        self.steps = getattr(self, "steps", 0) + 1
        return super().step(keys, epochs, snapshot_keys)


def test_an_actor_that_fails_every_step_is_retired_and_frees_its_gpu(ray_session, models):
    """It answers after each failure, so it was restored onto again and again, and each
    stream on it was given up on in turn. Now its streams move to the other actor, and once
    one has made a clip there the broken one is killed for good at its next failure (its
    logical GPU freed)."""
    import ray

    model = models["diffusion"]
    broken = LosingExecutor(model, max_streams=4, max_restarts=5)
    survivor = RayExecutor(model, max_streams=4)
    orch = Orchestrator([broken, survivor], max_failures=3)  # no `replace`
    reqs = [request_for(model, seed=s, frames=24) for s in range(5)]
    try:
        keys = [orch.submit(r) for r in reqs[:4]]
        assert {orch.streams[k].executor for k in keys} == {0, 1}
        for step in range(2):
            # Whether the broken actor is retired during the first four depends on the order
            # results come back in; if not, the fifth is placed on it (the least loaded).
            for key, req in zip(keys, reqs[: len(keys)], strict=True):
                if key not in orch.streams:
                    continue
                got = np.concatenate([c.frames for c in orch.clips(key)])
                diff = np.abs(got.astype(int) - reference(model, req))
                assert diff.max() <= 2 and (diff == 0).mean() > 0.99  # batched vs alone
            if step == 0:
                keys.append(orch.submit(reqs[4]))
        assert orch.executors[0] is None and broken.steps <= 8
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(broken.handle.ready.remote(), timeout=30)
        deadline = time.monotonic() + 30  # its logical GPU is given back
        while ray.available_resources().get("GPU", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ray.available_resources().get("GPU", 0) >= 1
    finally:
        survivor.retire()
        broken.retire()


class StoppingExecutor(RayExecutor):
    """Freezes its actor's process (SIGSTOP) right after handing it the step numbered
    ``stop_at``: a real hung worker, alive to Ray but making no progress, which only the
    orchestrator's ``step_timeout`` can notice."""

    def __init__(self, *args, stop_at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stop_at, self.steps = stop_at, 0
        self.stopped: list[int] = []

    def step(self, keys, epochs, snapshot_keys):
        ref = super().step(keys, epochs, snapshot_keys)
        self.steps += 1
        if self.steps == self.stop_at:
            os.kill(self.info["pid"], signal.SIGSTOP)
            self.stopped.append(self.info["pid"])
        return ref


@pytest.mark.parametrize("max_restarts", [0, 2])
def test_a_hung_actor_times_out_and_its_stream_moves(ray_session, models, tmp_path, max_restarts):
    """A frozen actor process (not dead: Ray still sees it) is caught by ``step_timeout``,
    killed, and replaced; the video is whole and exact."""
    model = models["diffusion"]
    req = request_for(model, frames=16)  # 8 clips: frozen at the 3rd step, mid-run
    hung = StoppingExecutor(model, max_restarts=max_restarts, stop_at=3)
    made: list[RayExecutor] = []

    def replace(failed):
        failed.retire()
        made.append(RayExecutor(model))
        return made[-1]

    # A test-size step takes well under a second, even on a busy 2-core machine.
    orch = Orchestrator([hung], step_timeout=5.0, replace=replace)
    result: list = []
    worker = threading.Thread(
        target=lambda: result.append(
            render(orch, req, tmp_path / "v.mp4", segment_clips=2, lossless=True, progress=False)
        ),
        daemon=True,
    )
    try:
        worker.start()
        worker.join(timeout=300)  # a missed timeout would wait on the frozen actor for ever
        assert result, "the render did not finish: the hung step was never timed out"
        out = result[0]
        assert hung.stopped and orch.failures >= 1
        np.testing.assert_array_equal(read_video(out.path).numpy(), reference(model, req))
        # The frozen process was killed, not left holding its logical GPU.
        deadline = time.monotonic() + 30
        while _alive(hung.stopped[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(hung.stopped[0])
    finally:
        for pid in hung.stopped:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        hung.retire()
        for e in made:
            e.retire()


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def manifest(path: Path, models: dict[str, str], context: Path | None = None) -> Path:
    lines = [
        json.dumps(
            {
                "id": "a",
                "model": models["diffusion"],
                "frames": 32,
                "seed": 1,
                "steps": 2,
                "label": 2,
            }
        ),
        "{not json",
        json.dumps({"id": "b", "model": models["tokens"], "frames": 24, "seed": 2}),
        json.dumps({"id": "../escape", "model": models["diffusion"], "frames": 8}),
        json.dumps({"id": "c", "model": "no-such-model", "frames": 8}),
        json.dumps({"id": "d", "model": models["diffusion"], "frames": 0}),
        json.dumps(
            {
                "id": "e",
                "model": models["diffusion"],
                "frames": 16,
                "seed": 3,
                "steps": 2,
                "colour": "red",
            }
        ),
        json.dumps({"id": "f", "model": models["diffusion"], "frames": 48, "seed": 4, "steps": 2}),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_job(manifest_path: Path, out: Path, address: str, env=None, **kwargs):
    cmd = [
        sys.executable,
        "-m",
        "workers.jobs.render",
        "--manifest",
        str(manifest_path),
        "--out",
        str(out),
        "--address",
        address,
        "--lossless",
        "--segment-clips",
        "2",
        "--max-streams",
        "1",  # each stream alone in its steps: bit-identical to the in-process reference
    ]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env or os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_batch_job_resumes_after_its_driver_is_killed(ray_session, models, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    items = manifest(tmp_path / "items.jsonl", models)
    out = tmp_path / "out"
    proc = run_job(items, out, address)
    # Kill the driver once the first item is recorded and a later one has segments on disk.
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        results = out / "results.jsonl"
        parts = list(out.glob(".f.mp4.parts/part_*.mp4"))
        if results.exists() and '"status": "ok"' in results.read_text() and parts:
            break
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    first = [json.loads(r) for r in (out / "results.jsonl").read_text().splitlines()]
    done_first = {r["id"] for r in first if r["status"] == "ok"}
    finished = run_job(items, out, address)
    _, stderr = finished.communicate(timeout=300)
    assert finished.returncode == 0, stderr[-2000:]
    rows = [json.loads(r) for r in (out / "results.jsonl").read_text().splitlines()]
    by_id = {}
    for row in rows:
        by_id.setdefault(row["id"], []).append(row)
    ok = {i for i, rs in by_id.items() if any(r["status"] == "ok" for r in rs)}
    assert ok == {"a", "b", "f"}
    for item_id in done_first:
        assert sum(r["status"] == "ok" for r in by_id[item_id]) == 1  # skipped, not redone
    errors = {i: rs[-1]["error"] for i, rs in by_id.items() if i not in ok}
    assert ("line 2" in errors and "JSON" in errors["line 2"]) or "Expecting" in errors["line 2"]
    assert "plain file name" in errors["line 4"]
    assert "no-such-model" in errors["c"] and "frames" in errors["d"] and "colour" in errors["e"]
    for item_id, frames in (("a", 32), ("b", 24), ("f", 48)):
        row = next(r for r in by_id[item_id] if r["status"] == "ok")
        req = GenerationRequest.from_json(
            {k: v for k, v in row["provenance"]["request"].items() if k != "context"}
        )
        np.testing.assert_array_equal(
            read_video(out / f"{item_id}.mp4").numpy(), reference(req.model, req)
        )
        assert row["frames"] == frames and len(row["provenance"]["model_sha256"]) == 64
    assert not (tmp_path / "escape.mp4").exists()


def test_vidgen_render_runs_on_cpu_actors_without_gpus(models, tmp_path):
    out = tmp_path / "cpu.mp4"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [
            "vidgen",
            "render",
            f"model={models['diffusion']}",
            "frames=16",
            "steps=2",
            "seed=5",
            "label=1",
            f"out={out}",
            "lossless=true",
            "address=",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 1 actor(s) [cpu]" in proc.stdout
    req = request_for(models["diffusion"], frames=16, seed=5, label=1)
    np.testing.assert_array_equal(read_video(out).numpy(), reference(models["diffusion"], req))
    provenance = json.loads(out.with_suffix(".json").read_text())
    assert provenance["seed"] == 5 and provenance["request"]["frames"] == 16


def free_ports(n: int) -> list[int]:
    """n distinct free ports: all bound at once, so none is handed out twice."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


SUBMIT = """
import json, sys, time
from ray.job_submission import JobSubmissionClient, JobStatus
client = JobSubmissionClient(sys.argv[1])
job = client.submit_job(entrypoint=sys.argv[2], runtime_env=json.loads(sys.argv[3]))
deadline = time.time() + 400
while time.time() < deadline:
    status = client.get_job_status(job)
    if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        break
    time.sleep(0.2)
print(json.dumps({"status": str(status), "logs": client.get_job_logs(job)[-3000:]}))
"""


def head_log_tail(tmp_path: Path) -> str:
    logs = sorted(tmp_path.glob("head-*.log"))
    return logs[-1].read_text()[-3000:] if logs else "(no log)"


def stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    import signal

    # SIGKILL to its whole process group (it was started in a session of its own): a
    # SIGTERM drains for up to 30 s and was never done within 5, which every test waited.
    with contextlib.suppress(ProcessLookupError):  # it has exited already
        os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=30)
    shutil.rmtree(temp_dir, ignore_errors=True)


def start_token_head(env: dict, tmp_path: Path, attempts: int = 3):
    """Start a second Ray head (``ray start --head --block``); returns (process, dashboard port,
    temp dir) once it says "Ray runtime started.".

    Ray gives its raylet a fixed 30 s to register with its GCS; on a loaded CI machine a first
    start has timed out that way ("The current node timed out during startup"). Such a start is
    tried again, on fresh ports and a fresh temp dir, up to ``attempts`` times.
    """
    failures = []
    for attempt in range(attempts):
        gcs, dashboard, agent, agent_grpc, metrics, runtime_env, client = free_ports(7)
        # Ray's unix sockets live under the temp dir and their paths must stay under 108
        # bytes: pytest's tmp_path is too deep.
        temp_dir = tempfile.mkdtemp(prefix="vg-ray-", dir="/tmp")
        head_log = tmp_path / f"head-{attempt}.log"
        with head_log.open("w") as log:
            head = subprocess.Popen(
                [
                    "ray",
                    "start",
                    "--head",
                    "--block",
                    f"--port={gcs}",
                    f"--dashboard-port={dashboard}",
                    # The session's Ray instance (ray_session) holds the default agent ports:
                    # a second head on them gets no job agent ("No available agent to submit
                    # job").
                    f"--dashboard-agent-listen-port={agent}",
                    f"--dashboard-agent-grpc-port={agent_grpc}",
                    f"--metrics-export-port={metrics}",
                    f"--runtime-env-agent-port={runtime_env}",
                    f"--ray-client-server-port={client}",
                    "--num-cpus=2",
                    "--num-gpus=0",
                    "--include-dashboard=true",
                    "--disable-usage-stats",
                    f"--temp-dir={temp_dir}",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.time() + 180
        while time.time() < deadline:
            if "Ray runtime started." in head_log.read_text():
                return head, dashboard, temp_dir
            if head.poll() is not None:
                break
            time.sleep(0.5)
        failures.append(head_log.read_text()[-1500:])
        stop_head(head, temp_dir)
    raise AssertionError(f"ray start --head failed {attempts} times:\n" + "\n---\n".join(failures))


def agent_log_tail(temp_dir: str) -> str:
    """The end of a head's dashboard agent logs (why it did not register, if it says)."""
    logs = sorted(Path(temp_dir).glob("session_latest/logs/dashboard_agent*"))
    return "\n".join(f"{p.name}: {p.read_text(errors='replace')[-1500:]}" for p in logs[-2:])


def submit_to_a_token_head(env: dict, tmp_path: Path, entrypoint: str, runtime_env: dict):
    """Start a token-auth head and submit ``entrypoint`` to it; returns (result, head, dashboard
    port, temp dir), the head still running.

    The dashboard, then its job agent, take a while to come up on a busy machine ("No
    available agent to submit job, please try again later"): submissions are retried for
    180 s. Once (1 of 9 clean-clone CI runs, on a loaded machine) the agent never came: a
    head whose agent has not come in that time is replaced by a fresh one (fresh ports and
    temp dir), once."""
    failures = []
    for _ in range(2):
        head, dashboard, temp_dir = start_token_head(env, tmp_path)
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 180
        try:
            while time.time() < deadline:
                assert head.poll() is None, f"ray start --head exited: {head_log_tail(tmp_path)}"
                proc = subprocess.run(
                    [sys.executable, "-c", SUBMIT, address, entrypoint, json.dumps(runtime_env)],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                if proc.returncode == 0:
                    result = json.loads(proc.stdout.strip().splitlines()[-1])
                    return result, head, dashboard, temp_dir
                time.sleep(3)
        except BaseException:
            stop_head(head, temp_dir)
            raise
        failures.append(f"{proc.stderr[-2000:]}\nagent logs: {agent_log_tail(temp_dir)}")
        stop_head(head, temp_dir)
    raise AssertionError("no job could be submitted to two heads:\n" + "\n---\n".join(failures))


def test_ray_job_submit_with_token_auth(models, tmp_path):
    import secrets

    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    items = tmp_path / "items.jsonl"
    items.write_text(
        json.dumps(
            {
                "id": "job-a",
                "model": models["diffusion"],
                "frames": 16,
                "seed": 2,
                "steps": 2,
                "label": 3,
            }
        )
        + "\n"
    )
    out = tmp_path / "job-out"
    entrypoint = (
        f"python -m workers.jobs.render --manifest {items} --out {out} --address auto --lossless"
    )
    runtime_env = {
        "working_dir": str(ROOT),
        "excludes": [".git", ".venv*", "runs", "*.safetensors", "*.mp4"],
    }
    result, head, dashboard, temp_dir = submit_to_a_token_head(
        env, tmp_path, entrypoint, runtime_env
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        assert result["status"].endswith("SUCCEEDED"), result["logs"]
        row = json.loads((out / "results.jsonl").read_text().splitlines()[0])
        assert row["status"] == "ok" and row["frames"] == 16
        req = request_for(models["diffusion"], frames=16, seed=2, label=3)
        np.testing.assert_array_equal(
            read_video(out / "job-a.mp4").numpy(), reference(models["diffusion"], req)
        )
        # Without the token the cluster refuses the submission.
        no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
        refused = subprocess.run(
            [sys.executable, "-c", SUBMIT, address, "echo hi", "{}"],
            env=no_token,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode != 0
    finally:
        stop_head(head, temp_dir)


def test_waiting_for_the_first_result_does_not_wait_for_the_rest(ray_session):
    """The orchestrator's one wait over all actors returns at the first result."""
    import ray

    @ray.remote(num_cpus=0)
    def after(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    slow, fast = after.remote(120.0), after.remote(0.0)
    try:
        assert RayExecutor.wait([slow, fast], timeout=60.0, first=True) == [fast]
        assert RayExecutor.wait([slow, fast], timeout=0.5) == [fast]
    finally:
        ray.cancel(slow, force=True)


def test_an_actor_that_cannot_load_its_model_says_why_without_a_traceback(ray_session, tmp_path):
    """The remote CheckpointError came back as a 50-line ActorDiedError with the actor's
    traceback and colour codes (in the CLI, and in a batch job's error row)."""
    from vidgen import checkpoint
    from workers.actor import ActorLoadError, start_actor

    models = save_test_generators(tmp_path / "models")
    Path(checkpoint.load(models["diffusion"]).card["tokenizer"]).unlink()
    with pytest.raises(ActorLoadError) as caught:
        start_actor(models["diffusion"], timeout=120)
    message = str(caught.value)
    assert "CheckpointError" in message and "does not exist" in message
    assert "Traceback" not in message and "\x1b[" not in message and "\n" not in message


def test_a_command_line_not_in_utf8_reaches_ray_as_utf8(monkeypatch):
    """Ray hands the driver's command line (read with surrogate escapes) to its core worker
    as UTF-8: `vidgen render out=<a name of other bytes>` failed in ray.init with a
    UnicodeEncodeError. Inside connect's wrapper the name is encodable, and after it Ray's
    own function is back."""
    import ray._private.utils as ray_utils

    from workers.cluster import _utf8_entrypoint

    original = ray_utils.get_entrypoint_name
    monkeypatch.setattr(ray_utils, "get_entrypoint_name", lambda: "vidgen out=v\udcff.mp4")
    with _utf8_entrypoint():
        name = ray_utils.get_entrypoint_name()
        assert name == "vidgen out=v\ufffd.mp4"
        name.encode("utf-8")
    assert ray_utils.get_entrypoint_name() == "vidgen out=v\udcff.mp4"
    monkeypatch.undo()
    assert ray_utils.get_entrypoint_name is original
