"""The sharded path ``torch-dist-cpu[N]``: judged against the same unsharded goldens as
every other path, it passes on XLM's layer, a network and Meta's memory layers (one bf16
table shared by three layers); a wrong shard fails at the read; a process that fails is the
path's error, and the next run starts a fresh group."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from conformance.cases import load_cases
from conformance.compare import judge
from conformance.golden import GoldenStore
from conformance.paths import PATH_NAMES, CaseContext, PathUnavailable, get_path, select_paths
from conformance.paths.dist_paths import DistPath, GroupFailed, parse_name
from conformance.spec import write_weights_dir
from conformance.tolerances import load_policy
from pkm_models.torch_sharded import column_bounds

REPO = Path(__file__).resolve().parents[3]
CASES_DIR = REPO / "conformance" / "cases"
STORE = GoldenStore(REPO / "golden")
POLICY = load_policy(REPO / "golden" / "tolerances.toml", PATH_NAMES, [p.stem for p in CASES_DIR.glob("*.toml")])


def _case(name):
    (case,) = load_cases(CASES_DIR, [name])
    return case


def _verdict(path, case_name, weights_dir: Path):
    case = _case(case_name)
    golden = STORE.read(case_name)
    context = CaseContext(case, weights_dir=weights_dir)
    got = path.prepare(context)(golden.input)
    return judge(path.name, case, got, golden, golden.weights, POLICY, seconds=None)


@pytest.fixture(scope="module")
def weights_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    return {name: write_weights_dir(_case(name).spec.weights(), root / name) for name in ("tiny", "memory-layers")}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case_name", ["tiny", "memory-layers"])
def test_the_sharded_reference_passes_on_the_unsharded_golden(case_name, world, weights_dirs):
    result = _verdict(DistPath("cpu", world), case_name, weights_dirs[case_name])
    assert result.status == "pass", result.reason


@pytest.mark.parametrize("case_name", ["tiny", "memory-layers"])
def test_a_wrong_shard_fails_at_the_read(case_name, weights_dirs, tmp_path):
    """The second process's columns of every table come from the wrong rows (shifted by
    one): the first process's half of the read stays right, the verdict must still fail."""
    bad = Path(shutil.copytree(weights_dirs[case_name], tmp_path / "bad"))
    config = _case(case_name).config
    start, stop = column_bounds(config.v_dim, 2)[1]
    for table in bad.glob("*values.weight.npy"):
        values = np.load(table)
        values[:, start:stop] = np.roll(values[:, start:stop], 1, axis=0)
        np.save(table, values)
    result = _verdict(DistPath("cpu", 2), case_name, bad)
    assert result.status == "fail", result.reason
    read = "output" if case_name == "tiny" else "0/output"
    assert result.first_divergence == read, result.reason


def test_a_failing_process_is_the_paths_error_and_the_next_run_starts_afresh(weights_dirs, tmp_path):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    path = DistPath("cpu", 2)
    with pytest.raises(GroupFailed, match=r"rank \d of 2 on 'load': .*"):
        path.prepare(CaseContext(_case("tiny"), weights_dir=empty))
    assert _verdict(path, "tiny", weights_dirs["tiny"]).status == "pass"


def test_a_process_that_dies_ends_its_group_at_once_and_the_path_starts_another(weights_dirs):
    """Rank 1 is killed: rank 0 then waits for it in a collective. The group must end both
    within seconds (not after a time-out of minutes), name the dead one, and the path's next
    run must start a fresh group, leaving no process of the old one behind."""
    path = DistPath("cpu", 2)
    context = CaseContext(_case("tiny"), weights_dir=weights_dirs["tiny"])
    run = path.prepare(context)
    group = run.__self__
    old = list(group._procs)
    os.kill(old[1].pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(GroupFailed, match=r"rank 1 of 2 died"):
        run(STORE.read("tiny").input)
    assert time.monotonic() - started < 30
    assert all(p.poll() is not None for p in old)  # rank 0 ended too
    assert _verdict(path, "tiny", weights_dirs["tiny"]).status == "pass"


def test_the_taps_have_the_references_shapes_for_any_input_rank(weights_dirs):
    import torch

    case = _case("tiny")
    reference = case.spec.torch_model(case.spec.weights())
    run = DistPath("cpu", 2).prepare(CaseContext(case, weights_dir=weights_dirs["tiny"]))
    rng = np.random.default_rng(0)
    for shape in [(16,), (5, 16), (2, 3, 16), (2, 1, 3, 16)]:
        x = rng.standard_normal(shape).astype(np.float32)
        with torch.inference_mode():
            want = {k: v.numpy() for k, v in reference(torch.from_numpy(x), return_taps=True).items()}
        got = run(x)
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}, shape
        np.testing.assert_allclose(got["output"], want["output"], rtol=1e-6, atol=1e-7)


def test_more_processes_than_columns_is_unavailable():
    with pytest.raises(PathUnavailable, match="cannot split the 8 columns of a value row over 9 processes"):
        DistPath("cpu", 9).check(_case("tiny"))


def test_any_n_by_its_name():
    assert parse_name("torch-dist-cpu[4]") == ("cpu", 4)
    assert parse_name("torch-dist-cuda[8]") == ("cuda", 8)
    assert parse_name("torch-dist-cpu[0]") is None and parse_name("torch-dist-tpu[2]") is None
    assert get_path("torch-dist-cpu[4]").name == "torch-dist-cpu[4]"
    assert [p.name for p in select_paths(["torch-dist-cpu[4]"])] == ["torch-dist-cpu[4]"]
    assert "torch-dist-cpu[2]" in PATH_NAMES and "torch-dist-cuda[2]" in PATH_NAMES


def test_cuda_needs_a_device_per_process():
    import torch

    if torch.cuda.device_count() >= 64:
        pytest.skip("this machine has 64 CUDA devices")
    with pytest.raises(PathUnavailable, match=r"(CUDA devices|no CUDA|NCCL)"):
        DistPath("cuda", 64).check(None)
