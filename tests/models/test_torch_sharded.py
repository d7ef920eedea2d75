"""A value table sharded over a gloo group of processes reads what the unsharded table
reads: every tap of every process's tokens, put back in token order, equals the reference's
(XLM's layer, and Meta's memory layers: one bf16 table shared by three SwiLU layers), also
when the value dim does not divide by the processes or a process has no token."""

from __future__ import annotations

import datetime
import itertools
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pkm_models.config import PKMConfig
from pkm_models.torch_pkm import build_torch_model
from pkm_models.torch_sharded import (
    ColumnShardedValues,
    build_sharded_model,
    column_bounds,
    shard_values,
    token_bounds,
)
from pkm_models.weights import make_weights

TINY = PKMConfig(input_dim=16, output_dim=8, k_dim=8, heads=2, knn=4, n_keys=8)
META = PKMConfig(
    input_dim=12, output_dim=12, k_dim=8, heads=2, knn=4, n_keys=8,
    swilu_projection=True, value_dtype="bfloat16", share_values=True,
)  # fmt: skip


def test_column_bounds_cover_every_column_once_in_order():
    assert column_bounds(8, 2) == [(0, 4), (4, 8)]
    assert column_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert column_bounds(1, 2) == [(0, 1), (1, 1)]  # a process may hold none
    for v, n in [(768, 8), (5, 4), (3, 3)]:
        bounds = column_bounds(v, n)
        assert bounds[0][0] == 0 and bounds[-1][1] == v
        assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    assert token_bounds(15, 2) == [(0, 8), (8, 15)]
    assert token_bounds(1, 2) == [(0, 1), (0, 1)]  # fewer tokens than processes: all read all


def _rank(rank, world, rendezvous, config_dict, layers, x, out):
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    torch.set_num_threads(1)
    config = PKMConfig.from_dict(config_dict)
    if config.share_values:  # how a sharded path builds it: the tables never whole
        weights = make_weights(config, 3, layers=layers)
        model = build_sharded_model(config, layers, weights, lambda name, a, b: weights[name][:, a:b].copy()).eval()
    else:
        model = build_torch_model(config, layers, seed=3).eval()
        shard_values(model)
    tables = {id(m) for m in model.modules() if isinstance(m, ColumnShardedValues)}
    shapes = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, ColumnShardedValues)]
    flat = x.reshape(-1, x.shape[-1])
    start, stop = token_bounds(flat.shape[0], world)[rank]
    with torch.inference_mode():
        taps = model(torch.from_numpy(np.ascontiguousarray(flat[start:stop])), return_taps=True)
    np.savez(out, **{k: v.float().numpy() for k, v in taps.items()}, tables=len(tables), shape=shapes[0])
    dist.barrier()  # no process closes its connections while another still reads from them
    dist.destroy_process_group()


def _sharded(config, layers, x, world):
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"{r}.npz" for r in range(world)]
        rendezvous = Path(tmp) / "rendezvous"
        mp.start_processes(
            _rank_entry,
            args=(world, str(rendezvous), config.to_dict(), layers, x, [str(o) for o in outs]),
            nprocs=world,
            start_method="spawn",
        )
        parts = [dict(np.load(o)) for o in outs]
    return parts


def _rank_entry(rank, world, rendezvous, config_dict, layers, x, outs):
    _rank(rank, world, rendezvous, config_dict, layers, x, outs[rank])
    # Its taps are written and its group is ended: leave without the interpreter's
    # finalisation, where gloo's threads have aborted a process now and then ("terminate
    # called without an active exception", 2 full-suite runs of about 8), after the test's work.
    os._exit(0)


@pytest.mark.parametrize(
    ("config", "layers", "shape", "world"),
    [
        (TINY, 1, (3, 5, 16), 2),
        (TINY, 1, (1, 1, 16), 2),  # one token: both processes read it
        (TINY.replace(output_dim=7), 1, (2, 3, 16), 3),  # 7 columns over 3 processes
        (META, 3, (2, 5, 12), 2),  # one bf16 table, shared by three SwiLU layers
    ],
    ids=["tiny", "one-token", "uneven", "memory-layers"],
)
def test_sharded_taps_equal_the_unsharded_reference(config, layers, shape, world):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    reference = build_torch_model(config, layers, seed=3).eval()
    with torch.inference_mode():
        expected = {k: v.float().numpy() for k, v in reference(torch.from_numpy(x), return_taps=True).items()}
    parts = _sharded(config, layers, x, world)
    starts = [a for a, _ in column_bounds(config.v_dim, world)]
    for rank, part in enumerate(parts):
        stop = column_bounds(config.v_dim, world)[rank][1]
        assert tuple(part["shape"]) == (config.size, stop - starts[rank])  # only its columns
        assert int(part["tables"]) == 1  # a shared table stays one shard
    tokens = int(np.prod(shape[:-1]))
    for name, want in expected.items():
        got = np.concatenate([p[name] for p in (parts if tokens >= world else parts[:1])], axis=0)
        if name.endswith("output"):
            got = got.reshape(want.shape)
        if want.dtype.kind == "i" or name.endswith("indices"):
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:  # a narrower slice may round a vectorised kernel's tail differently
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=name)
