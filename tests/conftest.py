"""Shared test setup: test-size models are tiny, so one torch thread is fastest and keeps
timings steady when other processes share the CPU."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

torch.set_num_threads(1)

# Ray starts its workers at nice 15: with anything else busy on the machine (another CI job)
# an actor then took over 120 s to load a test model (1 s when idle) and missed its start
# timeout. Every Ray instance the tests start, in this process or in subprocesses (vidgen
# render, the batch job, a second head), inherits this.
os.environ.setdefault("RAY_worker_niceness", "0")
# A killed worker that does not exit (the hung-actor test's SIGSTOPped process) is SIGKILLed
# after this grace: Ray's default of 5 s delayed every restart behind such a kill.
os.environ.setdefault("RAY_kill_worker_timeout_milliseconds", "300")
# The files that passed the checkpoint probe are remembered here (vidgen.checkpoint), not in
# ~/.cache: one folder per test process, shared by the actors and subprocesses it starts.
_CACHE = tempfile.mkdtemp(prefix="vidgen-test-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("VIDGEN_CACHE_DIR", _CACHE)
# Subprocesses run this environment's `vidgen` and `ray`, even when pytest was started by the
# venv's python without the venv activated.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items) -> None:
    """Under pytest-xdist (``-n 2 --dist loadgroup``, the README's command) every Ray test
    runs in one worker, so the session still has one shared Ray instance."""
    for item in items:
        if item.path.name == "test_ray.py":
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture
def all_threads():
    """Every core for one test: the I3D of FVD is no test-size model (a clip takes 1.2 s on
    one thread and 0.46 s on two on the 2-core CI machine)."""
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for the whole test run, with two logical GPUs so GPU placement is
    tested on a CPU machine (DEVELOPERS.md)."""
    import ray

    from workers.cluster import connect

    connect("", num_cpus=2, num_gpus=2)  # a local start, tried again if it times out
    yield ray
    ray.shutdown()
