import numpy as np
import pytest

from pkm_models import convert, get_preset, make_weights
from pkm_models.checkpoint import read_checkpoint
from pkm_models.convert import (
    ConversionError,
    check_weights,
    convert_checkpoint,
    get_keras_weights,
    infer_config,
    keras_to_torch,
    save_checkpoint,
    set_keras_weights,
    split_layers,
    torch_to_keras,
)
from pkm_models.errors import PKMError
from pkm_models.keras_pkm import build_keras_model
from pkm_models.torch_pkm import HashingMemory, PKMStack

TINY = get_preset("tiny").config
SQUARE = TINY.replace(output_dim=TINY.input_dim, query_batchnorm=True)


def test_torch_keras_names_round_trip():
    w = make_weights(SQUARE, 0)
    k = torch_to_keras(w)
    assert k["query_kernel"].shape == w["query_proj.0.weight"].shape[::-1]
    back = keras_to_torch(k)
    assert set(back) == set(w)
    for name in w:
        np.testing.assert_array_equal(back[name], w[name])


def test_keras_model_weights_round_trip():
    w = make_weights(SQUARE, 1, layers=3)
    model = build_keras_model(SQUARE, layers=3, seed=None)
    set_keras_weights(model, w)
    got = get_keras_weights(model)
    assert set(got) == set(w)
    for name in w:
        np.testing.assert_array_equal(got[name], w[name])


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("chain", [(".pt", ".keras", ".npz", ".pth"), (".npz", ".keras", ".pt")])
def test_checkpoint_conversion_chain_is_lossless(tmp_path, layers, chain):
    config = SQUARE.replace(knn=3)
    w = make_weights(config, 2, layers=layers)
    first = tmp_path / f"c0{chain[0]}"
    save_checkpoint(w, first, config)
    src = first
    for i, suffix in enumerate(chain[1:], start=1):
        dst = tmp_path / f"c{i}{suffix}"
        got = convert_checkpoint(src, dst, knn=3)
        assert got.config == config
        src = dst
    loaded = read_checkpoint(src, knn=3).stacked_weights()
    assert set(loaded) == set(w)
    for name in w:
        np.testing.assert_array_equal(loaded[name], w[name])


def test_keras_checkpoint_keeps_knn(tmp_path):
    config = SQUARE.replace(knn=3)
    save_checkpoint(make_weights(config, 0), tmp_path / "m.keras", config)
    assert read_checkpoint(tmp_path / "m.keras").config == config


def test_torch_checkpoint_loads_into_the_reference(tmp_path):
    import torch

    save_checkpoint(make_weights(SQUARE, 0, layers=2), tmp_path / "s.pt", SQUARE)
    stack = PKMStack(SQUARE, 2)
    stack.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))


def test_missing_extra_and_misshapen_tensors_are_each_named():
    w = make_weights(TINY, 0)
    del w["keys"]
    w["values.weight"] = w["values.weight"][:, :3]
    w["bogus"] = np.zeros(1, np.float32)
    layer = HashingMemory(**TINY.to_dict())
    with pytest.raises(ConversionError) as err:
        layer.load_weights(w)
    msg = str(err.value)
    assert "missing ['keys']" in msg
    assert "unexpected ['bogus']" in msg
    assert "values.weight: expected shape (64, 8), got (64, 3)" in msg


def test_keras_side_errors():
    w = make_weights(TINY, 0)
    with pytest.raises(ConversionError, match="not built"):
        set_keras_weights(build_keras_model(TINY, seed=None).layers[0].__class__.from_pkm_config(TINY), w)
    model = build_keras_model(TINY, seed=None)
    with pytest.raises(ConversionError, match="weights hold 2 layer"):
        set_keras_weights(model, make_weights(SQUARE, 0, layers=2))
    w["keys"] = w["keys"][:1]
    with pytest.raises(ConversionError, match=r"keys: expected shape \(2, 2, 8, 4\), got \(1, 2, 8, 4\)"):
        set_keras_weights(model, w)
    with pytest.raises(ConversionError, match="unexpected tensor 'bogus'"):
        torch_to_keras({"bogus": np.zeros(1)})


def test_infer_config_and_split_errors():
    config, layers = infer_config(make_weights(SQUARE, 0, layers=2), knn=3)
    assert (config, layers) == (SQUARE.replace(knn=3), 2)
    with pytest.raises(ConversionError, match="no 'keys'"):
        infer_config({"query_proj.0.weight": np.zeros((2, 2)), "values.weight": np.zeros((4, 2))}, knn=1)
    with pytest.raises(ConversionError, match=r"must all be named layers.<i>.<name>; found \['keys'\]"):
        split_layers({"layers.0.keys": 1, "keys": 2})
    with pytest.raises(ConversionError, match=r"no tensors for layer\(s\) \[1\]"):
        split_layers({"layers.0.keys": 1, "layers.2.keys": 2})
    with pytest.raises(ConversionError, match="missing"):
        check_weights({}, {"a": (1,)}, "x")


def test_bad_files(tmp_path):
    with pytest.raises(ConversionError, match=r"unknown checkpoint format '\.bin'; known: \['\.pt'"):
        read_checkpoint(tmp_path / "x.bin")
    with pytest.raises(ConversionError, match="no such file"):
        read_checkpoint(tmp_path / "x.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match=r"bad\.pt: not a checkpoint"):
        read_checkpoint(tmp_path / "bad.pt")
    (tmp_path / "bad.keras").write_bytes(b"PK garbage")
    with pytest.raises(PKMError, match=r"bad\.keras"):
        read_checkpoint(tmp_path / "bad.keras")


def _data_pointer(tensor) -> int:
    """Where a TensorFlow tensor's data lives (read through DLPack, without a copy)."""
    import tensorflow as tf

    if tensor.dtype == tf.bfloat16:  # DLPack does not carry bfloat16 to numpy: its bits, not copied
        tensor = tf.bitcast(tensor, tf.uint16)

    class Capsule:
        def __dlpack__(self, **kwargs):
            return tf.experimental.dlpack.to_dlpack(tensor)

        def __dlpack_device__(self):
            return (1, 0)  # CPU

    return np.from_dlpack(Capsule()).ctypes.data


@pytest.mark.parametrize("value_dtype", ["float32", "bfloat16"])
def test_a_large_table_is_read_from_its_file_into_the_variable_it_becomes(tmp_path, monkeypatch, value_dtype):
    """Past ASSIGN_BLOCK_BYTES a table is read from its memory-mapped file in blocks into one
    buffer that the variable adopts: the variable holds the file's values, and reading it
    does not copy it (no slice assign has put it into TensorFlow's copy-on-read mode, where
    every forward pass would copy the whole table)."""
    import tensorflow as tf

    monkeypatch.setattr(convert, "ASSIGN_BLOCK_BYTES", 1024)  # the tiny table: several blocks
    config = TINY.replace(value_dtype=value_dtype)
    weights = make_weights(config, 0)
    np.save(tmp_path / "values.npy", weights["values.weight"])
    weights["values.weight"] = np.load(tmp_path / "values.npy", mmap_mode="c")
    model = build_keras_model(config, seed=None, weights=weights)
    np.testing.assert_array_equal(get_keras_weights(model)["values.weight"], np.load(tmp_path / "values.npy"))
    table = model.layers[0].values.value
    assert _data_pointer(tf.convert_to_tensor(table)) == _data_pointer(tf.convert_to_tensor(table))
