"""Checks for the numbers and flags that public entry points take (rates, counts, sizes).

One place for the rule, so every function says the same thing the same way: a bool, a string
or None is not a number (``TypeError``), and a number must be finite and within its bounds
(``ValueError``). Each message names the function (``where``), the argument and the value.
Without these, ``True`` would pass as a learning rate of 1 and ``nan`` would pass every
``x > 0`` test written as ``not x <= 0``.
"""

from __future__ import annotations

import argparse
import math
import numbers

import numpy as np


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def check_real(
    name: str,
    value,
    where: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float: a finite real number with ``low <= value <= high`` (open ends
    with ``low_open`` / ``high_open``; None: unbounded)."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{where}: {name} must be a real number, got {value!r} ({type(value).__name__})"
        )
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{where}: {name} must be finite, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        bounds = _bounds(low, high, low_open, high_open)
        raise ValueError(f"{where}: {name} must be {bounds}, got {value!r}")
    return value


def _bounds(low, high, low_open: bool, high_open: bool) -> str:
    if high is None:
        if low == 0:
            return "a positive number" if low_open else ">= 0"
        return f"{'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_positive(name: str, value, where: str) -> float:
    """A finite number > 0 (a learning rate, a scale), as a float."""
    return check_real(name, value, where, low=0.0, low_open=True)


def check_nonnegative(name: str, value, where: str) -> float:
    """A finite number >= 0 (weight decay, momentum, a minimum learning rate), as a float."""
    return check_real(name, value, where, low=0.0)


def check_bool(name: str, value, where: str) -> bool:
    """``value`` as a bool: True or False (a NumPy bool too). Anything else is refused, since
    ``bool("False")`` is True and a flag spelled as a string would silently mean the opposite."""
    if not _is_bool(value):
        raise TypeError(
            f"{where}: {name} must be True or False, got {value!r} ({type(value).__name__})"
        )
    return bool(value)


def check_int(name: str, value, where: str, low: int | None = 1, high: int | None = None) -> int:
    """``value`` as an int: an integer (not a bool, not a float such as 5.0) in [low, high]."""
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: {name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{where}: {name} must be {_int_bounds(low, high)}, got {value}")
    return value


def _int_bounds(low, high) -> str:
    if high is None:
        return {1: "a positive integer", 0: "a non-negative integer"}.get(
            low, f"an integer >= {low}"
        )
    return f"an integer in [{low}, {high}]"


# --- the same rules as argparse ``type=`` functions (the examples' command lines) ----------------


def _arg_type(parse, check, description: str):
    def convert(text: str):
        try:
            return check("value", parse(text), "")
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}") from None

    convert.__name__ = description  # argparse names the type by it in its own messages
    return convert


positive_int = _arg_type(int, lambda n, v, w: check_int(n, v, w, low=1), "a positive integer")
nonnegative_int = _arg_type(
    int, lambda n, v, w: check_int(n, v, w, low=0), "a non-negative integer"
)
positive_float = _arg_type(float, check_positive, "a positive finite number")
nonnegative_float = _arg_type(float, check_nonnegative, "a finite number >= 0")
