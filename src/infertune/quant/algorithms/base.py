"""What every accuracy algorithm shares: its options, the context it runs in, what it returns.

An algorithm is one module with ``NAME``, ``STAGE`` and two functions:

- ``apply(ctx) -> Step``: measures what it needs on the calibration data (streamed, memory bounded
  whatever the number of samples) and returns the transformed model, int8 weight overrides and a
  record of every decision;
- ``replay(ctx, record) -> Step``: the same transformation from the record alone, without data.
  ``apply`` ends by calling ``replay`` on its own record, so that ``rebuild`` from a recipe gives
  byte-identical models.

Stages, in the order ``quantize`` runs them whatever order they were asked in:

1. ``float``: rewrite the float model, FP32 outputs unchanged (``cle``, ``range_split``, ``smoothquant``);
   calibration then measures ranges on the rewritten model;
2. ``ranges``: activation ranges rescaled by the output error they cause (``range_refinement``), once
   the methods chose them;
3. ``weights``: int8 weight rounding (``adaround``), once placement and ranges are known;
4. ``bias``: float bias corrections (``bias_correction``), once ranges and rounding are known.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

import numpy as np

from infertune import backends
from infertune.data import Dataset
from infertune.errors import UsageError
from infertune.model import Model
from infertune.quant.placement import Exclusions, QuantPlan
from infertune.quant.qparams import QParams, seven_bit

# range_split before smoothquant: a split is for a tail inside every channel, which per-channel scales cannot
# flatten; SmoothQuant then smooths the rest and leaves the split's parts alone. On YOLOv8n (OpenVINO, + bias
# correction, 2 x 1000 held-out mosaics) SmoothQuant first took the tailed activation and no split was worth
# it (box F1 0.9536, scratch); split first, 0.9693 (benchmarks/results/algorithms.md)
Algorithm = Literal["cle", "range_split", "smoothquant", "range_refinement", "adaround", "bias_correction"]
ALGORITHMS: tuple[Algorithm, ...] = get_args(Algorithm)  # also the order they run in
STAGES = {"cle": "float", "range_split": "float", "smoothquant": "float", "range_refinement": "ranges",
          "adaround": "weights", "bias_correction": "bias"}
DESCRIPTIONS = {
    "cle": "cross-layer equalisation",
    "smoothquant": "SmoothQuant",
    "range_split": "split-range activations",
    "range_refinement": "output-aware range refinement",
    "adaround": "learned weight rounding",
    "bias_correction": "bias correction",
}
AlgorithmProgress = Callable[[str, int, int | None], None]  # (algorithm, done, total)


@dataclass(frozen=True)
class AlgorithmOptions:
    """The rarer knobs of the algorithms (``quantize(..., algorithm_options=...)``)."""

    smoothquant_alphas: tuple[float, ...] = (0.25, 0.4, 0.5, 0.6, 0.75, 0.85, 0.95)
    adaround_seconds: float = 120.0  # whole learned-rounding step, sampling passes included
    adaround_iterations: int = 400  # per layer, at most
    adaround_min_iterations: int = 40  # a layer that cannot get these in its share of time keeps nearest
    adaround_learning_rate: float = 0.05
    adaround_regularization: float = 50.0
    range_samples: int = 16  # calibration feeds the output error of a range is measured on
    range_tensors: int = 8  # ranges refined, the largest shares of the output error first
    range_fractions: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 1.2, 1.5)  # of the chosen range
    range_seconds: float = 90.0  # the whole refinement; half of it at most for the shares
    split_tensors: int = 1  # activations split in two ranges at most, the largest drop of quantization noise first
    sample_rows: int = 2048  # activation rows kept per layer (SmoothQuant, learned rounding)
    sample_memory_mb: float = 256.0  # sampled rows held at once; more layers: more passes over the data
    seed: int = 0
    # numpy's BLAS threads while the algorithms run (0: its default). 1 by default: on a loaded 2-core
    # machine OpenBLAS's spinning threads made small products an order of magnitude slower at 2 threads
    blas_threads: int = 1
    progress: AlgorithmProgress | None = None
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        if not self.smoothquant_alphas or any(not 0.0 <= a <= 1.0 for a in self.smoothquant_alphas):
            raise UsageError(f"smoothquant_alphas must be in [0, 1], got {self.smoothquant_alphas}")
        if self.adaround_seconds <= 0:
            raise UsageError(f"adaround_seconds must be > 0, got {self.adaround_seconds}")
        if self.adaround_iterations < 1 or self.adaround_min_iterations < 1:
            raise UsageError("adaround iterations must be >= 1")
        if self.blas_threads < 0:
            raise UsageError(f"blas_threads must be >= 0, got {self.blas_threads}")
        if self.range_samples < 1 or self.range_tensors < 0 or self.range_seconds <= 0:
            raise UsageError("range_samples must be >= 1, range_tensors >= 0 and range_seconds > 0")
        if not self.range_fractions or any(not 0.0 < f for f in self.range_fractions):
            raise UsageError(f"range_fractions must be > 0, got {self.range_fractions}")
        if self.split_tensors < 0:
            raise UsageError(f"split_tensors must be >= 0, got {self.split_tensors}")
        if self.sample_rows < 1 or self.sample_memory_mb <= 0:
            raise UsageError("sample_rows and sample_memory_mb must be > 0")

    def to_dict(self) -> dict:
        return {"smoothquant_alphas": list(self.smoothquant_alphas), "adaround_seconds": self.adaround_seconds,
                "adaround_iterations": self.adaround_iterations,
                "adaround_min_iterations": self.adaround_min_iterations,
                "adaround_learning_rate": self.adaround_learning_rate,
                "adaround_regularization": self.adaround_regularization, "range_samples": self.range_samples,
                "range_tensors": self.range_tensors, "range_fractions": list(self.range_fractions),
                "range_seconds": self.range_seconds, "split_tensors": self.split_tensors,
                "sample_rows": self.sample_rows, "sample_memory_mb": self.sample_memory_mb, "seed": self.seed,
                "blas_threads": self.blas_threads}


@dataclass
class Context:
    """What a step sees. ``plan``, ``qparams`` and ``weights`` are set from the ``weights`` stage on."""

    model: Model
    target: str
    reduce_range: bool | frozenset[str]  # 7-bit weights: every one, none, or the weight tensors named
    data: Dataset | None = None  # None when replaying a recipe
    exclusions: Exclusions = field(default_factory=Exclusions)
    options: AlgorithmOptions = field(default_factory=AlgorithmOptions)
    settings: backends.Settings | None = None
    batch_size: int = 1
    plan: QuantPlan | None = None
    qparams: Mapping[str, QParams] = field(default_factory=dict)  # activation tensor -> its parameters
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # weight tensor -> int8 values (overrides)

    def reduced(self, tensor: str) -> bool:
        """Whether weight ``tensor`` is quantized to 7 bits."""
        return seven_bit(self.reduce_range, tensor)

    def with_model(self, model: Model) -> Context:
        return replace(self, model=model)

    def progress(self, name: str, done: int, total: int | None) -> None:
        if self.options.progress is not None:
            self.options.progress(name, done, total)


@dataclass
class Step:
    model: Model
    record: dict
    weights: dict[str, np.ndarray] = field(default_factory=dict)


@contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """numpy's BLAS limited to ``n`` threads inside the block (0: unchanged)."""
    if n <= 0:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n, user_api="blas"):
        yield


def check_algorithms(names: Iterable[str]) -> tuple[Algorithm, ...]:
    """The algorithms asked for, validated, in the order they run."""
    names = list(names)
    unknown = [n for n in names if n not in ALGORITHMS]
    if unknown:
        raise UsageError(f"unknown algorithm {unknown[0]!r} (known: {', '.join(ALGORITHMS)})")
    return tuple(a for a in ALGORITHMS if a in names)
