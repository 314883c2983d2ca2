"""Per-tensor statistics gathered while streaming calibration data, in bounded memory.

Pass 1 keeps a running min/max of the finite values (exact, so independent of batching and
order). Pass 2, when a method needs it, counts values into a fixed histogram over
[-absmax, absmax] from pass 1: counts add, so the histogram too is identical whatever the
batch size or order. Non-finite values (attention masks of -inf, NaN) are excluded and counted.
Memory per tensor is O(bins), independent of the number of samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

DEFAULT_BINS = 2048  # even, so that 0 is a bin edge; what TensorRT's calibrator used


@dataclass
class TensorStats:
    name: str
    count: int = 0  # finite values seen
    nonfinite: int = 0
    lo: float = math.inf
    hi: float = -math.inf
    hist: np.ndarray | None = field(default=None, repr=False)  # int64 counts
    limit: float = 0.0  # the histogram covers [-limit, limit]

    @property
    def absmax(self) -> float:
        return max(abs(self.lo), abs(self.hi)) if self.count else 0.0

    @property
    def edges(self) -> np.ndarray:
        assert self.hist is not None
        return np.linspace(-self.limit, self.limit, self.hist.size + 1)

    def update_range(self, arr: np.ndarray) -> None:
        x = _finite(self, arr)
        if x.size:
            self.lo = min(self.lo, float(x.min()))
            self.hi = max(self.hi, float(x.max()))
            self.count += int(x.size)

    def start_histogram(self, bins: int = DEFAULT_BINS) -> None:
        if bins < 2 or bins % 2:
            raise ValueError(f"histogram bins must be even and >= 2, got {bins}")
        self.hist = np.zeros(bins, np.int64)
        self.limit = self.absmax

    def update_histogram(self, arr: np.ndarray) -> None:
        """Count the finite values of ``arr`` (call after pass 1; counts non-finite again not)."""
        assert self.hist is not None, "start_histogram first"
        x = np.asarray(arr).reshape(-1)
        if x.dtype.kind != "f":
            x = x.astype(np.float32)
        finite = np.isfinite(x)
        if not finite.all():
            x = x[finite]
        if not x.size:
            return
        bins = self.hist.size
        if self.limit == 0.0:
            self.hist[bins // 2] += x.size
            return
        # float32 arithmetic: the bin of a value is off by one only within ~1e-7 of an edge
        idx = (x.astype(np.float32, copy=False) + np.float32(self.limit)) * np.float32(bins / (2.0 * self.limit))
        idx = np.clip(idx, 0, bins - 1, out=idx).astype(np.int32)
        self.hist += np.bincount(idx, minlength=bins)

    def to_dict(self) -> dict:
        return {"count": self.count, "nonfinite": self.nonfinite,
                "observed_min": self.lo if self.count else None,
                "observed_max": self.hi if self.count else None}


def _finite(stats: TensorStats, arr: np.ndarray) -> np.ndarray:
    x = np.asarray(arr).reshape(-1)
    if x.dtype.kind != "f":
        return x.astype(np.float32)
    finite = np.isfinite(x)
    if finite.all():
        return x
    stats.nonfinite += int(x.size - np.count_nonzero(finite))
    return x[finite]
