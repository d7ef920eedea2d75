"""Reading a user's model file: the one place that turns a checkpoint into PKM weights.

Formats, recognised from the content and checked against the suffix:

=====================  ==============  ===================================================
content                suffix          holds
=====================  ==============  ===================================================
``torch.save`` archive ``.pt``/``.pth`` a ``state_dict`` of one ``HashingMemory`` or of a
(zip with data.pkl)                    stack (``layers.<i>.``), or an XLM training
                                       checkpoint (``model`` / ``encoder`` / ``decoder``
                                       state_dicts, ``params``)
zip of ``.npy`` files  ``.npz``        arrays under the reference's ``state_dict`` names
Keras archive (zip     ``.keras``      a Keras model of ``ProductKeyMemory`` layers
with config.json)
=====================  ==============  ===================================================

Nothing in a file is executed: PyTorch files are read with the weights-only unpickler,
``.npz`` without pickle, ``.keras`` in Keras' safe mode. A file that cannot be read that way
is refused with the reason. Nothing is guessed either: ``knn`` (which no ``state_dict``
holds) comes from the file where it is recorded (XLM's ``params["mem_knn"]``, a ``.keras``
layer config), else from the caller, else it is an error naming the missing setting.
See docs/checkpoints.md for XLM's options and how memories are picked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pkm_models.config import ConfigError, PKMConfig
from pkm_models.convert import (
    IGNORED_TORCH_NAMES,
    ConversionError,
    check_weights,
    join_layers,
    shape_config,
    split_layers,
)
from pkm_models.weights import Weights, weight_shapes

SUFFIX_FORMATS = {".pt": "torch", ".pth": "torch", ".npz": "npz", ".keras": "keras"}
FORMAT_WORDS = {
    "torch": "a PyTorch torch.save archive",
    "npz": "a numpy .npz archive",
    "keras": "a Keras .keras archive",
}
XLM_MODULES = ("model", "encoder", "decoder")

# XLM options the reference implements only at one value (or a few): option -> allowed values.
XLM_FIXED: dict[str, tuple[Any, ...]] = {
    "mem_implementation": ("pq_fast", "pq_default"),  # "flat" has no product keys
    "mem_query_layer_sizes": ("0,0", [0, 0], (0, 0)),  # one Linear; "" (identity) or hidden layers: no
    "mem_query_kernel_sizes": ("", []),
    "mem_query_residual": (False,),
    "mem_multi_query_net": (False,),
    "mem_grouped_conv": (False,),
    "mem_input2d": (False,),
    "mem_shuffle_indices": (False,),
    "mem_shuffle_query": (False,),
    "mem_modulo_size": (-1,),
    "mem_normalize_query": (False,),
    "mem_temperature": (1,),
    "mem_score_softmax": (True,),
    "mem_score_subtract": ("",),
    "mem_score_normalize": (False,),
}
# XLM options read into the config or checked against the tensors.
XLM_MAPPED = (
    "mem_k_dim",
    "mem_heads",
    "mem_knn",
    "mem_n_keys",
    "mem_v_dim",
    "mem_query_batchnorm",
    "mem_query_bias",
    "mem_use_different_keys",
    "mem_share_values",
    "mem_input_dropout",
    "mem_query_dropout",
    "mem_value_dropout",
    "mem_size",
    "mem_product_quantization",
    "mem_enc_positions",
    "mem_dec_positions",
)
# XLM options that only change initialisation or training, never what a trained memory computes.
XLM_TRAINING_ONLY = (
    "mem_sparse",
    "mem_values_optimizer",
    "mem_keys_type",
    "mem_keys_normalized_init",
    "mem_keys_learn",
    "mem_value_zero_init",
    "mem_query_net_learn",
    "mem_query_detach_input",
)
_XLM_NAME = re.compile(r"^memories\.(\d+)_(in|after)\.(.+)$")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """PKM memories read from a file, in the order they are applied as a network.

    ``weights[i]`` holds memory ``memories[i]``'s float32 tensors under the reference's
    ``HashingMemory`` names; ``config`` fits every one of them; ``notes`` says what was
    changed on the way (dtype conversions, filled-in biases, tiled keys).
    """

    path: Path
    format: str  # "torch", "xlm", "meta" (pkm_models.checkpoint_meta), "npz" or "keras"
    memories: tuple[str, ...]
    weights: tuple[Weights, ...]
    config: PKMConfig
    sha256: str
    size: int
    notes: tuple[str, ...] = ()

    @property
    def layers(self) -> int:
        return len(self.memories)

    def stacked_weights(self) -> Weights:
        """The weights under one ``HashingMemory``'s names (one memory) or a ``PKMStack``'s."""
        return join_layers(list(self.weights))


@dataclasses.dataclass
class _Found:
    """What a file holds before selection and conversion: source-named tensors per memory."""

    kind: str
    memories: dict[str, dict[str, Any]]  # memory name -> torch name -> tensor (numpy or torch)
    source_names: dict[str, dict[str, str]]  # memory name -> torch name -> name in the file
    recorded: dict[str, Any]  # PKMConfig fields the file records
    recorded_where: str = ""
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # XLM's, when there are any
    notes: list[str] = dataclasses.field(default_factory=list)


# --- the entry point ---------------------------------------------------------------------
def read_checkpoint(
    path: str | Path,
    *,
    knn: int | None = None,
    memories: Sequence[str] | None = None,
) -> Checkpoint:
    """Read a checkpoint file into per-memory weights and one config.

    Args:
        path: a ``.pt``/``.pth``, ``.npz`` or ``.keras`` file (see the module docstring).
        knn: value rows per head, for files that do not record it; a value that contradicts
            a recorded one is an error naming both.
        memories: names of the memories to use, in the order they are applied (XLM names like
            ``"4_in"``; ``"0"``, ``"1"``, ... for a plain stack). Default: all, in layer order.

    Raises:
        ConversionError: any problem with the file, named with the file and what was found.
    """
    path = Path(path)
    fmt = detect_format(path)
    sha256, size = file_digest(path)
    if fmt == "torch":
        found = _found_in_torch_object(_torch_load(path), path)
    elif fmt == "npz":
        found = _found_in_npz(path)
    else:
        found = _found_in_keras(path)
    names = _select(found, memories, path)
    notes = list(found.notes)
    weights = tuple(_as_float32(found.memories[n], found.source_names[n], path, notes) for n in names)
    config = _config(weights, names, found, knn, path)
    for name, layer in zip(names, weights, strict=True):
        check_weights(layer, weight_shapes(config), f"{path}: memory {name!r}")
        _check_computable(layer, found.source_names[name], path)
    return Checkpoint(
        path=path,
        format=found.kind,
        memories=tuple(names),
        weights=weights,
        config=config,
        sha256=sha256,
        size=size,
        notes=tuple(dict.fromkeys(notes)),
    )


# --- formats -----------------------------------------------------------------------------
def suffix_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIX_FORMATS:
        raise ConversionError(f"{path}: unknown checkpoint format {suffix!r}; known: {list(SUFFIX_FORMATS)}")
    return SUFFIX_FORMATS[suffix]


def content_format(path: Path) -> str:
    """What the bytes of ``path`` are: "torch", "npz" or "keras"; an error for anything else."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80":
        return "torch"  # PyTorch's legacy (pre-zip) format: a pickle stream
    if head != b"PK\x03\x04":
        if not head:
            raise ConversionError(f"{path}: the file is empty")
        raise ConversionError(f"{path}: not a checkpoint: neither a zip archive nor a PyTorch file (starts {head!r})")
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except zipfile.BadZipFile as exc:
        raise ConversionError(f"{path}: truncated or corrupt zip archive ({exc})") from exc
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "torch"
    if "config.json" in names:
        return "keras"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    raise ConversionError(f"{path}: a zip archive, but not a checkpoint this project reads (members {names[:5]})")


def detect_format(path: Path) -> str:
    """The format of ``path`` from its suffix, checked against its content."""
    by_suffix = suffix_format(path)
    if path.is_dir():
        raise ConversionError(f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    by_content = content_format(path)
    if by_content != by_suffix:
        right = [s for s, f in SUFFIX_FORMATS.items() if f == by_content]
        raise ConversionError(
            f"{path}: the suffix {path.suffix!r} says {FORMAT_WORDS[by_suffix]}, but the file is "
            f"{FORMAT_WORDS[by_content]}; rename it to {' or '.join(right)}"
        )
    return by_suffix


def file_digest(path: Path) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _torch_load(path: Path) -> Any:
    import pickle

    import torch

    try:
        # zip archives are memory-mapped: only the memories' tensors are ever read into memory
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        what = _refused_globals(str(exc), path)
        hint = ""
        if what == "argparse.Namespace":
            hint = (
                " (an old XLM checkpoint keeps its params as an argparse.Namespace: in a trusted "
                "environment, re-save it with data['params'] = vars(data['params']))"
            )
        raise ConversionError(
            f"{path}: refused: it holds {what}, which PyTorch's weights-only loader does not accept; "
            f"loading it otherwise could run code from the file{hint}"
        ) from exc
    except Exception as exc:  # truncated archive, wrong magic, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"{path}: cannot read as a PyTorch file (truncated or corrupt?): {reason}") from exc


def _refused_globals(message: str, path: Path) -> str:
    """What PyTorch's weights-only loader refused, by name (``posix.system``): from its
    message (worded differently across versions), else from the pickle's own GLOBAL opcodes
    (read, never run), else a plain description."""
    # the opcode's name, in capitals: "an allowed global by default", "this global if you trust" are not names
    named = re.findall(r"GLOBAL ([\w.]+)", message)
    if not named:
        named = [g for g in _pickle_globals(path) if not g.startswith(("torch.", "collections.OrderedDict"))]
    if named:
        return ", ".join(dict.fromkeys(named))
    return "non-tensor Python objects"


def _pickle_globals(path: Path) -> list[str]:
    """``module.name`` of every global a PyTorch file's pickle refers to (``[]`` if unreadable)."""
    import pickletools

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                member = next(n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl"))
                data = z.read(member)
        else:
            data = path.read_bytes()
        out, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                out.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                out.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
        return out
    except Exception:  # the loader's own message stands
        return []


def _strip_module(key: str) -> str:
    # DistributedDataParallel's prefix, possibly nested
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def _is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")  # no torch imported: no torch tensor (and no import for .npz/.keras)
    return torch is not None and isinstance(x, torch.Tensor)


def _found_in_torch_object(obj: Any, path: Path) -> _Found:
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: expected a state_dict or an XLM checkpoint (a dict), got {type(obj).__name__}")
    from pkm_models import checkpoint_meta

    meta_state = checkpoint_meta.state_dict_of(obj)  # facebookresearch/memory: layers.<i>.feed_forward.keys
    if meta_state is not None:
        params = checkpoint_meta.read_params(path)
        memories, sources, recorded, notes = checkpoint_meta.memories_in(meta_state, params, path)
        where = str(path.parent / "params.json") if params else ""
        return _Found("meta", memories, sources, recorded, where, params, notes)
    modules = [m for m in XLM_MODULES if isinstance(obj.get(m), Mapping)]
    if modules:
        return _found_in_xlm(obj, modules, path)
    if not obj or not all(_is_tensor(v) for v in obj.values()):
        keys = sorted(map(str, obj))[:10]
        raise ConversionError(
            f"{path}: expected a state_dict (names -> tensors) or an XLM checkpoint with one of "
            f"{list(XLM_MODULES)}; found keys {keys}"
        )
    state = {_strip_module(str(k)): v for k, v in obj.items()}
    if any(_XLM_NAME.match(k) for k in state):  # an XLM model's state_dict alone, without params
        return _xlm_memories({"model": state}, ["model"], {}, path)
    return _found_in_flat(state, "torch")


def _found_in_flat(state: Mapping[str, Any], kind: str) -> _Found:
    """One HashingMemory's names, or a stack's ``layers.<i>.<name>``."""
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED_TORCH_NAMES)}
    layers = split_layers(state)
    memories = {str(i): layer for i, layer in enumerate(layers)}
    prefix = len(layers) > 1
    sources = {str(i): {k: (f"layers.{i}.{k}" if prefix else k) for k in layer} for i, layer in enumerate(layers)}
    return _Found(kind=kind, memories=memories, source_names=sources, recorded={})


# a member of an .npz that inflates more than this many times, and is this large, is refused
# before it is read: float weights compress little; a zip bomb (9 MB to 2.7 GB) a lot
NPZ_MAX_RATIO, NPZ_RATIO_FROM_BYTES = 100, 64 << 20


def check_npz_members(path: Path, available: int | None = None) -> None:
    """Refuse (ConversionError) an ``.npz`` whose members would inflate far past the file
    before any is read: from the archive's declared sizes, each member against
    :data:`NPZ_MAX_RATIO`, and all of them against ``available`` bytes of memory."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise ConversionError(f"{path}: cannot read as .npz (truncated or corrupt?): {exc}") from None
    total = 0
    for m in members:
        total += m.file_size
        ratio = m.file_size / max(m.compress_size, 1)
        if m.file_size > NPZ_RATIO_FROM_BYTES and ratio > NPZ_MAX_RATIO:
            raise ConversionError(
                f"{path}: member {m.filename!r} declares {m.file_size:,} bytes from {m.compress_size:,} "
                f"({ratio:,.0f}x): not a tensor's data; refused before reading it (save with np.savez)"
            )
    if available is not None and total > available:
        raise ConversionError(
            f"{path}: its members declare {total / 2**30:,.1f} GiB once read, more than the "
            f"{available / 2**30:,.1f} GiB of memory available; refused before reading them"
        )


def _found_in_npz(path: Path) -> _Found:
    check_npz_members(path, available_memory())
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except ValueError as exc:  # object arrays need pickle: refused
        raise ConversionError(f"{path}: refused: {exc}") from exc
    except Exception as exc:
        raise ConversionError(f"{path}: cannot read as .npz (truncated or corrupt?): {exc}") from exc
    if not arrays:
        raise ConversionError(f"{path}: the .npz holds no arrays")
    return _found_in_flat(arrays, "npz")


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is none): the one reader
    of it (``conformance.cases`` and ``conformance.memory`` ask here)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _found_in_keras(path: Path) -> _Found:
    import keras

    from pkm_models import keras_pkm  # noqa: F401  (registers ProductKeyMemory)
    from pkm_models.convert import keras_to_torch, pkm_layers

    try:
        model = keras.saving.load_model(path, safe_mode=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"{path}: cannot read as a .keras model (in safe mode): {reason}") from exc
    layers = pkm_layers(model)
    memories, sources = {}, {}
    for i, layer in enumerate(layers):
        memories[str(i)] = keras_to_torch({v.name: np.asarray(v.numpy()) for v in layer.weights})
        sources[str(i)] = {k: f"{layer.name}/{k}" for k in memories[str(i)]}
    cfg = layers[0].get_config()
    recorded = {k: cfg[k] for k in ("knn", "input_dropout", "query_dropout", "value_dropout") if k in cfg}
    # Meta's options, where the layer sets them (an own value dim: the output dim is value_proj's)
    meta = ("value_dim", "swilu_projection", "gated", "value_dtype", "share_values")
    recorded.update({k: cfg[k] for k in (*meta, "output_dim") if k in cfg and any(m in cfg for m in meta)})
    return _Found(
        kind="keras", memories=memories, source_names=sources, recorded=recorded, recorded_where="the layer config"
    )


# --- XLM ---------------------------------------------------------------------------------
def _found_in_xlm(obj: Mapping, modules: list[str], path: Path) -> _Found:
    params = obj.get("params", {})
    if not isinstance(params, Mapping):
        raise ConversionError(f"{path}: XLM checkpoint: 'params' must be a dict, got {type(params).__name__}")
    return _xlm_memories(obj, modules, params, path)


def xlm_options(params: Mapping[str, Any]) -> dict[str, Any]:
    """The PKMConfig fields XLM's ``params`` record; refuses options the reference lacks."""
    problems = []
    for option, allowed in XLM_FIXED.items():
        if option in params and params[option] not in allowed:
            problems.append(f"{option}={params[option]!r} (supported: {allowed[0]!r})")
    known = set(XLM_FIXED) | set(XLM_MAPPED) | set(XLM_TRAINING_ONLY)
    unknown = sorted(k for k in params if str(k).startswith("mem_") and k not in known)
    if unknown:
        problems.append("option(s) this project does not know: " + ", ".join(f"{k}={params[k]!r}" for k in unknown))
    if problems:
        raise ConversionError("XLM options the reference does not implement: " + "; ".join(problems))
    recorded = {}
    for option, field in (
        ("mem_knn", "knn"),
        ("mem_input_dropout", "input_dropout"),
        ("mem_query_dropout", "query_dropout"),
        ("mem_value_dropout", "value_dropout"),
    ):
        if option in params:
            recorded[field] = params[option]
    return recorded


def _xlm_positions(value: Any) -> list[str] | None:
    """XLM memory positions -> names: [(4, "in"), (7, "after")] or the command line's "4,7+"."""
    if value is None:
        return None
    if isinstance(value, str):
        items = [x for x in value.split(",") if x]
        return [f"{int(x[:-1])}_after" if x.endswith("+") else f"{int(x)}_in" for x in items]
    return [f"{int(layer)}_{pos}" for layer, pos in value]


def _xlm_memories(obj: Mapping, modules: list[str], params: Mapping, path: Path) -> _Found:
    try:
        recorded = xlm_options(params)
    except ConversionError as exc:
        raise ConversionError(f"{path}: {exc}") from None
    per_module: dict[str, dict[str, dict[str, Any]]] = {}
    for module in modules:
        memories: dict[str, dict[str, Any]] = {}
        for key, value in obj[module].items():
            m = _XLM_NAME.match(_strip_module(str(key)))
            if m is None or not _is_tensor(value):
                continue
            name = f"{int(m.group(1))}_{m.group(2)}"
            memories.setdefault(name, {})[m.group(3)] = (str(key), value)
        if memories:
            positions = _xlm_positions(params.get("mem_dec_positions" if module == "decoder" else "mem_enc_positions"))
            if positions is not None and sorted(positions) != sorted(memories):
                option = "mem_dec_positions" if module == "decoder" else "mem_enc_positions"
                raise ConversionError(
                    f"{path}: XLM {module!r} holds memories {sorted(memories)} but params {option} "
                    f"says {sorted(positions)}"
                )
            per_module[module] = memories
    if not per_module:
        raise ConversionError(
            f"{path}: an XLM checkpoint without memories: no 'memories.<layer>_in|after.*' tensors in {modules}"
        )
    qualify = len(per_module) > 1
    found = _Found(
        kind="xlm",
        memories={},
        source_names={},
        recorded=recorded,
        recorded_where="params['mem_knn']",
        params=params,
    )
    for module, memories in per_module.items():
        order = sorted(memories, key=lambda n: (int(n.split("_")[0]), n.endswith("_after")))
        for name in order:
            full = f"{module}:{name}" if qualify else name
            tensors, sources = _xlm_rename(memories[name], params, f"{path}: memory {full!r}", found.notes)
            found.memories[full] = tensors
            found.source_names[full] = sources
    return found


def _xlm_rename(
    tensors: Mapping[str, tuple[str, Any]], params: Mapping, where: str, notes: list[str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """XLM's names under one memory -> the reference's names (and the source name of each)."""
    import torch

    out: dict[str, Any] = {}
    sources: dict[str, str] = {}
    extra = []
    for sub, (source, value) in tensors.items():
        m = re.match(r"^query_proj\.query_mlps\.(\d+)\.(.+)$", sub)
        if m and m.group(1) in ("0", "1"):
            name = f"query_proj.{m.group(1)}.{m.group(2)}"
        elif m:
            layer_sizes = params.get("mem_query_layer_sizes", "?")
            raise ConversionError(
                f"{where}: {source}: a query network of more than one Linear (+ BatchNorm1d) is not "
                f"implemented by the reference (mem_query_layer_sizes={layer_sizes!r})"
            )
        elif sub in ("keys", "values.weight"):
            name = sub
        else:
            extra.append(source)
            continue
        if name.endswith(IGNORED_TORCH_NAMES):
            continue
        out[name] = value
        sources[name] = source
    if extra:
        raise ConversionError(f"{where}: tensors the reference has no place for: {extra}")
    has_bias = "query_proj.0.bias" in out
    if "query_proj.0.weight" in out and has_bias != params.get("mem_query_bias", True):
        # XLM's default is a query bias: only params saying mem_query_bias=False allow none
        said = f"mem_query_bias={params['mem_query_bias']!r}" if "mem_query_bias" in params else "XLM's default"
        stem = sources["query_proj.0.weight"][: -len("weight")]
        found = "there is no" if not has_bias else "the file holds a"
        raise ConversionError(
            f"{where}: XLM params contradict the tensors: {said} says the query Linear "
            f"{'has a bias' if not has_bias else 'has no bias'}, but {found} {stem}bias tensor"
        )
    if "query_proj.0.weight" in out and not has_bias:
        # mem_query_bias=False: a Linear without bias is a Linear with a zero bias, exactly
        weight = out["query_proj.0.weight"]
        out["query_proj.0.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
        sources["query_proj.0.bias"] = f"{sources['query_proj.0.weight'][: -len('weight')]}bias (zeros)"
        notes.append("the query Linear has no bias (mem_query_bias=False): a zero bias is used, which is exact")
    keys = out.get("keys")
    if keys is not None and keys.dim() == 2 and "query_proj.0.weight" in out:
        # mem_use_different_keys=False: one (n_keys, half) table serves every head and both halves
        half = keys.shape[1]
        heads = out["query_proj.0.weight"].shape[0] // (2 * half)
        out["keys"] = keys.reshape(1, 1, *keys.shape).expand(heads, 2, *keys.shape).clone()
        notes.append("one sub-key table shared by every head and half (mem_use_different_keys=False) is repeated")
    return out, sources


# --- selection, dtypes, config -------------------------------------------------------------
def _select(found: _Found, wanted: Sequence[str] | None, path: Path) -> list[str]:
    available = list(found.memories)
    if wanted is None:
        return available
    if isinstance(wanted, str):
        wanted = [wanted]
    if not wanted:
        raise ConversionError(f"{path}: no memories selected; available: {available}")
    out = []
    for name in wanted:
        name = str(name)
        if name not in found.memories:
            matches = [a for a in available if a.split(":")[-1] == name]
            if len(matches) != 1:
                why = "ambiguous" if matches else "no memory"
                raise ConversionError(f"{path}: {why} {name!r}; available: {available}")
            name = matches[0]
        if name in out:
            raise ConversionError(f"{path}: memory {name!r} selected twice")
        out.append(name)
    return out


def _as_float32(tensors: Mapping[str, Any], sources: Mapping[str, str], path: Path, notes: list[str]) -> Weights:
    """float32 numpy arrays; refuses integer, complex and non-finite tensors by name."""
    out: Weights = {}
    for name, value in tensors.items():
        source = sources.get(name, name)
        if _is_tensor(value):
            import torch

            dtype = str(value.dtype).replace("torch.", "")
            if not value.dtype.is_floating_point:
                raise ConversionError(f"{path}: {source}: {dtype} tensor where floats are expected")
            array = value.detach().cpu().to(torch.float32).numpy()
        else:
            array = np.asarray(value)
            dtype = str(array.dtype)
            if not (np.issubdtype(array.dtype, np.floating) or dtype == "bfloat16"):  # a Keras bfloat16 table
                raise ConversionError(f"{path}: {source}: {dtype} array where floats are expected")
            array = array.astype(np.float32, copy=False)
        if dtype != "float32":
            notes.append(f"converted {dtype} weights to float32")
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise ConversionError(f"{path}: {source}: {bad} NaN or Inf value(s) in {np.size(array)}")
        out[name] = array
    return out


def _check_computable(layer: Weights, sources: Mapping[str, str], path: Path) -> None:
    """Weights that cannot compute are refused here, not found as NaN later: BatchNorm's
    running variance must be >= 0 (its square root is taken; finiteness is checked on read)."""
    var = layer.get("query_proj.1.running_var")
    if var is not None and np.any(var < 0):
        source = sources.get("query_proj.1.running_var", "query_proj.1.running_var")
        raise ConversionError(
            f"{path}: {source}: {int(np.count_nonzero(var < 0))} negative BatchNorm running variance(s) "
            f"(smallest {float(var.min()):.4g}); a variance is >= 0, and this one would compute NaN"
        )


def _config(weights: tuple[Weights, ...], names: list[str], found: _Found, knn: int | None, path: Path) -> PKMConfig:
    recorded = dict(found.recorded)
    if knn is not None and "knn" in recorded and knn != recorded["knn"]:
        raise ConversionError(
            f"{path}: knn={knn} contradicts the checkpoint, which records knn={recorded['knn']} "
            f"(in {found.recorded_where})"
        )
    if knn is None:
        knn = recorded.get("knn")
    if knn is None:
        raise ConversionError(
            f"{path}: knn (value rows read per head) is not recorded in this file and a state_dict cannot "
            "carry it: give it explicitly (convert --knn N, or knn in the case's [config])"
        )
    source = f" (knn={knn!r} from {found.recorded_where})" if "knn" in recorded and found.recorded_where else ""
    try:
        configs = [
            shape_config(layer, knn, f"{path}: memory {name!r}") for name, layer in zip(names, weights, strict=True)
        ]
    except ConfigError as exc:  # a knn the tensors cannot have, named with the file that gave it
        raise ConversionError(f"{path}: {exc}{source}") from None
    first = configs[0]
    for name, config in zip(names[1:], configs[1:], strict=True):
        if config != first:
            raise ConversionError(
                f"{path}: memories {names[0]!r} and {name!r} differ in shape ({first} vs {config}); "
                "select memories of one shape"
            )
    extra = {k: v for k, v in recorded.items() if k != "knn"}
    config = first.replace(**extra) if extra else first
    contradictions = xlm_shape_params(found.params, config) if found.kind == "xlm" else []
    if contradictions:
        raise ConversionError(f"{path}: XLM params contradict the tensors: " + "; ".join(contradictions))
    return config


def xlm_shape_params(params: Mapping[str, Any], config: PKMConfig) -> list[str]:
    """XLM options that contradict the tensor shapes, as ``option=value vs tensors: value``."""
    checks = [
        ("mem_k_dim", config.k_dim),
        ("mem_heads", config.heads),
        ("mem_n_keys", config.n_keys),
        ("mem_query_batchnorm", config.query_batchnorm),
    ]
    out = [f"{o}={params[o]!r} but the tensors have {v!r}" for o, v in checks if o in params and params[o] != v]
    v_dim = params.get("mem_v_dim", -1)
    if v_dim not in (-1, None) and v_dim != config.output_dim:
        out.append(f"mem_v_dim={v_dim!r} but the tensors have {config.output_dim}")
    return out
