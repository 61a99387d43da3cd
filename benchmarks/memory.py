"""Peak memory of in-process generation over long videos (fresh process per length).

Usage: python benchmarks/memory.py [--model ca2vdm-tiny] [--frames 500,5000] [--steps 2]

Each length runs in its own fresh Python process: ``generate_video`` makes the video and
every clip is written to an mp4 as it arrives (what a renderer does), then the process
reports its peak resident memory (VmHWM). Memory per stream is O(window), so the peak must
not grow with the length. A third fresh process only imports, loads the model and opens the
stream (``baseline_mb``): the rest of a peak is generation's own working set. One JSON object
last with the peaks, ``growth`` (largest peak over smallest) and ``working_set_growth`` (the
same over the peaks less the baseline, which the totals dilute: 350 MB of imports and model
under a working set of about 50). Diffusion steps do not change memory; a few keep the run
short.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from _args import child_stdout, int_list, positive_int

from vidgen.machine import describe_machine


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(model: str, frames: int, steps: int) -> None:
    from vidgen.generators import GenerationRequest, generate_video, load_generator
    from vidgen.io import VideoWriter

    torch.set_num_threads(CHILD_THREADS)
    gen = load_generator(model, max_streams=1)
    request = GenerationRequest(model=model, frames=max(frames, 8), seed=0, label=2, steps=steps)
    if frames < 0:  # the baseline: everything but the generation itself
        gen.close(gen.open(request))
        print(json.dumps({"frames": 0, "peak_mb": peak_rss_mb()}))
        return
    with tempfile.TemporaryDirectory() as tmp, VideoWriter(Path(tmp) / "v.mp4") as writer:
        for clip in generate_video(gen, request):
            writer.write(clip.frames)
    print(json.dumps({"frames": frames, "peak_mb": peak_rss_mb()}))


CHILD_THREADS = 1  # what each measured process runs with (and the machine line says)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ca2vdm-tiny")
    parser.add_argument("--frames", type=int_list, default="500,5000")
    parser.add_argument("--steps", type=positive_int, default=2)
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.child, args.steps)
        return
    lengths = [x // 8 * 8 for x in args.frames]
    if min(lengths) < 8:  # 0 is the child flag's "not a child": the child would rerun all this
        parser.error(f"--frames must be whole clips of 8 frames or more, got {args.frames}")
    peaks = {}
    for frames in [-1, *lengths]:
        stdout = child_stdout(
            [
                sys.executable,
                __file__,
                "--child",
                str(frames),
                "--model",
                args.model,
                "--steps",
                str(args.steps),
            ]
        )
        peaks[frames] = json.loads(stdout.strip().splitlines()[-1])["peak_mb"]
    base = peaks.pop(-1)
    torch.set_num_threads(CHILD_THREADS)  # the machine line names the children's threads
    work = {f: p - base for f, p in peaks.items()}
    print(
        json.dumps(
            {
                "model": args.model,
                **{f"peak_mb_{f}": round(p, 1) for f, p in peaks.items()},
                "baseline_mb": round(base, 1),
                "growth": round(max(peaks.values()) / min(peaks.values()), 4),
                "working_set_growth": round(max(work.values()) / min(work.values()), 4),
                "machine": describe_machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
