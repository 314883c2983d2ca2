"""A calibrated model and every Q/DQ variant of it that keeps some groups in float.

A *group* is one quantized node with its input Q/DQ, its weight and the activation it absorbs.
``QuantSpace`` holds one calibration (``quantize(..., observe_all=True)``) from which the model
for any set of excluded groups is built in memory, without data.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace

from infertune import backends
from infertune.data import Dataset
from infertune.errors import CalibrationError
from infertune.model import Model
from infertune.quant.algorithms import AlgorithmOptions
from infertune.quant.calibrate import CalibrationResult
from infertune.quant.placement import TARGETS
from infertune.quant.prepare import PrepareResult
from infertune.quant.quantize import Progress, QuantizeResult, quantize, rebuild


class QuantSpace:
    """A calibrated model and every Q/DQ variant of it that excludes some groups."""

    CACHED = 16

    def __init__(self, source: Model, calibrated: QuantizeResult) -> None:
        self.source = source  # what build() returns when nothing is left in 8-bit
        self.calibrated = calibrated
        # the float graph the Q/DQ go into: the prepared one when quantize prepared it
        self.float_model = calibrated.float_model or source
        rules = TARGETS[calibrated.plan.target]
        # from the quantized model: algorithms may have added nodes (a SmoothQuant Mul, a bias Add)
        self.op_types = {n.name: n.op_type for n in calibrated.model.graph.node}
        self.groups = [n for n in calibrated.plan.quantized_nodes if self.op_types[n] not in rules.passthrough_ops]
        self._cache: OrderedDict[frozenset[str], Model] = OrderedDict()

    def result(self, excluded: Sequence[str] = ()) -> QuantizeResult:
        """The full result (model, recipe, plan) of one exclusion set; some group must remain."""
        recipe = replace(self.calibrated.recipe, exclusions=[*self.calibrated.recipe.exclusions, *excluded])
        return rebuild(self.source, recipe, check_source=False, prepared=self.calibrated.float_model)

    def build(self, excluded: Sequence[str] = ()) -> Model:
        """The Q/DQ model with ``excluded`` groups in float (the float model when none is left).
        The last ``CACHED`` variants are kept (a bisection asks for some twice)."""
        key = frozenset(excluded)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            model = self.source if set(self.groups) <= key else self.result(sorted(key)).model
        except CalibrationError:  # what is left cannot run in 8-bit on its own (an Add without its convs)
            model = self.source
        self._cache[key] = model
        if len(self._cache) > self.CACHED:
            self._cache.popitem(last=False)
        return model

    def quantizes(self, excluded: Sequence[str] = ()) -> bool:
        """Does anything stay in 8-bit with ``excluded`` in float?"""
        return self.build(excluded) is not self.source

    def most_in_float(self, order: Sequence[str]) -> int:
        """The largest k for which keeping ``order[:k]`` in float still leaves something quantized
        (beyond it the 'INT8' variant is the float model: what is left, element-wise ops after
        float producers, does not run in 8-bit on its own). Built in memory, no data."""
        lo, hi = 0, len(order) + 1  # k = lo quantizes (when k = 0 does); k = hi does not
        if not self.quantizes():
            return -1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if mid <= len(order) and self.quantizes(order[:mid]):
                lo = mid
            else:
                hi = mid
        return lo


def calibrated_space(model: Model, calib: Dataset, *, method: str = "auto", target: str = "ort-cpu",
                     exclude: Sequence[str] = (), prepare: bool | None = None,
                     preparation: PrepareResult | None = None, settings: backends.Settings | None = None,
                     progress: Progress | None = None, algorithms: Sequence[str] = (),
                     algorithm_options: AlgorithmOptions | None = None,
                     calibration: CalibrationResult | None = None) -> QuantSpace:
    """Calibrate once, observing every tensor any exclusion set needs; ``algorithms`` run on the
    way (their records make every exclusion set's model without data: a group kept in float gets
    neither its learned rounding nor its bias correction); ``prepare``, ``preparation``, ``calibration``: as
    ``quantize``."""
    q = quantize(model, calib, method=method, target=target, exclude=exclude, observe_all=True,
                 stability_halves=0, settings=settings, progress=progress, algorithms=algorithms,
                 algorithm_options=algorithm_options, prepare=prepare, preparation=preparation, calibration=calibration)
    return QuantSpace(model, q)
