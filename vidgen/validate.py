"""Checks of plain arguments whose errors name the argument and what was expected."""

from __future__ import annotations

import math

import numpy as np


def check_int(name: str, value: object, minimum: int | None = None) -> int:
    """``value`` as an int; bool (an int subclass: True as a count is a bug, not a 1) and
    non-integers are refused, as is anything below ``minimum``."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_number(name: str, value: object, minimum: float | None = None) -> float:
    """``value`` as a finite float (ints accepted, bool refused), at least ``minimum``."""
    if isinstance(value, bool | np.bool_) or not isinstance(
        value, int | float | np.integer | np.floating
    ):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return float(value)
