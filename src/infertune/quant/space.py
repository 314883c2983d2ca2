"""A calibrated model and every Q/DQ variant of it that keeps some groups in float.

A *group* is one quantized node with its input Q/DQ, its weight and the activation it absorbs.
``QuantSpace`` holds one calibration (``quantize(..., observe_all=True)``) from which the model
for any set of excluded groups is built in memory, without data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from infertune import backends
from infertune.data import Dataset
from infertune.errors import CalibrationError
from infertune.model import Model
from infertune.quant.placement import TARGETS
from infertune.quant.qdq import ensure_opset
from infertune.quant.quantize import Progress, QuantizeResult, quantize, rebuild


class QuantSpace:
    """A calibrated model and every Q/DQ variant of it that excludes some groups."""

    def __init__(self, source: Model, calibrated: QuantizeResult) -> None:
        self.source = source
        self.calibrated = calibrated
        rules = TARGETS[calibrated.plan.target]
        converted = ensure_opset(source)
        self.op_types = {n.name: n.op_type for n in converted.graph.node}
        self.groups = [n for n in calibrated.plan.quantized_nodes if self.op_types[n] not in rules.passthrough_ops]
        self._cache: dict[frozenset[str], Model] = {}

    def result(self, excluded: Sequence[str] = ()) -> QuantizeResult:
        """The full result (model, recipe, plan) of one exclusion set; some group must remain."""
        recipe = replace(self.calibrated.recipe, exclusions=[*self.calibrated.recipe.exclusions, *excluded])
        return rebuild(self.source, recipe, check_source=False)

    def build(self, excluded: Sequence[str] = ()) -> Model:
        """The Q/DQ model with ``excluded`` groups in float (the float model when none is left)."""
        key = frozenset(excluded)
        if key not in self._cache:
            try:
                self._cache[key] = self.source if set(self.groups) <= key else self.result(sorted(key)).model
            except CalibrationError:  # what is left cannot run in 8-bit on its own (an Add without its convs)
                self._cache[key] = self.source
        return self._cache[key]




def calibrated_space(model: Model, calib: Dataset, *, method: str = "auto", target: str = "ort-cpu",
                     exclude: Sequence[str] = (), settings: backends.Settings | None = None,
                     progress: Progress | None = None) -> QuantSpace:
    """Calibrate once, observing every tensor any exclusion set needs."""
    q = quantize(model, calib, method=method, target=target, exclude=exclude, observe_all=True,
                 stability_halves=0, settings=settings, progress=progress)
    return QuantSpace(model, q)
