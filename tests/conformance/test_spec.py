"""The weights folder: a table read by columns, in blocks, equals the same columns of the
array, whatever the block size; a file that is not a 2-D float32 table is refused."""

from __future__ import annotations

import numpy as np
import pytest

from conformance.spec import read_columns, read_weights_dir, write_weights_dir


@pytest.mark.parametrize("block_bytes", [1, 40, 1 << 20])
@pytest.mark.parametrize(("start", "stop"), [(0, 5), (2, 4), (3, 3), (0, 0)])
def test_columns_read_in_blocks_are_the_arrays_columns(tmp_path, block_bytes, start, stop):
    table = np.random.default_rng(0).standard_normal((13, 5)).astype(np.float32)
    folder = write_weights_dir({"values.weight": table}, tmp_path)
    got = read_columns(folder / "values.weight.npy", start, stop, block_bytes=block_bytes)
    np.testing.assert_array_equal(got, table[:, start:stop])
    np.testing.assert_array_equal(read_weights_dir(folder)["values.weight"], table)


def test_what_is_not_a_float32_table_is_refused(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 4), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((2, 3), np.float64))
    for name in ("a", "b"):
        with pytest.raises(ValueError, match="columns"):
            read_columns(tmp_path / f"{name}.npy", 0, 1)
    np.save(tmp_path / "c.npy", np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="columns 2:4"):
        read_columns(tmp_path / "c.npy", 2, 4)
    data = (tmp_path / "c.npy").read_bytes()
    (tmp_path / "d.npy").write_bytes(data[:-4])
    with pytest.raises(ValueError, match="shorter"):
        read_columns(tmp_path / "d.npy", 0, 3)


def test_a_shared_table_is_one_file_under_every_layers_name(tmp_path):
    import dataclasses
    from pathlib import Path

    from conformance.cases import load_cases

    (case,) = load_cases(Path(__file__).resolve().parents[2] / "conformance" / "cases", ["memory-layers"])
    folder = case.spec.write_weights(tmp_path / "weights")
    tables = [folder / f"layers.{i}.values.weight.npy" for i in range(3)]
    assert len({t.stat().st_ino for t in tables}) == 1 and tables[0].stat().st_nlink == 3
    expected = case.spec.generated_weights()
    spec = dataclasses.replace(case.spec, weights_file=folder, checkpoint=None)
    got = spec.weights()
    assert sorted(got) == sorted(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(got[name], array, err_msg=name)


def test_linked_tensors_are_the_files_and_a_second_attempt_replaces_the_first(tmp_path):
    """A layer's folder links the network's files under the layer's names; linking again
    (after an attempt that failed later, on a full disk) replaces what is there instead of
    failing on it, and a copy-on-write map of a link never writes the network's file."""
    import os

    from conformance.spec import link_weights_dir

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    network = write_weights_dir({"layers.1.values.weight": a}, tmp_path / "network")
    files = {"values.weight": network / "layers.1.values.weight.npy"}
    for _ in range(2):
        folder = link_weights_dir(files, tmp_path / "layer1")
    assert os.path.samefile(folder / "values.weight.npy", files["values.weight"])
    mapped = read_weights_dir(folder, writable=True)["values.weight"]
    mapped[0, 0] = 99
    np.testing.assert_array_equal(np.load(files["values.weight"]), a)
