"""The budget flags of ``deepshrink auto``: sizes (200KB, 196KiB), latencies (5ms, 800us) and the Top-1 drop,
read before anything loads so that a bad value fails at once with one line."""

import math
import re

from deepshrink.core.errors import InputError

SIZE_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3}
TIME_UNITS = {"ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1000.0}


def _split_number(text: str, flag: str, example: str) -> tuple[float, str]:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµ]*)\s*", str(text))
    if not match:
        raise InputError(f"{flag}: cannot read {text!r}; write a number with a unit, e.g. {example}")
    return float(match.group(1)), match.group(2).lower()


def parse_size(text: str | int, flag: str = "--target-size") -> int:
    """Bytes from ``200KB``, ``1.5MB``, ``150000`` (bytes). KB/MB are powers of 1000, KiB/MiB of 1024."""
    value, unit = _split_number(str(text), flag, "200KB (1000 bytes), 196KiB (1024) or 150000 (bytes)")
    if unit not in SIZE_UNITS and unit != "":
        raise InputError(f"{flag}: unknown unit {unit!r} in {text!r}; use B, KB, KiB, MB, MiB, GB or GiB")
    size = int(value * SIZE_UNITS.get(unit, 1))
    if size < 1:
        raise InputError(f"{flag}: the size must be at least one byte, got {text!r}")
    return size


def parse_latency(text: str | float, flag: str = "--target-latency") -> float:
    """Milliseconds from ``5ms``, ``800us``, ``0.01s`` or ``5`` (milliseconds)."""
    value, unit = _split_number(str(text), flag, "5ms, 800us or 0.01s")
    if unit not in TIME_UNITS and unit != "":
        raise InputError(f"{flag}: unknown unit {unit!r} in {text!r}; use ms, us or s")
    ms = value * TIME_UNITS.get(unit, 1.0)
    if not ms > 0:
        raise InputError(f"{flag}: the latency must be positive, got {text!r}")
    return ms


def check_max_drop(value: float, flag: str = "--max-drop") -> float:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise InputError(f"{flag}: the allowed Top-1 drop (percentage points) must be >= 0, got {value!r}")
    return float(value)
