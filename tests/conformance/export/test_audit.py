"""The static weight audit (conformance.export.audit): every export's stored weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conformance.cases import default_cases_dir, load_case
from conformance.export import export
from conformance.export.audit import audit_file


@pytest.fixture(scope="module")
def tiny():
    return load_case(default_cases_dir() / "tiny.toml")


@pytest.mark.parametrize("exporter", ["torch-fast", "torch-script", "torch-fast@int8", "torch-fast@fp16"])
def test_every_weight_of_an_export_is_found_and_equal(tiny, tmp_path, exporter):
    path = export(tiny.spec, exporter, tmp_path, tapped=True).path
    result = audit_file(path, tiny.spec.weights())
    assert result, result.message
    assert result.tensors == 4 and not result.not_found  # query projection, bias, keys, values


def test_a_batchnorm_folded_into_the_projection_is_not_found_and_not_a_failure(tmp_path):
    """The exporter folds inference batchnorm into the projection: the named bias holds other
    values (a 1-D tensor compared element by element), the tables still match."""
    case = load_case(default_cases_dir() / "tiny-bn.toml")
    path = export(case.spec, "torch-fast", tmp_path, tapped=True).path
    result = audit_file(path, case.spec.weights())
    assert result, result.message
    assert "query_proj.0.bias" in result.not_found and "values.weight" not in result.not_found


def _rewrite(path, change):
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init).copy()
        if change(init.name, array):
            init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(model, str(path))


def test_a_value_table_with_rows_zeroed_fails_naming_the_tensor_and_element(tiny, tmp_path):
    path = export(tiny.spec, "torch-fast", tmp_path, tapped=True).path
    table = tiny.spec.weights()["values.weight"]

    def zero(name, array):
        if array.shape == table.shape:
            array[40:] = 0
            return True
        return False

    _rewrite(path, zero)
    result = audit_file(path, tiny.spec.weights())
    assert not result
    (bad,) = result.differing
    assert bad["name"] == "values.weight" and bad["initializer"].endswith("values.weight")
    first = int(np.argwhere(table[40:] != 0)[0][0]) + 40
    assert bad["index"][0] == first and bad["obtained"] == 0.0
    assert "values.weight" in result.message


def test_an_int8_table_with_one_rows_scale_wrong_fails(tiny, tmp_path):
    path = export(tiny.spec, "torch-fast@int8", tmp_path, tapped=True).path

    def scale(name, array):
        if name.endswith("scale"):
            array[17] *= 1.5
            return True
        return False

    _rewrite(path, scale)
    result = audit_file(path, tiny.spec.weights())
    assert not result and result.differing[0]["index"][0] == 17


def test_a_key_changed_in_an_export_that_splits_the_keys_by_head_is_not_found(tiny, tmp_path):
    path = export(tiny.spec, "torch-script", tmp_path, tapped=True).path
    changed = []

    def nudge(name, array):
        if name.startswith("onnx::MatMul") and not changed:
            array.reshape(-1)[0] += 1
            changed.append(name)
            return True
        return False

    _rewrite(path, nudge)
    result = audit_file(path, tiny.spec.weights())
    assert changed and "keys" in result.not_found
