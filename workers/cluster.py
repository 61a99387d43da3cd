"""Connecting to Ray: an embedded local instance, a running cluster, or a Ray client."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading

import ray

from vidgen.validate import check_int

log = logging.getLogger(__name__)

# Ray gives a new node's raylet a fixed 30 s to register with its GCS; on a loaded machine a
# local start can miss that ("The current node timed out during startup") and then succeed
# when tried again.
STARTUP_TIMEOUT_MESSAGE = "timed out during startup"
LOCAL_START_ATTEMPTS = 3


def _descendants() -> dict[int, object]:
    """This process's child processes, recursively (pid -> psutil.Process)."""
    try:
        import psutil  # vendored by Ray (ray/thirdparty_files)
    except ImportError:  # pragma: no cover - every Ray wheel has it
        return {}
    return {p.pid: p for p in psutil.Process().children(recursive=True)}


def _is_ray(process: object) -> bool:
    """Whether a process (psutil) is one of Ray's own: its GCS and raylet binaries, its
    workers (``ray::IDLE``, ``ray::GeneratorWorker``) and agents, all run from Ray's
    package. Another thread's child that appears meanwhile is not."""
    import psutil

    try:
        name = process.name()  # type: ignore[attr-defined]
        cmdline = process.cmdline()  # type: ignore[attr-defined]
    except psutil.Error:
        return False
    if name in {"raylet", "gcs_server"} or name.startswith("ray::"):
        return True
    if cmdline and cmdline[0].startswith("ray::"):
        return True
    package = os.path.dirname(ray.__file__) + os.sep
    return any(part.startswith(package) for part in cmdline)


def _stop(processes: list) -> None:
    """Terminate ``processes`` (psutil), then kill those still running after 5 s."""
    import psutil

    for p in processes:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(processes, timeout=5)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


def _start_local(num_cpus: int | None, num_gpus: int | None, attempts: int) -> None:
    for attempt in range(1, attempts + 1):
        before = set(_descendants())
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
            if STARTUP_TIMEOUT_MESSAGE not in str(e):
                raise
            # The failed node's processes (GCS, raylet, agents) were started before Ray gave
            # up, and ray.shutdown() does not know them: stop them, or each try adds load.
            ray.shutdown()
            _stop([p for pid, p in _descendants().items() if pid not in before and _is_ray(p)])
            if attempt == attempts:
                raise
            log.warning("ray: local start %d of %d timed out; trying again", attempt, attempts)


ANSWER_TIMEOUT = 5.0  # seconds a cluster's address has to accept a connection


def _check_answers(address: str) -> None:
    """ConnectionError at once when nothing accepts connections at a ``host:port`` address
    (``ray://host:port`` too): Ray retried it for minutes before it said so."""
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():  # "", "auto", or a form Ray names itself
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), ANSWER_TIMEOUT):
            pass
    except OSError as err:
        raise ConnectionError(
            f"nothing answers at {hostport} ({err.strerror or err}): is the cluster running, "
            "and is this its address?"
        ) from None


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
    if not isinstance(address, str):  # None failed as an AttributeError
        raise ValueError(f"address must be a string ('' for a local instance), got {address!r}")
    attempts = check_int("attempts", attempts, minimum=1)  # 0 never started Ray
    for name, count in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
        if count is None:
            continue
        # 0 CPUs read as "all of them"; a negative count went to Ray as it was
        check_int(name, count, minimum=1 if name == "num_cpus" else 0)
        if address != "":
            raise ValueError(
                f"{name} sizes a local instance (address ''); a cluster at {address!r} has its own"
            )
    if ray.is_initialized():
        return False
    _check_answers(address)
    with _keeping_sigterm_handler(), _utf8_entrypoint():
        if address == "":
            _start_local(num_cpus, num_gpus, attempts)
        else:
            ray.init(address=address, log_to_driver=False)
    log.info("ray: %s", ray.cluster_resources())
    return True


@contextlib.contextmanager
def _keeping_sigterm_handler():
    """``ray.init`` sets its own SIGTERM handler (``sys.exit(15)``) over the caller's: put
    back one the caller set (the ``vidgen`` CLI sends SIGTERM down Ctrl-C's path, where a
    render keeps its finished segments and says how to resume). The default is left to
    Ray."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Ray sets no handler from another thread either
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if previous not in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _utf8_entrypoint():
    """``ray.init`` hands the driver's command line to its core worker as UTF-8, and failed
    (``UnicodeEncodeError``) on an argument that is not: a file name of other bytes, read
    as surrogate escapes. Such bytes are given to Ray as replacement characters."""
    utils = getattr(getattr(ray, "_private", None), "utils", None)
    original = getattr(utils, "get_entrypoint_name", None)
    if original is None:  # another Ray: nothing to wrap
        yield
        return

    def entrypoint_name() -> str:
        return os.fsencode(original()).decode("utf-8", "replace")

    utils.get_entrypoint_name = entrypoint_name
    try:
        yield
    finally:
        utils.get_entrypoint_name = original
