"""Token streams: a path judged on many tokens, batch by batch, against the live reference.

A case's golden batch is a few dozen tokens; a stream is what a deployer's traffic looks
like: any number of tokens, run through every path in batches and judged with the same
verdict as the golden batch (:func:`conformance.compare.judge`), token by token, against
the PyTorch reference computed in the same worker on the same batch. Statistics are kept
as the stream goes, never the stream itself: peak memory does not grow with its length.

A case names its stream in a ``[stream]`` table (:class:`StreamSpec`)::

    [stream]
    tokens = 65536        # generated: standard-normal rows, as [input] (seed below)
    seed = 5
    batch = 4096          # tokens a batch (default 4096)

    file = "acts.npy"     # or: a .npy of (..., input_dim) float32 rows, memory-mapped

    embeddings = "emb.npy"  # or: tokens drawn from an embedding table (V, input_dim),
    noise = 0.3             # a uniformly random row plus Gaussian noise of this std

The golden pins the stream (the file's sha256, or the generator's parameters) and stores
the reference's taps on a fixed sample of it (:func:`sample_rows`: 1 token in 1,000, at
most :data:`SAMPLE_TOKENS`) as ``test_data_set_1``; a worker compares its live reference
with that sample first, so a reference that changed since the golden is seen.

:class:`StreamStats` keeps, per tap: the largest absolute and relative error, a
log-histogram of absolute errors (its p50, p99 and p99.9 are the upper edges of the bins
they fall in: never below the true quantile, at most 12% above it), and the largest error
on the rows the verdict considers (the smallest atol that would pass); per selection: the
rows whose selected set equals the reference's, the ambiguous rows, and the tokens whose
selection is wrong.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from pkm_models.errors import PKMError

DEFAULT_BATCH = 4096
SAMPLE_EVERY = 1000
SAMPLE_TOKENS = 4096
GENERATED_BLOCK = 4096  # a generated stream is drawn in blocks of this many tokens, whatever the batch
# the log-histogram: 20 bins a decade from 1e-15 to 1e5, plus one for exact zeros
_EDGES = 10.0 ** (np.arange(-15 * 20, 5 * 20 + 1) / 20)
WRONG_TOKENS_KEPT = 20


class StreamError(PKMError):
    """A stream that cannot be read: a wrong last dimension, a non-float or empty file."""


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """A case's token stream (see the module docstring)."""

    tokens: int
    batch: int = DEFAULT_BATCH
    seed: int = 0
    file: Path | None = None
    sha256: str | None = None
    embeddings: Path | None = None
    noise: float = 0.0
    sample: int | None = None  # tokens whose reference taps the golden stores (default: 1 in 1,000)

    def to_json(self, shown: Callable[[Path], str] = str) -> dict:
        """As the case file and case.json say it; ``shown`` writes a file's name (relative
        to the case file, by :meth:`conformance.cases.Case.to_json`)."""
        out: dict = {"tokens": self.tokens, "batch": self.batch}
        if self.sample is not None:
            out["sample"] = self.sample
        if self.file:
            out |= {"file": shown(self.file), "sha256": self.sha256}
        elif self.embeddings:
            out |= {"embeddings": shown(self.embeddings), "sha256": self.sha256, "noise": self.noise, "seed": self.seed}
        else:
            out |= {"seed": self.seed}
        return out

    @classmethod
    def from_json(cls, data: dict, resolve: Callable[[str], Path] = Path) -> StreamSpec:
        """The inverse of :meth:`to_json`; ``resolve`` turns a file's name back into a path."""

        def resolved(name):
            return None if name is None else resolve(name)

        return cls(
            tokens=int(data["tokens"]),
            batch=int(data.get("batch", DEFAULT_BATCH)),
            seed=int(data.get("seed", 0)),
            file=resolved(data.get("file")),
            sha256=data.get("sha256"),
            embeddings=resolved(data.get("embeddings")),
            noise=float(data.get("noise", 0.0)),
            sample=data.get("sample"),
        )


def open_stream_file(path: Path, input_dim: int) -> np.ndarray:
    """The rows of a stream file, memory-mapped: (N, input_dim) float32. StreamError names
    what is wrong with a file that is not one."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise StreamError(f"{path}: not a readable .npy file ({exc})") from exc
    if array.dtype != np.float32:
        raise StreamError(f"{path}: a stream holds float32 activations, this file holds {array.dtype}")
    if array.ndim < 1 or array.shape[-1] != input_dim:
        raise StreamError(f"{path}: shape {array.shape}: the last dimension must be input_dim = {input_dim}")
    rows = array.reshape(-1, input_dim)
    if len(rows) == 0:
        raise StreamError(f"{path}: an empty stream (shape {array.shape})")
    return rows


def _embeddings(spec: StreamSpec, input_dim: int) -> np.ndarray:
    table = np.load(spec.embeddings, mmap_mode="r", allow_pickle=False)
    if table.ndim != 2 or table.shape[1] != input_dim or table.dtype != np.float32:
        raise StreamError(
            f"{spec.embeddings}: expected a float32 table (V, {input_dim}), got {table.dtype} {table.shape}"
        )
    return table


def _generated_block(spec: StreamSpec, block: int, input_dim: int, table) -> np.ndarray:
    """Block ``block`` of a generated stream: the same tokens whatever the batch size."""
    rng = np.random.default_rng([spec.seed, block])
    n = min(GENERATED_BLOCK, spec.tokens - block * GENERATED_BLOCK)
    if table is None:
        return rng.standard_normal((n, input_dim), dtype=np.float32)
    keys = rng.integers(0, len(table), n)
    return (table[keys] + np.float32(spec.noise) * rng.standard_normal((n, input_dim), dtype=np.float32)).astype(
        np.float32
    )


def rows(spec: StreamSpec, input_dim: int, first: int, count: int) -> np.ndarray:
    """Tokens ``first .. first + count`` of the stream, (count, input_dim) float32."""
    if spec.file is not None:
        return np.array(open_stream_file(spec.file, input_dim)[first : first + count])
    table = _embeddings(spec, input_dim) if spec.embeddings is not None else None
    out = []
    block = first // GENERATED_BLOCK
    while sum(len(o) for o in out) < count + first % GENERATED_BLOCK and block * GENERATED_BLOCK < spec.tokens:
        out.append(_generated_block(spec, block, input_dim, table))
        block += 1
    skip = first % GENERATED_BLOCK
    return np.concatenate(out)[skip : skip + count] if out else np.zeros((0, input_dim), np.float32)


def batches(spec: StreamSpec, input_dim: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first token, (1, batch, input_dim) float32) over the whole stream."""
    for first in range(0, spec.tokens, spec.batch):
        x = rows(spec, input_dim, first, min(spec.batch, spec.tokens - first))
        yield first, x[None]


def sample_rows(spec: StreamSpec) -> np.ndarray:
    """The tokens whose reference taps the golden stores: every 1,000th, at most 4,096 (or
    the case's ``sample``, spread evenly over the stream)."""
    count = min(SAMPLE_TOKENS, math.ceil(spec.tokens / SAMPLE_EVERY))
    if spec.sample is not None:
        count = min(count, spec.sample)
    every = math.ceil(spec.tokens / max(count, 1))
    return np.arange(0, spec.tokens, every)


def sample_input(spec: StreamSpec, input_dim: int) -> np.ndarray:
    """(1, S, input_dim): the sampled tokens, read from the file, or generated block by
    block where a block holds one (not the whole stream)."""
    picked = sample_rows(spec)
    if spec.file is not None:
        return np.array(open_stream_file(spec.file, input_dim)[picked])[None]
    out = np.empty((len(picked), input_dim), np.float32)
    for block in np.unique(picked // GENERATED_BLOCK):
        first = int(block) * GENERATED_BLOCK
        x = rows(spec, input_dim, first, min(GENERATED_BLOCK, spec.tokens - first))
        inside = picked // GENERATED_BLOCK == block
        out[inside] = x[picked[inside] - first]
    return out[None]


# --- statistics ---------------------------------------------------------------------------
@dataclasses.dataclass
class TapStats:
    count: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    required_atol: float = 0.0  # the largest error the verdict considered (ambiguous rows aside)
    histogram: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(len(_EDGES) + 1, np.int64))

    def add(self, got: np.ndarray, want: np.ndarray, considered_max: float | None) -> None:
        got, want = np.asarray(got), np.asarray(want)
        if considered_max is not None:
            self.required_atol = max(self.required_atol, considered_max)
        if got.shape == want.shape and np.array_equal(got, want):  # read exactly: every error is 0
            self.count += got.size
            self.histogram[0] += got.size
            return
        err = np.subtract(got, want, dtype=np.float64).reshape(-1)
        np.abs(err, out=err)
        np.nan_to_num(err, copy=False, nan=np.inf, posinf=np.inf)  # a NaN counts as the largest error
        self.count += err.size
        self.max_abs = max(self.max_abs, float(err.max(initial=0.0)))
        scale = np.abs(want, dtype=np.float64).reshape(-1)
        np.maximum(scale, 1e-30, out=scale)
        np.divide(err, scale, out=scale)
        self.max_rel = max(self.max_rel, float(scale.max(initial=0.0)))
        self.histogram += np.bincount(np.searchsorted(_EDGES, err, side="left"), minlength=len(_EDGES) + 1)[
            : len(_EDGES) + 1
        ]

    def quantile(self, q: float) -> float:
        """The upper edge of the bin holding the ``q`` quantile (0 for exact zeros)."""
        if self.count == 0:
            return 0.0
        k = int(np.searchsorted(np.cumsum(self.histogram), math.ceil(q * self.count)))
        return 0.0 if k == 0 else float(_EDGES[min(k, len(_EDGES) - 1)])

    def to_json(self) -> dict:
        return {
            "p50": self.quantile(0.5),
            "p99": self.quantile(0.99),
            "p999": self.quantile(0.999),
            "max": self.max_abs,
            "max_rel": self.max_rel,
        }


@dataclasses.dataclass
class StreamStats:
    """What a stream's run keeps (see the module docstring)."""

    tokens: int = 0
    rows: int = 0  # selections (tokens x heads x layers)
    agreeing: int = 0
    ambiguous: int = 0
    wrong: int = 0
    wrong_tokens: list = dataclasses.field(default_factory=list)
    taps: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0  # the path's own time
    failure: str = ""  # the first failing batch's verdict, naming the token
    sample: str = ""  # how the live reference compared with the golden's stored sample

    def add(self, first: int, got: dict, want: dict, result, heads: int) -> None:
        """One batch from token ``first``: the path's taps, the reference's, and the
        batch's verdict (:class:`conformance.results.PathResult`)."""
        by_name = {t.name: t for t in result.tensors}
        for tap, expected in want.items():
            obtained = got.get(tap)
            if obtained is None:
                continue
            judged = by_name.get(tap)
            if tap.rpartition("/")[2] == "indices":
                same = (np.sort(obtained, axis=-1) == np.sort(expected, axis=-1)).all(axis=-1)
                self.rows += len(same)
                self.agreeing += int(same.sum())
                if judged is not None:
                    self.ambiguous += judged.ambiguous_rows
                    if not judged:
                        self.wrong += max(1, judged.mismatches)
                        for row in np.flatnonzero(~same)[:WRONG_TOKENS_KEPT]:
                            token = first + int(row) // heads
                            if token not in self.wrong_tokens and len(self.wrong_tokens) < WRONG_TOKENS_KEPT:
                                self.wrong_tokens.append(token)
                continue
            stats = self.taps.setdefault(tap, TapStats())
            stats.add(obtained, expected, judged.max_abs if judged is not None else None)
        if result.status != "pass" and not self.failure:
            bad = next((t for t in result.tensors if not t), None)
            token = _first_token(bad, got, want, first, heads) if bad is not None else None
            self.failure = (f"token {token:,}: " if token is not None else "") + result.reason

    def to_json(self) -> dict:
        return {
            "tokens": self.tokens,
            "agreement": self.agreeing / self.rows if self.rows else None,
            "ambiguous_rate": self.ambiguous / self.rows if self.rows else None,
            "wrong_selections": self.wrong,
            "wrong_tokens": self.wrong_tokens,
            "quantiles": {tap: s.to_json() for tap, s in self.taps.items()},
            "required_atol": {tap: s.required_atol for tap, s in self.taps.items()},
            "tokens_per_second": self.tokens / self.seconds if self.seconds else None,
            "failure": self.failure,
            "sample": self.sample,
            "histograms": {tap: s.histogram.tolist() for tap, s in self.taps.items()},
        }


def _first_token(bad, got: dict, want: dict, first: int, heads: int) -> int | None:
    """The stream token of the first row of a failing tap ``bad`` (a TensorResult) that
    differs from the reference: a selection that is not the reference's set, or an element
    past the tap's tolerance."""
    tap = bad.name.split("@")[0]
    obtained, expected = got.get(tap), want.get(tap)
    if obtained is None or expected is None or np.shape(obtained) != np.shape(expected):
        return None
    if tap.rpartition("/")[2] == "indices":
        rows = np.flatnonzero(~(np.sort(obtained, axis=-1) == np.sort(expected, axis=-1)).all(axis=-1))
        return first + int(rows[0]) // heads if len(rows) else None
    per_token = tap.rpartition("/")[2] in ("output", "layer_output")
    o = np.asarray(obtained, np.float64).reshape(-1, np.shape(obtained)[-1])
    e = np.asarray(expected, np.float64).reshape(o.shape)
    limit = (bad.atol or 0.0) + (bad.rtol or 0.0) * np.abs(e)
    rows = np.flatnonzero(~(np.abs(o - e) <= limit).all(axis=-1))
    if not len(rows):
        return None
    return first + (int(rows[0]) if per_token else int(rows[0]) // heads)


def histogram_edges() -> np.ndarray:
    return _EDGES
