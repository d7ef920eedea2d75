"""The table sweep (conformance.sweep): planted defects in rows the golden batch never reads."""

from __future__ import annotations

import numpy as np
import pytest

from conformance.precision import quantize_rows
from conformance.sweep import LOCATE_BAGS, TableRead, sweep_table

HEADS, KNN = 4, 32


def _summing(table: np.ndarray, dtype=np.float32):
    """A correct weighted sum over ``table`` (what a runtime's lookup computes)."""

    def read(indices, weights):
        rows = table[indices.reshape(-1, HEADS * KNN)].astype(dtype)  # (bags,n,D)
        w = weights.reshape(-1, HEADS * KNN).astype(dtype)
        return np.einsum("bn,bnd->bd", w, rows).astype(np.float32)

    return read


def _table(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, dim**-0.5, (rows, dim)).astype(np.float32)


def test_a_correct_lookup_reads_every_row_and_passes():
    table = _table(1000, 16)  # not a whole number of bags: the last is padded
    result = sweep_table(TableRead("values", table, _summing(table), HEADS, KNN))
    assert result, result.message
    assert (result.rows, result.rows_read, result.rows_differing) == (1000, 1000, 0)


def test_an_export_whose_unselected_rows_are_zeroed_fails_naming_the_first():
    table = _table(4096, 32)
    selected = np.arange(0, 4096, 37)  # what a golden batch might read
    served = np.zeros_like(table)
    served[selected] = table[selected]
    result = sweep_table(TableRead("values", table, _summing(served), HEADS, KNN))
    assert not result
    assert result.first_bad_row["row"] == 1  # row 0 is selected
    assert result.first_bad_row["expected"] == float(table[1, result.first_bad_row["column"]])
    assert result.first_bad_row["obtained"] == 0.0
    assert result.rows_differing == 4096 - len(selected)  # 32 bags: every one located
    assert f"{4096 - len(selected):,} of 4,096 rows differ" in result.message


@pytest.mark.parametrize("shared", [False, True], ids=["sums-per-chunk", "sums-stored"])
def test_rows_scaled_by_1_001_at_a_block_boundary_and_at_the_last_row_fail(shared, tmp_path):
    table = _table(257 * 257, 64)  # 66,049 rows: past the 65,536-row block
    served = table.copy()
    served[65536] *= np.float32(1.001)
    served[-1] *= np.float32(1.001)
    store = tmp_path if shared else None
    if shared:  # a correct path first: it stores the reference's bag sums, the next one reads them
        assert sweep_table(TableRead("values", table, _summing(table), HEADS, KNN), store)
        assert len(list(tmp_path.glob("bag-sums-values-fp32-*.npy"))) == 1
    result = sweep_table(TableRead("values", table, _summing(served), HEADS, KNN), store)
    assert not result
    assert result.rows_differing == 2 and result.rows_differing_exact
    assert result.first_bad_row["row"] == 65536
    assert "65,536" in result.message


def test_stored_bag_sums_are_kept_apart_by_precision(tmp_path):
    table = _table(1000, 16)
    assert sweep_table(TableRead("values", table, _summing(table), HEADS, KNN), tmp_path)
    stored = np.asarray(table.astype(np.float16), np.float32)
    fp16 = TableRead("values", table, _summing(stored), HEADS, KNN, "fp16", reduced=True)
    assert sweep_table(fp16, tmp_path)  # not judged against the float32 sums
    assert sorted(p.name.split("-")[3] for p in tmp_path.glob("bag-sums-*.npy")) == ["fp16", "fp32"]
    # and a float32 path serving the fp16 rows still fails against the stored float32 sums
    assert not sweep_table(TableRead("values", table, _summing(stored), HEADS, KNN), tmp_path)


def test_too_many_differing_bags_give_a_lower_bound():
    table = _table(HEADS * KNN * (LOCATE_BAGS + 8), 8)
    result = sweep_table(TableRead("values", table, _summing(np.zeros_like(table)), HEADS, KNN))
    assert not result and not result.rows_differing_exact
    assert result.bags_differing == LOCATE_BAGS + 8
    assert "at least" in result.message


def test_a_nan_row_fails():
    table = _table(512, 8)
    served = table.copy()
    served[300, 2] = np.nan
    result = sweep_table(TableRead("values", table, _summing(served), HEADS, KNN))
    assert not result and result.first_bad_row["row"] == 300


@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8"])
def test_a_correct_reduced_precision_lookup_passes(precision):
    from conformance.sweep import expected_rows

    table = _table(2048, 32)
    stored = expected_rows(table, precision).astype(np.float32)
    result = sweep_table(TableRead("values", table, _summing(stored), HEADS, KNN, precision, reduced=True))
    assert result, result.message


def test_an_int8_table_with_one_rows_scale_wrong_fails_naming_the_row():
    table = _table(2048, 32)
    codes, scale, offset = quantize_rows(table)
    scale[1500] *= np.float32(1.02)  # one row's scale written wrong
    served = codes.astype(np.float32) * scale[:, None] + offset[:, None]
    result = sweep_table(TableRead("values", table, _summing(served), HEADS, KNN, "int8", reduced=True))
    assert not result
    assert result.rows_differing == 1 and result.first_bad_row["row"] == 1500


def test_a_float32_row_off_by_one_ulp_is_found_once_its_bag_is_read_slot_by_slot():
    """Float32 rows are judged exactly when located: a bag flagged for any reason names
    every row that is not bit for bit the reference's."""
    table = _table(256, 8)
    served = table.copy()
    served[7] = np.float32(0.5)  # far off: flags the bag
    served[9, 0] = np.nextafter(served[9, 0], np.float32(1))  # one ulp, in the same bag
    result = sweep_table(TableRead("values", table, _summing(served), HEADS, KNN))
    assert result.rows_differing == 2 and result.first_bad_row["row"] == 7


def test_an_onnx_export_with_its_unselected_rows_zeroed_fails_on_onnx_runtime(tmp_path):
    """The defect that passed a run before the sweep: the torch-fast export of a case with
    every value row its golden batch does not select set to zero, run by ONNX Runtime."""
    import onnx
    from onnx import numpy_helper

    from conformance.cases import default_cases_dir, load_case
    from conformance.export import export
    from conformance.paths import CaseContext, get_path
    from conformance.sweep import sweep_path

    case = load_case(default_cases_dir() / "tiny.toml")
    path = export(case.spec, "torch-fast", tmp_path, tapped=True).path
    context = CaseContext(case, export_dir=tmp_path)
    ort = get_path("ort-cpu[torch-fast]")
    taps = ort.prepare(context)(case.make_input())
    (tables, why) = sweep_path(ort, context)
    assert tables and all(tables), why
    model = onnx.load(str(path))
    table = context.weights["values.weight"]
    keep = np.unique(taps["indices"])
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.shape == table.shape:
            zeroed = np.zeros_like(array)
            zeroed[keep] = array[keep]
            init.CopyFrom(numpy_helper.from_array(zeroed, init.name))
    onnx.save(model, str(path))
    context = CaseContext(case, export_dir=tmp_path)  # the changed file, as a run would find it
    still = ort.prepare(context)(case.make_input())
    np.testing.assert_array_equal(still["output"], taps["output"])  # the golden batch cannot see it
    (tables, why) = sweep_path(ort, context)
    assert len(tables) == 1 and not tables[0]
    assert tables[0].rows_differing == len(table) - len(keep)
    assert tables[0].first_bad_row["row"] == int(np.setdiff1d(np.arange(len(table)), keep)[0])
