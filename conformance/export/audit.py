"""The static weight audit of an ONNX file: each of the reference's weights found among the
file's initializers and compared with it, without running the model.

The table sweep (:mod:`conformance.sweep`) reads every value row through a path's lookup,
but only where an export's value stage can be cut out; the audit reads what every export
*stores*. For each reference tensor (torch names: ``values.weight``, ``keys``,
``query_proj.0.weight``, ``layers.<i>.…``) it looks, in order, for:

1. an initializer whose name ends with the torch name, or with the Keras port's
   (``pkm_<i>/values``, ``keys``, ``query_kernel``);
2. an initializer of the same shape, or of the transposed shape for a matrix;
3. an initializer holding the same values in another layout (an exporter that transposes
   or reshapes the sub-keys): the same multiset of values.

Float32 initializers must match exactly; fp16 and bf16 ones within a unit roundoff of each
value (fp16's subnormal spacing included); an int8 value table (``uint8`` codes with a
float32 scale and offset per row) within half a step of its row; a weight ONNX Runtime's
quantizer stored for ``DequantizeLinear`` (``<name>_quantized``, ``_scale``,
``_zero_point``) within half a step of its scale. A table is compared in
blocks of rows from the memory-mapped external data, never copied whole. A tensor that no
initializer holds (an exporter may fold the query projection into another constant) is
listed as not found, and so is a query-projection or batchnorm tensor whose named
initializer holds other values (an exporter folds the batchnorm into the projection: the
``query`` tap judges that part); a value table not found, or a value table or sub-key
tensor that an initializer holds differently, fails.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from conformance.precision import U32, half_steps
from conformance.sweep import row_bound

BLOCK_ROWS = 1 << 16
# onnx.TensorProto's data types (this module's result types are read by the run's process,
# which imports no ONNX: onnx is imported where a file is read)
FLOAT, UINT8, FLOAT16, BFLOAT16 = 1, 2, 10, 16
_KERAS_NAMES = {"values.weight": "values", "keys": "keys", "query_proj.0.weight": "query_kernel"}


@dataclasses.dataclass
class AuditResult:
    """report.json's ``audit``: tensors matched, the differing ones, the ones not found."""

    file: str
    tensors: int = 0
    differing: list = dataclasses.field(default_factory=list)  # {"name", "initializer", "index", ...}
    not_found: list = dataclasses.field(default_factory=list)
    tables_not_found: list = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return not self.differing and not self.tables_not_found

    @property
    def message(self) -> str:
        if self.differing:
            d = self.differing[0]
            return (
                f"{self.file}: initializer {d['initializer']!r} holds {d['name']} but differs at {d['index']}: "
                f"{d['obtained']!r}, expected {d['expected']!r}"
                + (f" ({len(self.differing)} tensors differ)" if len(self.differing) > 1 else "")
            )
        if self.tables_not_found:
            return f"{self.file}: no initializer holds the value table {self.tables_not_found[0]}"
        return f"{self.file}: {self.tensors} tensors as the reference's"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def report_json(self) -> dict:
        """report.json's ``audit``: the differing tensors by name, the first difference."""
        return {
            "file": self.file,
            "tensors": self.tensors,
            "differing": [d["name"] for d in self.differing],
            "first_difference": self.differing[0] if self.differing else None,
            "not_found": self.not_found + self.tables_not_found,
        }

    @classmethod
    def from_json(cls, data: dict) -> AuditResult:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


def _array(init, folder: Path) -> np.ndarray:
    """The initializer's values, memory-mapped when they are external."""
    import onnx
    from onnx import numpy_helper

    dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
    if init.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in init.external_data}
        shape = tuple(init.dims)
        if init.data_type == BFLOAT16:
            dtype = np.dtype(np.uint16)
        return np.memmap(folder / info["location"], dtype, "r", int(info.get("offset", 0)), shape)
    if init.data_type == BFLOAT16:
        raw = np.frombuffer(init.raw_data, np.uint16) if init.raw_data else np.asarray(init.int32_data, np.uint16)
        return raw.reshape(tuple(init.dims))
    return numpy_helper.to_array(init)


def _as_float32(a: np.ndarray, data_type: int) -> np.ndarray:
    if data_type == BFLOAT16:
        return (np.asarray(a, np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(a, np.float32)


def _compare(got, data_type: int, want: np.ndarray, transpose: bool = False) -> dict | None:
    """The first element of ``got`` (an initializer) out of bound of ``want``, block by block."""
    want = np.asarray(want)
    rows = want.shape[0] if want.ndim else 1
    for first in range(0, max(rows, 1), BLOCK_ROWS):
        w = np.asarray(want[first : first + BLOCK_ROWS], np.float32)
        g = got.T[first : first + BLOCK_ROWS] if transpose else got[first : first + BLOCK_ROWS]
        g = _as_float32(g, data_type)
        if data_type == FLOAT and np.array_equal(g, w):
            continue
        # a stored value's bound at the initializer's type: the sweep's, for a row read alone
        bound = row_bound(w, {FLOAT16: "fp16", BFLOAT16: "bf16"}.get(data_type, "fp32"))
        bad = ~(np.abs(g.astype(np.float64) - w) <= bound)
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            index = (index[0] + first, *index[1:])
            return {
                "index": list(index),
                "obtained": float(g[(index[0] - first, *index[1:])]),
                "expected": float(w[(index[0] - first, *index[1:])]),
            }
    return None


def _int8_table(inits: dict, arrays, want: np.ndarray, layer: str, used: set) -> tuple[str, dict | None] | None:
    """A uint8 table of ``want``'s shape with a scale and offset a row: (name, first bad or
    None). Initializers named for the table's layer (``layer``: ``layers.<i>.``) come first."""
    n, d = want.shape

    def mine_first(names: list[str]) -> list[str]:
        names = [k for k in names if k not in used]
        return sorted(names, key=lambda k: layer not in k) if layer else names

    codes = mine_first([k for k, t in inits.items() if t.data_type == UINT8 and tuple(t.dims) == (n, d)])
    per_row = mine_first([k for k, t in inits.items() if t.data_type == FLOAT and tuple(t.dims) in ((n, 1), (n,))])
    if layer:
        per_row = [k for k in per_row if layer in k] or per_row
    if not codes or len(per_row) < 2:
        return None
    c = arrays(codes[0])
    head = np.asarray(want[: min(n, 256)], np.float32)
    bound = half_steps(head)[:, None] + 4 * U32 * np.abs(head)

    def misfit(pair) -> int:  # rows of the first block out of bound with this (scale, offset)
        scale, offset = (np.asarray(arrays(k), np.float64).reshape(-1)[: len(head)] for k in pair)
        got = np.asarray(c[: len(head)], np.float64) * scale[:, None] + offset[:, None]
        return int((~(np.abs(got - head) <= bound)).any(axis=1).sum())

    pairs = [(a, b) for a in per_row for b in per_row if a != b]
    scale_name, offset_name = min(pairs, key=misfit)  # the roles of the two per-row tensors
    used.update((codes[0], scale_name, offset_name))
    scale, offset = arrays(scale_name).reshape(-1), arrays(offset_name).reshape(-1)
    for start in range(0, n, BLOCK_ROWS):
        first = _int8_block(c, scale, offset, want, start, min(n, start + BLOCK_ROWS))
        if first is not None:
            return codes[0], first
    return codes[0], None


def _int8_block(codes, scale, offset, want, start: int, stop: int) -> dict | None:
    w = np.asarray(want[start:stop], np.float32)
    got = np.asarray(codes[start:stop], np.float64) * scale[start:stop, None] + offset[start:stop, None]
    bound = half_steps(w)[:, None] + 4 * U32 * np.abs(w)
    bad = ~(np.abs(got - w) <= bound)
    if not bad.any():
        return None
    r, col = (int(i) for i in np.argwhere(bad)[0])
    return {
        "index": [start + r, col],
        "obtained": float(got[r, col]),
        "expected": float(w[r, col]),
        "row_scale": float(scale[start + r]),
    }


def _keras_name(name: str) -> str | None:
    match = re.match(r"^(?:layers\.(\d+)\.)?(.+)$", name)
    layer, rest = match.group(1) or "0", match.group(2)
    return f"pkm_{layer}/{_KERAS_NAMES[rest]}" if rest in _KERAS_NAMES else None


def audit_file(path: Path, weights: dict[str, np.ndarray], shared_values: bool = False) -> AuditResult:
    """Audit the ONNX file at ``path`` against the reference's ``weights`` (torch names)."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    cache: dict = {}

    def arrays(name: str) -> np.ndarray:
        if name not in cache:
            cache[name] = _array(inits[name], path.parent)
        return cache[name]

    result = AuditResult(path.name)
    used: set = set()
    for name, want in weights.items():
        want = np.asarray(want)
        table = name.endswith("values.weight")
        if shared_values and table and not name.startswith(("values", "layers.0.")):
            continue  # one table for every layer: layer 0's
        if want.dtype.kind != "f" or want.size <= 1:
            continue  # batchnorm's step counter
        keras = _keras_name(name)
        by_name = [k for k in inits if k.endswith(name) or (keras and (k == keras or k.startswith(keras + ":")))]
        shape = tuple(want.shape)
        same = [k for k in inits if tuple(inits[k].dims) == shape and k not in used]
        flipped = [k for k in inits if want.ndim == 2 and tuple(inits[k].dims) == shape[::-1] and k not in used]
        candidates = [(k, False) for k in by_name if tuple(inits[k].dims) == shape]
        candidates += [(k, True) for k in by_name if want.ndim == 2 and tuple(inits[k].dims) == shape[::-1]]
        candidates += [(k, False) for k in same if k not in by_name] + [(k, True) for k in flipped if k not in by_name]
        floats = (FLOAT, FLOAT16, BFLOAT16)
        candidates = [(k, t) for k, t in candidates if inits[k].data_type in floats]
        first_bad = None
        for k, transpose in candidates:
            bad = _compare(arrays(k), inits[k].data_type, want, transpose)
            if bad is None:
                used.add(k)
                result.tensors += 1
                break
            if first_bad is None:
                first_bad = {"name": name, "initializer": k, **bad}
        else:
            # stored quantized: an int8 value table (codes, scale and offset per row), or a weight
            # for DequantizeLinear (ONNX Runtime's quantize_dynamic: X_quantized, X_scale, X_zero_point)
            layer = re.match(r"^(layers\.\d+\.)?", name).group(1) or ""
            quantized = (_int8_table(inits, arrays, want, layer, used) if table else None) or _linear_quantized(
                inits, arrays, want, name, used
            )
            if quantized is not None:
                codes, bad = quantized
                if bad is None:
                    result.tensors += 1
                else:
                    result.differing.append({"name": name, "initializer": codes, **bad})
                continue
            if first_bad is not None and (table or name.endswith("keys")):
                result.differing.append(first_bad)
            elif _same_values(inits, arrays, want, used):
                result.tensors += 1
            elif table:
                result.tables_not_found.append(name)
            else:
                result.not_found.append(name)
    return result


def _linear_quantized(inits: dict, arrays, want: np.ndarray, name: str, used: set) -> tuple[str, dict | None] | None:
    """``want`` stored as ``DequantizeLinear`` reads it, by ONNX Runtime's quantizer's names
    (``<name>_quantized`` codes, ``<name>_scale``, ``<name>_zero_point``, per tensor or per
    channel of the last axis): (the codes' name, None) when every dequantised value
    ``(q - zero_point) * scale`` is within half a step (and float32 rounding) of the
    reference, else the first that is not; None where no such initializers hold it."""
    found = [k for k in inits if k.endswith("_quantized") and k.removesuffix("_quantized").endswith(name)]
    for codes in found:
        base = codes.removesuffix("_quantized")
        if f"{base}_scale" not in inits or tuple(inits[codes].dims) not in (want.shape, want.shape[::-1]):
            continue
        q = np.asarray(arrays(codes), np.float64)
        scale = np.asarray(arrays(f"{base}_scale"), np.float64)
        zero = np.asarray(arrays(f"{base}_zero_point"), np.float64) if f"{base}_zero_point" in inits else 0.0
        stored = (q - zero) * scale
        step = np.broadcast_to(np.abs(scale), stored.shape)
        reference = np.asarray(want, np.float64)
        # as stored, or transposed (a MatMul's weight; a square one may be either)
        layouts = [(g, h) for g, h in ((stored, step), (stored.T, step.T)) if g.shape == reference.shape]
        used.update({codes, f"{base}_scale", f"{base}_zero_point"})
        first = None
        for got, half in layouts:
            bad = ~(np.abs(got - reference) <= half / 2 * (1 + 1e-6) + U32 * np.abs(reference))
            if not bad.any():
                return codes, None
            if first is None:
                index = tuple(int(i) for i in np.argwhere(bad)[0])
                first = {"index": list(index), "obtained": float(got[index]), "expected": float(reference[index])}
        return codes, first
    return None


def _same_values(inits: dict, arrays, want: np.ndarray, used: set) -> bool:
    """Some initializers not matched yet hold, together, the same multiset of values as
    ``want`` (a small tensor stored in another layout, or split by head: the sub-keys),
    at the initializers' own type (fp16 / bf16 values are the reference's rounded to it,
    ties to even). Tables are never searched this way."""
    if want.size > 1 << 22:
        return False
    from conformance.sweep import expected_rows

    flat = np.asarray(want, np.float32).reshape(1, -1)
    for data_type, precision in (
        (FLOAT, "fp32"),
        (FLOAT16, "fp16"),
        (BFLOAT16, "bf16"),
    ):
        target = np.sort(expected_rows(flat, precision).astype(np.float32).reshape(-1))
        parts, size = [], 0
        for k, t in inits.items():
            n = int(np.prod(t.dims))
            if k in used or t.data_type != data_type or n > want.size or n == 0:
                continue
            values = np.sort(_as_float32(arrays(k), data_type).reshape(-1))
            if np.isin(values, target).all():
                parts.append((k, values))
                size += n
        if parts and size == want.size:
            union = np.sort(np.concatenate([v for _, v in parts]))
            if np.array_equal(union, target):
                used.update(k for k, _ in parts)
                return True
    return False
