"""argparse ``type=`` checks shared by the benchmark scripts: a bad value is an argparse
error naming the flag (exit 2), not a traceback from deep inside a run."""

from __future__ import annotations

import argparse
import subprocess
import sys

import torch


def positive_int(text: str) -> int:
    return _int(text, 1)


def threads(text: str) -> int:
    """torch CPU threads; 0: torch's own count."""
    return _int(text, 0)


def int_list(text: str) -> list[int]:
    """Comma-separated ints, at least one."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected comma-separated whole numbers, got nothing")
    return [_int(t, None) for t in items]


def device(text: str) -> str:
    try:
        torch.device(text)
    except (RuntimeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"not a torch device ({err})") from None
    return text


def _int(text: str, minimum: int | None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if minimum is not None and value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def child_stdout(command: list[str]) -> str:
    """Run a benchmark's child process; its stdout. A failed child ends the benchmark with
    the child's own error (``check=True`` raised a bare CalledProcessError, its stderr
    dropped)."""
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(
            f"a child run failed (exit {proc.returncode}): {' '.join(command[1:])}\n"
            f"{proc.stderr[-3000:]}"
        )
    return proc.stdout
