"""Weights between the PyTorch reference and the Keras port, and checkpoint files.

Weights travel as numpy arrays keyed by the reference's ``state_dict`` names (the
"torch names"); a Keras layer's weights have their own names, related by
:data:`TORCH_TO_KERAS`. A stack of layers prefixes torch names with ``layers.<i>.``.

Checkpoints are written here, in the format of the destination's suffix:

``.pt`` / ``.pth``  a PyTorch ``state_dict`` saved with ``torch.save``
``.npz``            numpy arrays under torch names
``.keras``          a Keras model (a ``Sequential`` of ``ProductKeyMemory`` layers)

Reading a user's file (those formats and XLM training checkpoints) is
:mod:`pkm_models.checkpoint`'s.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pkm_models.config import PKMConfig
from pkm_models.errors import PKMError
from pkm_models.weights import Weights, weight_shapes

# torch name -> (keras weight name, transposed?)
TORCH_TO_KERAS: dict[str, tuple[str, bool]] = {
    "query_proj.0.weight": ("query_kernel", True),  # nn.Linear is (out, in); Keras is (in, out)
    "query_proj.0.bias": ("query_bias", False),
    "query_proj.1.weight": ("bn_gamma", False),
    "query_proj.1.bias": ("bn_beta", False),
    "query_proj.1.running_mean": ("bn_moving_mean", False),
    "query_proj.1.running_var": ("bn_moving_variance", False),
    "keys": ("keys", False),
    "values.weight": ("values", False),
    # Meta's memory layers (docs/memory-layers.md)
    "value_proj.weight": ("value_proj_kernel", True),
    "value_proj.bias": ("value_proj_bias", False),
    "swilu_projection.weight": ("swilu_projection_kernel", True),
    "swilu_projection.bias": ("swilu_projection_bias", False),
    "gating.weight": ("gating_kernel", True),
    "gating.bias": ("gating_bias", False),
}
# BatchNorm1d's step counter: only used when momentum=None, which the reference never sets.
IGNORED_TORCH_NAMES = ("query_proj.1.num_batches_tracked",)
FORMATS = (".pt", ".pth", ".npz", ".keras")


class ConversionError(PKMError, ValueError):
    """Weights that do not fit the model: missing, unexpected or wrongly shaped tensors."""


def check_weights(weights: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Raise one ConversionError naming every missing, unexpected and misshapen tensor."""
    problems = []
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected and not k.endswith(IGNORED_TORCH_NAMES)]
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        problems.append(f"unexpected {unexpected}")
    for k, shape in expected.items():
        if k in weights and tuple(np.shape(weights[k])) != tuple(shape):
            problems.append(f"{k}: expected shape {tuple(shape)}, got {tuple(np.shape(weights[k]))}")
    if problems:
        raise ConversionError(f"{what}: " + "; ".join(problems))


def expected_shapes(config: PKMConfig, layers: int = 1) -> dict[str, tuple[int, ...]]:
    shapes = weight_shapes(config)
    if layers == 1:
        return shapes
    return {f"layers.{i}.{k}": v for i in range(layers) for k, v in shapes.items()}


def split_layers(weights: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """``layers.<i>.<name>`` keys -> one dict per layer; unprefixed keys -> one layer."""
    pattern = re.compile(r"^layers\.(\d+)\.(.+)$")
    matches = {k: pattern.match(k) for k in weights}
    if not any(matches.values()):
        return [dict(weights)]
    stray = [k for k, m in matches.items() if m is None]
    if stray:
        raise ConversionError(f"a stack's weights must all be named layers.<i>.<name>; found {stray}")
    count = 1 + max(int(m.group(1)) for m in matches.values())
    out: list[dict[str, np.ndarray]] = [{} for _ in range(count)]
    for k, m in matches.items():
        out[int(m.group(1))][m.group(2)] = weights[k]
    empty = [i for i, layer in enumerate(out) if not layer]
    if empty:
        raise ConversionError(f"stack weights have no tensors for layer(s) {empty}")
    return out


def join_layers(layers: list[Mapping[str, np.ndarray]]) -> Weights:
    if len(layers) == 1:
        return dict(layers[0])
    return {f"layers.{i}.{k}": v for i, layer in enumerate(layers) for k, v in layer.items()}


def shape_config(layer: Mapping[str, np.ndarray], knn: int, where: str) -> PKMConfig:
    """The config one layer's torch-named tensors fit (``knn`` given: tensors do not record
    it), ranks and shapes checked first, every problem named with ``where``."""
    prefix = f"{where}: " if where else ""
    for name, rank in (("query_proj.0.weight", 2), ("keys", 4), ("values.weight", 2)):
        if name not in layer:
            raise ConversionError(f"{prefix}cannot infer the config: no {name!r} among {sorted(layer)}")
        if np.ndim(layer[name]) != rank:
            raise ConversionError(f"{prefix}{name} must have {rank} dimensions, got shape {np.shape(layer[name])}")
    heads, two, n_keys, half = np.shape(layer["keys"])
    size, v_dim = np.shape(layer["values.weight"])
    hk, input_dim = np.shape(layer["query_proj.0.weight"])
    if two != 2 or size != n_keys**2 or hk != heads * 2 * half:
        raise ConversionError(
            f"{prefix}inconsistent shapes: keys {np.shape(layer['keys'])} (heads, 2, n_keys, k_dim/2), "
            f"values.weight {np.shape(layer['values.weight'])} (n_keys**2, v_dim), "
            f"query_proj.0.weight {np.shape(layer['query_proj.0.weight'])} (heads*k_dim, input_dim)"
        )
    return PKMConfig(
        input_dim=int(input_dim),
        output_dim=int(v_dim),
        k_dim=int(2 * half),
        heads=int(heads),
        knn=knn,
        n_keys=int(n_keys),
        query_batchnorm="query_proj.1.weight" in layer,
    )


def infer_config(weights: Mapping[str, np.ndarray], *, knn: int) -> tuple[PKMConfig, int]:
    """The (config, layer count) that ``weights`` fit. ``knn`` is not stored in weights: the
    caller must say it."""
    layers = split_layers(weights)
    config = shape_config(layers[0], knn, "")
    check_weights(weights, expected_shapes(config, len(layers)), "weights")
    return config, len(layers)


def torch_to_keras(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One layer's torch-named weights -> Keras weight names (no copies where possible)."""
    out = {}
    for name, array in weights.items():
        if name in IGNORED_TORCH_NAMES:
            continue
        if name not in TORCH_TO_KERAS:
            raise ConversionError(f"unexpected tensor {name!r}; known: {sorted(TORCH_TO_KERAS)}")
        keras_name, transpose = TORCH_TO_KERAS[name]
        out[keras_name] = np.ascontiguousarray(np.asarray(array).T) if transpose else np.asarray(array)
    return out


def keras_to_torch(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One layer's Keras-named weights -> torch names."""
    back = {k: (t, tr) for t, (k, tr) in TORCH_TO_KERAS.items()}
    out = {}
    for name, array in weights.items():
        if name not in back:
            raise ConversionError(f"unexpected Keras weight {name!r}; known: {sorted(back)}")
        torch_name, transpose = back[name]
        out[torch_name] = np.ascontiguousarray(np.asarray(array).T) if transpose else np.asarray(array)
    return out


# --- PyTorch side ------------------------------------------------------------------------
def numpy_to_state_dict(weights: Mapping[str, np.ndarray], reference: Mapping) -> dict:
    """Numpy weights -> a state_dict for a module whose current state_dict is ``reference``.

    Checks names and shapes against it; fills ``num_batches_tracked`` when absent.
    """
    import torch

    expected = {k: tuple(v.shape) for k, v in reference.items() if not k.endswith(IGNORED_TORCH_NAMES)}
    check_weights(weights, expected, "PyTorch weights")
    out = {}
    for k, v in reference.items():
        if k in weights:  # shares the array's memory where the dtype is already the module's
            out[k] = torch.as_tensor(np.asarray(weights[k])).to(v.dtype)
        else:  # num_batches_tracked (a real zero where the module is still on the meta device)
            out[k] = torch.zeros((), dtype=v.dtype) if v.is_meta else v.clone()
    return out


def state_dict_to_numpy(state_dict: Mapping) -> Weights:
    return {k: v.detach().cpu().float().numpy() for k, v in state_dict.items() if not k.endswith(IGNORED_TORCH_NAMES)}


# --- Keras side --------------------------------------------------------------------------
def pkm_layers(model) -> list:
    """The ProductKeyMemory layers of a Keras layer or model, in order."""
    from pkm_models.keras_pkm import ProductKeyMemory

    if isinstance(model, ProductKeyMemory):
        return [model]
    found = [layer for layer in getattr(model, "layers", []) if isinstance(layer, ProductKeyMemory)]
    if not found:
        raise ConversionError(f"{type(model).__name__} holds no ProductKeyMemory layer")
    return found


ASSIGN_BLOCK_BYTES = 64 << 20  # larger weights are copied into a variable in blocks of rows of about this size


def _mapped_file(array: np.ndarray) -> tuple[str, int] | None:
    """(file, offset) when ``array`` is the whole of a C-ordered memory-mapped array, else None."""
    base = array
    while base is not None and not isinstance(base, np.memmap):
        base = getattr(base, "base", None)
    if base is None or getattr(base, "filename", None) is None or not base.flags.c_contiguous:
        return None
    same = array.__array_interface__["data"][0] == base.__array_interface__["data"][0]
    if not same or array.shape != base.shape or array.dtype != base.dtype or not array.flags.c_contiguous:
        return None
    return base.filename, base.offset


def row_blocks(array: np.ndarray, rows: int):
    """``(start, block)`` over ``array``'s first axis, ``rows`` at a time, each block a fresh
    C-ordered array. A memory-mapped array is read with file reads, so that its pages never
    become part of this process (the page cache holds them once for every reader)."""
    mapped = _mapped_file(array)
    n = array.shape[0]
    if mapped is None:
        for start in range(0, n, rows):
            yield start, np.ascontiguousarray(array[start : start + rows])
        return
    filename, offset = mapped
    row_bytes = array[:1].nbytes
    with open(filename, "rb") as f:
        for start in range(0, n, rows):
            block = np.empty((min(rows, n - start), *array.shape[1:]), array.dtype)
            f.seek(offset + start * row_bytes)
            if f.readinto(memoryview(block).cast("B")) != block.nbytes:
                raise ConversionError(f"{filename}: shorter than its header says")
            yield start, block


def aligned_empty(shape: tuple[int, ...], dtype, zeros: bool = False, align: int = 4096) -> np.ndarray:
    """An uninitialised (or ``zeros``) C-ordered array whose data starts on an ``align``-byte
    boundary, so that TensorFlow can adopt it without a copy (:func:`tensor_adopting`).
    Zeros come from untouched pages: they take no memory until written."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = (np.zeros if zeros else np.empty)(nbytes + align, np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def tensor_adopting(array: np.ndarray):
    """A TensorFlow tensor over ``array``'s memory (through DLPack, no copy); the tensor keeps
    the array alive. ``array`` must be C-ordered and aligned (:func:`aligned_empty`); a
    bfloat16 array (which DLPack does not carry from numpy) goes as its bits and is
    reinterpreted, still without a copy. ``tf.convert_to_tensor`` would copy it."""
    import tensorflow as tf

    if array.dtype.name == "bfloat16":
        bits = tf.experimental.dlpack.from_dlpack(array.view(np.uint16).__dlpack__())
        return tf.bitcast(bits, tf.bfloat16)
    return tf.experimental.dlpack.from_dlpack(array.__dlpack__())


def assign_variable(variable, array: np.ndarray) -> None:
    """``variable.assign(array)`` holding at most one full copy of a large array at a time.

    A TensorFlow variable: the array is copied in blocks of rows (read from the file where
    it is memory-mapped, :func:`row_blocks`) into one aligned buffer, which the variable then
    adopts as its value. Neither ``variable.assign(array)`` (it converts the array into a
    tensor first, a second full copy: 3 GB for a 1M-row table) nor a slice assign per block
    does: a slice assign puts the variable into TensorFlow's copy-on-read mode, where every
    later dense read copies the whole variable (each block's ``variable[a:b]`` and every
    forward pass's read of the table: 2x the table at the peak). Other backends' variables
    are assigned whole."""
    target = getattr(variable, "value", variable)  # Keras 3 on TensorFlow: the tf.Variable
    if array.nbytes <= ASSIGN_BLOCK_BYTES or array.ndim == 0 or not hasattr(target, "handle"):
        variable.assign(np.asarray(array))
        return
    dtype = target.dtype.as_numpy_dtype
    rows = max(1, ASSIGN_BLOCK_BYTES // max(1, array[:1].nbytes))
    buffer = aligned_empty(array.shape, dtype)
    for start, block in row_blocks(array, rows):
        buffer[start : start + len(block)] = block.astype(dtype, copy=False)
    value = tensor_adopting(buffer)
    del buffer  # held by the tensor, then by the variable alone
    target.assign(value)


def set_keras_weights(model, weights: Mapping[str, np.ndarray]) -> None:
    """Load torch-named numpy weights into a built Keras layer or model (large ones in
    blocks: :func:`assign_variable`). A value table that several layers share (one
    variable, ``share_values``) is assigned once; every layer's array for it must be that
    table. A bfloat16 table takes float32 arrays that hold bfloat16 values."""
    layers = pkm_layers(model)
    per_layer = split_layers(weights)
    if len(per_layer) != len(layers):
        raise ConversionError(f"weights hold {len(per_layer)} layer(s), the Keras model has {len(layers)}")
    assigned: dict[int, tuple[str, np.ndarray]] = {}  # id(variable) -> (where, the array it holds)
    for layer, torch_named in zip(layers, per_layer, strict=True):
        if not layer.built:
            raise ConversionError(f"Keras layer {layer.name!r} is not built: call it on an input first")
        variables = {v.name: v for v in layer.weights}
        converted = torch_to_keras(torch_named)
        check_weights(converted, {k: tuple(v.shape) for k, v in variables.items()}, f"Keras layer {layer.name!r}")
        for name, array in converted.items():
            variable = variables[name]
            where = f"{layer.name}/{name}"
            if id(variable) in assigned:  # a shared table: one variable, assigned once
                first, held = assigned[id(variable)]
                if array is not held and not np.array_equal(array, held):
                    raise ConversionError(
                        f"{where} differs from {first}, the table it shares: a shared table is one table"
                    )
                continue
            assign_variable(variable, array)
            assigned[id(variable)] = (where, array)


def get_keras_weights(model) -> Weights:
    """Torch-named numpy weights of a Keras layer or model (a bfloat16 table as float32
    holding its values; a shared table under every layer's name, one array)."""
    arrays: dict[int, np.ndarray] = {}

    def value(v) -> np.ndarray:
        if id(v) not in arrays:
            array = np.asarray(v.numpy())
            arrays[id(v)] = array.astype(np.float32) if array.dtype.name == "bfloat16" else array
        return arrays[id(v)]

    per_layer = [keras_to_torch({v.name: value(v) for v in layer.weights}) for layer in pkm_layers(model)]
    return join_layers(per_layer)


# --- checkpoint files --------------------------------------------------------------------
def check_destination(path: str | Path) -> Path:
    """A checkpoint path that can be written: known suffix, an existing folder, not a directory."""
    path = Path(path)
    if path.is_dir():
        raise ConversionError(f"{path}: is a directory; give a file name ending in one of {list(FORMATS)}")
    if path.suffix.lower() not in FORMATS:
        raise ConversionError(f"{path}: unknown checkpoint format {path.suffix!r}; known: {list(FORMATS)}")
    folder = path.parent
    if not folder.is_dir():
        raise ConversionError(f"{path}: cannot write: the folder {folder} does not exist")
    return path


def save_checkpoint(weights: Mapping[str, np.ndarray], path: str | Path, config: PKMConfig) -> None:
    """Write torch-named weights to ``path`` (format from the suffix).

    Written beside the destination, then renamed over it: an existing file survives any failure.
    """
    path = check_destination(path)
    fmt = path.suffix.lower()
    layers = len(split_layers(weights))
    check_weights(weights, expected_shapes(config, layers), "weights")
    # same folder (so the rename is atomic), same suffix (numpy and Keras insist on theirs)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        _write(weights, tmp, fmt, config, layers)
        os.replace(tmp, path)
    except OSError as exc:
        raise ConversionError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _write(weights: Mapping[str, np.ndarray], tmp: Path, fmt: str, config: PKMConfig, layers: int) -> None:
    if fmt in (".pt", ".pth"):
        import torch

        from pkm_models.torch_pkm import build_torch_model

        model = build_torch_model(config, layers, seed=None)
        model.load_weights(weights)
        torch.save(model.state_dict(), tmp)
    elif fmt == ".npz":
        np.savez(tmp, **weights)
    else:
        from pkm_models.keras_pkm import build_keras_model

        model = build_keras_model(config, layers, seed=None)
        set_keras_weights(model, weights)
        model.save(tmp)


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    knn: int | None = None,
    memories: Sequence[str] | None = None,
):
    """Convert a checkpoint (any format :func:`pkm_models.checkpoint.read_checkpoint` reads)
    to ``.pt``, ``.npz`` or ``.keras``; returns the :class:`~pkm_models.checkpoint.Checkpoint`
    it read.

    ``knn`` is required when ``src`` does not record it (``.pt``, ``.npz``), and must agree
    with it when it does (XLM's ``params``, ``.keras``). ``memories`` picks and orders the
    memories to write (default: all); more than one are written as a stack (``layers.<i>.``).
    """
    from pkm_models.checkpoint import read_checkpoint

    check_destination(dst)
    checkpoint = read_checkpoint(src, knn=knn, memories=memories)
    save_checkpoint(checkpoint.stacked_weights(), dst, checkpoint.config)
    return checkpoint
