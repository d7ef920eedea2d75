"""Per-tensor tolerances from ``golden/tolerances.toml``.

::

    [default]                       # required: atol, rtol; statistic = "max" | "mean"
    atol = 1e-5
    rtol = 1e-4

    [tap.query]                     # per tap
    atol = 2e-5

    [path."tf-xla-*"]               # per path (a glob over path names; [ and ] are literal)
    atol = 5e-5

    [path."ort-*".tap.output]       # per path and tap
    atol = 1e-5

    [case.xlm]                      # per case
    atol = 3e-5

    [case.xlm.tap.query]            # per case and tap
    atol = 5e-5

    [precision.bf16.tap.output]     # per precision (and tap): paths named "...@bf16";
    atol = 1e-4                     # added to the bounds conformance.precision derives

Later entries in this order are more specific and win: default, tap, precision,
precision+tap, path, path+tap, case, case+tap. A precision entry applies to the paths
with that suffix (``fp16``, ``bf16``, ``int8``; see ``conformance.precision``) and is
also a floor for them: path and case entries, tuned for float32 rounding, may loosen a
reduced-precision path's atol or rtol but never tighten them below its precision's.
Each entry may set any of atol, rtol and statistic. ``statistic = "max"`` (the default)
requires every element to satisfy ``|got - expected| <= atol + rtol * |expected|``;
``"mean"`` requires the mean absolute error to be at most atol. The integer ``indices``
tap always compares exactly, except in rows whose selection is ambiguous (a top-k margin
below the ``scores`` atol, or a reduced precision's near-tie margin, see
``conformance.compare``).
Unknown keys, taps, cases and path globs that match no path are errors, and so is a
tolerance that would switch a check off for a golden (``rtol >= 1``, an atol above most
of a tap's values, a ``scores`` atol above the typical top-k margin):
:func:`conformance.compare.check_checkable` refuses those before a run.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pkm_models.config import TAPS
from pkm_models.errors import PKMError
from pkm_models.small_files import SmallFileError, read_small_text

STATISTICS = ("max", "mean")
REDUCED_PRECISIONS = ("fp16", "bf16", "int8")  # conformance.precision.REDUCED (kept import-free)
FIELDS = ("atol", "rtol", "statistic")


def path_matches(name: str, glob: str) -> bool:
    """Shell-style match of a path name, with ``[`` and ``]`` literal (path names such as
    ``ort-cpu[torch-fast]`` contain them): ``*`` and ``?`` are the wildcards."""
    literal = "".join("[[]" if c == "[" else "[]]" if c == "]" else c for c in glob)
    return fnmatch.fnmatchcase(name, literal)


class ToleranceError(PKMError):
    """A tolerance file that is missing, not TOML, or names something that does not exist."""


@dataclasses.dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    statistic: str = "max"


@dataclasses.dataclass
class TolerancePolicy:
    default: Tolerance
    tap: dict[str, dict[str, Any]]
    path: dict[str, dict[str, Any]]  # glob -> fields, with optional "tap" sub-table
    case: dict[str, dict[str, Any]]  # name -> fields, with optional "tap" sub-table
    source: str = "<built-in>"
    precision: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # fp16 -> fields, "tap"

    def resolve(self, case: str, path: str, tap: str) -> Tolerance:
        fields = dataclasses.asdict(self.default)
        fields.update(_fields(self.tap.get(tap, {})))
        floor = self._precision_fields(path, tap)
        fields.update(floor)
        for glob, entry in self.path.items():  # file order; later matching globs win
            if path_matches(path, glob):
                fields.update(_fields(entry))
                fields.update(_fields(entry.get("tap", {}).get(tap, {})))
        entry = self.case.get(case, {})
        fields.update(_fields(entry))
        fields.update(_fields(entry.get("tap", {}).get(tap, {})))
        for key in ("atol", "rtol"):
            if key in floor:
                fields[key] = max(fields[key], floor[key])
        return Tolerance(**fields)

    def _precision_fields(self, path: str, tap: str) -> dict[str, Any]:
        precision = path.rpartition("@")[2] if "@" in path else None
        entry = self.precision.get(precision, {}) if precision else {}
        return {**_fields(entry), **_fields(entry.get("tap", {}).get(tap, {}))}


def _fields(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k in FIELDS}


def _check_fields(entry: Any, where: str, allow_tap: bool) -> None:
    if not isinstance(entry, dict):
        raise ToleranceError(f"{where}: expected a table, got {entry!r}")
    known = (*FIELDS, "tap") if allow_tap else FIELDS
    unknown = sorted(set(entry) - set(known))
    if unknown:
        raise ToleranceError(f"{where}: unknown key(s) {unknown}; known: {list(known)}")
    for key in ("atol", "rtol"):
        if key in entry:
            value = entry[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ToleranceError(f"{where}.{key}: expected a non-negative number, got {value!r}")
    if "statistic" in entry and entry["statistic"] not in STATISTICS:
        raise ToleranceError(f"{where}.statistic: expected one of {list(STATISTICS)}, got {entry['statistic']!r}")
    if "tap" in entry:
        _check_taps(entry["tap"], f"{where}.tap")


def _check_taps(table: Any, where: str) -> None:
    if not isinstance(table, dict):
        raise ToleranceError(f"{where}: expected a table of taps")
    unknown = sorted(set(table) - set(TAPS))
    if unknown:
        raise ToleranceError(f"{where}: unknown tap(s) {unknown}; known: {list(TAPS)}")
    if "indices" in table:  # it would be accepted and never read
        raise ToleranceError(
            f"{where}.indices: indices are compared exactly; which selections may differ follows the "
            "scores' tolerance (a near tie): set it on scores instead"
        )
    for tap, entry in table.items():
        _check_fields(entry, f"{where}.{tap}", allow_tap=False)


def parse_policy(
    data: dict[str, Any], source: str, known_paths: Iterable[str], known_cases: Iterable[str]
) -> TolerancePolicy:
    where = source
    tables = ["default", "tap", "precision", "path", "case"]
    for table in tables:
        if table in data and not isinstance(data[table], dict):
            raise ToleranceError(f"{where}: [{table}] must be a table, got {data[table]!r}")
    unknown = sorted(set(data) - set(tables))
    if unknown:
        raise ToleranceError(f"{where}: unknown table(s) {unknown}; known: {tables}")
    if "default" not in data:
        raise ToleranceError(f"{where}: a [default] table with atol and rtol is required")
    _check_fields(data["default"], f"{where}: default", allow_tap=False)
    missing = [k for k in ("atol", "rtol") if k not in data["default"]]
    if missing:
        raise ToleranceError(f"{where}: default: missing {missing}")
    _check_taps(data.get("tap", {}), f"{where}: tap")
    known_paths = sorted(known_paths)
    for glob, entry in data.get("path", {}).items():
        if not any(path_matches(p, glob) for p in known_paths):
            raise ToleranceError(f"{where}: path {glob!r} matches no execution path; known: {known_paths}")
        _check_fields(entry, f"{where}: path.{glob}", allow_tap=True)
    precision = data.get("precision", {})
    if not isinstance(precision, dict):
        raise ToleranceError(f"{where}: precision: expected a table of precisions")
    for name, entry in precision.items():
        if name not in REDUCED_PRECISIONS:
            raise ToleranceError(f"{where}: unknown precision {name!r}; known: {list(REDUCED_PRECISIONS)}")
        _check_fields(entry, f"{where}: precision.{name}", allow_tap=True)
    known_cases = sorted(known_cases)
    for name, entry in data.get("case", {}).items():
        if name not in known_cases:
            raise ToleranceError(f"{where}: unknown case {name!r}; known: {known_cases}")
        _check_fields(entry, f"{where}: case.{name}", allow_tap=True)
    return TolerancePolicy(
        default=Tolerance(**_fields(data["default"])),
        tap=data.get("tap", {}),
        path=data.get("path", {}),
        case=data.get("case", {}),
        source=source,
        precision=precision,
    )


def load_policy(path: Path, known_paths: Iterable[str], known_cases: Iterable[str]) -> TolerancePolicy:
    path = Path(path)
    try:
        data = tomllib.loads(read_small_text(path))
    except FileNotFoundError:
        raise ToleranceError(f"{path}: no tolerance file") from None
    except SmallFileError as exc:
        raise ToleranceError(str(exc)) from None
    except OSError as exc:
        raise ToleranceError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ToleranceError(f"{path}: not valid TOML: {exc}") from exc
    return parse_policy(data, str(path), known_paths, known_cases)
