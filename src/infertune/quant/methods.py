"""Range methods: from a tensor's statistics to the [lo, hi] its quantization covers.

- ``minmax``: the observed finite extremes.
- ``percentile``: cut (100 - p)% of the mass, half from each tail (symmetric targets: from |x|).
- ``entropy``: the clipping threshold minimising the KL divergence between the histogram and its
  quantized version (TensorRT's legacy calibrator; the MXNet formulation, with q in float and
  empty bins kept empty, where ONNX Runtime's copy truncates q to integers).
- ``mse``: the clipping threshold minimising the expected squared error: rounding noise
  scale^2/12 for values inside, squared distance to the clip for those outside.
- ``auto``: per tensor: ``minmax`` where the producer bounds the values by construction
  (Sigmoid, Softmax, Tanh, Clip, ...: the extremes are the signal, not outliers) and for graph
  inputs (their range is a preprocessing contract); elsewhere ``mse`` when clipping cuts the
  expected error by more than 10%, else ``minmax`` (a clipped range risks unseen outliers for
  little gain).

All of them read the same ``TensorStats``, so one calibration run serves every method.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from infertune.errors import UsageError
from infertune.quant.observers import TensorStats
from infertune.quant.qparams import qrange

Method = Literal["minmax", "percentile", "entropy", "mse", "auto"]
METHODS: tuple[Method, ...] = get_args(Method)
NEEDS_HISTOGRAM = frozenset({"percentile", "entropy", "mse", "auto"})
# Min: the lower part of a split activation (quant.algorithms.range_split) ends exactly at its threshold;
# a clipped range would open a gap below it that the upper part does not cover
BOUNDED_OPS = frozenset({"Sigmoid", "HardSigmoid", "Softmax", "Tanh", "Clip", "Relu6",
                         "HardSwish", "Softsign", "LogSoftmax", "Min"})
DEFAULT_PERCENTILE = 99.999
ENTROPY_QUANTIZED_BINS = 128  # TensorRT's choice: 128 levels for one sign of int8
MSE_CANDIDATES = 256
AUTO_CLIP_GAIN = 0.9  # auto clips (mse) only when that cuts the expected error by more than 10%


@dataclass(frozen=True)
class RangeChoice:
    lo: float
    hi: float
    method: str  # the method that produced the range (auto resolves to one of the others)
    reason: str = ""

    def to_dict(self) -> dict:
        d = {"min": self.lo, "max": self.hi, "method": self.method}
        if self.reason:
            d["reason"] = self.reason
        return d


def minmax_range(s: TensorStats, symmetric: bool) -> tuple[float, float]:
    if not s.count:
        return 0.0, 0.0
    if symmetric:
        return -s.absmax, s.absmax
    return s.lo, s.hi


def percentile_range(s: TensorStats, symmetric: bool, p: float = DEFAULT_PERCENTILE) -> tuple[float, float]:
    if not 0 < p <= 100:
        raise UsageError(f"percentile must be in (0, 100], got {p}")
    hist, edges = _hist(s)
    if hist is None:
        return minmax_range(s, symmetric)
    if symmetric:
        folded, fedges = _fold(hist, edges)
        cdf = np.cumsum(folded) / folded.sum()
        t = float(fedges[min(int(np.searchsorted(cdf, p / 100.0)) + 1, folded.size)])
        t = min(t, s.absmax)
        return -t, t
    cut = (100.0 - p) / 200.0
    cdf = np.cumsum(hist) / hist.sum()
    left = int(np.searchsorted(cdf, cut, side="right"))
    right = int(np.searchsorted(cdf, 1.0 - cut))
    lo = max(float(edges[left]), s.lo)
    hi = min(float(edges[min(right + 1, hist.size)]), s.hi)
    return lo, hi


def entropy_range(s: TensorStats, symmetric: bool,
                  quantized_bins: int = ENTROPY_QUANTIZED_BINS) -> tuple[float, float]:
    """Scan symmetric windows [z - i, z + i) around the zero bin; keep the one with least KL."""
    hist, edges = _hist(s)
    if hist is None:
        return minmax_range(s, symmetric)
    n = hist.size
    z = n // 2
    half = quantized_bins // 2
    if z <= half:
        return minmax_range(s, symmetric)
    step = max(1, (z - half) // 256)
    csum = np.concatenate([[0], np.cumsum(hist)])
    best_i, best_kl = z, np.inf
    for i in range(half, z + 1, step):
        start, end = z - i, z + i
        kl = _kl_for_window(hist[start:end], csum[start], csum[n] - csum[end], quantized_bins)
        if kl < best_kl:
            best_i, best_kl = i, kl
    lo, hi = float(edges[z - best_i]), float(edges[z + best_i])
    if symmetric:
        t = min(hi, s.absmax)
        return -t, t
    return max(lo, s.lo), min(hi, s.hi)


def _kl_for_window(sliced: np.ndarray, left_out: int, right_out: int, nq: int) -> float:
    p = sliced.astype(np.float64)
    p[0] += left_out
    p[-1] += right_out
    if not p.any():
        return np.inf
    nonzero = p != 0
    m = sliced.size // nq
    starts = np.arange(nq) * m
    sums = np.add.reduceat(sliced.astype(np.float64), starts)  # last chunk takes the remainder
    counts = np.add.reduceat(nonzero.astype(np.float64), starts)
    lengths = np.diff(np.append(starts, sliced.size))
    per_bin = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    q = np.repeat(per_bin, lengths)
    q[~nonzero] = 0.0
    p = _smooth(p)
    q = _smooth(q)
    if p is None or q is None:
        return np.inf
    p /= p.sum()
    q /= q.sum()
    return float(np.sum(p * np.log(p / q)))


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    zeros = p == 0
    nz = p.size - int(zeros.sum())
    if not nz:
        return None
    eps1 = eps * float(zeros.sum()) / nz
    out = p + np.where(zeros, eps, -eps1)
    return out if (out > 0).all() else None


def mse_range(s: TensorStats, symmetric: bool, dtype: str) -> tuple[float, float]:
    """Threshold t on |x| minimising sum(count * err) over the histogram's bin centres."""
    found = _mse_search(s, symmetric, dtype)
    if found is None:
        return minmax_range(s, symmetric)
    lo, hi, err = found
    k = int(np.argmin(err))
    return float(lo[k, 0]), float(hi[k, 0])


def _mse_search(s: TensorStats, symmetric: bool, dtype: str):
    """Candidate ranges (the last one is minmax's) and their expected squared error, or None."""
    hist, edges = _hist(s)
    if hist is None:
        return None
    centres = (edges[:-1] + edges[1:]) / 2
    used = hist > 0
    c, w = centres[used], hist[used].astype(np.float64)
    qmin, qmax = qrange(dtype, symmetric)
    levels = qmax - qmin
    t = np.linspace(s.absmax / MSE_CANDIDATES, s.absmax, MSE_CANDIDATES)[:, None]
    if symmetric:
        lo, hi = -t, t
    else:
        lo = np.minimum(np.maximum(s.lo, -t), 0.0)
        hi = np.maximum(np.minimum(s.hi, t), 0.0)
    scale = np.maximum(hi - lo, 1e-30) / levels
    outside = (c[None, :] - np.clip(c[None, :], lo, hi)) ** 2
    inside = np.where((c[None, :] >= lo) & (c[None, :] <= hi), scale**2 / 12.0, 0.0)
    return lo, hi, (outside + inside) @ w


def choose_range(s: TensorStats, method: str, *, symmetric: bool, dtype: str,
                 producer_op: str | None = None, percentile: float = DEFAULT_PERCENTILE) -> RangeChoice:
    if method == "auto":
        if producer_op is None:
            lo, hi = minmax_range(s, symmetric)
            return RangeChoice(lo, hi, "minmax", "graph input: preprocessing range")
        if producer_op in BOUNDED_OPS:
            lo, hi = minmax_range(s, symmetric)
            return RangeChoice(lo, hi, "minmax", f"{producer_op} output is bounded")
        found = _mse_search(s, symmetric, dtype)
        if found is not None:
            lo, hi, err = found
            k = int(np.argmin(err))
            if err[k] < AUTO_CLIP_GAIN * err[-1]:
                return RangeChoice(float(lo[k, 0]), float(hi[k, 0]), "mse",
                                   f"clipping cuts the expected error by {1 - err[k] / err[-1]:.0%}")
        lo, hi = minmax_range(s, symmetric)
        return RangeChoice(lo, hi, "minmax", "clipping would gain less than 10%: full range kept")
    fn: dict[str, Callable[[], tuple[float, float]]] = {
        "minmax": lambda: minmax_range(s, symmetric),
        "percentile": lambda: percentile_range(s, symmetric, percentile),
        "entropy": lambda: entropy_range(s, symmetric),
        "mse": lambda: mse_range(s, symmetric, dtype),
    }
    if method not in fn:
        raise UsageError(f"unknown calibration method {method!r} (known: {', '.join(METHODS)})")
    lo, hi = fn[method]()
    return RangeChoice(lo, hi, method)


@dataclass(frozen=True)
class MethodOverrides:
    """Per-tensor method by tensor name, producer op type ('op:Softmax') or regex ('re:...')."""

    rules: tuple[tuple[str, str, str], ...] = ()  # (kind, key, method)

    @classmethod
    def parse(cls, items: Iterable[str]) -> MethodOverrides:
        rules = []
        for item in items:
            key, sep, method = item.rpartition("=")
            if not sep or not key or method not in METHODS:
                raise UsageError(f"bad method override {item!r}: expected TENSOR=METHOD, "
                                 f"op:OPTYPE=METHOD or re:REGEX=METHOD with METHOD in {', '.join(METHODS)}")
            if key.startswith("op:"):
                rules.append(("op", key[3:], method))
            elif key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as e:
                    raise UsageError(f"bad regex in method override {item!r}: {e}") from None
                rules.append(("re", key[3:], method))
            else:
                rules.append(("name", key, method))
        return cls(tuple(rules))

    def method_for(self, tensor: str, producer_op: str | None, default: str) -> str:
        chosen = default  # the last matching rule wins
        for kind, key, method in self.rules:
            if ((kind == "name" and key == tensor) or (kind == "op" and key == producer_op)
                    or (kind == "re" and re.search(key, tensor))):
                chosen = method
        return chosen

    def to_list(self) -> list[str]:
        prefix = {"name": "", "op": "op:", "re": "re:"}
        return [f"{prefix[k]}{key}={m}" for k, key, m in self.rules]


def _hist(s: TensorStats) -> tuple[np.ndarray | None, np.ndarray]:
    if s.hist is None or not s.hist.any() or s.limit == 0.0:
        return None, np.empty(0)
    return s.hist, s.edges


def _fold(hist: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of |x| from one symmetric about 0 (bin k pairs with bin n-1-k)."""
    z = hist.size // 2
    folded = hist[z:] + hist[:z][::-1]
    return folded, edges[z:]
