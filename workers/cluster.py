"""Connecting to Ray: an embedded local instance, a running cluster, or a Ray client."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)

# Ray gives a new node's raylet a fixed 30 s to register with its GCS; on a loaded machine a
# local start can miss that ("The current node timed out during startup") and then succeed
# when tried again.
STARTUP_TIMEOUT_MESSAGE = "timed out during startup"
LOCAL_START_ATTEMPTS = 3


def _start_local(num_cpus: int | None, num_gpus: int | None, attempts: int) -> None:
    for attempt in range(1, attempts + 1):
        try:
            # address="local" always starts a new instance, never joins one on the machine.
            ray.init(
                address="local",
                num_cpus=num_cpus or os.cpu_count(),
                num_gpus=num_gpus,
                include_dashboard=False,
                log_to_driver=False,
            )
            return
        except Exception as e:  # Ray raises a bare Exception for this
            if STARTUP_TIMEOUT_MESSAGE not in str(e) or attempt == attempts:
                raise
            log.warning("ray: local start %d of %d timed out; trying again", attempt, attempts)
            ray.shutdown()


def connect(
    address: str = "",
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    attempts: int = LOCAL_START_ATTEMPTS,
) -> bool:
    """``""``: start a local instance (this machine's CPUs and GPUs); ``"auto"``: join the
    running cluster (as a ``ray job submit`` driver does); ``"ray://host:port"``: a client.
    A local start that times out registering its node is tried again, up to ``attempts``
    times in all. Already connected: nothing to do. Returns whether this call connected (so
    the caller knows to ``ray.shutdown()`` when done)."""
    if ray.is_initialized():
        return False
    if address == "":
        _start_local(num_cpus, num_gpus, attempts)
    else:
        ray.init(address=address, log_to_driver=False)
    log.info("ray: %s", ray.cluster_resources())
    return True
