"""Peak memory of ``vidgen eval`` over long videos, streamed against decoded whole.

Usage: python benchmarks/eval_memory.py [--frames 512,4096] [--size 64]

Writes one BouncingShapes h264 video per length (3 shapes, ``--size`` pixels square), then
scores each in fresh Python processes, two ways: ``streamed`` is ``vidgen eval``'s own path
(``vidgen.eval.report.evaluate``: 256 frames decoded and scored at a time), ``whole`` reads the
video into memory at once (``read_video``) and scores it with ``scene_metrics`` (what eval
did until 2026-11-30). Each process reports its peak resident memory (VmHWM) and the time
scoring took; a process that only imports the same modules gives the baseline. Both ways
must give the same figures (checked before anything is printed). One JSON object last:
peaks, their growth from the shortest to the longest video (``streamed_growth``: flat is
bounded memory), the memory over the baseline of the longest video whole vs streamed
(``whole_over_streamed``), and times.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from _args import child_stdout, int_list, positive_int


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, video: str) -> None:
    import numpy as np  # noqa: F401  (the same imports in every mode)

    from vidgen.eval.report import EvalConfig, evaluate
    from vidgen.eval.scene import scene_metrics
    from vidgen.io import read_video
    from vidgen.worlds.bouncing import BOUNCING_PALETTE

    start = time.perf_counter()
    figures = None
    if mode == "streamed":
        report = evaluate(EvalConfig(videos=video, label=3))
        figures = report["per_video"][Path(video).name]
        figures.pop("frames"), figures.pop("label")
    elif mode == "whole":
        frames = read_video(video).numpy()
        figures = scene_metrics(frames, BOUNCING_PALETTE, 3, clip_len=8, true_speed=1.5)
    seconds = time.perf_counter() - start
    print(json.dumps({"peak_mb": peak_rss_mb(), "seconds": seconds, "figures": figures}))


def run(mode: str, video: Path) -> dict:
    stdout = child_stdout([sys.executable, __file__, "--child", mode, "--video", str(video)])
    return json.loads(stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int_list, default="512,4096")
    parser.add_argument("--size", type=positive_int, default=64)
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--video", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.frames) < 1 or args.size < 16:  # tracebacks from the world, after imports
        parser.error(f"--frames must be >= 1 and --size >= 16, got {args.frames}, {args.size}")
    if args.child:
        child(args.child, args.video)
        return
    from vidgen.io import VideoWriter
    from vidgen.worlds.bouncing import BouncingShapes, BouncingShapesConfig

    lengths = sorted(args.frames)
    out: dict[str, object] = {"frames": lengths, "size": args.size}
    with tempfile.TemporaryDirectory() as tmp:
        runs: dict[int, dict[str, dict]] = {}
        for frames in lengths:
            video = Path(tmp) / f"v{frames}.mp4"
            world = BouncingShapes(BouncingShapesConfig(num_shapes=3, size=args.size), seed=0)
            with VideoWriter(video) as writer:
                writer.write(world.trajectory(frames).frames)
            runs[frames] = {mode: run(mode, video) for mode in ("baseline", "streamed", "whole")}
            streamed, whole = runs[frames]["streamed"], runs[frames]["whole"]
            if streamed["figures"].keys() != whole["figures"].keys():
                raise SystemExit(f"{frames} frames: streamed and whole give other figures")
            for key, value in whole["figures"].items():
                got = streamed["figures"][key]
                # Equal (inf too: inf - inf is NaN, which no tolerance test catches), both
                # NaN, or within a relative 1e-9.
                numbers = all(isinstance(x, int | float) for x in (got, value))
                same = got == value or (numbers and math.isnan(got) and math.isnan(value))
                if not (same or (numbers and abs(got - value) <= 1e-9 * max(1.0, abs(value)))):
                    raise SystemExit(f"{frames} frames: {key} streamed {got} != whole {value}")
        for frames, modes in runs.items():
            for mode in ("baseline", "streamed", "whole"):
                out[f"{mode}_peak_mb_{frames}"] = round(modes[mode]["peak_mb"], 1)
            for mode in ("streamed", "whole"):
                out[f"{mode}_seconds_{frames}"] = round(modes[mode]["seconds"], 2)
    short, long = lengths[0], lengths[-1]
    over = {
        mode: runs[long][mode]["peak_mb"] - runs[long]["baseline"]["peak_mb"]
        for mode in ("streamed", "whole")
    }
    out["streamed_growth"] = round(
        runs[long]["streamed"]["peak_mb"] / runs[short]["streamed"]["peak_mb"], 4
    )
    out["whole_growth"] = round(runs[long]["whole"]["peak_mb"] / runs[short]["whole"]["peak_mb"], 4)
    out["whole_over_streamed"] = round(over["whole"] / over["streamed"], 2)
    from vidgen.machine import describe_machine  # torch: imported by the children only

    out["machine"] = describe_machine()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
