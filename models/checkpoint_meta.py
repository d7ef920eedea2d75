"""Reading a facebookresearch/memory ("Memory Layers at Scale") consolidated checkpoint.

Their training saves ``torch.distributed.checkpoint`` folders and consolidates them into
``consolidated/consolidated.pth``, a ``torch.save`` dict whose ``"model"`` entry is the
state_dict, with the run's arguments beside it in ``consolidated/params.json``. A memory
layer replaces the feed-forward block of transformer layer ``i``; its tensors are

================================================  =====================================
their name (``layers.<i>.feed_forward.``)         ours (:mod:`pkm_models.torch_pkm`)
================================================  =====================================
``keys`` (2 * heads * n_keys, k_dim / 2)          ``keys`` (heads, 2, n_keys, k_dim / 2):
                                                  the same memory order, reshaped
``values.weight`` (n_keys**2, v_dim), bf16        ``values.weight``
``query_proj.query_mlps.0.weight`` / ``.bias``    ``query_proj.0.weight`` / ``.bias``
``query_proj.query_mlps.1.*`` (batchnorm)         ``query_proj.1.*``
``value_proj.*``, ``swilu_projection.*``,         the same names
``gating.*``
================================================  =====================================

The memories are named by their layer index (``"4"``, ``"12"``, ``"20"``); by default all,
in layer order, or those that ``params.json``'s ``model.productkey_args.layers`` lists.
``knn`` and the options the tensors do not show come from ``productkey_args`` when the
file is there. With shared values every memory layer carries an alias of one table: aliases
(the same storage, or equal contents) become one float32 array, held once. The PEER variant
(``peer_variant``, ``values_u`` / ``values_v``) is refused by name. Nothing is executed:
the dict is read by :mod:`pkm_models.checkpoint`'s weights-only loader and ``params.json``
as JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pkm_models.convert import ConversionError
from pkm_models.small_files import SmallFileError, read_small_text

_NAME = re.compile(r"^layers\.(\d+)\.feed_forward\.(.+)$")
# their name after "layers.<i>.feed_forward." -> ours
RENAMES = {
    "keys": "keys",
    "values.weight": "values.weight",
    "query_proj.query_mlps.0.weight": "query_proj.0.weight",
    "query_proj.query_mlps.0.bias": "query_proj.0.bias",
    **{f"query_proj.query_mlps.1.{s}": f"query_proj.1.{s}" for s in ("weight", "bias", "running_mean", "running_var")},
    **{f"{m}.{s}": f"{m}.{s}" for m in ("value_proj", "swilu_projection", "gating") for s in ("weight", "bias")},
}
IGNORED = ("query_proj.query_mlps.1.num_batches_tracked",)
# the rank of each tensor of a memory layer (ours' names): matrices, else vectors
MATRICES = (
    "keys",
    "values.weight",
    "query_proj.0.weight",
    "value_proj.weight",
    "swilu_projection.weight",
    "gating.weight",
)
PEER_NAMES = ("values_u.weight", "values_v.weight")
# productkey_args that must have these values for the layer to be ours
FIXED = {"peer_variant": (False,), "mem_query_bias": (True,)}


def state_dict_of(obj: Any) -> Mapping[str, Any] | None:
    """The state_dict when ``obj`` is one of theirs (``{"model": state_dict}`` or the
    state_dict alone, with at least one ``layers.<i>.feed_forward.keys``), else None."""
    if not isinstance(obj, Mapping):
        return None
    state = obj.get("model", obj)
    if not isinstance(state, Mapping):
        return None
    if any(isinstance(k, str) and _NAME.match(k) and k.endswith(".feed_forward.keys") for k in state):
        return state
    return None


def read_params(path: Path) -> dict[str, Any]:
    """``model.productkey_args`` of the run's ``params.json`` beside ``path`` ({} without one)."""
    file = path.parent / "params.json"
    if not file.exists() and not file.is_symlink():
        return {}
    if file.is_dir():  # was silently taken for no params
        raise ConversionError(f"{file}: the run's params must be a regular JSON file, not a folder")
    try:
        params = json.loads(read_small_text(file))
    except SmallFileError as exc:  # a FIFO, a device, a 1 GB file
        raise ConversionError(str(exc)) from None
    except RecursionError:
        raise ConversionError(f"{file}: the run's params are nested too deeply to be read") from None
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{file}: the run's params are not readable JSON ({exc})") from exc
    if not isinstance(params, Mapping) or not isinstance(params.get("model", {}), Mapping):
        raise ConversionError(f"{file}: the run's params must be a JSON object with a 'model' object")
    args = params.get("model", {}).get("productkey_args")
    if args is None:
        return {}
    if not isinstance(args, Mapping):
        raise ConversionError(f"{file}: model.productkey_args must be an object, got {type(args).__name__}")
    return dict(args)


def memories_in(state: Mapping[str, Any], params: Mapping[str, Any], path: Path):
    """Their memory layers, in layer order, as ``({name: {our name: tensor}}, {name: {our
    name: their name}}, recorded config fields, notes)``."""
    import torch

    where = f"{path.parent / 'params.json'}" if params else str(path)
    if params.get("peer_variant") or any(k.endswith(PEER_NAMES) for k in state if isinstance(k, str)):
        raise ConversionError(
            f"{path}: a PEER memory (peer_variant: values_u / values_v, an expert per slot) is not a "
            "product-key memory this project implements; only the PK variant (values.weight) is read"
        )
    for option, allowed in FIXED.items():
        if option in params and params[option] not in allowed:
            raise ConversionError(f"{where}: productkey_args.{option}={params[option]!r}; only {allowed} is read")
    layers: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        m = _NAME.match(key) if isinstance(key, str) else None
        if m is None:
            continue
        layer, rest = m.groups()
        if rest.endswith(IGNORED):
            continue
        layers.setdefault(layer, {})[rest] = tensor
    memories = {i: t for i, t in layers.items() if "keys" in t}  # other feed_forwards are MLPs
    if not memories:
        raise ConversionError(f"{path}: no memory layer (layers.<i>.feed_forward.keys)")
    names = sorted(memories, key=int)
    given = params.get("layers", "")
    if isinstance(given, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in given):
        given = ",".join(map(str, given))
    wanted = [s.strip() for s in str(given).split(",") if s.strip()] if isinstance(given, str | int) else None
    if wanted is None or not all(s.isdigit() for s in wanted) or isinstance(given, bool):
        raise ConversionError(f'{where}: productkey_args.layers = {given!r}: expected layer numbers, e.g. "4,12,20"')
    if wanted and sorted(wanted, key=int) != names:
        raise ConversionError(
            f"{where}: productkey_args.layers = {params['layers']!r}, but the state_dict has memory layers {names}"
        )
    out: dict[str, dict[str, Any]] = {}
    renamed: dict[str, dict[str, str]] = {}
    notes: list[str] = []
    for name in names:
        theirs = memories[name]
        unknown = sorted(set(theirs) - set(RENAMES))
        if unknown:
            raise ConversionError(
                f"{path}: layers.{name}.feed_forward: unknown tensor(s) {unknown}; known: {sorted(RENAMES)}"
            )
        out[name] = {RENAMES[k]: v for k, v in theirs.items()}
        renamed[name] = {RENAMES[k]: f"layers.{name}.feed_forward.{k}" for k in theirs}
        for ours, tensor in out[name].items():
            _check_tensor(tensor, ours, f"{path}: {renamed[name][ours]}", torch)
    dtypes = {n: str(out[n]["values.weight"].dtype).replace("torch.", "") for n in names if "values.weight" in out[n]}
    if len(set(dtypes.values())) > 1:  # one value_dtype is the model's: the others would be rounded, or not
        listed = ", ".join(f"layers.{n} {d}" for n, d in dtypes.items())
        raise ConversionError(
            f"{path}: the memory layers' value tables differ in dtype ({listed}); a model here has one "
            "value dtype: save them in one"
        )
    table_dtype = next(iter(dtypes.values()), "")
    share = _share_values(out, renamed, params, path, notes, torch)
    recorded = {}
    for name in names:
        recorded = _layer_fields(out[name], renamed[name], params, path, name)
        recorded["value_dtype"] = "bfloat16" if table_dtype == "bfloat16" else "float32"
        out[name]["keys"] = _keys(out[name]["keys"], recorded.pop("heads"), renamed[name]["keys"], path)
    recorded["share_values"] = share and len(names) > 1
    if "mem_knn" in params:
        knn = params["mem_knn"]
        if isinstance(knn, bool) or not isinstance(knn, int):
            raise ConversionError(f"{where}: productkey_args.mem_knn must be an integer, got {knn!r}")
        recorded["knn"] = knn
    return out, renamed, recorded, notes


def _share_values(out, renamed, params, path, notes, torch) -> bool:
    """Make every memory's table one float32 array when they are one table (aliases of
    the same storage, or equal); a missing table is layer 0's when values are shared."""
    names = list(out)
    tables = [out[n].get("values.weight") for n in names]
    first = tables[0]
    if first is None:
        raise ConversionError(f"{path}: layers.{names[0]}.feed_forward.values.weight: missing")
    declared = params.get("mem_share_values")
    if declared is not None and not isinstance(declared, bool):  # "true" was read as not declared
        raise ConversionError(
            f"{path.parent / 'params.json'}: productkey_args.mem_share_values must be true or false, got {declared!r}"
        )
    same = all(t is None or _same_table(t, first) for t in tables)
    if declared is True and not same:
        raise ConversionError(
            f"{path}: mem_share_values is true but the memory layers' values.weight differ; a shared table is one"
        )
    if any(t is None for t in tables) and not same:
        raise ConversionError(f"{path}: some memory layers have no values.weight and the others differ")
    shared = same and len(names) > 1 and declared is not False
    if not shared:
        return False
    dtype = str(first.dtype).replace("torch.", "")
    table = first.detach().to(torch.float32).numpy() if isinstance(first, torch.Tensor) else np.asarray(first)
    table = table.astype(np.float32, copy=False)
    for n in names:
        out[n]["values.weight"] = table  # one array: _as_float32 keeps float32 arrays as they are
        renamed[n]["values.weight"] = f"layers.{names[0]}.feed_forward.values.weight"
    notes.append(f"one value table shared by memory layers {names} ({dtype}), held once")
    return True


def _check_tensor(tensor, ours: str, where: str, torch) -> None:
    """A tensor of the rank its role needs, no dimension 0, and no more elements than the
    file holds for it (a stride-0 view of one number declared as 2^34 elements would be
    made whole in float32)."""
    if not isinstance(tensor, torch.Tensor):
        raise ConversionError(f"{where}: expected a tensor, got {type(tensor).__name__}")
    rank = 2 if ours in MATRICES else 1
    shape = tuple(tensor.shape)
    if len(shape) != rank or 0 in shape:
        kind = "a matrix" if rank == 2 else "a vector"
        raise ConversionError(f"{where}: expected {kind} with no empty dimension, got shape {list(shape)}")
    held = tensor.untyped_storage().nbytes() - tensor.storage_offset() * tensor.element_size()
    if tensor.numel() * tensor.element_size() > held:
        raise ConversionError(
            f"{where}: declares {tensor.numel():,} elements of shape {list(shape)} but the file holds "
            f"{max(held, 0) // tensor.element_size():,} for it (strides {list(tensor.stride())}): refused"
        )


def _same_table(a, b) -> bool:
    import torch

    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return False
        if a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.stride() == b.stride():
            return a.storage_offset() == b.storage_offset()
        return bool(torch.equal(a, b))
    return np.array_equal(np.asarray(a), np.asarray(b))


def _layer_fields(layer, renamed, params, path, name) -> dict[str, Any]:
    """The config fields one memory layer's tensors (and the run's params) say."""
    where = f"{path}: layers.{name}.feed_forward"
    for needed in ("keys", "query_proj.0.weight", "values.weight"):
        if needed not in layer:
            raise ConversionError(f"{where}: no {needed!r} ({renamed.get(needed, needed)})")
    if "query_proj.0.bias" not in layer:
        raise ConversionError(
            f"{where}: no query_proj.query_mlps.0.bias: mem_query_bias=False is not implemented "
            "(XLM's query has a bias)"
        )
    rows, input_dim = tuple(layer["query_proj.0.weight"].shape)
    if len(layer["keys"].shape) != 2:
        raise ConversionError(
            f"{where}.keys: expected (2 * heads * n_keys, k_dim / 2), got {tuple(layer['keys'].shape)}"
        )
    k_dim = 2 * int(layer["keys"].shape[1])
    if rows % k_dim:
        raise ConversionError(f"{where}: query_proj rows {rows} are not heads * k_dim (k_dim = {k_dim} from the keys)")
    heads = rows // k_dim
    if "mem_heads" in params and params["mem_heads"] != heads:
        raise ConversionError(f"{where}: mem_heads={params['mem_heads']!r} but the tensors have {heads}")
    v_dim = tuple(layer["values.weight"].shape)[1]
    swilu = "swilu_projection.weight" in layer
    if "swilu_projection" in params and bool(params["swilu_projection"]) != swilu:
        raise ConversionError(
            f"{where}: swilu_projection={params['swilu_projection']!r} but the tensors "
            f"{'have' if swilu else 'have no'} swilu_projection"
        )
    gated = "gating.weight" in layer
    if "mem_gated" in params and bool(params["mem_gated"]) != gated:
        raise ConversionError(
            f"{where}: mem_gated={params['mem_gated']!r} but the tensors {'have' if gated else 'have no'} gating"
        )
    if "value_proj.weight" in layer:
        output_dim, proj_in = tuple(layer["value_proj.weight"].shape)
        value_dim = 0 if swilu and proj_in == output_dim else proj_in
    else:
        output_dim, value_dim = v_dim, 0
    mem_v_dim = params.get("mem_v_dim", -1)
    if mem_v_dim not in (-1, None) and mem_v_dim != v_dim:
        raise ConversionError(f"{where}: mem_v_dim={mem_v_dim!r} but values.weight has {v_dim} columns")
    return {
        "heads": heads,
        "input_dim": int(input_dim),
        "output_dim": int(output_dim),
        "value_dim": int(value_dim),
        "swilu_projection": swilu,
        "gated": gated,
    }


def _keys(keys, heads: int, source: str, path: Path):
    """(2 * heads * n_keys, half) -> (heads, 2, n_keys, half): their ``view``, no copy."""
    flat, half = tuple(keys.shape)
    if flat % (2 * heads):
        raise ConversionError(f"{path}: {source}: {flat} rows are not 2 * heads ({heads}) * n_keys")
    return keys.reshape(heads, 2, flat // (2 * heads), half)
