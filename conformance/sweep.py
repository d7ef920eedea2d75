"""The table sweep: every row of every value table read through a path's own lookup.

A case's golden batch selects a small fraction of a large table's rows (16 tokens of
``xlm`` select 0.8% of them), so a verdict on the taps alone cannot see a wrong row
elsewhere. The sweep reads all of them, through the function the path's forward uses for
its weighted sum (:class:`TableRead`: ``EmbeddingBag``, the fused block sum, the value
stage of an ONNX export run on the path's runtime), and compares what it reads with the
reference table. Nothing here knows a framework: a path hands in its lookup.

How, for a table of ``R`` rows and a lookup whose bags hold ``n = heads * knn`` slots:

1. **Detect.** Bag ``b`` holds rows ``b n .. b n + n - 1`` with weight 1 (the last bag is
   padded with weight-0 slots), so one pass reads every row once, in chunks of bags, and
   never holds more than a chunk. Each bag's output is compared with the float64 sum of
   the expected rows, elementwise, within the rounding of an ``n``-term float32 sum
   (:func:`detection_bound`). A row changed by more than that rounding (about
   ``n 2^-24`` of the bag's magnitude) changes its bag's sum.
2. **Locate.** A bag that differs is read again row by row (each row in every slot, the
   first weighing 1 and the rest 0: the output is the row itself, exactly), so the rows
   that differ are counted and the first is named with its value and the expected one; a
   bag whose rows are all right (a reduced-precision runtime that rounds or accumulates in
   its own type) does not count.
   At most :data:`LOCATE_BAGS` bags a table are located (:data:`LOCATE_BAGS_REDUCED` on a
   reduced-precision path); past that a bag counts as differing (``rows_differing_exact``
   false) unless, on a reduced-precision path, it is within :func:`loose_bound`.

Expected rows at a reduced precision are the reference rows in the path's number format
(:func:`expected_rows`: fp16 and bf16 rounded to nearest even, int8 through
:func:`conformance.precision.quantize_rows`); a row read alone passes when it is
within that precision's bound of the float32 row (half a step of its row for int8, a
unit roundoff of each value for fp16 and bf16), so a runtime that rounds differently but
within the format is not a failure. Float32 rows must be read exactly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from conformance.precision import U32, UNIT_ROUNDOFF, half_steps, quantize_rows

CHUNK_BYTES = 8 << 20  # float32 bytes of the rows one lookup call reads
LOCATE_BAGS = 64  # differing bags located row by row, per table
# a reduced-precision runtime that rounds or accumulates its own way differs in most bags
# from the standard format's sums, all within its bound: a few are located, the rest judged
# with the precision's loose bound
LOCATE_BAGS_REDUCED = 8

Read = Callable[[np.ndarray, np.ndarray], np.ndarray]


class NotSwept(Exception):
    """Raised by a path whose lookup cannot be read on its own; the message says why."""


@dataclasses.dataclass
class TableRead:
    """One value table and the path's lookup of it.

    ``read(indices, weights)``: (bags * heads, knn) int64 and float32, as the ``indices``
    and ``weights`` taps -> (bags, v_dim), the weighted sum the forward computes.
    ``reference``: the float32 table (R, v_dim), memory-mapped where it can be.
    ``precision``: the number format the path stores the table in."""

    name: str  # "values", or "<i>/values" in a network
    reference: np.ndarray
    read: Read
    heads: int
    knn: int
    precision: str = "fp32"
    # the path computes in ``precision`` (a reduced-precision variant), not only stores the table in it
    reduced: bool = False


@dataclasses.dataclass
class SweepResult:
    """One table's sweep on one path (report.json's ``sweep`` entries)."""

    table: str
    rows: int
    rows_read: int
    rows_differing: int = 0
    rows_differing_exact: bool = True
    bags_differing: int = 0
    first_bad_row: dict | None = None  # {"row", "column", "obtained", "expected"}
    seconds: float = 0.0  # the path's reads and the comparison
    precision: str = "fp32"
    # computing the reference's bag sums, where this sweep did it (0: read from the case's store)
    reference_seconds: float = 0.0

    def __bool__(self) -> bool:
        return self.rows_read == self.rows and self.bags_differing == 0

    @property
    def message(self) -> str:
        if self.rows_read != self.rows:
            return f"{self.table}: read {self.rows_read:,} of {self.rows:,} rows"
        if self:
            return f"{self.table}: {self.rows:,} rows read, all as expected"
        counted = f"{self.rows_differing:,}" if self.rows_differing_exact else f"at least {self.rows_differing:,}"
        text = f"{self.table}: {counted} of {self.rows:,} rows differ ({self.bags_differing:,} bags)"
        bad = self.first_bad_row
        if bad is not None:
            text += (
                f"; first row {bad['row']:,}, column {bad['column']}: read {bad['obtained']!r}, "
                f"expected {bad['expected']!r}"
            )
        elif self.bags_differing:
            text += "; every row of the bags read row by row was within the bound: the sum itself differs"
        return text

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SweepResult:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


def value_tables(case, weights) -> list[tuple[int, str, np.ndarray]]:
    """(layer, table name, reference table) of every value table of ``case`` (a
    :class:`conformance.cases.Case`) in its torch-named ``weights``: one a layer, or layer
    0's alone when the layers share one (Meta's ``share_values``)."""
    layers = case.spec.layers
    out = []
    for i in range(1 if case.config.share_values else layers):
        key, name = (f"layers.{i}.values.weight", f"{i}/values") if layers > 1 else ("values.weight", "values")
        out.append((i, name, weights[key]))
    return out


def stored_precision(config) -> str:
    """The format a float32 path stores the case's table in: bf16 for Meta's bfloat16 table
    (its kernel also rounds the sum to bf16), else fp32."""
    return "bf16" if config.value_dtype == "bfloat16" else "fp32"


# --- number formats of the table ------------------------------------------------------------
def _bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bfloat16 (ties to even), as float32."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def expected_rows(rows: np.ndarray, precision: str) -> np.ndarray:
    """(n, D) float64: the reference rows as a path at ``precision`` stores them."""
    rows = np.asarray(rows, np.float32)
    if precision == "fp16":
        with np.errstate(over="ignore"):
            return rows.astype(np.float16).astype(np.float64)
    if precision == "bf16":
        return _bf16(rows).astype(np.float64)
    if precision == "int8":
        codes, scale, offset = quantize_rows(rows)
        return codes.astype(np.float64) * scale[:, None].astype(np.float64) + offset[:, None].astype(np.float64)
    return rows.astype(np.float64)


def row_bound(rows: np.ndarray, precision: str) -> np.ndarray:
    """float64, of ``rows``' shape ((n, 1) for int8's per-row bound of (n, D) rows): how far a
    stored value may be from the float32 one at ``precision`` (0 at fp32: read exactly)."""
    rows = np.asarray(rows, np.float32)
    if precision == "int8":
        return half_steps(rows)[:, None]
    if precision in ("fp16", "bf16"):
        tiny = 2.0**-24 if precision == "fp16" else 0.0  # fp16's subnormal spacing
        return UNIT_ROUNDOFF[precision] * np.abs(rows.astype(np.float64)) + tiny
    return np.zeros(rows.shape)


def loose_bound(rows: np.ndarray, bags: int, n: int, precision: str) -> np.ndarray:
    """(bags, D) float64, for a bag no longer read row by row: how far a reduced-precision
    path's bag sum may be from the float32 rows' sum when it accumulates in its own type
    (``n u`` of the sum of magnitudes) and stores each row within its precision's bound."""
    rows = np.asarray(rows, np.float32)
    per_row = np.broadcast_to(row_bound(rows, precision), rows.shape).reshape(bags, n, -1).sum(axis=1)
    magnitude = np.abs(rows.astype(np.float64)).reshape(bags, n, -1).sum(axis=1)
    return per_row + (n * UNIT_ROUNDOFF[precision] + (n + 4) * U32) * (magnitude + per_row)


def detection_bound(expected_abs_sum: np.ndarray, expected_sum: np.ndarray, n: int, precision: str) -> np.ndarray:
    """Elementwise bound on |path's bag sum - float64 sum of the expected rows|, all
    weights 1: float32 accumulation of ``n`` terms (``(n + 4) 2^-24`` of the sum of
    magnitudes) and, at fp16 / bf16, the
    result's own rounding to the type (``u`` of its size)."""
    out = (n + 4) * U32 * expected_abs_sum
    if precision in ("fp16", "bf16"):
        out = out + UNIT_ROUNDOFF[precision] * (np.abs(expected_sum) + out)
    return out * (1 + 1e-6) + 1e-30


# --- the sweep --------------------------------------------------------------------------------
def _bags(table: TableRead, first_row: int, rows: int, slot_by_slot: bool = False):
    """The (indices, weights) of the bags over ``rows`` rows from ``first_row``: n slots a
    bag, weight 1 (or, ``slot_by_slot``, one bag's rows one at a time: bag j is row j, read alone)."""
    n = table.heads * table.knn
    last = len(table.reference) - 1
    if not slot_by_slot:
        bags = math.ceil(rows / n)
        idx = np.arange(first_row, first_row + bags * n, dtype=np.int64)
        w = (idx < first_row + rows).astype(np.float32)
        idx = np.minimum(idx, last)
    else:  # bag j reads row j in every slot, weighing only the first: a NaN row spoils its own bag only
        idx = np.repeat(np.minimum(np.arange(first_row, first_row + n, dtype=np.int64), last), n)
        w = np.zeros((n, n), np.float32)
        w[:, 0] = 1
        w = w.reshape(-1)
    return idx.reshape(-1, table.knn), w.reshape(-1, table.knn)


def _locate(table: TableRead, bag_first_row: int, found: list) -> int:
    """Read one bag row by row; append (row, column, obtained, expected) of each row out of
    bound to ``found``; return how many rows differ."""
    n = table.heads * table.knn
    rows = min(n, len(table.reference) - bag_first_row)
    idx, w = _bags(table, bag_first_row, n, slot_by_slot=True)
    got = np.asarray(table.read(idx, w), np.float64)[:rows]  # (rows, D): row j read alone
    reference = np.asarray(table.reference[bag_first_row : bag_first_row + rows])
    bound = row_bound(reference, table.precision)
    diff = np.abs(got - reference.astype(np.float64))
    bad = ~(diff <= bound)  # NaN counts as differing
    count = 0
    for j in np.flatnonzero(bad.any(axis=1)):
        column = int(np.argmax(np.where(bad[j], np.nan_to_num(diff[j], nan=np.inf), -1)))
        found.append((bag_first_row + int(j), column, float(got[j, column]), float(reference[j, column])))
        count += 1
    return count


def _expected_chunk(rows: np.ndarray, n: int, precision: str) -> tuple[np.ndarray, np.ndarray]:
    """The reference's side of the detection pass for ``rows`` (a whole number of bags but
    the table's last): each bag's float64 sum of the expected rows and its
    :func:`detection_bound`, both (bags, D) float64."""
    count, dim = rows.shape
    bags = math.ceil(count / n)
    stored = rows if precision == "fp32" else expected_rows(rows, precision).astype(np.float32)
    pad = bags * n - count
    if pad:
        stored = np.concatenate([stored, np.zeros((pad, dim), stored.dtype)])
    stored = stored.reshape(bags, n, dim)
    want = np.add.reduce(stored, axis=1, dtype=np.float64)  # (bags, D), exact to float64
    # the sum of magnitudes in float32: its own rounding (at most n 2^-24 of it) is in the 1e-4 margin
    magnitude = np.add.reduce(np.abs(stored), axis=1).astype(np.float64) * (1 + 1e-4)
    if precision == "int8":  # dequantising code * scale + offset rounds at their own sizes
        lo, hi = rows.min(axis=1).astype(np.float64), rows.max(axis=1).astype(np.float64)
        arithmetic = np.concatenate([np.abs(lo) + (hi - lo), np.zeros(pad)]).reshape(bags, n).sum(axis=1)
        magnitude = magnitude + 2 * arithmetic[:, None]
    return want, detection_bound(magnitude, want, n, precision)


class BagSums:
    """The reference's bag sums of one table at one precision, and their bounds: what every
    path's detection pass is compared with. They depend on the table, the bag size and the
    precision only, not on the path, so with a ``store`` (a folder the paths of a case
    share, across processes) they are computed once, chunk by chunk, into a mapped file
    there and read back by every later path; without one, each chunk is computed as it is
    needed. Either way nothing larger than a chunk of rows is held: the file is a
    ``(2, bags, D)`` float64 array, 1/16 of a float32 table at 128 slots a bag."""

    def __init__(self, table: TableRead, rows_per_chunk: int, store=None):
        self.table, self.rows_per_chunk = table, rows_per_chunk
        self.n = table.heads * table.knn
        self.computed = False  # whether this object computed the stored file
        self._stored = None if store is None else self._load_or_compute(store)

    def _compute(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(self.table.reference[first : first + count])
        return _expected_chunk(rows, self.n, self.table.precision)

    def _load_or_compute(self, store) -> np.ndarray:
        rows, dim = self.table.reference.shape
        name = self.table.name.replace("/", "-")
        path = Path(store) / f"bag-sums-{name}-{self.table.precision}-n{self.n}-{rows}x{dim}.npy"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{os.getpid()}")  # moved in whole: never half a file
            out = np.lib.format.open_memmap(partial, "w+", np.float64, (2, math.ceil(rows / self.n), dim))
            for first in range(0, rows, self.rows_per_chunk):
                count = min(self.rows_per_chunk, rows - first)
                want, bound = self._compute(first, count)
                out[0, first // self.n : first // self.n + len(want)] = want
                out[1, first // self.n : first // self.n + len(want)] = bound
            out.flush()
            del out
            os.replace(partial, path)
            self.computed = True  # another process may have put the same sums first
        return np.load(path, mmap_mode="r")

    def chunk(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(want, bound) of the bags over ``count`` rows from ``first`` (a bag's first row)."""
        if self._stored is None:
            return self._compute(first, count)
        b0, b1 = first // self.n, math.ceil((first + count) / self.n)
        return np.asarray(self._stored[0, b0:b1]), np.asarray(self._stored[1, b0:b1])


def sweep_table(table: TableRead, store=None) -> SweepResult:
    """Read every row of ``table`` through its lookup, in chunks (see the module docstring).
    ``store``: a folder where the reference's bag sums are kept for the case's other paths
    (:class:`BagSums`); the time to compute them is not the path's and is not counted."""
    rows_total, dim = table.reference.shape
    n = table.heads * table.knn
    bags_per_chunk = max(1, CHUNK_BYTES // (4 * n * dim))
    t0 = time.perf_counter()
    expected = BagSums(table, bags_per_chunk * n, store)
    result = SweepResult(table.name, rows_total, 0, precision=table.precision)
    result.reference_seconds = time.perf_counter() - t0 if expected.computed else 0.0
    t0 = time.perf_counter()
    found: list = []
    located = 0
    budget = LOCATE_BAGS_REDUCED if table.reduced else LOCATE_BAGS
    for first in range(0, rows_total, bags_per_chunk * n):
        count = min(bags_per_chunk * n, rows_total - first)
        idx, w = _bags(table, first, count)
        got = np.asarray(table.read(idx, w), np.float64)  # (bags, D)
        bags = len(got)
        want, bound = expected.chunk(first, count)
        differs = ~(np.abs(got - want) <= bound).all(axis=1)  # NaN differs
        result.rows_read += count
        loose = None
        for b in np.flatnonzero(differs):
            if located < budget:  # decided row by row
                located += 1
                bad = _locate(table, first + int(b) * n, found)
                result.rows_differing += bad
                result.bags_differing += bad > 0
                continue
            if table.reduced:  # past the budget: within the precision's own accumulation, or not
                if loose is None:
                    rows = np.asarray(table.reference[first : first + count])
                    pad = bags * n - count
                    padded = np.concatenate([rows, np.zeros((pad, dim), np.float32)]) if pad else rows
                    loose = loose_bound(padded, bags, n, table.precision)
                if (np.abs(got[b] - want[b]) <= loose[b]).all():
                    continue
            result.bags_differing += 1
            result.rows_differing_exact = False
    if found:
        row, column, obtained, expected_value = min(found)
        result.first_bad_row = {"row": row, "column": column, "obtained": obtained, "expected": expected_value}
    result.seconds = time.perf_counter() - t0
    return result


def sweep_path(path, context) -> tuple[list[SweepResult], str]:
    """Every value table of ``context``'s case read through ``path``'s lookup (a prepared
    :class:`~conformance.paths.ExecutionPath`): the results, or none and why. The
    reference's bag sums are kept in the case's shared folder (``context.shared_folder``)."""
    try:
        return [sweep_table(t, context.shared_folder("sweep")) for t in path.table_reads(context)], ""
    except NotSwept as exc:
        return [], str(exc)
