"""Serving through Ray: overhead, batching, scaling, and memory over long videos.

Usage: python benchmarks/serving.py [--model ca2vdm-tiny] [--frames 128] [--streams 8]
                                    [--steps 12] [--memory-frames 500,5000]

All in one run, on a local Ray instance with two logical GPUs on a CPU machine, or the
machine's GPUs (one actor per GPU, one torch thread per actor; the in-process runs use the
device the actors use: a GPU where there is one; with a single GPU there is no two-actor
run):
- ``ray_overhead``: seconds for one video through one actor and the orchestrator over the
  same video made in process the way the actor makes it, each clip decoded in a second
  thread while the next is denoised (same model, frames, seed); ``ray_overhead_vs_serial``
  is the same over plain ``generate_video``, which decodes between steps (the overlap alone
  made that ratio about 0.83 with no Ray cost at all).
- ``batching_gain``: throughput of ``--streams`` streams batched on one actor over the same
  streams run one after another on it.
- ``scaling_2_actors``: throughput of two actors over one, ``--streams`` streams each time.
- peak memory (VmHWM: host memory; an actor's GPU memory is not in it) of the driver and of
  the actor rendering ``--memory-frames`` frames, each in a fresh process; ``*_growth`` is
  the largest over the smallest; a fresh process that starts the actor and renders nothing
  gives ``*_baseline_mb`` (imports, Ray, the model), and ``*_working_set_growth`` compares
  the peaks less it.
Diffusion steps are ``--steps``, by default the render default (12). The ratios depend on
them: each actor decodes in a second thread while it denoises the next clip, so the fewer the
steps, the larger decoding's share of the work and the more one actor already uses the second
core (measured on 2 cores: with 4 steps ``ray_overhead_vs_serial``, as ``ray_overhead`` was until
2026-12-01, 0.67 and ``scaling_2_actors`` 1.31, with 12 steps 0.83 and 1.47). One JSON object last.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ray
import torch
from _args import child_stdout, int_list, positive_int

from vidgen import checkpoint
from vidgen.generators import GenerationRequest, generate_video, load_generator
from vidgen.machine import describe_machine
from workers.executors import RayExecutor
from workers.orchestrator import Orchestrator


def peak_rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def request(model: str, frames: int, seed: int, steps: int) -> GenerationRequest:
    return GenerationRequest(model=model, frames=frames, seed=seed, label=2, steps=steps)


def actor_device() -> str:
    """The device an actor placed on a GPU of this machine uses (``auto_device``), and so
    the in-process runs compared with it: on a GPU machine they ran on the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def in_process_seconds(model: str, frames: int, steps: int) -> tuple[float, float, np.ndarray]:
    """Seconds for seed 0's video made in process by ``generate_video`` (decoding between
    steps) and as the actor makes it (each clip decoded in a second thread while the next is
    denoised), and the video (the same both ways, checked)."""
    torch.set_num_threads(1)
    gen = load_generator(model, max_streams=1, device=actor_device())
    for _ in generate_video(gen, request(model, 16, 0, steps)):  # warm-up, as the actor gets
        pass
    start = time.perf_counter()
    clips = [clip.frames for clip in generate_video(gen, request(model, frames, 0, steps))]
    serial = time.perf_counter() - start
    start = time.perf_counter()
    stream = gen.open(request(model, frames, 0, steps))
    with ThreadPoolExecutor(max_workers=1) as decoder:
        pending = []
        while not stream.done:
            (latents,) = gen.step([stream])
            pending.append(decoder.submit(gen.decode, [latents]))
        piped = [future.result()[0].frames for future in pending]
    pipelined = time.perf_counter() - start
    gen.close(stream)
    if not all(np.array_equal(a, b) for a, b in zip(clips, piped, strict=True)):
        raise RuntimeError("decoding in a second thread made another video")
    return serial, pipelined, np.concatenate(clips)


class VideoSink:
    """Takes every clip at once (a consumer that never holds a stream back: taking streams'
    clips one stream after another through ``Orchestrator.clips`` would stall the others at
    their queue bound, and batching with them) and keeps them, to check that every way of
    serving made the same video."""

    def __init__(self) -> None:
        self.clips: list[np.ndarray] = []
        self.finished = False

    def room(self) -> int:
        return 1 << 30

    def put(self, clip) -> None:
        self.clips.append(clip.frames)

    def finish(self) -> None:
        self.finished = True


def orchestrated_seconds(
    executors: list, model: str, frames: int, steps: int, seeds: list[int], together: bool = True
) -> tuple[float, dict[int, np.ndarray]]:
    """Seconds to make one video per seed, all submitted at once (batched on the executors)
    or one after another, and the videos by seed."""
    orch = Orchestrator(executors, queue_clips=8)
    start = time.perf_counter()
    groups = [seeds] if together else [[s] for s in seeds]
    videos: dict[int, np.ndarray] = {}
    for group in groups:
        sinks = [VideoSink() for _ in group]
        for seed, sink in zip(group, sinks, strict=True):
            orch.submit(request(model, frames, seed, steps), sink=sink)
        orch.run()
        for seed, sink in zip(group, sinks, strict=True):
            if not sink.finished or sum(map(len, sink.clips)) != frames:
                raise RuntimeError(f"a stream did not deliver its {frames} frames")
            videos[seed] = np.concatenate(sink.clips)
    return time.perf_counter() - start, videos


def frame_difference(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> float:
    """The largest per-video mean absolute difference (0-255) between two sets of videos."""
    return max(float(np.abs(a[k].astype(np.int16) - b[k]).mean()) for k in a)


# Ways of serving the same requests must make the same videos (up to the rounding of batched
# float math, which an autoregressive video can carry along) before their speeds are
# compared: a mean absolute difference far below that between videos of other seeds.
SAME_VIDEO = 0.5


def memory_child(model: str, frames: int, steps: int) -> None:
    """Render ``frames`` through one actor in this (fresh) process (none when negative: the
    baseline); print peak memory."""
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    executor = RayExecutor(model, max_streams=1)
    orch = Orchestrator([executor])
    if frames > 0:
        for _ in orch.clips(orch.submit(request(model, frames, 0, steps))):
            pass
    actor_pid = executor.info["pid"]
    print(json.dumps({"driver_mb": peak_rss_mb(), "actor_mb": peak_rss_mb(actor_pid)}))


def memory(model: str, frames_list: list[int], steps: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for frames in [-1, *frames_list]:
        stdout = child_stdout(
            [
                sys.executable,
                __file__,
                "--memory-child",
                str(frames),
                "--model",
                model,
                "--steps",
                str(steps),
            ]
        )
        figures = json.loads(stdout.strip().splitlines()[-1])
        name = "baseline_mb" if frames < 0 else f"peak_mb_{frames}"
        out[f"driver_{name}"] = round(figures["driver_mb"], 1)
        out[f"actor_{name}"] = round(figures["actor_mb"], 1)
    lo, hi = min(frames_list), max(frames_list)
    for who in ("driver", "actor"):
        low, high, base = (
            out[f"{who}_{k}"] for k in (f"peak_mb_{lo}", f"peak_mb_{hi}", "baseline_mb")
        )
        out[f"{who}_growth"] = round(high / low, 4)
        out[f"{who}_working_set_growth"] = round((high - base) / (low - base), 4)
    return out


def model_or_random(name: str, folder: Path) -> str:
    """The shipped model, or a random-weight one of the same size (speed does not depend on
    the weights) when it is not trained yet."""
    try:
        checkpoint.resolve(name)
        return name
    except checkpoint.CheckpointError:
        from vidgen.models.ca2vdm import CA2VDM_CONFIGS, CausalVideoDiT
        from vidgen.tokenizers.kl import KL_CONFIGS, KLAutoencoder

        kl = checkpoint.save(
            folder / "kl.safetensors", KLAutoencoder(KL_CONFIGS["tiny"]), KL_CONFIGS["tiny"]
        )
        return str(
            checkpoint.save(
                folder / "dit.safetensors",
                CausalVideoDiT(CA2VDM_CONFIGS["tiny"]),
                CA2VDM_CONFIGS["tiny"],
                card={"tokenizer": str(kl)},
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ca2vdm-tiny")
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--streams", type=positive_int, default=8)
    parser.add_argument("--steps", type=positive_int, default=12, help="the render default")
    parser.add_argument("--memory-frames", type=int_list, default=[500, 5000])
    parser.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.model, args.memory_child, args.steps)
        return
    frames = args.frames // 8 * 8
    memory_frames = [x // 8 * 8 for x in args.memory_frames]
    if min(frames, *memory_frames) < 8:  # 0 would be the child flag's "not a child"
        parser.error("--frames and --memory-frames must be whole clips of 8 frames or more")
    with tempfile.TemporaryDirectory() as tmp:
        model = model_or_random(args.model, Path(tmp))
        t_local, t_piped, local_video = in_process_seconds(model, frames, args.steps)
        # Logical GPUs on a CPU machine; on a GPU machine its own (two logical ones on one
        # GPU gave the second actor a device torch does not see: it ran on the CPU).
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 2
        ray.init(
            address="local", num_cpus=2, num_gpus=gpus, include_dashboard=False, log_to_driver=False
        )
        executors = [RayExecutor(model, max_streams=args.streams) for _ in range(min(gpus, 2))]
        for executor in executors:  # warm-up: each actor's first batched steps untimed
            if executor.info.get("device", "cpu").split(":")[0] != actor_device():
                raise RuntimeError(
                    f"an actor runs on {executor.info.get('device')}, the in-process runs on "
                    f"{actor_device()}: the ratios would compare two devices"
                )
            orchestrated_seconds([executor], model, 16, args.steps, list(range(args.streams)))
        a = executors[0]
        orchestrated_seconds([a], model, 16, args.steps, [0])
        t_ray, ray_video = orchestrated_seconds([a], model, frames, args.steps, [0])
        seeds = list(range(args.streams))
        t_batched, batched = orchestrated_seconds([a], model, frames, args.steps, seeds)
        t_serial, serial = orchestrated_seconds([a], model, frames, args.steps, seeds, False)
        t_two, two = None, None
        if len(executors) == 2:
            t_two, two = orchestrated_seconds(executors, model, frames, args.steps, seeds)
        else:
            print("one GPU: no two-actor run (scaling_2_actors is null)", file=sys.stderr)
        ray.shutdown()
        differences = {
            "ray_vs_in_process": frame_difference(ray_video, {0: local_video}),
            "batched_vs_one_after_another": frame_difference(batched, serial),
        }
        if two is not None:
            differences["two_actors_vs_one_after_another"] = frame_difference(two, serial)
        other_seed = frame_difference({0: serial[0]}, {0: serial[seeds[-1]]}) if seeds[1:] else 0
        if any(d > SAME_VIDEO for d in differences.values()):
            raise RuntimeError(
                f"the ways of serving made different videos (mean absolute frame difference, "
                f"0-255; {other_seed:.2f} between two seeds): {differences}"
            )
        print(  # the speed figures before the (long) memory runs
            f"in process {t_local:.2f}s (decoding in a thread {t_piped:.2f}s), one actor "
            f"{t_ray:.2f}s, batched {t_batched:.2f}s, "
            f"one after another {t_serial:.2f}s, two actors "
            + ("-" if t_two is None else f"{t_two:.2f}s"),
            file=sys.stderr,
        )
        result: dict[str, object] = {
            "model": args.model if model == args.model else f"{args.model} (random weights)",
            "frames": frames,
            "streams": args.streams,
            "steps": args.steps,
            "in_process_s": round(t_local, 3),
            "in_process_decoding_in_a_thread_s": round(t_piped, 3),
            "one_actor_s": round(t_ray, 3),
            "ray_overhead": round(t_ray / t_piped, 4),
            "ray_overhead_vs_serial": round(t_ray / t_local, 4),
            "batched_s": round(t_batched, 3),
            "one_after_another_s": round(t_serial, 3),
            "batching_gain": round(t_serial / t_batched, 4),
            "two_actors_s": None if t_two is None else round(t_two, 3),
            "scaling_2_actors": None if t_two is None else round(t_batched / t_two, 4),
            "device": actor_device(),
            "video_difference": {k: round(v, 4) for k, v in differences.items()},
            "video_difference_between_seeds": round(other_seed, 2),
            **memory(model, memory_frames, args.steps),
            "machine": describe_machine(),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
