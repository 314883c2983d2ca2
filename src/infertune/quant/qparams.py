"""Scale and zero point from a range, the same arithmetic as ONNX Runtime's quantizer.

Activations: ``uint8`` asymmetric (range widened to include 0) or ``int8`` symmetric (zero point
0, [-127, 127] so that -absmax and +absmax are both representable, as TensorRT requires).
Weights: ``int8`` symmetric per output channel; ``reduce_range`` uses 7 bits ([-63, 63]), which
avoids the int16 saturation of the u8s8 multiply-add on CPUs without VNNI.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QRANGE = {  # (dtype, symmetric, reduce_range) -> (qmin, qmax)
    ("uint8", False, False): (0, 255),
    ("uint8", False, True): (0, 127),
    ("int8", True, False): (-127, 127),
    ("int8", True, True): (-63, 63),
    ("int8", False, False): (-128, 127),
}


@dataclass(frozen=True)
class QParams:
    scale: float
    zero_point: int
    dtype: str  # 'uint8' | 'int8'

    def to_dict(self) -> dict:
        return {"scale": float(self.scale), "zero_point": int(self.zero_point), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict) -> QParams:
        return cls(float(d["scale"]), int(d["zero_point"]), str(d["dtype"]))


def seven_bit(reduce_range: bool | frozenset[str], weight: str) -> bool:
    """Whether ``weight`` gets 7 bits under ``reduce_range``: every weight (True), none (False) or those named."""
    return reduce_range if isinstance(reduce_range, bool) else weight in reduce_range


def qrange(dtype: str, symmetric: bool, reduce_range: bool = False) -> tuple[int, int]:
    try:
        return QRANGE[(dtype, symmetric, reduce_range)]
    except KeyError:
        raise ValueError(f"no quantized range for {dtype} symmetric={symmetric} "
                         f"reduce_range={reduce_range}") from None


def compute_qparams(lo: float, hi: float, dtype: str, symmetric: bool) -> QParams:
    """Scale/zero point covering [lo, hi] (ORT's compute_scale_zp, in float32 like ORT)."""
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
        raise ValueError(f"invalid range [{lo}, {hi}]")
    qmin, qmax = qrange(dtype, symmetric)
    rmin = np.float32(min(lo, 0.0))
    rmax = np.float32(max(hi, 0.0))
    if symmetric:
        absmax = np.float32(max(abs(rmin), abs(rmax)))
        rmin, rmax = -absmax, absmax
    if rmax == rmin:
        return QParams(1.0, 0 if symmetric else qmin, dtype)
    scale = np.float32((np.float64(rmax) - np.float64(rmin)) / (qmax - qmin))  # ORT divides in float64
    if symmetric:
        zero_point = 0
    else:
        zero_point = int(np.clip(np.round(np.float32(qmin) - rmin / scale), qmin, qmax))
    return QParams(float(scale), zero_point, dtype)


def quantize(x: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int,
             qmin: int, qmax: int) -> np.ndarray:
    """ONNX QuantizeLinear: round half to even, saturate."""
    q = np.rint(np.asarray(x, np.float32) / np.float32(scale)) + zero_point
    return np.clip(q, qmin, qmax)


def dequantize(q: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int) -> np.ndarray:
    return ((np.asarray(q, np.float32) - np.float32(zero_point)) * np.float32(scale)).astype(np.float32)


def quantize_weight_per_channel(
    w: np.ndarray, axis: int, *, dtype: str = "int8", reduce_range: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int8 symmetric per-channel weights: (quantized, scales [C], zero points [C])."""
    if dtype != "int8":
        raise ValueError("weights are quantized to int8 only")
    qmin, qmax = qrange("int8", True, reduce_range)
    w = np.asarray(w, np.float32)
    axis = axis % w.ndim
    other = tuple(i for i in range(w.ndim) if i != axis)
    absmax = np.max(np.abs(w), axis=other) if other else np.abs(w)
    scales = (absmax / np.float32(qmax)).astype(np.float32)
    scales[scales == 0] = 1.0  # an all-zero channel: any scale represents it exactly
    shape = [1] * w.ndim
    shape[axis] = -1
    q = quantize(w, scales.reshape(shape), 0, qmin, qmax).astype(np.int8)
    return q, scales, np.zeros_like(scales, dtype=np.int8)
