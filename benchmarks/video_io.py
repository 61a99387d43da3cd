"""Throughput and quality of vidgen.io on a 64x64 bouncing-squares clip.

Usage: python benchmarks/io.py [--frames N]   (default 512)

Writes the clip in the default h264 mode and in lossless mode, reads the h264 file back with
the decord and PyAV backends, and prints one JSON object as the last line. Times are the best
of a few repeats; compare the ratio (decord_vs_pyav_read), not absolute figures, across
machines (DESIGN.md section 8).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vidgen.io import DEFAULT_CRF, VideoWriter, read_video

SIZE = 64
REPEATS = 3
BACKGROUND = (20, 20, 28)
# (colour, side, start x, start y, velocity x, velocity y): saturated squares at 1-2 px a frame.
SQUARES = [
    ((220, 40, 40), 16, 3, 10, 1, 2),
    ((40, 200, 60), 14, 40, 24, -2, 1),
    ((50, 90, 230), 10, 50, 5, -1, -1),
    ((235, 210, 40), 8, 20, 44, 2, -1),
]


def _bounce(start: int, velocity: int, t: int, span: int) -> int:
    """Position after t frames moving between 0 and span, reflecting off both walls."""
    period = 2 * span
    p = (start + velocity * t) % period
    return p if p <= span else period - p


def bouncing_squares(num_frames: int) -> np.ndarray:
    frames = np.empty((num_frames, SIZE, SIZE, 3), np.uint8)
    frames[:] = BACKGROUND
    for t in range(num_frames):
        for colour, side, x0, y0, vx, vy in SQUARES:
            x = _bounce(x0, vx, t, SIZE - side)
            y = _bounce(y0, vy, t, SIZE - side)
            frames[t, y : y + side, x : x + side] = colour
    return frames


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


def parse_frames(argv: list[str]) -> int:
    if not argv:
        return 512
    if len(argv) == 2 and argv[0] == "--frames" and argv[1].isdigit() and int(argv[1]) > 0:
        return int(argv[1])
    sys.exit(f"usage: python benchmarks/io.py [--frames N]  (N a positive int), got {argv}")


def main() -> None:
    num_frames = parse_frames(sys.argv[1:])
    frames = bouncing_squares(num_frames)
    with tempfile.TemporaryDirectory() as tmp:
        h264, lossless = Path(tmp) / "h264.mp4", Path(tmp) / "lossless.mp4"
        print(f"writing {num_frames} frames of {SIZE}x{SIZE}", file=sys.stderr)
        t_h264, _ = best_seconds(lambda: write(h264, frames, lossless=False))
        t_lossless, _ = best_seconds(lambda: write(lossless, frames, lossless=True))
        print("reading back", file=sys.stderr)
        t_decord, via_decord = best_seconds(lambda: read_video(h264, backend="decord").numpy())
        t_pyav, via_pyav = best_seconds(lambda: read_video(h264, backend="pyav").numpy())
        exact = np.array_equal(read_video(lossless, backend="decord").numpy(), frames)
        result = {
            "frames": num_frames,
            "crf": DEFAULT_CRF,
            "write_fps_h264": round(num_frames / t_h264, 1),
            "write_fps_lossless": round(num_frames / t_lossless, 1),
            "read_fps_decord": round(num_frames / t_decord, 1),
            "read_fps_pyav": round(num_frames / t_pyav, 1),
            "decord_vs_pyav_read": round(t_pyav / t_decord, 3),
            "bytes_per_frame_h264": round(h264.stat().st_size / num_frames, 1),
            "bytes_per_frame_lossless": round(lossless.stat().st_size / num_frames, 1),
            "psnr_h264": round(psnr(via_decord, frames), 2),
            "psnr_h264_luma": round(psnr(luma(via_decord), luma(frames)), 2),
            "decord_equals_pyav_h264": bool(np.array_equal(via_decord, via_pyav)),
            "lossless_bit_exact": exact,
            "machine": f"{platform.platform()} {platform.machine()}, {os.cpu_count()} cpus",
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
