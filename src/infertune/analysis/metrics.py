"""Streaming error metrics between a reference and a candidate output.

``ErrorAccumulator`` takes one (reference, candidate) pair per run and keeps only running
sums, so memory does not grow with the number of samples. Definitions (element-wise over
every run, r = reference, c = candidate, d = c - r):

- max_abs = max |d|;  mean_abs = sum |d| / n
- max_rel = max |d| / |r| over elements where r != 0 (exact zeros, e.g. after ReLU, would
  make it infinite; allclose covers them)
- cosine = mean over runs of cos(r, c) (each run flattened); cosine_min = the smallest
  (two all-zero vectors count as cosine 1)
- sqnr_db = 10 log10(sum r^2 / sum d^2)  (inf when d is all zero)
- allclose_frac = fraction of elements with |d| <= atol + rtol |r|
- top1_agreement = fraction of rows (last axis = classes) where argmax r == argmax c;
  only for float outputs whose last axis has >= 2 entries
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from infertune.errors import DataError


@dataclass
class ErrorAccumulator:
    atol: float = 1e-5
    rtol: float = 1e-3
    runs: int = 0
    elements: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0
    max_rel: float = 0.0
    sum_sq_ref: float = 0.0
    sum_sq_err: float = 0.0
    cosine_sum: float = 0.0
    cosine_min: float = 1.0
    close: int = 0
    rows: int = 0
    top1_same: int = 0
    nonfinite_candidate: int = 0
    nonfinite_reference: int = 0
    shape: tuple[int, ...] | None = field(default=None)

    def add(self, ref: np.ndarray, cand: np.ndarray, *, name: str = "output") -> None:
        ref, cand = np.asarray(ref), np.asarray(cand)
        if ref.shape != cand.shape:
            raise DataError(
                f"output '{name}': reference shape {list(ref.shape)} != candidate shape "
                f"{list(cand.shape)}"
            )
        self.shape = tuple(cand.shape)
        r = ref.astype(np.float64, copy=False).ravel()
        c = cand.astype(np.float64, copy=False).ravel()
        fin = np.isfinite(r) & np.isfinite(c)
        self.nonfinite_reference += int(r.size - np.count_nonzero(np.isfinite(r)))
        self.nonfinite_candidate += int(c.size - np.count_nonzero(np.isfinite(c)))
        if not fin.all():
            r, c = r[fin], c[fin]
        self.runs += 1
        self.elements += r.size
        if r.size == 0:
            return
        d = c - r
        ad = np.abs(d)
        ar = np.abs(r)
        self.max_abs = max(self.max_abs, float(ad.max()))
        self.sum_abs += float(ad.sum())
        nz = ar > 0
        if nz.any():
            self.max_rel = max(self.max_rel, float((ad[nz] / ar[nz]).max()))
        self.sum_sq_ref += float(r @ r)
        self.sum_sq_err += float(d @ d)
        cos = cosine(r, c)
        self.cosine_sum += cos
        self.cosine_min = min(self.cosine_min, cos)
        self.close += int(np.count_nonzero(ad <= self.atol + self.rtol * ar))
        if ref.dtype.kind == "f" and ref.ndim >= 1 and ref.shape[-1] >= 2:
            rr = ref.reshape(-1, ref.shape[-1])
            cc = cand.reshape(-1, cand.shape[-1])
            self.rows += rr.shape[0]
            self.top1_same += int(np.count_nonzero(rr.argmax(-1) == cc.argmax(-1)))

    def metrics(self) -> dict[str, float | int | None]:
        n = max(self.elements, 1)
        return {
            "max_abs": self.max_abs,
            "mean_abs": self.sum_abs / n,
            "max_rel": self.max_rel,
            "cosine": self.cosine_sum / self.runs if self.runs else None,
            "cosine_min": self.cosine_min if self.runs else None,
            "sqnr_db": sqnr_db(self.sum_sq_ref, self.sum_sq_err),
            "allclose_frac": self.close / n if self.elements else None,
            "top1_agreement": self.top1_same / self.rows if self.rows else None,
            "nonfinite_candidate": self.nonfinite_candidate,
            "nonfinite_reference": self.nonfinite_reference,
        }


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    na, nb = math.sqrt(float(a @ a)), math.sqrt(float(b @ b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.clip((a @ b) / (na * nb), -1.0, 1.0))


def sqnr_db(signal_power: float, noise_power: float) -> float:
    if noise_power == 0.0:
        return math.inf
    if signal_power == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)
