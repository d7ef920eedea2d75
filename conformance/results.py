"""Every result the toolkit produces, as plain serialisable data, and their one status
vocabulary. The logic that fills them lives elsewhere (``compare``, ``runner``, ``bench``).

Statuses:

==============  =================================================================
``pass``        a path's taps all conform to the golden (a verdict)
``fail``        some tap does not conform, or a required path is unavailable
``unavailable`` the path cannot run on this machine; the reason says why
``error``       the path raised, crashed or timed out
``ok``          a measurement (a worker's run, a benchmark) finished; it carries
                numbers, not a verdict
==============  =================================================================

A worker process answers ``ok``, ``unavailable`` or ``error``; the conformance run turns
an ``ok`` into ``pass`` or ``fail`` by comparing, and a benchmark keeps ``ok``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

PASS, FAIL, UNAVAILABLE, ERROR, OK = "pass", "fail", "unavailable", "error", "ok"


@dataclasses.dataclass
class TensorResult:
    """One tap of one path against its golden."""

    name: str
    status: str  # PASS | FAIL
    max_abs: float | None = None
    max_rel: float | None = None
    atol: float | None = None
    rtol: float | None = None
    mismatches: int = 0
    ambiguous_rows: int = 0
    message: str = ""
    # the worst elements: {"index", "obtained", "expected", "difference"}, largest difference first
    worst_elements: list[dict] = dataclasses.field(default_factory=list)
    figures: dict = dataclasses.field(default_factory=dict)  # reduced precision: see conformance.compare
    required_atol: float | None = None  # a failing float tap: the smallest atol that would have passed

    def __bool__(self) -> bool:
        return self.status == PASS

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "status": self.status,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "atol": self.atol,
            "rtol": self.rtol,
            "mismatches": self.mismatches,
            "ambiguous_rows": self.ambiguous_rows,
            "message": self.message,
            "worst_elements": self.worst_elements,
            **({"figures": self.figures} if self.figures else {}),
            **({"required_atol": self.required_atol} if self.required_atol is not None else {}),
        }


@dataclasses.dataclass
class Comparison:
    """Every tap of one path, in pipeline order."""

    tensors: list[TensorResult]
    errors: dict[str, np.ndarray]  # tap -> absolute errors of failing float taps (for histograms)
    downstream_tokens: int = 0  # tokens set aside in later layers after a legitimate flip

    @property
    def ok(self) -> bool:
        return all(self.tensors)

    @property
    def first_divergence(self) -> str | None:
        return next((t.name for t in self.tensors if not t), None)

    def __bool__(self) -> bool:
        return self.ok


@dataclasses.dataclass
class PathResult:
    """One path on one case: its verdict and every tap's result."""

    name: str
    status: str  # PASS | FAIL | UNAVAILABLE | ERROR
    reason: str = ""
    first_divergence: str | None = None
    tensors: list[TensorResult] = dataclasses.field(default_factory=list)
    seconds: float | None = None
    errors: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)
    obtained: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)  # kept when it fails
    downstream_tokens: int = 0  # as Comparison's: such a path is also judged layer by layer
    # the table sweep (conformance.sweep): one SweepResult a value table, or why there is none
    sweep: list = dataclasses.field(default_factory=list)
    sweep_reason: str = ""
    audit: object = None  # conformance.export.audit.AuditResult of the ONNX file the path runs
    stream: dict | None = None  # conformance.stream.StreamStats.to_json(): the case's stream on this path

    def add_stream(self, stream: dict) -> None:
        """Join the case's stream: a token the stream's verdict fails fails the path."""
        self.stream = stream
        if stream.get("failure") and self.status == PASS:
            self.status, self.first_divergence = FAIL, "stream"
            self.reason = f"stream: {stream['failure']}"

    def add_audit(self, audit) -> None:
        """Join the static weight audit: a weight the file holds differently fails the path."""
        self.audit = audit
        if audit is not None and not audit and self.status == PASS:
            self.status, self.first_divergence = FAIL, "audit"
            self.reason = f"weight audit: {audit.message}"

    def add_sweep(self, tables: list, reason: str = "") -> None:
        """Join the table sweep's results: a table with a row that differs fails a path
        whose taps passed, naming the row."""
        self.sweep, self.sweep_reason = list(tables), reason
        bad = next((t for t in tables if not t), None)
        if bad is not None and self.status == PASS:
            self.status, self.first_divergence = FAIL, f"sweep:{bad.table}"
            self.reason = f"table sweep: {bad.message}"

    def sweep_json(self) -> dict | None:
        """report.json's ``sweep``: the totals over every table, and each table."""
        if not self.sweep:
            return {"reason": self.sweep_reason} if self.sweep_reason else None
        first = [t.first_bad_row | {"table": t.table} for t in self.sweep if t.first_bad_row]
        return {
            "rows": sum(t.rows for t in self.sweep),
            "rows_read": sum(t.rows_read for t in self.sweep),
            "rows_differing": sum(t.rows_differing for t in self.sweep),
            "first_bad_row": first[0] if first else None,
            "seconds": round(sum(t.seconds for t in self.sweep), 4),
            "tables": [t.to_json() for t in self.sweep],
        }

    @classmethod
    def unavailable(cls, name: str, reason: str, required: bool) -> PathResult:
        """``unavailable``, or a failure when the user required the path (``--require``)."""
        if required:
            return cls(name, FAIL, reason=f"required but unavailable: {reason}")
        return cls(name, UNAVAILABLE, reason=reason)

    @property
    def worst(self) -> TensorResult | None:
        """The failing tap first in pipeline order, else the tap with the largest error
        relative to its tolerance."""
        failing = [t for t in self.tensors if not t]
        if failing:
            return failing[0]
        scored = [t for t in self.tensors if t.max_abs is not None and t.atol]
        return max(scored, key=lambda t: t.max_abs / t.atol, default=None)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "status": self.status,
            "reason": self.reason,
            "first_divergence": self.first_divergence,
            "seconds": self.seconds,
            "tensors": [t.to_json() for t in self.tensors],
            **({"sweep": self.sweep_json()} if self.sweep_json() is not None else {}),
            **({"audit": self.audit.report_json()} if self.audit is not None else {}),
            **({"stream": {k: v for k, v in self.stream.items() if k != "histograms"}} if self.stream else {}),
        }


@dataclasses.dataclass
class CaseResult:
    name: str
    paths: list[PathResult]
    golden_sha256: str | None = None  # of the golden's case.json: which golden was compared against
    # what the golden batch reads of the tables: {"rows", "rows_selected"} (conformance.runner.golden_coverage)
    coverage: dict | None = None

    def to_json(self) -> dict:
        out: dict = {"name": self.name}
        if self.golden_sha256 is not None:
            out["golden"] = {"sha256": self.golden_sha256}
        if self.coverage is not None:
            out["coverage"] = self.coverage
        out["paths"] = [p.to_json() for p in self.paths]
        return out


@dataclasses.dataclass
class RunResult:
    cases: list[CaseResult]
    environment: dict

    @property
    def ok(self) -> bool:
        return all(p.status in (PASS, UNAVAILABLE) for c in self.cases for p in c.paths)

    def to_json(self) -> dict:
        return {"ok": self.ok, "environment": self.environment, "cases": [c.to_json() for c in self.cases]}


@dataclasses.dataclass
class WorkerResult:
    """What a worker process answers (see ``conformance.isolation``)."""

    status: str  # OK | UNAVAILABLE | ERROR
    reason: str = ""
    seconds: float | None = None
    sweep: list = dataclasses.field(default_factory=list)  # SweepResult.to_json() of each table
    sweep_reason: str = ""  # why the path's tables were not swept
    audit: dict | None = None  # AuditResult.to_json() of the path's ONNX file

    @classmethod
    def from_json(cls, data: dict) -> WorkerResult:
        return cls(
            data.get("status", ERROR),
            data.get("reason", ""),
            data.get("seconds"),
            data.get("sweep", []),
            data.get("sweep_reason", ""),
            data.get("audit"),
        )

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
