"""Streaming what the algorithms measure, in memory that does not grow with the number of samples.

- ``stream``: each batch's values of some tensors of the float model (as calibration does: the
  tensors become the only outputs of a copy of the model, one batch alive at a time);
- ``RowSampler``: a fixed number of rows (activation vectors, convolution patches) drawn
  uniformly from everything streamed: each row gets a key from a hash of its position in the
  stream, and the smallest keys are kept (priority sampling). The sample depends on the data and
  its order only, not on the batch size;
- ``ConvGeometry``: a convolution's padding and strides: sums of its input at every kernel offset
  (what a mean output shift needs) and patches at sampled output positions (what rounding needs);
- ``passes``: layers grouped so that the rows sampled at once fit a memory budget.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from infertune import backends
from infertune.data import Dataset, FeedValidator, batched
from infertune.model import Model
from infertune.quant.algorithms.graph import attr
from infertune.quant.qparams import QParams

SATURATION = {"uint8": (0, 255), "int8": (-128, 127)}  # what QuantizeLinear saturates to


def stream(model: Model, tensors: Sequence[str], data: Dataset, *, batch_size: int = 1,
           settings: backends.Settings | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Per batch of ``data``: the values of ``tensors`` (graph inputs straight from the feed)."""
    inputs = {i.name for i in model.inputs}
    run = [t for t in dict.fromkeys(tensors) if t not in inputs]
    runner = backends.compile(model.with_outputs(run, keep_original=False), settings) if run else None
    validator = FeedValidator(model, nonfinite="keep")
    for feed in batched(data, batch_size):
        clean = validator(feed)
        if clean is None:
            continue
        out = dict(runner.run(clean)) if runner is not None else {}
        out.update({t: clean[t] for t in tensors if t in inputs})
        yield out
    validator.finish(data.name)


def fake_quant(x: np.ndarray, qp: QParams) -> np.ndarray:
    """QuantizeLinear then DequantizeLinear, in float32 as ONNX Runtime computes them."""
    lo, hi = SATURATION[qp.dtype]
    scale = np.float32(qp.scale)
    q = np.clip(np.rint(np.asarray(x, np.float32) / scale) + np.float32(qp.zero_point), lo, hi)
    return ((q - np.float32(qp.zero_point)) * scale).astype(np.float32)


def _keys(seed: int, first: int, n: int) -> np.ndarray:
    """splitmix64 of the stream positions first .. first + n - 1: a fixed pseudo-random key per row."""
    with np.errstate(over="ignore"):
        z = np.arange(first, first + n, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class RowSampler:
    """Up to ``capacity`` rows drawn uniformly from a stream of rows, independent of batching.

    The kept rows live in one preallocated array; a newcomer overwrites the row with the largest
    key it beats, so a batch costs the rows it brings, never a copy of the sample."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity, self.seed = capacity, seed
        self.keys = np.empty(0, np.uint64)
        self.rows: np.ndarray | None = None
        self.seen = 0

    def offer(self, n: int, make_rows) -> None:
        """The next ``n`` rows of the stream; ``make_rows(indices)`` builds the ones that might be kept
        (a [len(indices), D] float32 array), so a batch's rows are never all materialised."""
        keys = _keys(self.seed, self.seen, n)
        self.seen += n
        full = self.keys.size >= self.capacity
        if full:
            cand = np.nonzero(keys < self.keys.max())[0]
        elif n > self.capacity:
            cand = np.sort(np.argpartition(keys, self.capacity - 1)[:self.capacity])
        else:
            cand = np.arange(n)
        if not cand.size:
            return
        rows = np.asarray(make_rows(cand), np.float32)
        finite = np.isfinite(rows).all(axis=1)  # a row holding -inf (a mask) or NaN is no sample
        cand, rows = cand[finite], rows[finite]
        self._merge(keys[cand], rows)

    def _merge(self, keys: np.ndarray, rows: np.ndarray) -> None:
        if self.rows is None:
            self.rows = np.empty((self.capacity, rows.shape[1]), np.float32)
        have = self.keys.size
        room = min(self.capacity - have, keys.size)
        if room:  # fill the free slots with the smallest newcomers first
            first = np.argsort(keys, kind="stable")[:room]
            self.rows[have:have + room] = rows[first]
            self.keys = np.concatenate([self.keys, keys[first]])
            rest = np.ones(keys.size, bool)
            rest[first] = False
            keys, rows = keys[rest], rows[rest]
        if not keys.size:
            return
        both = np.concatenate([self.keys, keys])
        keep = np.argpartition(both, self.capacity - 1)[:self.capacity]
        newcomers = keep[keep >= self.capacity] - self.capacity
        if newcomers.size:
            kept_old = np.zeros(self.capacity, bool)
            kept_old[keep[keep < self.capacity]] = True
            slots = np.nonzero(~kept_old)[0]
            self.rows[slots] = rows[newcomers]
            self.keys[slots] = keys[newcomers]

    def sample(self, dim: int) -> np.ndarray:
        """The kept rows, ordered by key (so the same whatever the batching)."""
        if self.rows is None:
            return np.zeros((0, dim), np.float32)
        order = np.argsort(self.keys, kind="stable")
        return self.rows[:self.keys.size][order]


def matrix_rows(x: np.ndarray, transposed: bool = False) -> np.ndarray:
    """The rows a MatMul / Gemm multiplies: [..., K] -> [-1, K] (Gemm's transA: the columns)."""
    x = np.asarray(x, np.float32)
    return x.T if transposed else x.reshape(-1, x.shape[-1])


@dataclass(frozen=True)
class ConvGeometry:
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]  # begin..., end...
    auto_pad: str
    group: int

    @classmethod
    def of(cls, node: onnx.NodeProto, weight_shape: Sequence[int]) -> ConvGeometry:
        kernel = tuple(int(k) for k in weight_shape[2:])
        nd = len(kernel)
        auto = attr(node, "auto_pad", b"NOTSET")
        return cls(kernel, tuple(attr(node, "strides", [1] * nd)), tuple(attr(node, "dilations", [1] * nd)),
                   tuple(attr(node, "pads", [0] * 2 * nd)), auto.decode() if isinstance(auto, bytes) else auto,
                   int(attr(node, "group", 1)))

    @property
    def offsets(self) -> list[tuple[int, ...]]:
        return list(itertools.product(*(range(k) for k in self.kernel)))

    def padded(self, x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
        """``x`` zero-padded as the Conv pads it, and the output's spatial shape."""
        spatial = x.shape[2:]
        nd = len(spatial)
        begin, end = list(self.pads[:nd]), list(self.pads[nd:])
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            for i, size in enumerate(spatial):
                out = math.ceil(size / self.strides[i])
                total = max(0, (out - 1) * self.strides[i] + (self.kernel[i] - 1) * self.dilations[i] + 1 - size)
                small, big = total // 2, total - total // 2
                begin[i], end[i] = (small, big) if self.auto_pad == "SAME_UPPER" else (big, small)
        elif self.auto_pad == "VALID":
            begin, end = [0] * nd, [0] * nd
        xp = np.pad(np.asarray(x, np.float32), [(0, 0), (0, 0), *zip(begin, end, strict=True)])
        out = tuple((xp.shape[2 + i] - (self.kernel[i] - 1) * self.dilations[i] - 1) // self.strides[i] + 1
                    for i in range(nd))
        return xp, out

    def offset_sums(self, xp: np.ndarray, out: tuple[int, ...]) -> np.ndarray:
        """[C, *kernel] float64: the sum, over the batch and all output positions, of the padded
        input each kernel tap reads. Conv is linear, so sum(conv(x, W)) = sum(W * these).

        A tap's positions along one axis are o*d, o*d + s, ..., o*d + (n-1)*s: contiguous in the
        axis taken with stride s from o*d mod s, so one cumulative sum per residue answers every
        tap in O(1); the axes are reduced one after the other."""
        a = xp.sum(axis=0, dtype=np.float64)  # [C, *spatial]
        for i in range(len(out)):
            axis, s, d, n = 1 + i, self.strides[i], self.dilations[i], out[i]
            cums = {}
            taps = []
            for o in range(self.kernel[i]):
                r = (o * d) % s
                if r not in cums:
                    part = np.take(a, np.arange(r, a.shape[axis], s), axis=axis)
                    zero = np.zeros_like(np.take(part, [0], axis=axis))
                    cums[r] = np.concatenate([zero, np.cumsum(part, axis=axis)], axis=axis)
                start = (o * d - r) // s
                c = cums[r]
                taps.append(np.take(c, start + n, axis=axis) - np.take(c, start, axis=axis))
            a = np.stack(taps, axis=axis)
        return a

    def patches(self, xp: np.ndarray, out: tuple[int, ...], flat: np.ndarray) -> np.ndarray:
        """[len(flat), C * prod(kernel)]: the input patch at each flat (batch, *output) position,
        channel-major (a group's channels are contiguous)."""
        pos = np.unravel_index(flat, (xp.shape[0], *out))
        b = pos[0][:, None, None]
        c = np.arange(xp.shape[1])[None, :, None]
        offs = np.array(self.offsets, np.int64)  # [taps, nd]
        index = [b, c]
        for i in range(len(out)):
            index.append((pos[1 + i] * self.strides[i])[:, None, None]
                         + (offs[:, i] * self.dilations[i])[None, None, :])
        return xp[tuple(index)].reshape(len(flat), -1)

    def positions(self, batch: int, out: tuple[int, ...]) -> int:
        return batch * int(np.prod(out))


def passes(sizes: dict[str, int], budget_bytes: float) -> list[list[str]]:
    """Keys grouped, in order, so that each group's sizes sum to at most the budget (a key larger
    than the budget alone gets a pass of its own)."""
    groups: list[list[str]] = []
    used = math.inf
    for key, size in sizes.items():
        if used + size > budget_bytes:
            groups.append([])
            used = 0
        groups[-1].append(key)
        used += size
    return groups
