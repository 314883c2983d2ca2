"""A tune run's trials: what each one is (``TrialSpec``) and what it measured (``Trial``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Literal, get_args

from infertune import backends
from infertune.errors import UsageError

Precision = Literal["fp32", "fp16", "bf16", "int8"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
FLOAT_GRAPH: tuple[Precision, ...] = ("fp32", "bf16")  # variants whose model is the FP32 graph (bf16: run in bf16)
KNOB_LABELS = {"cuda_graph": "CUDA graph",  # runtime knobs tune searches, as a label shows them
               "INFERENCE_PRECISION_HINT": "inference precision"}


@dataclass(frozen=True)
class TrialSpec:
    """One variant on one runtime. ``options``: runtime knobs (``Settings.options``, e.g. the GPU
    backends' ``cuda_graph``), sorted (name, value) pairs; part of the key only when given, so the
    keys of CPU trials recorded before knobs existed still match. ``prepared`` likewise (only when set):
    the prepared float graph (``quant.prepare``), or INT8 placed in it."""

    precision: Precision
    method: str = ""  # calibration method (int8)
    exclude: tuple[str, ...] = ()  # nodes kept in float (int8)
    threads: int = 0
    opt: str = "all"
    backend: str = "ort"  # the runtime that runs (and is evaluated on) this variant
    target: str = ""  # Q/DQ placement (int8); empty: the runtime's own (its registry entry)
    options: tuple[tuple[str, str], ...] = ()
    algorithms: tuple[str, ...] = ()  # accuracy algorithms run while quantizing (int8), in their run order
    prepared: bool = False  # the prepared float graph (quant.prepare), or INT8 placed in it

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precision == "int8" and not self.target:
            placement = backends.require(self.backend, "placement", "INT8").placement
            object.__setattr__(self, "target", placement)
        if self.precision == "fp16":
            backends.require(self.backend, "fp16", "an FP16 variant")
        if self.precision == "bf16":  # the FP32 graph, compiled with the runtime's bf16 options
            entry = backends.require(self.backend, "bf16", "a BF16 variant")
            object.__setattr__(self, "options", {**dict(self.options), **dict(entry.bf16)})
        pairs = self.options.items() if isinstance(self.options, dict) else self.options
        object.__setattr__(self, "options", tuple(sorted((str(k), str(v)) for k, v in pairs)))

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.options:
            d["options"] = dict(self.options)
        else:
            del d["options"]
        if not self.prepared:  # as recorded before graph preparation existed: the same key
            del d["prepared"]
        if not self.algorithms:  # a spec without algorithms keeps the key it had before they existed
            del d["algorithms"]
        return d

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def label(self) -> str:
        t = f"{self.threads} thread{'s' if self.threads != 1 else ''}" if self.threads else "default threads"
        on = backends.runtime(self.backend).on()
        implied = dict(backends.runtime(self.backend).bf16) if self.precision == "bf16" else {}
        knobs = "".join(f", {KNOB_LABELS.get(k, k)}" + ("" if v in ("1", "true") else f"={v}")
                        for k, v in self.options if implied.get(k) != v)
        prepared = ", prepared" if self.prepared else ""
        if self.precision == "fp32":
            return f"FP32{prepared}{on}, {t}{knobs}"
        if self.precision in ("fp16", "bf16"):
            return f"{self.precision.upper()}{prepared}{on}, {t}{knobs}"
        algos = f" + {'+'.join(self.algorithms)}" if self.algorithms else ""
        # a placement other than the runtime's own (tune's LEANER one) is named
        placed = f" ({self.target} placement)" if self.target != backends.runtime(self.backend).placement else ""
        return f"INT8 {self.method}{algos}{prepared}{placed}{on}, {len(self.exclude)} in float, {t}{knobs}"

    @classmethod
    def from_dict(cls, d: dict) -> TrialSpec:
        # journals from before per-runtime placement built every INT8 variant for ort-cpu
        return cls(d["precision"], d.get("method", ""), tuple(d.get("exclude", ())), d.get("threads", 0),
                   d.get("opt", "all"), d.get("backend", "ort"),
                   d.get("target", "ort-cpu" if d["precision"] == "int8" else ""),
                   tuple(sorted(dict(d.get("options") or {}).items())), tuple(d.get("algorithms", ())),
                   bool(d.get("prepared", False)))


@dataclass
class Trial:
    index: int
    spec: TrialSpec
    metrics: dict[str, float]
    p50_ms: float
    met: bool
    seconds: float
    model_file: str | None  # relative to the run directory; None: the source model
    note: str = ""

    def to_dict(self) -> dict:
        return {"index": self.index, "key": self.spec.key, "spec": self.spec.to_dict(), "label": self.spec.label(),
                "metrics": self.metrics, "p50_ms": self.p50_ms, "met": self.met, "seconds": round(self.seconds, 3),
                "model_file": self.model_file, "note": self.note}

    @classmethod
    def from_dict(cls, d: dict) -> Trial:
        return cls(d["index"], TrialSpec.from_dict(d["spec"]), d["metrics"], d["p50_ms"], d["met"], d["seconds"],
                   d["model_file"], d.get("note", ""))


