"""facebookresearch/memory consolidated checkpoints: a small one written here in their layout
(``consolidated/consolidated.pth`` with ``["model"]``, ``params.json`` beside it), read by
:func:`pkm_models.checkpoint.read_checkpoint`, and the model it gives checked against
their forward, written out in this test from the formulas of their ``HashingMemory``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pkm_models.checkpoint import read_checkpoint
from pkm_models.convert import ConversionError
from pkm_models.torch_pkm import build_torch_model

HEADS, N_KEYS, HALF, DIM, KNN = 4, 16, 4, 32, 4
MEMORY_LAYERS = (1, 3, 5)


def _state(seed=0, gated=False, shared=True, bf16=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    table = r(N_KEYS**2, DIM, scale=DIM**-0.5)
    table = table.bfloat16() if bf16 else table
    state = {"tok_embeddings.weight": r(10, DIM)}
    for i in range(6):
        p = f"layers.{i}.feed_forward."
        if i not in MEMORY_LAYERS:  # an ordinary feed-forward block
            state[p + "w1.weight"] = r(8, DIM)
            continue
        state[p + "keys"] = r(2 * HEADS * N_KEYS, HALF, scale=HALF**-0.5)
        state[p + "values.weight"] = table if shared else r(N_KEYS**2, DIM).bfloat16()
        state[p + "query_proj.query_mlps.0.weight"] = r(HEADS * 2 * HALF, DIM, scale=DIM**-0.5)
        state[p + "query_proj.query_mlps.0.bias"] = r(HEADS * 2 * HALF, scale=0.1)
        state[p + "value_proj.weight"] = r(DIM, DIM, scale=DIM**-0.5)
        state[p + "value_proj.bias"] = r(DIM, scale=0.1)
        state[p + "swilu_projection.weight"] = r(DIM, DIM, scale=DIM**-0.5)
        state[p + "swilu_projection.bias"] = r(DIM, scale=0.1)
        if gated:
            state[p + "gating.weight"] = r(1, DIM, scale=DIM**-0.5)
            state[p + "gating.bias"] = r(1, scale=0.1)
    return state


def _write(tmp_path, state, params=None):
    folder = tmp_path / "consolidated"
    folder.mkdir()
    torch.save({"model": state, "optim": {}}, folder / "consolidated.pth")
    if params is not None:
        (folder / "params.json").write_text(json.dumps({"model": {"productkey_args": params}}))
    return folder / "consolidated.pth"


def _theirs(state, i, x, gated=False):
    """Their HashingMemory.forward (eval, float32 but for the table), from their formulas."""
    p = f"layers.{i}.feed_forward."
    bs = x.shape[0]
    query = F.linear(x, state[p + "query_proj.query_mlps.0.weight"], state[p + "query_proj.query_mlps.0.bias"])
    query = query.view(bs, HEADS, 2 * HALF)
    keys = state[p + "keys"].view(HEADS, 2, -1, HALF)
    s1 = torch.einsum("blh,lkh->blk", query[:, :, :HALF], keys[:, 0])
    s2 = torch.einsum("blh,lkh->blk", query[:, :, HALF:], keys[:, 1])
    s1, i1 = s1.topk(KNN, dim=2)
    s2, i2 = s2.topk(KNN, dim=2)
    all_s = (s1[..., :, None] + s2[..., None, :]).view(bs, HEADS, -1)
    all_i = (i1[..., :, None] * N_KEYS + i2[..., None, :]).view(bs, HEADS, -1)
    scores, best = all_s.topk(KNN, dim=2)
    indices = all_i.gather(2, best)
    weights = F.softmax(scores.float(), dim=-1)
    table = state[p + "values.weight"]
    read = F.embedding_bag(indices.view(bs, -1), table.float(), per_sample_weights=weights.view(bs, -1), mode="sum")
    read = read.bfloat16().float() if table.dtype == torch.bfloat16 else read
    swilu = F.linear(x, state[p + "swilu_projection.weight"], state[p + "swilu_projection.bias"])
    out = F.linear(read * F.silu(swilu), state[p + "value_proj.weight"], state[p + "value_proj.bias"])
    if gated:
        out = torch.sigmoid(F.linear(x, state[p + "gating.weight"], state[p + "gating.bias"])) * out
    return indices.view(bs * HEADS, KNN), out


@pytest.mark.parametrize("gated", [False, True])
def test_reads_their_layout_and_computes_their_layer(tmp_path, gated):
    state = _state(gated=gated)
    path = _write(tmp_path, state, {"layers": "1,3,5", "mem_knn": KNN, "mem_gated": gated, "swilu_projection": True})
    ckpt = read_checkpoint(path)
    assert ckpt.format == "meta"
    assert ckpt.memories == ("1", "3", "5")
    c = ckpt.config
    assert (c.heads, c.n_keys, c.k_dim, c.knn, c.input_dim, c.output_dim) == (HEADS, N_KEYS, 2 * HALF, KNN, DIM, DIM)
    assert (c.swilu_projection, c.gated, c.value_dtype, c.share_values, c.value_dim) == (
        True,
        gated,
        "bfloat16",
        True,
        0,
    )
    # their flat keys are XLM's (heads, 2, n_keys, half) in the same memory order
    flat = state["layers.3.feed_forward.keys"].numpy()
    np.testing.assert_array_equal(ckpt.weights[1]["keys"].reshape(flat.shape), flat)
    model = build_torch_model(c, 3, weights=ckpt.stacked_weights()).eval()
    x = torch.randn(6, DIM, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        taps = model(x, return_taps=True)
    h = x
    for k, i in enumerate(MEMORY_LAYERS):  # applied one after the other
        indices, out = _theirs(state, i, h, gated)
        np.testing.assert_array_equal(taps[f"{k}/indices"].numpy(), indices.numpy())
        np.testing.assert_allclose(taps[f"{k}/layer_output"].numpy(), out.numpy(), rtol=2e-2, atol=2e-3)
        h = taps[f"{k}/layer_output"]


def test_shared_aliases_are_one_table_held_once(tmp_path):
    ckpt = read_checkpoint(_write(tmp_path, _state(), {"mem_knn": KNN}))
    tables = [w["values.weight"] for w in ckpt.weights]
    assert all(t is tables[0] for t in tables)
    assert any("held once" in n for n in ckpt.notes)


def test_picked_by_index_without_params(tmp_path):
    ckpt = read_checkpoint(_write(tmp_path, _state()), knn=KNN, memories=["5", "1"])
    assert ckpt.memories == ("5", "1")
    with pytest.raises(ConversionError, match=r"no memory '2'; available: \['1', '3', '5'\]"):
        read_checkpoint(ckpt.path, knn=KNN, memories=["2"])
    with pytest.raises(ConversionError, match=r"knn .* is not recorded"):
        read_checkpoint(ckpt.path)


def test_layers_given_as_a_list_of_numbers_is_read_as_the_string_would_be(tmp_path):
    ckpt = read_checkpoint(_write(tmp_path, _state(), {"mem_knn": KNN, "layers": [1, 3, 5]}))
    assert ckpt.memories == ("1", "3", "5")


def test_unshared_tables_stay_per_layer(tmp_path):
    ckpt = read_checkpoint(_write(tmp_path, _state(shared=False), {"mem_knn": KNN, "mem_share_values": False}))
    assert not ckpt.config.share_values
    assert ckpt.weights[0]["values.weight"] is not ckpt.weights[1]["values.weight"]


@pytest.mark.parametrize(
    ("params", "change", "message"),
    [
        ({"peer_variant": True}, None, "PEER memory"),
        ({}, "peer", "PEER memory"),
        (
            {"layers": "1,3"},
            None,
            r"productkey_args.layers = '1,3', but the state_dict has memory layers \['1', '3', '5'\]",
        ),
        ({"mem_share_values": True}, "unshare", "mem_share_values is true but"),
        ({"mem_heads": 8}, None, "mem_heads=8 but the tensors have 4"),
        ({"mem_gated": True}, None, "mem_gated=True but the tensors have no gating"),
        ({}, "unknown", r"unknown tensor\(s\) \['extra.weight'\]"),
        # a model that is not the file's: one table float32 among bf16 ones was rounded to bf16
        ({"mem_share_values": False}, "mixed", r"differ in dtype \(layers.1 bfloat16, layers.3 float32"),
        # "true" as a string was read as not declared, "4" as a knn that contradicts 4
        ({"mem_share_values": "true"}, None, r"params.json: productkey_args.mem_share_values must be true or false"),
        ({"mem_knn": "4"}, None, r"params.json: productkey_args.mem_knn must be an integer, got '4'"),
        ({"layers": "all"}, None, r"productkey_args.layers = 'all': expected layer numbers"),
        ({"layers": [1, "x"]}, None, r"productkey_args.layers = \[1, 'x'\]: expected layer numbers"),
        # a knn the tensors cannot have was reported without the file that gave it
        ({"mem_knn": 1000}, None, r"cannot select 1000 of only n_keys=16 sub-keys.*\(knn=1000 from .*params.json\)"),
        # these gave a raw ZeroDivisionError or ValueError, or made a 64 GiB array
        ({}, "keys-0-columns", r"keys: expected a matrix with no empty dimension, got shape \[32, 0\]"),
        ({}, "query-0-rows", r"query_mlps.0.weight: expected a matrix with no empty dimension, got shape \[0, 32\]"),
        ({}, "query-1-d", r"query_mlps.0.weight: expected a matrix with no empty dimension, got shape \[32\]"),
        ({}, "values-1-d", r"values.weight: expected a matrix with no empty dimension, got shape \[256\]"),
        ({}, "stride-0", r"declares 17,179,869,184 elements of shape \[131072, 131072\] but the file holds 1"),
    ],
)
def test_refusals_name_the_problem(tmp_path, params, change, message):
    state = _state(shared=change not in ("unshare", "mixed", "values-1-d", "stride-0"))
    bad = {
        "keys-0-columns": ("keys", torch.zeros(32, 0)),
        "query-0-rows": ("query_proj.query_mlps.0.weight", torch.zeros(0, 32)),
        "query-1-d": ("query_proj.query_mlps.0.weight", torch.zeros(32)),
        "values-1-d": ("values.weight", torch.zeros(256, dtype=torch.bfloat16)),
        "stride-0": ("values.weight", torch.zeros(1, dtype=torch.bfloat16).expand(1 << 17, 1 << 17)),
    }
    if change in bad:
        name, tensor = bad[change]
        state[f"layers.1.feed_forward.{name}"] = tensor
    if change == "mixed":
        state["layers.3.feed_forward.values.weight"] = state["layers.3.feed_forward.values.weight"].float()
    if change == "peer":
        state["layers.1.feed_forward.values_u.weight"] = state.pop("layers.1.feed_forward.values.weight")
    if change == "unknown":
        state["layers.3.feed_forward.extra.weight"] = torch.zeros(2)
    path = _write(tmp_path, state, {"mem_knn": KNN, **params})
    with pytest.raises(ConversionError, match=message):
        read_checkpoint(path)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("[1, 2]", "must be a JSON object"),
        ('{"model": [1]}', "must be a JSON object"),
        ("DIR", "regular JSON file, not a folder"),
        # these hung, read until memory ran out, or read 1 GB whole
        ("FIFO", "a FIFO, where a regular file is expected"),
        ("ZERO", "a character device, where a regular file is expected"),
        ("HUGE", "1,073,741,824 bytes; a file of this kind is at most"),
        ("DEEP", "nested too deeply to be read"),
    ],
)
def test_params_that_are_not_an_object_are_refused_not_ignored(tmp_path, params, message):
    import os

    path = _write(tmp_path, _state(), None)
    file = path.parent / "params.json"
    if params == "DIR":
        file.mkdir()
    elif params == "FIFO":
        os.mkfifo(file)
    elif params == "ZERO":
        file.symlink_to("/dev/zero")
    elif params == "DEEP":
        file.write_text("[" * 100000 + "]" * 100000)
    elif params == "HUGE":
        with open(file, "wb") as f:
            f.truncate(1 << 30)  # sparse: no disk used
    else:
        file.write_text(params)
    with pytest.raises(ConversionError, match=message):
        read_checkpoint(path)


def test_loading_executes_nothing(tmp_path):
    """Their dict is read by the weights-only loader: a pickled object is refused."""
    folder = tmp_path / "consolidated"
    folder.mkdir()
    torch.save({"model": _state(), "args": torch.nn.Identity()}, folder / "consolidated.pth")
    with pytest.raises(ConversionError, match="weights-only loader"):
        read_checkpoint(folder / "consolidated.pth", knn=KNN)
