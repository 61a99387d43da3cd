"""Actor start and failover recovery: seconds until an actor serves, with the checkpoint probe
run in it and with its result remembered.

Usage: python benchmarks/actor_start.py [--model ca2vdm-tiny] [--restarts 3]

``Checkpoint.build`` makes each model on the meta device before it allocates it (a small file
whose config describes a huge model is refused there); in torch 2.13 that imports
``torch._dynamo``, about 2 s of every fresh process. Files that passed the probe are
remembered (``VIDGEN_CACHE_DIR``), so later actor processes skip it. Two fresh driver
processes, each with its own local Ray instance (one logical GPU, one torch thread per
actor), time the same things, one with ``VIDGEN_CACHE_DIR=off`` (every actor probes) and one
with a cache the first actor filled:

- ``start_s``: ``RayExecutor(model)`` until its actor has loaded the model and answered;
- ``recover_s``: the median over ``--restarts`` of ``kill()`` then ``recover()``, Ray
  restarting the actor in a new process that loads the model again (a failover's cost before
  the lost streams restart).

One JSON object last: each figure of both, and ``*_speedup`` (probe over remembered).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from vidgen.machine import describe_machine


def child(model: str, restarts: int) -> None:
    import ray

    from workers.executors import RayExecutor

    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        if os.environ["VIDGEN_CACHE_DIR"] != "off":  # the first actor that fills the cache
            RayExecutor(model, max_restarts=0).retire()
        began = time.perf_counter()
        executor = RayExecutor(model, max_restarts=restarts)
        start = time.perf_counter() - began
        recovers = []
        try:
            for _ in range(restarts):
                began = time.perf_counter()
                executor.kill()
                executor.recover()
                recovers.append(time.perf_counter() - began)
        finally:
            executor.retire()
    finally:
        ray.shutdown()
    print(json.dumps({"start_s": start, "recover_s": statistics.median(recovers)}))


CHILD_THREADS = 1  # each actor's torch threads (RayExecutor's default)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ca2vdm-tiny")
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.restarts < 1:
        parser.error(f"--restarts must be >= 1, got {args.restarts}")
    if args.child:
        child(args.model, args.restarts)
        return
    figures = {}
    with tempfile.TemporaryDirectory() as cache:
        for name, where in (("probe", "off"), ("remembered", cache)):
            argv = ["--child", "--model", args.model, "--restarts", str(args.restarts)]
            proc = subprocess.run(
                [sys.executable, __file__, *argv],
                env={**os.environ, "VIDGEN_CACHE_DIR": where},
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                sys.exit(f"actor_start.py: the {name} run failed:\n{proc.stderr[-3000:]}")
            figures[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    torch.set_num_threads(CHILD_THREADS)  # the machine line names the actors' threads
    out: dict = {"model": args.model, "restarts": args.restarts}
    for key in ("start_s", "recover_s"):
        for name, got in figures.items():
            out[f"{key}_{name}"] = round(got[key], 3)
        out[f"{key.removesuffix('_s')}_speedup"] = round(
            figures["probe"][key] / figures["remembered"][key], 3
        )
    out["machine"] = describe_machine()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
