"""What a tune run found: every trial, the choice and the reasons for it, as plain data."""

from __future__ import annotations

from dataclasses import dataclass, field

from infertune.fingerprint import environment
from infertune.search.trials import Trial

SCHEMA_VERSION = 1


@dataclass
class TuneResult:
    budget: str
    trials: list[Trial]
    chosen: Trial
    decisions: list[str]
    sensitivity: list[dict] = field(default_factory=list)  # [{node, op_type, score}] most sensitive first
    run_dir: str = ""
    artifact: str | None = None
    stopped: str = ""  # why the search ended
    runoff: dict[str, float] = field(default_factory=dict)  # trial key -> p50 ms re-measured (median of rounds)
    runoff_rounds: dict[str, list[float]] = field(default_factory=dict)  # trial key -> each round's p50 ms
    measurements: dict = field(default_factory=dict)  # for the report: {"op_types": ..., "sweep": ...}
    environment: dict = field(default_factory=environment)

    def p50(self, t: Trial) -> float:
        """The trial's latency as the choice saw it: re-measured in the runoff when it took part."""
        return self.runoff.get(t.spec.key, t.p50_ms)

    @property
    def fp32(self) -> Trial:
        return min((t for t in self.trials if t.spec.precision == "fp32"), key=self.p50)

    def pareto(self) -> list[Trial]:
        """Trials no other trial beats on both latency and accuracy (output SQNR)."""
        ran = [t for t in self.trials if "sqnr_db" in t.metrics]
        front = []
        for t in ran:
            if not any(o.p50_ms <= t.p50_ms and o.metrics["sqnr_db"] >= t.metrics["sqnr_db"]
                       and (o.p50_ms < t.p50_ms or o.metrics["sqnr_db"] > t.metrics["sqnr_db"]) for o in ran):
                front.append(t)
        return sorted(front, key=lambda t: t.p50_ms)

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "kind": "tune", "budget": self.budget,
                "chosen": self.chosen.to_dict(), "decisions": self.decisions, "stopped": self.stopped,
                "trials": [t.to_dict() for t in self.trials], "pareto": [t.index for t in self.pareto()],
                "sensitivity": self.sensitivity, "runoff_p50_ms": self.runoff,
                "runoff_rounds_ms": self.runoff_rounds, "run_dir": self.run_dir,
                "artifact": self.artifact, "measurements": self.measurements,
                "environment": self.environment}
