"""Check and budget expressions: ``'cosine>=0.999'``, ``'top1_drop<=0.5'``, ``'max_abs<1e-3'``."""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

from infertune.errors import UsageError

_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_PATTERN = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|>|<)\s*([-+0-9.eEinf]+)\s*")


@dataclass(frozen=True)
class Check:
    metric: str
    op: str
    threshold: float

    @classmethod
    def parse(cls, text: str, *, metrics: tuple[str, ...] | None = None) -> Check:
        m = _PATTERN.fullmatch(text)
        if not m:
            raise UsageError(
                f"bad check {text!r}: expected METRIC OP NUMBER, e.g. 'cosine>=0.999'"
            )
        name, op, num = m.groups()
        if metrics is not None and name not in metrics:
            raise UsageError(f"unknown metric {name!r} in {text!r} (known: {', '.join(metrics)})")
        try:
            threshold = float(num)
        except ValueError:
            raise UsageError(f"bad number {num!r} in check {text!r}") from None
        return cls(name, op, threshold)

    def passes(self, value: float | None) -> bool:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        return bool(_OPS[self.op](value, self.threshold))

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"
