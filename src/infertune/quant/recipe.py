"""The JSON recipe written beside every quantized model: enough to rebuild or edit it.

It records the source model's sha256, the target, the exclusions (the user's and those infertune
added, with reasons), and per activation tensor its range, the method that chose it and the
resulting scale / zero point, and whether the Q/DQ were placed in the prepared float graph
(``quant.prepare``; ``rebuild`` prepares it again). ``rebuild`` reads only ranges, so editing a tensor's ``min`` /
``max`` (or adding an exclusion) and rebuilding is the supported way to hand-tune a model.
``algorithms`` holds what each accuracy algorithm decided (equalisation and smoothing scales,
bias corrections, learned rounding as bit-packed flips of round-to-nearest), in the order they
ran, so that ``rebuild`` reproduces the same model without data. Schema 1 (no algorithms) still
loads.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from infertune.errors import UsageError
from infertune.model import Model

SCHEMA_VERSION = 2
READABLE = (1, 2)  # schema 1 recipes have no algorithms


@dataclass
class Recipe:
    source_sha256: str
    target: str
    method: str
    exclusions: list[str]  # as given to Exclusions.parse
    auto_exclusions: dict[str, str]  # node -> why infertune kept it float
    weight_reduce_range: bool | frozenset[str]  # 7-bit weights: every one, none, or the weight tensors named
    tensors: dict[str, dict]  # tensor -> {min, max, method, reason?, scale, zero_point, dtype, ...}
    percentile: float
    overrides: list[str] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    stability: dict | None = None
    versions: dict = field(default_factory=dict)
    prepared: bool = False  # Q/DQ placed in quant.prepare's graph of the source (recipes before it: False)
    preparation: dict | None = None  # what preparation did (PrepareResult.to_dict), for the record
    algorithms: list[dict] = field(default_factory=list)  # one record per algorithm, in the order they ran
    pair_overflow: list[dict] | None = None  # layers whose int16 pair sums overflowed (quant.pair_overflow)

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "source_sha256": self.source_sha256,
            "target": self.target,
            "method": self.method,
            "percentile": self.percentile,
            "overrides": self.overrides,
            "exclusions": self.exclusions,
            "auto_exclusions": self.auto_exclusions,
            "weight_reduce_range": self.weight_reduce_range if isinstance(self.weight_reduce_range, bool)
            else sorted(self.weight_reduce_range),
            "pair_overflow": self.pair_overflow,
            "prepared": self.prepared,
            "preparation": self.preparation,
            "tensors": self.tensors,
            "calibration": self.calibration,
            "stability": self.stability,
            "algorithms": self.algorithms,
            "versions": self.versions,
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "recipe") -> Recipe:
        if not isinstance(d, dict):
            raise UsageError(f"{where}: expected a JSON object")
        version = d.get("schema_version")
        if version not in READABLE:
            raise UsageError(f"{where}: schema_version {version!r} is not supported (expected one of "
                             f"{', '.join(map(str, READABLE))})")
        required = ("source_sha256", "target", "method", "exclusions", "weight_reduce_range", "tensors")
        missing = [k for k in required if k not in d]
        if missing:
            raise UsageError(f"{where}: missing field(s) {', '.join(missing)}")
        for t, entry in d["tensors"].items():
            for k in ("min", "max"):
                v = entry.get(k) if isinstance(entry, dict) else None
                if not isinstance(v, (int, float)):
                    raise UsageError(f"{where}: tensor '{t}' needs a numeric '{k}', got {v!r}")
            if entry["min"] > entry["max"]:
                raise UsageError(f"{where}: tensor '{t}' has min {entry['min']} > max {entry['max']}")
        return cls(
            source_sha256=d["source_sha256"], target=d["target"], method=d["method"],
            exclusions=list(d["exclusions"]), auto_exclusions=dict(d.get("auto_exclusions") or {}),
            weight_reduce_range=_reduce_range(d["weight_reduce_range"], where), tensors=dict(d["tensors"]),
            percentile=float(d.get("percentile", 99.999)), overrides=list(d.get("overrides") or []),
            calibration=dict(d.get("calibration") or {}), stability=d.get("stability"),
            versions=dict(d.get("versions") or {}), algorithms=list(d.get("algorithms") or []),
            prepared=bool(d.get("prepared", False)), preparation=d.get("preparation"),
            pair_overflow=d.get("pair_overflow"),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Recipe:
        from infertune._io import read_json

        return cls.from_dict(read_json(path, "recipe", UsageError), where=str(path))


def recipe_path(model_path: str | os.PathLike[str]) -> Path:
    """Where the recipe of a quantized model lives: ``model.onnx`` -> ``model.recipe.json``."""
    p = Path(model_path)
    return p.with_name(p.stem + ".recipe.json")


def model_sha256(model: Model) -> str:
    """sha256 of the model file when it has one, else of its serialized graph."""
    h = hashlib.sha256()
    if model.path is not None and Path(model.path).is_file():
        with open(model.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    else:
        h.update(model.to_bytes())
    return h.hexdigest()


def _reduce_range(value, where: str) -> bool | frozenset[str]:
    """A recipe's weight_reduce_range: true, false, or the list of weights quantized to 7 bits."""
    if isinstance(value, bool):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return frozenset(value)
    raise UsageError(f"{where}: weight_reduce_range must be true, false or a list of weight names, got {value!r}")
