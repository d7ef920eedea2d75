"""Conformance cases: data files, one per case, in ``conformance/cases/<name>.toml``.

A case names a model (a preset, config overrides, a weight seed), an input (shape and
seed) and how its golden is stored. Adding one is writing a file and running
``python -m conformance golden regenerate --case NAME``::

    description = "what this case is for"
    preset = "small"            # tiny, small, xlm (single-layer presets)
    seed = 0                    # weight seed
    layers = 1                  # PKM layers applied in sequence (needs input_dim == output_dim)
    group = "large"             # optional: left out of runs over all cases unless asked
                                # (--group large, or --case NAME)

    [config]                    # optional: PKMConfig fields that differ from the preset
    query_batchnorm = true

    [input]
    shape = [2, 7, 64]          # (batch, sequence, input_dim)
    seed = 1

    [weights]                   # optional
    store = true                # keep weights.npz and model.onnx in the golden (default: under 8 MB)
    duplicate_subkeys = 0       # pairs of identical sub-keys per head and half (forces ties)

    [stream]                    # optional: many tokens, every path against the live reference
    tokens = 65536              # generated, standard normal (or file = "acts.npy", memory-mapped,
    seed = 5                    # or embeddings = "emb.npy" with noise = 0.3: a random row plus noise)
    batch = 4096                # tokens a batch (conformance/stream.py)
    sample = 16                 # optional: tokens whose reference taps the golden keeps (1 in 1,000)

    [deploy]                    # optional: your own ONNX files, judged as paths ort-cpu[file:NAME]...
    onnx = ["model.onnx"]       # relative to this file; or { file = "...", precision = "int8",
                                # outputs = { output = "logits" } } (conformance/deploy.py)

The user's own model and data instead of a preset and a seed::

    [weights]
    checkpoint = "model.pth"    # relative to this file, or absolute: a PyTorch state_dict,
                                # an XLM training checkpoint, .npz or .keras
    memories = ["4_in", "8_after"]  # which memories, in order (default: all, in layer order)

    [config]
    knn = 32                    # only what the file does not record; anything else that
                                # contradicts the file is an error naming both values

    [input]
    file = "activations.npy"    # .npy, .npz (with key = "name") or an ONNX TensorProto .pb:
                                # float32, any leading shape, last dimension input_dim

With a checkpoint, ``preset`` and ``seed`` are not used and the config comes from the file;
``layers`` (if given) must equal the number of memories. The golden pins the checkpoint and
the input file by sha256: a changed or missing file is bad data (exit 2) until the golden is
regenerated. Loading never executes code from a file (``pkm_models.checkpoint``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from conformance.deploy import DeployError, ModelFile, deploy_table
from conformance.files import FileProblem, confined, user_file
from conformance.spec import CheckpointRef, ModelSpec
from conformance.stream import StreamError, StreamSpec, open_stream_file
from pkm_models.checkpoint import available_memory
from pkm_models.config import ConfigError, PKMConfig, get_preset
from pkm_models.convert import ConversionError
from pkm_models.errors import PKMError
from pkm_models.small_files import SmallFileError, read_small, read_small_text
from pkm_models.weights import make_input

STORE_LIMIT_BYTES = 8 << 20
NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # whole name: also no '.', '..', leading '.', newline
_SCHEMA: dict[str, set[str] | None] = {
    "description": None,
    "preset": None,
    "seed": None,
    "layers": None,
    "group": None,
    "config": None,
    "input": {"shape", "seed", "file", "key"},
    "weights": {"store", "duplicate_subkeys", "checkpoint", "memories"},
    "stream": {"tokens", "seed", "batch", "file", "embeddings", "noise", "sample"},
    "deploy": {"onnx", "outputs", "precision"},
}
# what a checkpoint's tensors determine: a case may not say otherwise
_FROM_WEIGHTS = ("input_dim", "output_dim", "k_dim", "heads", "n_keys", "query_batchnorm")


class CaseError(PKMError):
    """A case file that is missing, unreadable or invalid."""


@dataclasses.dataclass(frozen=True)
class InputFile:
    """Real activations a case names."""

    path: Path
    key: str | None
    sha256: str
    size: int | None = None  # bytes; None in a case read back from a golden made before sizes were kept

    def load(self) -> np.ndarray:
        return read_input_file(self.path, self.key)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    description: str
    spec: ModelSpec
    input_shape: tuple[int, ...]
    input_seed: int
    store_weights: bool
    source: Path
    input_file: InputFile | None = None
    group: str = ""  # "" : in every run over all cases; else only when its group is asked for
    stream: StreamSpec | None = None  # many tokens, judged batch by batch (conformance.stream)
    deploy: tuple[ModelFile, ...] = ()  # the user's ONNX files judged as paths (conformance.deploy)

    @property
    def config(self) -> PKMConfig:
        return self.spec.config

    def make_input(self) -> np.ndarray:
        if self.input_file is not None:
            x = self.input_file.load()
            digest = _digest(self.input_file.path)
            if digest != self.input_file.sha256:
                raise CaseError(f"{self.input_file.path}: changed while in use")
            return x
        return make_input(self.input_shape, self.input_seed)

    def memory_bytes(self) -> int:
        """An upper estimate of the memory one path needs for this case: the weights twice
        (the case's copy and the runtime's), drawing them (a block's float64 draw), the
        input, and the largest intermediates of any path per layer (the product-key
        candidates' scores and indices, the gathered value rows, the output)."""
        return 2 * self.spec.weight_bytes + self.spec.generation_bytes() + self.activation_bytes()

    def activation_bytes(self) -> int:
        """The input and twice the largest intermediates of any path per layer (the
        product-key candidates' scores and indices, the gathered value rows, the output)."""
        c, tokens = self.config, math.prod(self.input_shape[:-1])
        rows = tokens * c.heads
        intermediates = rows * c.knn * c.knn * 12 + rows * c.knn * c.v_dim * 4 + tokens * c.v_dim * 8
        return 4 * math.prod(self.input_shape) + 2 * intermediates

    def check_fits(self, available: int | None = None) -> None:
        """Refuse (CaseError) a case that would not fit in this machine's memory, before
        anything is allocated."""
        available = available_memory() if available is None else available
        need = self.memory_bytes()
        if available and need > available:
            raise CaseError(
                f"{self.source}: this case needs about {need / 2**30:,.1f} GiB (weights "
                f"{self.spec.weight_bytes / 2**30:,.1f} GiB, input {self.input_shape}); this machine has "
                f"{available / 2**30:,.1f} GiB available. Use a smaller input or model"
            )

    @classmethod
    def from_json(cls, data: dict[str, Any], source: Path) -> Case:
        """The inverse of :meth:`to_json` (how a worker process receives its case)."""
        source = Path(source)
        checkpoint = None
        if "checkpoint" in data:
            c = data["checkpoint"]
            checkpoint = CheckpointRef(_resolve(source, c["file"]), tuple(c["memories"]), c["sha256"], c["size"])
        spec = ModelSpec(
            name=data.get("model", data["name"]),
            config=PKMConfig.from_dict(data["config"]),
            layers=data["layers"],
            seed=data["weight_seed"],
            duplicate_subkeys=data["duplicate_subkeys"],
            weights_file=Path(data["weights_file"]) if "weights_file" in data else None,
            checkpoint=checkpoint,
        )
        given = data["input"]
        input_file = None
        if "file" in given:
            input_file = InputFile(
                _resolve(source, given["file"]), given.get("key"), given["sha256"], given.get("size")
            )
        return cls(
            name=data["name"],
            description=data["description"],
            spec=spec,
            input_shape=tuple(given["shape"]),
            input_seed=given.get("seed", 0),
            store_weights=data["weights_stored"],
            source=source,
            input_file=input_file,
            stream=StreamSpec.from_json(data["stream"], lambda name: _resolve(source, name))
            if data.get("stream")
            else None,
            deploy=tuple(ModelFile.from_json(f) for f in data.get("deploy", [])),
        )

    @property
    def user_files(self) -> list[Path]:
        """The files this case reads besides the golden: its case file, and the checkpoint,
        input file and ONNX files to judge it names (commands refuse to write over any of them)."""
        files = [self.source]
        if self.spec.checkpoint is not None:
            files.append(self.spec.checkpoint.path)
        if self.input_file is not None:
            files.append(self.input_file.path)
        files += [f.path for f in self.deploy]
        return files

    def to_json(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "description": self.description,
            "config": self.config.to_dict(),
            "layers": self.spec.layers,
            "weight_seed": self.spec.seed,
            "duplicate_subkeys": self.spec.duplicate_subkeys,
            "input": {"shape": list(self.input_shape), "seed": self.input_seed},
            "weights_stored": self.store_weights,
        }
        if self.input_file is not None:
            out["input"] = {
                "shape": list(self.input_shape),
                "file": _shown(self.source, self.input_file.path),
                **({"key": self.input_file.key} if self.input_file.key else {}),
                "sha256": self.input_file.sha256,
                "size": self.input_file.size,
            }
        if self.spec.checkpoint is not None:
            out["checkpoint"] = self.spec.checkpoint.to_json(self.source.parent)
        if self.spec.weights_file is not None:  # a layer judged alone (see layer())
            out["weights_file"] = str(self.spec.weights_file)
            out["model"] = self.spec.name
        if self.stream is not None:
            out["stream"] = self.stream.to_json(lambda path: _shown(self.source, path))
        if self.deploy:  # not part of the golden: the files are judged against it
            out["deploy"] = [f.to_json() for f in self.deploy]
        return out

    def layer(self, i: int, weights_file: Path, input_file: Path) -> Case:
        """Layer ``i`` of this case's network alone, with the weights in ``weights_file``
        (that layer's, torch-named) and the input in ``input_file`` (the golden input of
        that layer: the golden output of layer ``i - 1``). Keeps the case's name, so its
        tolerances apply; the model is named ``<case>#layer<i>``."""
        spec = dataclasses.replace(
            self.spec, name=f"{self.name}#layer{i}", layers=1, weights_file=weights_file, checkpoint=None
        )
        x = np.load(input_file, allow_pickle=False)
        return dataclasses.replace(
            self,
            spec=spec,
            input_shape=tuple(x.shape),
            store_weights=False,
            input_file=InputFile(input_file, None, *_file_digest(input_file)),
            stream=None,
            deploy=(),
        )


def _resolve(source: Path, name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() else source.parent / path


def _shown(source: Path, path: Path) -> str:
    return str(path.relative_to(source.parent)) if path.is_relative_to(source.parent) else str(path)


def _file_digest(path: Path) -> tuple[str, int]:
    """(sha256, size in bytes) of a file; for an ONNX ``.pb`` whose tensor keeps its data in
    other files, of the ``.pb`` and those files (each named and hashed in turn: a changed
    data file is a changed input)."""
    import hashlib

    from pkm_models.checkpoint import file_digest

    digest, size = file_digest(path)
    external = _pb_external_files(path) if path.suffix.lower() == ".pb" else []
    if not external:
        return digest, size
    combined = hashlib.sha256(digest.encode())
    for file in external:
        part, part_size = file_digest(file)
        combined.update(b"\0" + file.name.encode() + b"\0" + part.encode())
        size += part_size
    return combined.hexdigest(), size


def _pb_external_files(path: Path) -> list[Path]:
    """The data files an ONNX TensorProto ``.pb`` names (``external_data`` ``location``),
    resolved next to the ``.pb`` and confined to its folder; [] for a tensor that holds its data."""
    import onnx

    tensor = onnx.TensorProto()
    try:
        tensor.ParseFromString(read_small(path, 1 << 30))
    except Exception:  # not a tensor: read_input_file says why
        return []
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return []
    locations = [e.value for e in tensor.external_data if e.key == "location"]
    try:
        return [confined(path.parent, name, f"{path}: external data") for name in locations]
    except FileProblem as exc:
        raise CaseError(str(exc)) from None


def _digest(path: Path) -> str:
    return _file_digest(path)[0]


def read_input_file(path: Path, key: str | None = None, mapped: bool = False) -> np.ndarray:
    """Activations from ``.npy``, ``.npz`` (``key`` names the array; optional when there is
    one) or an ONNX TensorProto ``.pb``: float32, finite, at least 2-D, never unpickled.
    ``mapped``: a ``.npy`` is memory-mapped, not read into memory (loading a case only
    checks it: a 2 GiB input cost 2.6 GB to list the cases), and checked in blocks."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            x = np.load(path, allow_pickle=False, mmap_mode="r" if mapped else None)
        elif suffix == ".npz":
            from pkm_models.checkpoint import check_npz_members

            check_npz_members(path, available_memory())  # before any member is read
            with np.load(path, allow_pickle=False) as data:
                if key is None and len(data.files) != 1:
                    raise CaseError(f'{path}: holds {sorted(data.files)}; say which with [input] key = "..."')
                name = key if key is not None else data.files[0]
                if name not in data.files:
                    raise CaseError(f"{path}: no array {name!r}; it holds {sorted(data.files)}")
                x = data[name]
                if not isinstance(x, np.ndarray):  # a member that is not a .npy file reads as bytes
                    raise CaseError(f"{path}: {name!r} is not an array (.npy) member of the .npz")
        elif suffix == ".pb":
            import onnx
            from onnx import numpy_helper

            tensor = onnx.TensorProto()
            tensor.ParseFromString(path.read_bytes())
            _pb_external_files(path)  # its data files confined to the .pb's folder, and there
            x = numpy_helper.to_array(tensor, base_dir=str(path.parent))  # not the current folder
        else:
            raise CaseError(f"{path}: an input file is .npy, .npz or .pb (ONNX TensorProto), got {suffix!r}")
    except CaseError:
        raise
    except ConversionError as exc:  # an archive refused before it is read
        raise CaseError(str(exc)) from None
    except Exception as exc:
        raise CaseError(f"{path}: cannot read the input ({type(exc).__name__}: {exc})") from exc
    if key is not None and suffix != ".npz":
        raise CaseError(f"{path}: [input] key is only for .npz files")
    if x.dtype != np.float32:
        raise CaseError(f"{path}: the input must be float32, got {x.dtype} (convert it with .astype('float32'))")
    if x.ndim < 2 or x.size == 0:
        raise CaseError(f"{path}: the input must be (..., input_dim) with at least one token, got shape {x.shape}")
    nan, inf = _npy_non_finite(path, x) if isinstance(x, np.memmap) else _non_finite(x)
    if nan or inf:
        raise CaseError(f"{path}: the input holds {nan} NaN and {inf} Inf values")
    return x


def _npy_non_finite(path: Path, x: np.memmap, block: int = 1 << 22) -> tuple[int, int]:
    """:func:`_non_finite` of a mapped ``.npy``, read from the file block by block into one
    buffer (touching the mapping would make the whole file resident in this process)."""
    nan = inf = 0
    buffer = np.empty(min(block, x.size), x.dtype)
    with open(path, "rb") as f:
        f.seek(x.offset)
        left = x.size
        while left:
            part = buffer[: min(block, left)]
            if f.readinto(memoryview(part).cast("B")) != part.nbytes:
                raise CaseError(f"{path}: shorter than its header says (truncated?)")
            if not np.isfinite(part).all():
                nan += int(np.isnan(part).sum())
                inf += int(np.isinf(part).sum())
            left -= part.size
    return nan, inf


def _non_finite(x: np.ndarray, block: int = 1 << 22) -> tuple[int, int]:
    """(NaN count, Inf count) of ``x``, read in blocks of elements (a mapped file is never
    held whole, nor a mask of its size)."""
    flat = x.reshape(-1)
    nan = inf = 0
    for first in range(0, flat.size, block):
        part = np.asarray(flat[first : first + block])
        if not np.isfinite(part).all():
            nan += int(np.isnan(part).sum())
            inf += int(np.isinf(part).sum())
    return nan, inf


def _checkpoint(path: Path, weights: dict, config_table: dict, layers_given) -> tuple[PKMConfig, CheckpointRef]:
    """The config and checkpoint reference of a case that names a checkpoint."""
    from pkm_models.checkpoint import read_checkpoint
    from pkm_models.convert import ConversionError

    try:
        file = user_file(path.parent, weights["checkpoint"], f"{path}: [weights] checkpoint")
    except FileProblem as exc:
        raise CaseError(str(exc)) from None
    memories = weights.get("memories")
    if memories is not None and (
        not isinstance(memories, list) or not memories or not all(isinstance(m, str) for m in memories)
    ):
        raise CaseError(f"{path}: [weights] memories must be a non-empty list of names, got {memories!r}")
    knn = config_table.get("knn")
    try:
        read = read_checkpoint(file, knn=knn, memories=memories)
    except ConversionError as exc:
        raise CaseError(f"{path}: [weights] checkpoint: {exc}") from None
    for field in _FROM_WEIGHTS:
        if field in config_table and config_table[field] != getattr(read.config, field):
            raise CaseError(
                f"{path}: [config] {field} = {config_table[field]!r} contradicts the checkpoint's "
                f"{field} = {getattr(read.config, field)!r} ({file})"
            )
    unknown = sorted(
        set(config_table) - set(_FROM_WEIGHTS) - {"knn", "input_dropout", "query_dropout", "value_dropout"}
    )
    if unknown:
        raise CaseError(f"{path}: unknown [config] field(s) {unknown}")
    if layers_given is not None and layers_given != read.layers:
        raise CaseError(
            f"{path}: layers = {layers_given} but the checkpoint's selected memories are {list(read.memories)}"
        )
    try:
        config = read.config.replace(**{k: v for k, v in config_table.items() if k.endswith("_dropout")})
    except ConfigError as exc:
        raise CaseError(f"{path}: {exc}") from None
    return config, CheckpointRef(file, read.memories, read.sha256, read.size, knn)


def default_cases_dir() -> Path:
    return Path.cwd() / "conformance" / "cases"


def _int(value: Any, where: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CaseError(f"{where}: expected an integer >= {minimum}, got {value!r}")
    return value


def check_case_name(name: object, where: str) -> None:
    """Case names are plain: letters, digits, '-', '_' and '.', not starting with '.'. They
    become file and folder names (golden/<case>/) and lines of reports, so anything else (a
    newline, a slash, a space) is refused wherever a name enters, before anything is written."""
    if not (isinstance(name, str) and NAME.fullmatch(name)):
        raise CaseError(
            f"{where}: case names are letters, digits, '-', '_' and '.' (not starting with '.'); got {name!r}"
        )


def load_case(path: Path) -> Case:
    path = Path(path)
    name = path.stem
    check_case_name(name, f"case file {str(path)!r}")  # repr: the name may hold a newline
    try:
        data = tomllib.loads(read_small_text(path))
    except SmallFileError as exc:  # a FIFO, a device, a huge file or not UTF-8
        raise CaseError(str(exc)) from None
    except OSError as exc:
        raise CaseError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise CaseError(f"{path}: not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - set(_SCHEMA))
    if unknown:
        raise CaseError(f"{path}: unknown key(s) {unknown}; known: {sorted(_SCHEMA)}")
    for table, keys in _SCHEMA.items():
        if keys is not None and table in data:
            if not isinstance(data[table], dict):
                raise CaseError(f"{path}: [{table}] must be a table")
            extra = sorted(set(data[table]) - keys)
            if extra:
                raise CaseError(f"{path}: unknown key(s) {extra} in [{table}]; known: {sorted(keys)}")
    weights = data.get("weights", {})
    config_table = data.get("config", {})
    if not isinstance(config_table, dict):
        raise CaseError(f"{path}: [config] must be a table")
    checkpoint = None
    layers = _int(data.get("layers", 1), f"{path}: layers", minimum=1)
    if "checkpoint" in weights:
        for clash in ("preset", "seed"):
            if clash in data:
                raise CaseError(f"{path}: {clash} does not apply to a case with [weights] checkpoint")
        if "duplicate_subkeys" in weights:
            raise CaseError(f"{path}: [weights] duplicate_subkeys does not apply to a checkpoint")
        config, checkpoint = _checkpoint(path, weights, config_table, data.get("layers"))
        layers = len(checkpoint.memories)
    else:
        if "memories" in weights:
            raise CaseError(f"{path}: [weights] memories needs [weights] checkpoint")
        try:
            preset = get_preset(data.get("preset", ""))
            if preset.layers != 1:
                raise CaseError(
                    f"{path}: cases use single-layer presets and say `layers = N`; {preset.name!r} has {preset.layers}"
                )
            config = preset.config
            if config_table:
                config = PKMConfig.from_dict({**config.to_dict(), **config_table})
        except ConfigError as exc:
            raise CaseError(f"{path}: {exc}") from exc
    given = data.get("input", {})
    input_file = None
    if "file" in given:
        if "shape" in given or "seed" in given:
            raise CaseError(f"{path}: [input] takes a file or a shape and seed, not both")
        try:
            file = user_file(path.parent, given["file"], f"{path}: [input] file")
        except FileProblem as exc:
            raise CaseError(str(exc)) from None
        key = given.get("key")
        if key is not None and not isinstance(key, str):
            raise CaseError(f"{path}: [input] key must be a string, got {key!r}")
        x = read_input_file(file, key, mapped=True)
        if x.shape[-1] != config.input_dim:
            raise CaseError(
                f"{file}: the input's last dimension is {x.shape[-1]}, the model's input_dim is {config.input_dim}"
            )
        shape = list(x.shape)
        input_file = InputFile(file, key, *_file_digest(file))
    else:
        if "key" in given:
            raise CaseError(f"{path}: [input] key needs [input] file")
        if "shape" not in given:
            raise CaseError(
                f"{path}: [input] shape is required (or [input] file), e.g. shape = [2, 7, {config.input_dim}]"
            )
        shape = given["shape"]
        if (
            not isinstance(shape, list)
            or len(shape) != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        ):
            raise CaseError(
                f"{path}: [input] shape must be 3 positive integers (batch, sequence, input_dim), got {shape!r}"
            )
        if shape[-1] != config.input_dim:
            raise CaseError(
                f"{path}: [input] shape {shape} ends in {shape[-1]}, but the model's input_dim is {config.input_dim}"
            )
    try:
        spec = ModelSpec(
            name=name,
            config=config,
            layers=layers,
            seed=_int(data.get("seed", 0), f"{path}: seed"),
            duplicate_subkeys=_int(weights.get("duplicate_subkeys", 0), f"{path}: [weights] duplicate_subkeys"),
            checkpoint=checkpoint,
        )
    except ConfigError as exc:
        raise CaseError(f"{path}: {exc}") from exc
    store = weights.get("store", spec.weight_bytes <= STORE_LIMIT_BYTES)
    if not isinstance(store, bool):
        raise CaseError(f"{path}: [weights] store must be true or false, got {store!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise CaseError(f"{path}: description must be a string")
    group = data.get("group", "")
    if not isinstance(group, str) or (group and not NAME.fullmatch(group)):
        raise CaseError(f"{path}: group must be a name of letters, digits, '-', '_' and '.', got {group!r}")
    return Case(
        name=name,
        description=description,
        spec=spec,
        input_shape=tuple(shape),
        input_seed=_int(given.get("seed", 0), f"{path}: [input] seed"),
        store_weights=store,
        source=path,
        input_file=input_file,
        group=group,
        stream=_stream(path, data.get("stream"), config.input_dim),
        deploy=_deploy(path, data.get("deploy")),
    )


def _deploy(path: Path, table: dict | None) -> tuple[ModelFile, ...]:
    """The ``[deploy]`` table: the user's ONNX files, judged as paths (conformance.deploy)."""
    if table is None:
        return ()
    try:
        return deploy_table(table, path, lambda name: _resolve(path, name))
    except DeployError as exc:
        raise CaseError(str(exc)) from None


def _stream(path: Path, table: dict | None, input_dim: int) -> StreamSpec | None:
    """The ``[stream]`` table: a file, an embedding table with noise, or generated tokens."""
    if table is None:
        return None
    where = f"{path}: [stream]"
    batch = _int(table.get("batch", 4096), f"{where} batch", minimum=1)
    seed = _int(table.get("seed", 0), f"{where} seed")
    sample = _int(table["sample"], f"{where} sample", minimum=1) if "sample" in table else None
    sources = [k for k in ("file", "embeddings") if k in table]
    if len(sources) > 1:
        raise CaseError(f"{where} takes a file or embeddings, not both")
    if "noise" in table and "embeddings" not in table:
        raise CaseError(f"{where} noise needs embeddings")
    if not sources:
        if "tokens" not in table:
            raise CaseError(f"{where} needs tokens (a generated stream), a file or embeddings")
        return StreamSpec(_int(table["tokens"], f"{where} tokens", minimum=1), batch, seed, sample=sample)
    try:
        file = user_file(path.parent, table[sources[0]], f"{where} {sources[0]}")
    except FileProblem as exc:
        raise CaseError(str(exc)) from None
    try:
        if sources[0] == "file":
            if "tokens" in table or "seed" in table:
                raise CaseError(f"{where}: a file's tokens are its rows: tokens and seed do not apply")
            tokens = len(open_stream_file(file, input_dim))
            return StreamSpec(tokens, batch, 0, file=file, sha256=_file_digest(file)[0], sample=sample)
        table_rows = open_stream_file(file, input_dim)  # (V, input_dim) float32
        del table_rows
        noise = table.get("noise", 0.0)
        if isinstance(noise, bool) or not isinstance(noise, int | float) or not math.isfinite(noise) or noise < 0:
            raise CaseError(f"{where} noise must be a non-negative number, got {noise!r}")
        if "tokens" not in table:
            raise CaseError(f"{where}: tokens drawn from embeddings need a count (tokens = N)")
        tokens = _int(table["tokens"], f"{where} tokens", minimum=1)
        return StreamSpec(
            tokens, batch, seed, embeddings=file, sha256=_file_digest(file)[0], noise=float(noise), sample=sample
        )
    except StreamError as exc:
        raise CaseError(str(exc)) from None


def case_names(cases_dir: Path) -> list[str]:
    """The names of the case files in ``cases_dir`` (every group), sorted."""
    return sorted(p.stem for p in Path(cases_dir).glob("*.toml"))


def load_cases(
    cases_dir: Path | None = None, names: list[str] | None = None, groups: list[str] | None = None
) -> list[Case]:
    """The named cases, or when ``names`` is empty every case outside a group plus those of
    ``groups``, sorted by name (cases in a group, such as ``large``, are left out unless
    asked for by name or group)."""
    cases_dir = Path(cases_dir or default_cases_dir())
    if not cases_dir.is_dir():
        raise CaseError(
            f"no cases folder at {cases_dir}: run from the project's folder (the default is "
            "./conformance/cases) or pass --cases-dir"
        )
    for name in names or ():
        check_case_name(name, "--case")
    available = case_names(cases_dir)
    wanted = list(dict.fromkeys(names)) if names else available
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise CaseError(f"unknown case(s) {unknown}; available: {available}")
    cases = [load_case(cases_dir / f"{n}.toml") for n in wanted]
    if names:
        return cases
    groups = groups or []
    known = sorted({c.group for c in cases if c.group})
    unknown = [g for g in groups if g not in known]
    if unknown:
        raise CaseError(f"unknown case group(s) {unknown}; available: {known}")
    return [c for c in cases if not c.group or c.group in groups]
