"""Bounds on what can be asked of this machine, checked before anything is allocated or started.

- threads: at most ``THREADS_PER_CORE`` per logical core (a runtime given 100 000 threads spawns
  them, takes gigabytes and minutes, and is no faster than with one per core);
- a synthetic feed: at most ``MAX_SYNTHETIC_BYTES`` (``--dims H=100000,W=100000`` would otherwise
  try to allocate tens of gigabytes of random numbers).
"""

from __future__ import annotations

import os

from infertune.errors import DataError, UsageError

THREADS_PER_CORE = 4
MAX_SYNTHETIC_BYTES = 2 * 2**30


def logical_cores() -> int:
    return os.cpu_count() or 1


def max_threads() -> int:
    return THREADS_PER_CORE * logical_cores()


def check_threads(n: object, what: str = "threads") -> int:
    """``n`` as a thread count: an integer from 0 (the runtime's default) to ``max_threads()``."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise UsageError(f"{what} must be an integer, got {n!r}")
    if n < 0:
        raise UsageError(f"{what} must be >= 0 (0 = the runtime's default), got {n}")
    if n > max_threads():
        raise UsageError(f"{what} {n} is more than this machine can use: at most {max_threads()} "
                         f"({THREADS_PER_CORE} per logical core, {logical_cores()} cores); 0 = the runtime's default")
    return n


def check_feed_bytes(shapes: dict[str, tuple[int, ...]], itemsizes: dict[str, int], where: str) -> None:
    """Refuse a synthetic feed over ``MAX_SYNTHETIC_BYTES`` before allocating it."""
    total = 0
    for name, shape in shapes.items():
        n = itemsizes[name]
        for d in shape:
            n *= d
        total += n
        if total > MAX_SYNTHETIC_BYTES:
            raise DataError(f"{where}: input '{name}' of shape {list(shape)} would take {n / 2**30:.1f} GiB "
                            f"(a synthetic feed may take {MAX_SYNTHETIC_BYTES // 2**30} GiB): give smaller --dims")
