"""Throughput and quality of the foundation: world rendering, mp4 writing and reading.

Usage: python benchmarks/video_io.py [--frames N]   (default 512)

Renders a 64x64 BouncingShapes clip (4 shapes) and an AgentWorld rollout, writes the clip in
the default h264 mode and in lossless mode, reads the h264 file back with the decord and PyAV
backends, times `vidgen data preview` end to end (render + encode + atomic rename), and prints
one JSON object as its last line. Times are the best of a few repeats; compare ratios, not
absolute figures, across machines (DESIGN.md section 8).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vidgen.data.preview import PreviewConfig, preview
from vidgen.io import DEFAULT_CRF, VideoWriter, read_video
from vidgen.machine import describe_machine
from vidgen.worlds import AgentWorldConfig, BouncingShapes, BouncingShapesConfig
from vidgen.worlds.agent import generate_trajectory

REPEATS = 3


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def luma(frames: np.ndarray) -> np.ndarray:
    return frames.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def best_seconds(fn: Callable[[], object]) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def write(path: Path, frames: np.ndarray, lossless: bool) -> None:
    # Frame by frame, as a renderer streams them.
    with VideoWriter(path, fps=8, lossless=lossless) as writer:
        for frame in frames:
            writer.write(frame)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=512, help="frames per clip (> 0)")
    num_frames = parser.parse_args().frames
    if num_frames < 1:
        parser.error(f"--frames must be > 0, got {num_frames}")

    world = BouncingShapes(BouncingShapesConfig(num_shapes=4), seed=0)
    t_render, traj = best_seconds(lambda: world.trajectory(num_frames))
    frames = traj.frames
    t_agent, _ = best_seconds(
        lambda: generate_trajectory(AgentWorldConfig(), seed=0, num_frames=num_frames)
    )
    with tempfile.TemporaryDirectory() as tmp:
        h264, lossless = Path(tmp) / "h264.mp4", Path(tmp) / "lossless.mp4"
        print(f"writing {num_frames} frames of 64x64", file=sys.stderr)
        t_h264, _ = best_seconds(lambda: write(h264, frames, lossless=False))
        t_lossless, _ = best_seconds(lambda: write(lossless, frames, lossless=True))
        print("reading back", file=sys.stderr)
        t_decord, via_decord = best_seconds(lambda: read_video(h264, backend="decord").numpy())
        t_pyav, via_pyav = best_seconds(lambda: read_video(h264, backend="pyav").numpy())
        if not np.array_equal(via_decord, via_pyav):  # the read speeds compare like with like
            raise RuntimeError("decord and PyAV decoded the h264 file to different frames")
        exact = np.array_equal(read_video(lossless, backend="decord").numpy(), frames)
        cfg = PreviewConfig(world=BouncingShapesConfig(), frames=num_frames, out=f"{tmp}/p.mp4")
        t_preview, _ = best_seconds(lambda: preview(cfg))
        result = {
            "frames": num_frames,
            "crf": DEFAULT_CRF,
            "render_fps_bouncing": round(num_frames / t_render, 1),
            "render_fps_agent": round(num_frames / t_agent, 1),
            "preview_fps": round(num_frames / t_preview, 1),
            "write_fps_h264": round(num_frames / t_h264, 1),
            "write_fps_lossless": round(num_frames / t_lossless, 1),
            "read_fps_decord": round(num_frames / t_decord, 1),
            "read_fps_pyav": round(num_frames / t_pyav, 1),
            "decord_vs_pyav_read": round(t_pyav / t_decord, 3),
            "bytes_per_frame_h264": round(h264.stat().st_size / num_frames, 1),
            "bytes_per_frame_lossless": round(lossless.stat().st_size / num_frames, 1),
            "psnr_h264_rgb": round(psnr(via_decord, frames), 2),
            "psnr_h264_luma": round(psnr(luma(via_decord), luma(frames)), 2),
            "lossless_bit_exact": exact,
            "machine": describe_machine(),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
