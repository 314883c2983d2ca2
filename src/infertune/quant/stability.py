"""Calibration stability: does the scale of a tensor hold on random halves of the data?

Calibration keeps statistics for a few seeded random halves of the feeds alongside the full
set (no extra pass). Each half's range goes through the same method; a tensor whose scale moves
by more than ``threshold`` (relative) on some half is reported: the calibration set is too small
(or too unrepresentative) to pin its range down.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from infertune.quant.methods import choose_range
from infertune.quant.observers import TensorStats
from infertune.quant.qparams import QParams, compute_qparams

DEFAULT_THRESHOLD = 0.10


@dataclass(frozen=True)
class TensorStability:
    tensor: str
    scale: float
    max_relative_change: float  # over the halves

    def to_dict(self) -> dict:
        return {"tensor": self.tensor, "scale": self.scale,
                "max_relative_change": round(self.max_relative_change, 6)}


@dataclass
class StabilityReport:
    halves: int
    threshold: float
    tensors: list[TensorStability]  # every tensor, most unstable first

    @property
    def unstable(self) -> list[TensorStability]:
        return [t for t in self.tensors if t.max_relative_change > self.threshold]

    def to_dict(self) -> dict:
        return {"halves": self.halves, "threshold": self.threshold,
                "unstable": [t.to_dict() for t in self.unstable],
                "max_relative_change": {t.tensor: round(t.max_relative_change, 6) for t in self.tensors}}

    def message(self) -> str | None:
        if not self.unstable:
            return None
        names = ", ".join(f"{t.tensor} ({t.max_relative_change:.0%})" for t in self.unstable[:5])
        more = f" and {len(self.unstable) - 5} more" if len(self.unstable) > 5 else ""
        return (f"calibration set too small for {len(self.unstable)} tensor(s): their scale moves more than "
                f"{self.threshold:.0%} on random halves of the data: {names}{more}")


def stability(
    half_stats: list[dict[str, TensorStats]],
    full: Mapping[str, QParams],
    methods: Mapping[str, str],
    producers: Mapping[str, str | None],
    *,
    symmetric: bool,
    dtype: str,
    percentile: float,
    threshold: float = DEFAULT_THRESHOLD,
) -> StabilityReport:
    """Relative scale change per tensor between the full set and each half."""
    rows = []
    for t, qp in full.items():
        worst = 0.0
        for half in half_stats:
            s = half[t]
            if not s.count:
                worst = max(worst, 1.0)  # the half never saw a finite value of it
                continue
            r = choose_range(s, methods[t], symmetric=symmetric, dtype=dtype,
                             producer_op=producers.get(t), percentile=percentile)
            scale = compute_qparams(r.lo, r.hi, dtype, symmetric).scale
            worst = max(worst, abs(scale - qp.scale) / qp.scale)
        rows.append(TensorStability(t, qp.scale, worst))
    rows.sort(key=lambda r: -r.max_relative_change)
    return StabilityReport(len(half_stats), threshold, rows)
