"""Keras port -> ONNX: through tf2onnx, and through Keras' own ``model.export``."""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import numpy as np
import onnx

from conformance.export import ExportUnsupported, ModelSpec
from conformance.export.onnx_files import (
    order_outputs,
    quiet_exporters,
    rename_values,
    replace_inputs_with_initializers,
    save_model,
)
from pkm_models.convert import pkm_layers, set_keras_weights, split_layers, torch_to_keras
from pkm_models.stack import call_module, stack_forward

TF2ONNX_MAX_OPSET = 18


def _check_opset(exporter: str, opset: int, spec: ModelSpec | None = None) -> None:
    if spec is not None:
        from pkm_models.keras_pkm import unsupported

        problem = unsupported(spec.config)
        if problem:
            raise ExportUnsupported(f"{exporter}: {problem}")
    if opset > TF2ONNX_MAX_OPSET:
        raise ExportUnsupported(f"{exporter}: tf2onnx 1.17 supports opsets up to {TF2ONNX_MAX_OPSET}, got {opset}")


# Keras' own export hands tf2onnx every weight as a graph constant; tf2onnx with the xlm
# value table (805 MB) as a constant used all 24 GB of a development machine.
KERAS_EXPORT_MAX_BYTES = 256 << 20


def export_tf2onnx(spec: ModelSpec, path: Path, opset: int, tapped: bool) -> None:
    """tf2onnx on a ``tf.function`` that takes the weights as inputs.

    Converting with the weights captured as constants makes tf2onnx hold several copies
    of the value table (it exhausted 24 GB at the xlm size). Here every weight is a graph
    input during conversion (``Layer.stateless_call``); the weights are written into the
    file as initializers afterwards (as external data when large), one at a time.
    """
    _check_opset("tf2onnx", opset, spec)
    proto, keras_names = _convert_structure(spec, opset, tapped)
    gc.collect()  # the traced Keras model and its variables are gone: make room for the weights
    order_outputs(proto, spec.output_names(tapped))
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_inputs_with_initializers(proto, _keras_named_arrays(spec, keras_names), path, spec.weight_bytes)


def _convert_structure(spec: ModelSpec, opset: int, tapped: bool):
    """The ONNX graph with every weight as an input named ``<layer>/<weight>``, and those
    (layer, weight) names in input order."""
    import tensorflow as tf
    import tf2onnx

    from pkm_models.keras_pkm import build_keras_model

    # Only the structure is traced: Keras' own initial values stand in for the weights.
    # "einsum": the default method traces to an XLA-compiled block that ONNX cannot hold.
    model = build_keras_model(spec.config, spec.layers, seed=None, method="einsum")
    layers = pkm_layers(model)
    groups = [(list(layer.trainable_variables), list(layer.non_trainable_variables)) for layer in layers]
    variables = [(layer, v) for layer, (tv, ntv) in zip(layers, groups, strict=True) for v in (*tv, *ntv)]
    signature = [tf.TensorSpec((None, None, spec.config.input_dim), tf.float32, name="input")]
    signature += [tf.TensorSpec(v.shape, v.dtype, name=f"w{i}") for i, (_, v) in enumerate(variables)]

    def forward(input, *weights):
        it = iter(weights)

        def call(layer_and_groups, x, return_taps):
            layer, (tv, ntv) = layer_and_groups
            trainable, non_trainable = [next(it) for _ in tv], [next(it) for _ in ntv]
            y, _ = layer.stateless_call(trainable, non_trainable, x, return_taps=return_taps)
            return dict(y) if return_taps else y

        out = stack_forward(list(zip(layers, groups, strict=True)), input, call, return_taps=tapped)
        return {name: out[name] for name in spec.output_names(True)} if tapped else {"output": out}

    with quiet_exporters():
        proto, _ = tf2onnx.convert.from_function(
            tf.function(forward, input_signature=signature), input_signature=signature, opset=opset
        )
    rename_values(proto, {f"w{i}": f"{layer.name}/{v.name}" for i, (layer, v) in enumerate(variables)})
    return proto, [(layer.name, v.name) for layer, v in variables]


def _keras_named_arrays(spec: ModelSpec, keras_names):
    """(initializer name, array) for each Keras weight, converted from the torch-named
    weights layer by layer."""
    per_layer = [torch_to_keras(w) for w in split_layers(spec.weights())]
    layer_index = {}
    for layer_name, weight_name in keras_names:
        index = layer_index.setdefault(layer_name, len(layer_index))
        yield f"{layer_name}/{weight_name}", per_layer[index].pop(weight_name)


def export_keras(spec: ModelSpec, path: Path, opset: int, tapped: bool) -> None:
    """Keras 3's ``model.export(path, format="onnx")`` on a functional model."""
    import keras

    from pkm_models.keras_pkm import ProductKeyMemory

    _check_opset("keras", opset, spec)
    weight_bytes = spec.weight_bytes
    if weight_bytes > KERAS_EXPORT_MAX_BYTES:
        raise ExportUnsupported(
            f"keras: model.export hands tf2onnx all {weight_bytes / 2**20:,.0f} MB of weights as graph constants "
            f"(tf2onnx with the xlm value table as a constant used all 24 GB of a development machine); this "
            f"exporter is limited to {KERAS_EXPORT_MAX_BYTES >> 20} MB. Use the tf2onnx exporter for large models."
        )
    inputs = keras.Input((None, spec.config.input_dim), name="input")
    x = inputs
    # "einsum": the default method traces to an XLA-compiled block that ONNX cannot hold
    layers = [
        ProductKeyMemory.from_pkm_config(spec.config, method="einsum", name=f"pkm_{i}") for i in range(spec.layers)
    ]
    out = stack_forward(layers, x, call_module, return_taps=tapped)
    outputs = [out[name] for name in spec.output_names(True)] if tapped else [out]
    model = keras.Model(inputs, outputs)
    set_keras_weights(model, spec.weights())
    model(np.zeros((2, 3, spec.config.input_dim), np.float32))  # export needs a called model
    with tempfile.TemporaryDirectory() as tmp, quiet_exporters():
        raw = Path(tmp) / "keras.onnx"
        model.export(str(raw), format="onnx", verbose=False, opset_version=opset)
        proto = onnx.load(str(raw))
    names = spec.output_names(tapped)
    rename_values(proto, {o.name: n for o, n in zip(proto.graph.output, names, strict=True)})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(proto, path)
