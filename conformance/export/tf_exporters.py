"""Keras port -> ONNX: through tf2onnx, and through Keras' own ``model.export``."""

from __future__ import annotations

import contextlib
import gc
import tempfile
from pathlib import Path

import numpy as np
import onnx

from conformance.export import ExportError, ExportUnsupported, ModelSpec
from conformance.export.onnx_files import (
    all_nodes,
    order_outputs,
    quiet_exporters,
    rename_values,
    replace_inputs_with_initializers,
    save_model,
)
from pkm_models.convert import pkm_layers, set_keras_weights, split_layers, torch_to_keras
from pkm_models.stack import call_module, stack_forward

TF2ONNX_MAX_OPSET = 18


def _check_opset(exporter: str, opset: int) -> None:
    if opset > TF2ONNX_MAX_OPSET:
        raise ExportUnsupported(f"{exporter}: tf2onnx 1.17 supports opsets up to {TF2ONNX_MAX_OPSET}, got {opset}")


@contextlib.contextmanager
def bfloat16_kept():
    """tf2onnx 1.17 made faithful to bfloat16, for the conversions made inside this context.

    tf2onnx 1.17 has no bfloat16 of its own: it maps TensorFlow's bfloat16 to ONNX float16
    (``tf_utils.TF_TO_ONNX_DTYPE``), and its back-to-back optimizer merges
    ``Cast(Cast(x, to=<narrow float>), to=float)`` into one cast (it counts every float
    type as "high information"). A bfloat16 table (docs/memory-layers.md) would become a
    float16 one, and the one rounding of its weighted sum would disappear. Here bfloat16
    maps to ONNX's BFLOAT16, and a cast to bfloat16 or float16 is merged only into an
    identical cast before it; everything else converts as tf2onnx does. (Keras'
    ``model.export`` converts through tf2onnx too.) :func:`check_bfloat16_rounding`
    checks the result, so a tf2onnx whose internals moved fails loudly, not silently."""
    import tensorflow as tf
    from tensorflow.core.framework import types_pb2
    from tf2onnx import tf_utils, utils
    from tf2onnx.optimizer import back_to_back_optimizer as b2b

    bf16 = onnx.TensorProto.BFLOAT16
    narrow = {bf16, onnx.TensorProto.FLOAT16}
    original_cast = b2b._func_map.get(("Cast",))

    def cast(g, node, consumer_nodes):
        to = node.get_attr("to").i
        parent = node.inputs[0] if node.inputs else None
        same = parent is not None and parent.type == "Cast" and parent.get_attr("to").i == to
        if to in narrow and not same:
            return []  # a rounding: kept
        return original_cast(g, node, consumer_nodes)

    saved = [
        (tf_utils.TF_TO_ONNX_DTYPE, types_pb2.DT_BFLOAT16, bf16),
        (utils.ONNX_TO_NUMPY_DTYPE, bf16, tf.bfloat16.as_numpy_dtype),
        (utils.ONNX_DTYPE_NAMES, bf16, "bfloat16"),
    ]
    if original_cast is not None:
        saved.append((b2b._func_map, ("Cast",), cast))
    missing = object()
    previous = [(table, key, table.get(key, missing)) for table, key, _ in saved]
    try:
        for table, key, value in saved:
            table[key] = value
        yield
    finally:
        for table, key, value in previous:
            if value is missing:
                table.pop(key, None)
            else:
                table[key] = value


def check_bfloat16_rounding(proto: onnx.ModelProto, spec: ModelSpec, exporter: str) -> None:
    """Raise ExportError unless every layer of a bfloat16 table still rounds its weighted
    sum to bfloat16 (a ``Cast`` to bfloat16 per layer): a converter that drops it makes a
    model that is close, but not the reference."""
    if spec.config.value_dtype != "bfloat16":
        return
    rounding = sum(
        1
        for node in all_nodes(proto.graph)
        if node.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.BFLOAT16 for a in node.attribute)
    )
    if rounding < spec.layers:
        raise ExportError(
            f"{exporter}: the conversion dropped the rounding of the bfloat16 table's weighted sum to bfloat16 "
            f"({rounding} Cast to bfloat16 for {spec.layers} layer(s)): the exported read would not be the reference's"
        )


# Keras' own export hands tf2onnx every weight as a graph constant; tf2onnx with the xlm
# value table (805 MB) as a constant used all 24 GB of a development machine.
KERAS_EXPORT_MAX_BYTES = 256 << 20


def export_tf2onnx(spec: ModelSpec, path: Path, opset: int, tapped: bool) -> None:
    """tf2onnx on a ``tf.function`` that takes the weights as inputs.

    Converting with the weights captured as constants makes tf2onnx hold several copies
    of the value table (it exhausted 24 GB at the xlm size). Here every weight is a graph
    input during conversion (``Layer.stateless_call``); the weights are written into the
    file as initializers afterwards (as external data when large), one at a time. A value
    table that the layers share is one input, hence one initializer; a bfloat16 table is a
    bfloat16 initializer.
    """
    _check_opset("tf2onnx", opset)
    proto, keras_names = _convert_structure(spec, opset, tapped)
    gc.collect()  # the traced Keras model and its variables are gone: make room for the weights
    order_outputs(proto, spec.output_names(tapped))
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_inputs_with_initializers(proto, _keras_named_arrays(spec, keras_names), path, spec.weight_bytes)


def _convert_structure(spec: ModelSpec, opset: int, tapped: bool):
    """The ONNX graph with every weight as an input named ``<layer>/<weight>`` (a shared
    value table once, under its owner's name), and those (layer, weight, dtype) in input
    order."""
    import tensorflow as tf
    import tf2onnx

    from pkm_models.keras_pkm import build_keras_model

    # Only the structure is traced: zeros (on untouched pages) stand in for the tables.
    # "einsum": the default method traces to an XLA-compiled block that ONNX cannot hold.
    model = build_keras_model(spec.config, spec.layers, seed=None, method="einsum", structure_only=True)
    layers = pkm_layers(model)
    groups = [(list(layer.trainable_variables), list(layer.non_trainable_variables)) for layer in layers]
    # each variable once, under the first layer that holds it (a shared table: layer 0)
    variables, position = [], {}
    for layer, (tv, ntv) in zip(layers, groups, strict=True):
        for v in (*tv, *ntv):
            if id(v) not in position:
                position[id(v)] = len(variables)
                variables.append((layer, v))
    # A value table's input has a dynamic row count, its shape restored inside the function:
    # for an input of fully known shape, Grappler (which tf2onnx's freezing runs) makes a
    # zero-filled stand-in of that size and keeps it (3.1 GiB for mega's table).
    tables = {i for i, (_, v) in enumerate(variables) if v.name == "values"}
    signature = [tf.TensorSpec((None, None, spec.config.input_dim), tf.float32, name="input")]
    signature += [
        tf.TensorSpec((None, *v.shape[1:]) if i in tables else v.shape, v.dtype, name=f"w{i}")
        for i, (_, v) in enumerate(variables)
    ]

    def forward(input, *weights):
        weights = [
            tf.ensure_shape(w, v.shape) if i in tables else w
            for i, (w, (_, v)) in enumerate(zip(weights, variables, strict=True))
        ]

        def call(layer_and_groups, x, return_taps):
            layer, (tv, ntv) = layer_and_groups
            trainable = [weights[position[id(v)]] for v in tv]
            non_trainable = [weights[position[id(v)]] for v in ntv]
            y, _ = layer.stateless_call(trainable, non_trainable, x, return_taps=return_taps)
            return dict(y) if return_taps else y

        out = stack_forward(list(zip(layers, groups, strict=True)), input, call, return_taps=tapped)
        return {name: out[name] for name in spec.output_names(True)} if tapped else {"output": out}

    with quiet_exporters(), bfloat16_kept():
        proto, _ = tf2onnx.convert.from_function(
            tf.function(forward, input_signature=signature), input_signature=signature, opset=opset
        )
    check_bfloat16_rounding(proto, spec, "tf2onnx")
    rename_values(proto, {f"w{i}": f"{layer.name}/{v.name}" for i, (layer, v) in enumerate(variables)})
    return proto, [(layer.name, v.name, v.dtype) for layer, v in variables]


def _keras_named_arrays(spec: ModelSpec, keras_names):
    """(initializer name, array) for each Keras weight, converted from the torch-named
    weights layer by layer, in the variable's dtype (a bfloat16 table: float32 arrays that
    hold bfloat16 values, so the conversion is exact)."""
    import tensorflow as tf

    per_layer = [torch_to_keras(w) for w in split_layers(spec.weights())]
    layer_index = {}
    for layer_name, weight_name, dtype in keras_names:
        index = layer_index.setdefault(layer_name, len(layer_index))
        array = per_layer[index].pop(weight_name)
        if dtype == "bfloat16":
            array = np.asarray(array).astype(tf.bfloat16.as_numpy_dtype)
        yield f"{layer_name}/{weight_name}", array


def export_keras(spec: ModelSpec, path: Path, opset: int, tapped: bool) -> None:
    """Keras 3's ``model.export(path, format="onnx")`` on a functional model."""
    _check_opset("keras", opset)
    weight_bytes = spec.weight_bytes
    if weight_bytes > KERAS_EXPORT_MAX_BYTES:  # decided before importing Keras
        raise ExportUnsupported(
            f"keras: model.export hands tf2onnx all {weight_bytes / 2**20:,.0f} MB of weights as graph constants "
            f"(tf2onnx with the xlm value table as a constant used all 24 GB of a development machine); this "
            f"exporter is limited to {KERAS_EXPORT_MAX_BYTES >> 20} MB. Use the tf2onnx exporter for large models."
        )
    import keras

    from pkm_models.keras_pkm import pkm_layers_of

    inputs = keras.Input((None, spec.config.input_dim), name="input")
    x = inputs
    # "einsum": the default method traces to an XLA-compiled block that ONNX cannot hold
    layers = pkm_layers_of(spec.config, spec.layers, method="einsum")  # a shared table: one variable
    out = stack_forward(layers, x, call_module, return_taps=tapped)
    outputs = [out[name] for name in spec.output_names(True)] if tapped else [out]
    model = keras.Model(inputs, outputs)
    set_keras_weights(model, spec.weights())
    model(np.zeros((2, 3, spec.config.input_dim), np.float32))  # export needs a called model
    with tempfile.TemporaryDirectory() as tmp, quiet_exporters(), bfloat16_kept():
        raw = Path(tmp) / "keras.onnx"
        model.export(str(raw), format="onnx", verbose=False, opset_version=opset)
        proto = onnx.load(str(raw))
    check_bfloat16_rounding(proto, spec, "keras")
    names = spec.output_names(tapped)
    rename_values(proto, {o.name: n for o, n in zip(proto.graph.output, names, strict=True)})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(proto, path)
