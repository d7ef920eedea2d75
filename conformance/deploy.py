"""A user's own ONNX file, judged as a path against a case's golden.

The toolkit's exports are judged by the paths that run them; the file a user actually
ships (their own ``torch.onnx.export``, an ONNX Runtime-quantized or -optimized model) is
named instead: ``python -m conformance run --case C --model model.onnx`` (repeatable), or
in the case file::

    [deploy]
    onnx = ["model.onnx", { file = "model.int8.onnx", precision = "int8", outputs = { output = "logits" } }]

Each file becomes one path per runtime, ``ort-cpu[file:NAME]``, ``ort-cuda[file:NAME]``,
``ort-tensorrt[file:NAME]`` and ``onnx-reference[file:NAME]``, with a precision suffix
where its value table is stored reduced (``@fp16``, ``@bf16``, ``@int8``, ``@int4``), read
from the file or declared. NAME is the file's stem (made unique within a run).

This module knows the file's facts only: its name, what it is declared to be, and what
its graph says (inputs, outputs, the value table's number format), read without loading
its weights. Running it is :mod:`conformance.paths.file_paths`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

from pkm_models.errors import PKMError

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_FILE_NAME = re.compile(r"\[file:([A-Za-z0-9._-]+)\]")
# onnx.TensorProto data types (this module is read by the run's process, which imports no ONNX
# until a file is read)
_FLOAT, _UINT8, _INT8, _FLOAT16, _BFLOAT16, _UINT4, _INT4 = 1, 2, 3, 10, 16, 21, 22


class DeployError(PKMError):
    """A file that cannot be judged as given; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class ModelFile:
    """One ONNX file to judge: its name in path names, where it is, how its outputs map
    onto the case's taps (``(tap, output)`` pairs, where the names differ), and its
    precision where declared (else read from the file)."""

    name: str
    path: Path
    outputs: tuple[tuple[str, str], ...] = ()
    precision: str | None = None

    def to_json(self) -> dict:
        out = {"name": self.name, "file": str(self.path)}
        if self.outputs:
            out["outputs"] = dict(self.outputs)
        if self.precision:
            out["precision"] = self.precision
        return out

    @classmethod
    def from_json(cls, data: dict) -> ModelFile:
        return cls(
            data["name"], Path(data["file"]), tuple(sorted((data.get("outputs") or {}).items())), data.get("precision")
        )


def file_of(path_name: str) -> str | None:
    """NAME of a path name ``...[file:NAME]...``, or None for a path on no user file."""
    match = _FILE_NAME.search(path_name)
    return match.group(1) if match else None


def model_file(
    path: Path,
    taken: set[str] | None = None,
    outputs: dict[str, str] | None = None,
    precision: str | None = None,
    where: str = "",
) -> ModelFile:
    """A :class:`ModelFile` for ``path``, named by its stem (``-2``, ``-3``... where another
    file of the run took the name: ``taken``, updated). A missing file, a folder or an
    unknown precision is a DeployError naming ``where`` (the case file, or ``--model``)."""
    where = where or str(path)
    if not path.is_file():
        raise DeployError(f"{where}: {path} is not a file")
    if precision is not None and precision not in PRECISIONS:
        raise DeployError(f"{where}: precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    for tap, output in (outputs or {}).items():
        if not isinstance(tap, str) or not isinstance(output, str) or not tap or not output:
            raise DeployError(f"{where}: outputs must map tap names to the file's output names (strings)")
    taken = set() if taken is None else taken
    stem = _NAME.sub("-", path.name.removesuffix(".onnx")).strip("-.") or "model"
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}"
    taken.add(name)
    return ModelFile(name, path.resolve(), tuple(sorted((outputs or {}).items())), precision)


def deploy_table(table, source: Path, resolve) -> tuple[ModelFile, ...]:
    """The case file's ``[deploy]`` table: ``onnx``, a list of file names (relative to the
    case file) or of tables ``{file, precision, outputs}``; ``outputs`` and ``precision``
    beside ``onnx`` apply to every file without its own."""
    where = f"{source}: [deploy]"
    if not isinstance(table, dict):
        raise DeployError(f"{where} must be a table")
    unknown = set(table) - {"onnx", "outputs", "precision"}
    if unknown:
        raise DeployError(f"{where}: unknown key(s) {sorted(unknown)}; known: onnx, outputs, precision")
    entries = table.get("onnx", [])
    if not isinstance(entries, list) or not entries:
        raise DeployError(f"{where}: onnx must be a non-empty list of file names")
    shared_outputs, shared_precision = table.get("outputs"), table.get("precision")
    taken: set[str] = set()
    files = []
    for entry in entries:
        if isinstance(entry, str):
            entry = {"file": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise DeployError(f'{where}: each onnx entry is a file name or a table with file = "..."')
        extra = set(entry) - {"file", "outputs", "precision"}
        if extra:
            raise DeployError(f"{where}: unknown key(s) {sorted(extra)} in an onnx entry")
        outputs = entry.get("outputs", shared_outputs)
        if outputs is not None and not isinstance(outputs, dict):
            raise DeployError(f'{where}: outputs must be a table, e.g. outputs = {{ output = "logits" }}')
        files.append(
            model_file(resolve(entry["file"]), taken, outputs, entry.get("precision", shared_precision), where)
        )
    return tuple(files)


# --- what the file's graph says ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FileFacts:
    """A file's graph inputs ``(name, dims)`` (a dim is an int, or a str for a dynamic
    axis), its output names, and its value table's number format (``precision``; for
    int4 also its ``block_size``)."""

    inputs: tuple[tuple[str, tuple], ...]
    outputs: tuple[str, ...]
    precision: str
    block_size: int | None = None


def read_facts(path: Path) -> FileFacts:
    """The file's :class:`FileFacts`, read from its graph without its external data; a
    DeployError says why a file cannot be read: not ONNX, truncated, or no graph. Read once
    per process while the file stays the same (selection, availability, preparation and
    the sweep all ask, and a file may embed a large table)."""
    try:
        info = Path(path).stat()
    except OSError as exc:
        raise DeployError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return _read_facts(str(path), info.st_ino, info.st_size, info.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _read_facts(path: str, inode: int, size: int, mtime_ns: int) -> FileFacts:
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # DecodeError, or anything the protobuf parser raises
        raise DeployError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {str(exc)[:200]})") from None
    graph = model.graph
    if not graph.node or not graph.output:
        raise DeployError(f"{path}: the ONNX model has no graph (no nodes or no outputs): truncated or empty?")
    initializers = {i.name for i in graph.initializer}
    inputs = []
    for value in graph.input:
        if value.name in initializers:
            continue
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim
        )
        inputs.append((value.name, dims))
    precision, block = table_precision(model)
    return FileFacts(tuple(inputs), tuple(o.name for o in graph.output), precision, block)


def table_precision(model) -> tuple[str, int | None]:
    """The number format of the file's value table, the largest initializer (a PKM layer's
    table is by far its largest tensor): float32, fp16, bf16; int8 codes read through
    ``DequantizeLinear`` or a scale and offset per row; 4-bit codes through ONNX Runtime's
    ``GatherBlockQuantized`` (with its block size)."""
    import math

    largest = max(model.graph.initializer, key=lambda t: math.prod(t.dims), default=None)
    if largest is None:
        return "fp32", None
    consumers = [n for n in model.graph.node if largest.name in n.input]
    for node in consumers:
        if node.op_type == "GatherBlockQuantized":
            attrs = {a.name: a for a in node.attribute}
            bits = attrs["bits"].i if "bits" in attrs else 4
            block = attrs["block_size"].i if "block_size" in attrs else 128
            return ("int4" if bits == 4 else f"int{bits}"), block
    kind = largest.data_type
    if kind in (_UINT4, _INT4):
        return "int4", None
    if kind in (_UINT8, _INT8):
        return "int8", None
    if kind == _FLOAT16:
        return "fp16", None
    if kind == _BFLOAT16:
        return "bf16", None
    return "fp32", None
