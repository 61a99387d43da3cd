"""Checks of plain arguments whose errors name the argument and what was expected."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# The largest frame side of a procedural world: past it a frame alone is over 48 MiB, and a
# typo (world.size=100000) ended in a MemoryError traceback (596 GiB) instead of an error.
MAX_WORLD_SIZE = 4096


def check_world_size(value: object, minimum: int) -> int:
    """A world's ``size`` (frame side in px) in [minimum, MAX_WORLD_SIZE]."""
    size = check_int("size", value, minimum=minimum)
    if size > MAX_WORLD_SIZE:
        raise ValueError(f"size must be <= {MAX_WORLD_SIZE} px, got {shown(size)}")
    return size


def check_int(name: str, value: object, minimum: int | None = None) -> int:
    """``value`` as an int; bool (an int subclass: True as a count is a bug, not a 1) and
    non-integers are refused, as is anything below ``minimum``."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        at_least = "" if minimum is None else f" >= {minimum}"
        raise ValueError(
            f"{name} must be an int{at_least}, got {shown(value)} ({type(value).__name__})"
        )
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {shown(value)}")
    return int(value)


def check_number(
    name: str,
    value: object,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    above: float | None = None,
    below: float | None = None,
) -> float:
    """``value`` as a finite float (ints accepted, bool refused) within the bounds given:
    ``minimum``/``maximum`` inclusive, ``above``/``below`` exclusive."""
    if isinstance(value, bool | np.bool_) or not isinstance(
        value, int | float | np.integer | np.floating
    ):
        raise ValueError(f"{name} must be a number, got {shown(value)} ({type(value).__name__})")
    try:
        number: float | None = float(value)
    except OverflowError:  # an int beyond a float's range (math.isfinite raises on it too)
        number = None
    if number is not None and not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value}")
    lo = "[" if minimum is not None else "(" if above is not None else None
    hi = "]" if maximum is not None else ")" if below is not None else None
    low, high = (
        (minimum if minimum is not None else above),
        (maximum if maximum is not None else below),
    )
    if (
        (minimum is not None and value < minimum)
        or (above is not None and value <= above)
        or (maximum is not None and value > maximum)
        or (below is not None and value >= below)
    ):
        if lo and hi:
            expected = f"in {lo}{low}, {high}{hi}"
        elif lo:
            expected = f">= {low}" if lo == "[" else f"> {low}"
        else:
            expected = f"<= {high}" if hi == "]" else f"< {high}"
        raise ValueError(f"{name} must be {expected}, got {shown(value)}")
    if number is None:  # within the bounds given, but no float can hold it
        raise ValueError(f"{name} must fit in a float (about 1.8e308), got {shown(value)}")
    return number


MAX_STEP_TIMEOUT = 7 * 24 * 3600.0  # seconds: Ray's waits overflow on inf or 1e300


def check_step_timeout(name: str, value: object) -> float | None:
    """A step timeout in seconds: None (no limit) or a number in (0, ``MAX_STEP_TIMEOUT``]."""
    if value is None:
        return None
    return check_number(name, value, above=0, maximum=MAX_STEP_TIMEOUT)


MAX_DEPTH = 512  # layers: a checkpoint's config saying 2**20 took an hour to refuse


def check_depths(obj: object, *names: str) -> None:
    """Each ``obj.<name>`` (a number of layers) at most ``MAX_DEPTH``."""
    for name in names:
        value = getattr(obj, name)
        if value > MAX_DEPTH:
            raise ValueError(f"{name} must be <= {MAX_DEPTH} layers, got {value}")


def check_ints(obj: object, minimum: int, *names: str) -> None:
    """``check_int`` on attributes of ``obj`` (a config), each at least ``minimum``."""
    for name in names:
        check_int(name, getattr(obj, name), minimum=minimum)


def shown(value: object, limit: int = 80) -> str:
    """``value`` for an error message: a huge int by its size (Python refuses to print one of
    over 4300 digits, and a long one buries the message), anything else by a cut repr."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        digits = int(abs(value).bit_length() * math.log10(2)) + 1
        return f"{'a negative' if value < 0 else 'an'} int of about {digits} digits"
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def values_checkable(x: Any) -> bool:
    """Whether a check that reads the values of tensor ``x`` (a range, NaN) is free: on the
    CPU, outside a compiled graph. On a GPU it is a host sync, which on the per-step paths
    (each denoising or block step) stalls the queue of kernels; in a compiled graph it is a
    graph break. Such checks are made where this holds and skipped elsewhere."""
    import torch

    return x.device.type == "cpu" and not torch.compiler.is_compiling()
