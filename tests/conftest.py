"""Shared test setup: test-size models are tiny, so one torch thread is fastest and keeps
timings steady when other processes share the CPU."""

import torch

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for the whole test run, with two logical GPUs so GPU placement is
    tested on a CPU machine (DEVELOPERS.md)."""
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
