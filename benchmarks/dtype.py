"""bfloat16 against float32 serving: speed, cache memory and how far the frames move.

Usage: python benchmarks/dtype.py [--models ca2vdm-tiny,nbp-tiny] [--frames 64]
                                  [--streams 4] [--device cpu|cuda] [--threads 2] [--repeats 3]

For each model, in one process and run: ``--streams`` streams (seeds 0.., label 2) batched
on an in-process generator with ``dtype=float32`` and one with ``bfloat16`` (each after a
one-clip warm-up), the two timed in turn ``--repeats`` times. Figures per model: the median
frames/s of each and ``bf16_speedup`` (their ratio), the bytes of each one's cache tensors
(``cache_ratio``, 0.5 expected), and, for the diffusion family,
``first_clip_mean_abs_diff``: the mean absolute pixel difference (0-255) of the first clips
(the samplers start from the same noise, so this is rounding, not another draw; token models
sample other tokens as soon as a logit rounds differently, so their videos are compared only
by the figures of ``benchmarks/quality.py``). bfloat16 is meant for GPUs; on a CPU its speed
depends on the CPU's bfloat16 support and the batch. One JSON object last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from _args import device, positive_int, threads

from vidgen.generators import GenerationRequest, load_generator
from vidgen.machine import describe_machine


def run(gen, model: str, frames: int, streams: int) -> tuple[float, np.ndarray]:
    """Seconds for ``streams`` batched videos of ``frames`` frames, and seed 0's first clip."""
    reqs = [GenerationRequest(model=model, frames=frames, seed=s, label=2) for s in range(streams)]
    opened = [gen.open(r) for r in reqs]
    first = None
    if gen.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    while not opened[0].done:
        latents = gen.step(opened)
        clips = gen.decode(latents)
        if first is None:
            first = clips[0].frames
    if gen.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    for s in opened:
        gen.close(s)
    return seconds, first


def measure(model: str, frames: int, streams: int, device: str, repeats: int) -> dict[str, object]:
    out: dict[str, object] = {}
    dtypes = ("float32", "bfloat16")
    gens = {d: load_generator(model, max_streams=streams, device=device, dtype=d) for d in dtypes}
    for gen in gens.values():
        run(gen, model, gen.clip_len, streams)  # warm-up: one clip
    times: dict[str, list[float]] = {d: [] for d in dtypes}
    firsts = {}
    for _ in range(repeats):  # in turn, so that a load from elsewhere falls on both alike
        for dtype, gen in gens.items():
            seconds, firsts[dtype] = run(gen, model, frames, streams)
            times[dtype].append(seconds)
    for dtype, gen in gens.items():
        out[f"{dtype}_frames_per_s"] = round(frames * streams / statistics.median(times[dtype]), 2)
        out[f"{dtype}_cache_bytes"] = gen.cache.nbytes  # its K/V tensors, as allocated
    out["repeats"] = repeats
    out["bf16_speedup"] = round(out["bfloat16_frames_per_s"] / out["float32_frames_per_s"], 3)
    out["cache_ratio"] = round(out["bfloat16_cache_bytes"] / out["float32_cache_bytes"], 3)
    if gens["float32"].family == "diffusion":
        diff = np.abs(firsts["float32"].astype(int) - firsts["bfloat16"].astype(int))
        out["first_clip_mean_abs_diff"] = round(float(diff.mean()), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ca2vdm-tiny,nbp-tiny")
    parser.add_argument("--frames", type=positive_int, default=64)
    parser.add_argument("--streams", type=positive_int, default=4)
    parser.add_argument(
        "--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--threads", type=threads, default=2, help="torch threads on a CPU (0: default)"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=3, help="timed runs of each, medians"
    )
    args = parser.parse_args()
    if args.frames % 8:  # refused by the generators only after both were loaded
        parser.error(f"--frames must be whole 8-frame clips, got {args.frames}")
    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, object] = {
        "frames": args.frames,
        "streams": args.streams,
        "device": args.device,
        "machine": describe_machine(args.device),
    }
    for model in args.models.split(","):
        result[model] = measure(model, args.frames, args.streams, args.device, args.repeats)
        print(model, result[model], flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
