"""Connecting to Ray: an embedded local instance, a running cluster, or a Ray client."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def connect(address: str = "", num_cpus: int | None = None, num_gpus: int | None = None) -> bool:
    """``""``: start a local instance (this machine's CPUs and GPUs); ``"auto"``: join the
    running cluster (as a ``ray job submit`` driver does); ``"ray://host:port"``: a client.
    Already connected: nothing to do. Returns whether this call connected (so the caller
    knows to ``ray.shutdown()`` when done)."""
    if ray.is_initialized():
        return False
    if address == "":
        # address="local" always starts a new instance, never joins one found on the machine.
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            num_gpus=num_gpus,
            include_dashboard=False,
            log_to_driver=False,
        )
    else:
        ray.init(address=address, log_to_driver=False)
    log.info("ray: %s", ray.cluster_resources())
    return True
