"""Layerwise compare: where along the graph does a candidate (INT8, FP16) leave the reference?

Every float tensor of the reference is matched with the candidate tensor that carries the same
value: in a Q/DQ model the output of its DequantizeLinear (``<t>_dequantized``, what the next
layer actually reads), in an FP16 model ``<t>__fp16``, otherwise the tensor of the same name.
Both models run with those tensors exposed, one feed at a time; errors accumulate per tensor
(streaming: no activation is kept beyond the current feed). The report lists tensors in
topological order and names the first whose SQNR falls below the threshold, with the SQNR of its
inputs ("38 dB upstream, 12 dB here"), and the nodes whose own contribution is largest.

Exposing intermediate tensors stops ONNX Runtime from fusing across them, so the numbers describe
the unfused graph; the final outputs of the graph as deployed are measured by ``compare``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from infertune import backends
from infertune.analysis.metrics import ErrorAccumulator, sqnr_db
from infertune.data import Dataset, FeedValidator
from infertune.errors import DataError
from infertune.model import Model

DEFAULT_THRESHOLD_DB = 20.0
Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class TensorError:
    tensor: str
    node: str | None  # producer in the reference (None for graph inputs)
    op_type: str | None
    sqnr_db: float
    cosine: float | None
    max_abs: float
    upstream_db: float  # worst SQNR among its producer's inputs, before their own quantization (inf if none)
    signal_power: float = 0.0  # sum of squares of the reference values
    noise_power: float = 0.0  # sum of squared differences
    raw_sqnr_db: float | None = None  # before its own Q/DQ (None: the candidate does not quantize it)

    @property
    def drop_db(self) -> float:
        """How much SQNR the producer itself loses (inf upstream counts as 60 dB)."""
        up = min(self.upstream_db, 60.0)
        here = min(self.sqnr_db, 60.0)
        return up - here

    def to_dict(self) -> dict:
        return {"tensor": self.tensor, "node": self.node, "op_type": self.op_type,
                "sqnr_db": _finite(self.sqnr_db), "cosine": self.cosine, "max_abs": self.max_abs,
                "upstream_db": _finite(self.upstream_db), "drop_db": _finite(self.drop_db)}


@dataclass
class LayerwiseResult:
    reference: str
    candidate: str
    samples: int
    threshold_db: float
    tensors: list[TensorError]  # topological order
    first_divergence: TensorError | None
    warnings: list[str] = field(default_factory=list)
    backend: str = "ort"

    def largest_drops(self, k: int = 5) -> list[TensorError]:
        return sorted(self.tensors, key=lambda t: -t.drop_db)[:k]

    def message(self) -> str:
        d = self.first_divergence
        if d is None:
            return f"no tensor falls below {self.threshold_db:g} dB SQNR"
        up = "inputs exact" if math.isinf(d.upstream_db) else f"{d.upstream_db:.1f} dB upstream"
        return (f"divergence starts at node {d.node} ({d.op_type}), tensor {d.tensor}: {up}, "
                f"{d.sqnr_db:.1f} dB here")

    def to_dict(self) -> dict:
        return {"kind": "layerwise", "reference": self.reference, "candidate": self.candidate,
                "backend": self.backend, "samples": self.samples,
                "threshold_db": self.threshold_db, "message": self.message(),
                "first_divergence": self.first_divergence.to_dict() if self.first_divergence else None,
                "largest_drops": [t.to_dict() for t in self.largest_drops()],
                "tensors": [t.to_dict() for t in self.tensors], "warnings": self.warnings}


def tensor_map(reference: Model, candidate: Model) -> dict[str, str]:
    """Reference float tensor -> the candidate tensor holding its value, in topological order."""
    cand = set(candidate.tensor_order()) | {i.name for i in candidate.inputs}
    ref_types = reference.value_info()
    inputs = [i.name for i in reference.inputs if i.dtype == "float32"]
    constants = reference.constant_tensors()
    out: dict[str, str] = {}
    for t in [*inputs, *reference.tensor_order()]:
        if t in constants:
            continue  # weights in Constant nodes: their error is the weight quantization, not a layer's
        info = ref_types.get(t)
        if info is not None and info.dtype not in ("float32", None, ""):
            continue
        for name in (f"{t}_dequantized", f"{t}__fp16", t):
            if name in cand:
                out[t] = name
                break
    return out


def layerwise(
    reference: Model | str | os.PathLike[str],
    candidate: Model | str | os.PathLike[str],
    data: Dataset,
    *,
    threshold_db: float = DEFAULT_THRESHOLD_DB,
    max_samples: int | None = None,
    settings: backends.Settings | None = None,
    progress: Progress | None = None,
    on_reference: Callable[[dict[str, np.ndarray]], None] | None = None,
    backend: str = "ort",
) -> LayerwiseResult:
    """Compare every tensor (see the module docstring); ``on_reference`` sees the reference's
    exposed tensors of each feed (for statistics that need the float values themselves)."""
    backends.require(backend, "intermediates", "layerwise compare")
    ref = reference if isinstance(reference, Model) else Model.load(reference)
    cand = candidate if isinstance(candidate, Model) else Model.load(candidate)
    mapping = tensor_map(ref, cand)
    inputs = {i.name for i in ref.inputs}
    exposed = {t: c for t, c in mapping.items() if t not in inputs}
    cand_names = set(cand.tensor_order())
    # the value before its own Q/DQ: what a node's input error is made of upstream of that node
    raw = {t: t for t, c in exposed.items() if c != t and t in cand_names}
    ref_run = backends.compile(ref.with_outputs(list(exposed), keep_original=False), settings, backend=backend)
    cand_run = backends.compile(
        cand.with_outputs(list(dict.fromkeys([*exposed.values(), *raw.values()])), keep_original=False), settings,
        backend=backend)
    acc = {t: ErrorAccumulator(atol=0.0, rtol=0.0) for t in exposed}
    raw_acc = {t: ErrorAccumulator(atol=0.0, rtol=0.0) for t in raw}
    validator = FeedValidator(ref)
    n = 0
    for feed in data:
        clean = validator(feed)
        if clean is None:
            continue
        r_out, c_out = ref_run.run(clean), cand_run.run(clean)
        if on_reference is not None:
            on_reference({**clean, **r_out})
        for t, c in exposed.items():
            acc[t].add(r_out[t], np.asarray(c_out[c], np.float32), name=t)
        for t in raw:
            raw_acc[t].add(r_out[t], np.asarray(c_out[t], np.float32), name=t)
        n += 1
        if progress:
            progress(n, data.size)
        if max_samples and n >= max_samples:
            break
    validator.finish(data.name)
    if not n:
        raise DataError(f"dataset {data.name} gave no usable sample")
    producers = ref.producers()
    db = {t: sqnr_db(a.sum_sq_ref, a.sum_sq_err) for t, a in acc.items()}
    raw_db = {t: sqnr_db(a.sum_sq_ref, a.sum_sq_err) for t, a in raw_acc.items()}
    rows = []
    for t, a in acc.items():
        node = producers.get(t)
        ups = [raw_db.get(i, db[i]) for i in (node.input if node is not None else []) if i in db]
        m = a.metrics()
        rows.append(TensorError(t, node.name if node is not None else None, node.op_type if node is not None else None,
                                db[t], m["cosine"], float(m["max_abs"] or 0.0), min(ups) if ups else math.inf,
                                a.sum_sq_ref, a.sum_sq_err, raw_db.get(t)))
    first = next((r for r in rows if r.sqnr_db < threshold_db and r.upstream_db >= threshold_db), None)
    return LayerwiseResult(ref.name, cand.name, n, threshold_db, rows, first, validator.warnings(), backend)


def _finite(v: float) -> float | None:
    return None if v is None or math.isinf(v) or math.isnan(v) else round(float(v), 3)

