"""bench judges a sharded path's taps against the unsharded reference's: it conforms on the
tiny preset, and a wrong shard is the path's ``fail``, with the tap where it diverged."""

from __future__ import annotations

import shutil

import numpy as np

from conformance.bench import default_tolerances, get_bench_preset, run_worker
from conformance.bench.worker import judge_against_reference
from conformance.paths import CaseContext
from conformance.paths.dist_paths import DistPath
from conformance.spec import write_weights_dir
from pkm_models.torch_sharded import column_bounds
from pkm_models.weights import make_input

TINY = get_bench_preset("tiny")


def test_a_sharded_path_is_timed_once_judged(tmp_path):
    result = run_worker(TINY, "torch-dist-cpu[2]", 2, 0, tmp_path, timeout=300)
    assert result["status"] == "ok", result.get("reason")
    assert result["judged"] is True and len(result["times_s"]) == 2


def test_a_wrong_shard_is_the_paths_failure(tmp_path):
    case = TINY.case()
    weights = case.spec.weights()
    good = write_weights_dir(weights, tmp_path / "good")
    bad = shutil.copytree(good, tmp_path / "bad")
    start, stop = column_bounds(case.config.v_dim, 2)[1]
    table = np.load(bad / "values.weight.npy")
    table[:, start:stop] = table[::-1, start:stop]  # the second process reads other rows
    np.save(bad / "values.weight.npy", table)
    x = make_input(TINY.input_shape, seed=0)
    request = {"tolerances": str(default_tolerances())}
    path = DistPath("cpu", 2)
    assert judge_against_reference(path, CaseContext(case, weights, weights_dir=good), x, request) == ""
    problem = judge_against_reference(path, CaseContext(case, weights, weights_dir=bad), x, request)
    assert problem.startswith("its taps do not conform to the reference's: first at output:"), problem
