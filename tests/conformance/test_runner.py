"""Proof that the conformance run can fail, and fails at the right place."""

import os
from pathlib import Path

import numpy as np
import pytest

from conformance.compare import compare_taps
from conformance.golden import GoldenError
from conformance.paths import select_paths
from conformance.runner import RunOptions, run_conformance
from conformance.tolerances import parse_policy
from tests.conformance.helpers import rewrite_tap, run_stub
from tests.conftest import HAS_CUDA_DRIVER, is_gpu_path

REPO = Path(__file__).resolve().parents[2]
FAST = ["torch-eager-cpu", "tf-function-cpu", "ort-cpu[torch-fast]"]


def run(project, cases=("tiny",), paths=FAST, policy=None, isolate=False, **kwargs):
    """In-process by default (fast); the isolation tests below ask for processes. Any
    registered path may be named (bench-only variants included)."""
    return run_conformance(
        project.cases(*cases),
        select_paths(list(paths), bench=True),
        project.store,
        policy or project.policy(),
        RunOptions(isolate=isolate, **kwargs),
    )


def statuses(result):
    return {(c.name, p.name): p.status for c in result.cases for p in c.paths}


def test_clean_run_passes_and_gpu_paths_say_why_not(project):
    result = run(project, cases=("tiny", "tiny-bn"), paths=[*FAST, "*cuda*", "*gpu*", "ort-tensorrt*"])
    s = statuses(result)
    assert all(s[("tiny", p)] == "pass" for p in FAST)
    assert result.ok  # on a GPU machine: every GPU path that runs conforms too
    unavailable = [p for c in result.cases for p in c.paths if p.status == "unavailable"]
    assert all(p.reason for p in unavailable)
    assert not any(p.tensors for p in unavailable)  # no CPU results under a GPU name
    if not HAS_CUDA_DRIVER:  # no GPU here: every GPU path says so, with the real reason
        assert {p.name for p in unavailable} >= {p for (_, p) in s if is_gpu_path(p)}
        ort_cuda = next(p for p in unavailable if p.name == "ort-cuda[torch-fast]")
        assert "CUDAExecutionProvider: no NVIDIA driver" in ort_cuda.reason  # the real reason, not a guess


@pytest.mark.gpu
def test_the_cuda_reference_paths_conform_on_a_gpu(project):
    result = run(project, cases=("tiny", "tiny-bn"), paths=["torch-eager-cuda", "ort-cuda[torch-fast]"])
    assert set(statuses(result).values()) == {"pass"}, [(p.name, p.reason) for c in result.cases for p in c.paths]


def test_require_turns_unavailable_into_failure(project, gpu_paths_unavailable):
    result = run(project, paths=["torch-eager-cuda"], require=["torch-*-cuda"])
    (path,) = result.cases[0].paths
    assert path.status == "fail" and "required but unavailable" in path.reason
    assert not result.ok


@pytest.mark.parametrize(("index", "tap"), [(0, "query"), (1, "scores"), (3, "weights"), (4, "output")])
def test_a_corrupted_golden_tensor_fails_at_its_tap(project, index, tap):
    def nudge(a):
        a = a.copy()
        a.flat[3] += 1e-3
        return a

    rewrite_tap(project, "tiny", index, nudge)
    project.store.verify("tiny")  # the hashes are consistent: only the comparison can tell
    result = run(project, paths=FAST)
    for p in result.cases[0].paths:
        assert p.status == "fail", p.name
        assert p.first_divergence == tap
        bad = next(t for t in p.tensors if t.name == tap)
        assert bad.mismatches == 1 and bad.max_abs == pytest.approx(1e-3, rel=1e-2)
        assert "1 of" in bad.message and "differ beyond atol" in bad.message


def test_a_wrong_slot_fails_at_indices(project):
    def swap(a):
        a = a.copy()
        a[0, 0] = (a[0, 0] + 1) % 64
        return a

    rewrite_tap(project, "tiny", 2, swap)
    result = run(project, paths=["torch-eager-cpu"])
    p = result.cases[0].paths[0]
    assert p.status == "fail" and p.first_divergence == "indices"
    assert "without a near-tie" in p.reason


def test_a_tightened_tolerance_fails_the_right_tensor(project):
    policy = parse_policy(
        {"default": {"atol": 1e-5, "rtol": 1e-4}, "path": {"tf-*": {"tap": {"weights": {"atol": 0.0, "rtol": 0.0}}}}},
        "t",
        [p.name for p in select_paths(None)],
        ["tiny", "tiny-bn", "tiny-tie"],
    )
    result = run(project, cases=("tiny-bn",), paths=["torch-eager-cpu", "tf-function-cpu"], policy=policy)
    s = {p.name: p for p in result.cases[0].paths}
    assert s["torch-eager-cpu"].status == "pass"  # bit-identical to its own golden
    tf = s["tf-function-cpu"]
    assert tf.status == "fail" and tf.first_divergence == "weights"
    assert [t.name for t in tf.tensors if not t] == ["weights"]
    weights = next(t for t in tf.tensors if t.name == "weights")
    assert weights.required_atol > 0 and f"an atol of {weights.required_atol:.3g} would pass" in weights.message


_run_stub = run_stub


def test_nan_or_inf_fails(project):
    def poison(taps):
        taps["weights"][1, 2] = np.nan
        taps["output"][0, 0, 0] = np.inf
        return taps

    result, _ = _run_stub(project, "tiny", poison)
    assert result.status == "fail" and result.first_divergence == "weights"
    assert "1 NaN and 0 Inf" in result.reason
    output = next(t for t in result.tensors if t.name == "output")
    assert not output and "0 NaN and 1 Inf" in output.message


def test_shape_and_dtype_mismatches_name_both(project):
    def reshape(taps):
        taps["query"] = taps["query"][:-1]
        taps["indices"] = taps["indices"].astype(np.int32)
        return taps

    result, golden = _run_stub(project, "tiny", reshape)
    q = next(t for t in result.tensors if t.name == "query")
    rows, k = golden.taps["query"].shape
    assert q.message == f"expected float32[{rows}, {k}], got float32[{rows - 1}, {k}]"
    i = next(t for t in result.tensors if t.name == "indices")
    assert "expected int64" in i.message and "got int32" in i.message


def test_a_tie_chosen_the_other_way_is_ambiguous_not_failed(project):
    """tiny-tie duplicates every sub-key: picking the twin of a selected slot is right."""
    case = project.cases("tiny-tie")[0]
    golden = project.store.read("tiny-tie")
    values = golden.weights["values.weight"]
    n_keys, heads, knn = case.config.n_keys, case.config.heads, case.config.knn

    def twin(taps):
        idx = taps["indices"]
        hi, lo = idx // n_keys, idx % n_keys
        taps["indices"] = hi * n_keys + (lo ^ 1)  # the duplicated sub-key's slot: same score
        w = taps["weights"].reshape(-1, heads * knn).astype(np.float64)
        rows = values[taps["indices"].reshape(-1, heads * knn)]
        taps["output"] = np.einsum("bn,bnd->bd", w, rows).astype(np.float32).reshape(taps["output"].shape)
        return taps

    result, _ = _run_stub(project, "tiny-tie", twin)
    assert result.status == "pass", result.reason
    indices = next(t for t in result.tensors if t.name == "indices")
    assert indices.ambiguous_rows > 0 and "selected differently" in indices.message
    output = next(t for t in result.tensors if t.name == "output")
    assert output.ambiguous_rows > 0

    def twin_with_wrong_output(taps):
        taps = twin(taps)
        taps["output"] = taps["output"] + 1e-2  # a different selection, and a wrong sum of it
        return taps

    result, _ = _run_stub(project, "tiny-tie", twin_with_wrong_output)
    assert result.status == "fail" and result.first_divergence == "output"
    assert "weighted sum of the rows they selected" in result.reason


def test_comparison_is_truthy_and_names_first_divergence(project):
    golden = project.store.read("tiny")
    case = project.cases("tiny")[0]
    taps = {k: v.copy() for k, v in golden.taps.items()}
    kwargs = dict(
        config=case.config,
        weights=golden.weights,
        policy=project.policy(),
        case="tiny",
        path="torch-eager-cpu",
    )
    assert compare_taps(taps, golden.taps, **kwargs)
    taps["weights"] = taps["weights"] * 1.01
    bad = compare_taps(taps, golden.taps, **kwargs)
    assert not bad and bad.first_divergence == "weights" and "weights" in bad.errors


def test_missing_or_stale_golden_is_bad_data(project):
    import shutil

    shutil.rmtree(project.store.case_dir("tiny-bn"))
    with pytest.raises(GoldenError, match="no golden for case 'tiny-bn'"):
        run(project, cases=("tiny", "tiny-bn"))
    (project.cases_dir / "tiny.toml").write_text(
        (project.cases_dir / "tiny.toml").read_text().replace("seed = 1", "seed = 2")
    )
    with pytest.raises(GoldenError, match="the case changed since its golden was made"):
        run(project, cases=("tiny",))


def test_a_path_that_crashes_its_process_is_that_paths_error(project, tmp_path, monkeypatch):
    """Every path runs in its own process: a segfault in one is reported with its cause
    and the others' results still come out."""
    import sys

    python = sys.executable
    script = tmp_path / "python"
    script.write_text(
        "#!/bin/sh\n"
        'case "$3" in *\'"path": "tf-function-cpu"\'*) echo "runtime blew up" >&2; kill -SEGV $$;; esac\n'
        f'exec {python} "$@"\n'
    )
    script.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(script))
    result = run(project, paths=FAST, isolate=True, isolation="path")
    s = {p.name: p for p in result.cases[0].paths}
    assert s["tf-function-cpu"].status == "error"
    assert "died of SIGSEGV" in s["tf-function-cpu"].reason and "runtime blew up" in s["tf-function-cpu"].reason
    assert s["torch-eager-cpu"].status == "pass" and s["ort-cpu[torch-fast]"].status == "pass"
    assert not result.ok


CRASHES = """
import os, sys, time

import conformance.paths.tf_paths as tf_paths
import conformance.paths.torch_paths as torch_paths


def planted(cls):
    original = cls.prepare

    def prepare(self, context):
        if self.name == "tf-eager-cpu":  # a runtime that segfaults
            sys.stderr.write("runtime blew up\\n")
            sys.stderr.flush()
            os.kill(os.getpid(), 11)
        if self.name == "torch-eager-cpu[fast]":  # one that hangs
            time.sleep(3600)
        return original(self, context)

    cls.prepare = prepare


planted(tf_paths.TFPath)
planted(torch_paths.TorchPath)
"""


def test_a_crash_or_a_hang_in_a_family_worker_is_that_paths_error(project, tmp_path, monkeypatch):
    """In a family's long-lived worker, a segfault and a time-out are that (case, path)'s
    error; the worker is replaced and the family's next paths pass."""
    (tmp_path / "sitecustomize.py").write_text(CRASHES)  # loaded by every worker process
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    paths = ["torch-eager-cpu", "torch-eager-cpu[fast]", "torch-eager-cpu[fast-bag]", "tf-eager-cpu", "tf-function-cpu"]
    result = run(project, paths=paths, isolate=True, isolation="family", timeout=30, jobs=1)
    s = {p.name: p for p in result.cases[0].paths}
    assert s["tf-eager-cpu"].status == "error"
    assert "died of SIGSEGV" in s["tf-eager-cpu"].reason and "runtime blew up" in s["tf-eager-cpu"].reason
    assert s["torch-eager-cpu[fast]"].status == "error" and "timed out after 30 s" in s["torch-eager-cpu[fast]"].reason
    assert [s[p].status for p in ("torch-eager-cpu", "torch-eager-cpu[fast-bag]", "tf-function-cpu")] == ["pass"] * 3
    assert not result.ok


AGREE = [*FAST, "onnx-reference[keras]", "ort-cpu[torch-fast]@int8", "torch-eager-cuda", "ort-cuda[torch-fast]"]


def assert_same_verdicts(a, b):
    """The same status for every (case, path), and every one a verdict on the path itself:
    two runs that both ``error`` prove nothing."""
    sa, sb = statuses(a), statuses(b)
    assert sa == sb
    assert set(sa.values()) <= {"pass", "fail", "unavailable"}, sa
    assert "pass" in sa.values()
    for ca, cb in zip(a.cases, b.cases, strict=True):
        for pa, pb in zip(ca.paths, cb.paths, strict=True):
            assert [t.name for t in pa.tensors] == [t.name for t in pb.tensors], pa.name
            assert [t.max_abs for t in pa.tensors] == [t.max_abs for t in pb.tensors], pa.name


def test_family_workers_path_processes_and_in_process_agree(project):
    """The three ways of running give the same verdicts, on every family of paths (an
    unavailable CUDA one included); the slow test below compares them on every shipped case."""
    family = run(project, cases=("tiny-bn",), paths=AGREE, isolate=True, isolation="family")
    path = run(project, cases=("tiny-bn",), paths=AGREE, isolate=True, isolation="path")
    in_process = run(project, cases=("tiny-bn",), paths=AGREE, isolate=False)
    assert_same_verdicts(family, path)
    assert_same_verdicts(family, in_process)
    assert statuses(family)[("tiny-bn", "torch-eager-cuda")] == ("pass" if torch_cuda() else "unavailable")


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


NATIVE_VARIANTS = ["torch-eager-cpu[fast]", "torch-eager-cpu[fast-bag]", "tf-function-cpu[einsum]", "tf-xla-cpu"]


def test_native_variants_pass_and_a_corrupted_golden_fails_them_at_its_tap(project):
    """The loop-free torch models run natively, and the Keras port's old default method,
    are checked like every other path: they pass, and a corrupted output golden fails them."""
    assert all(s == "pass" for s in statuses(run(project, paths=NATIVE_VARIANTS)).values())
    rewrite_tap(project, "tiny", 4, lambda a: a + 1e-3)  # output_4: the output tap
    result = run(project, paths=NATIVE_VARIANTS)
    for path in result.cases[0].paths:
        assert path.status == "fail" and path.first_divergence == "output", path.name


@pytest.mark.slow
def test_family_workers_and_path_processes_agree_on_every_shipped_case():
    """The default run (family workers) and one process per path: the same verdict for
    every shipped case and conformance path, networks judged layer by layer included."""
    from pathlib import Path

    from conformance.cases import load_cases
    from conformance.golden import GoldenStore
    from conformance.paths import PATH_NAMES, PATHS
    from conformance.tolerances import load_policy

    repo = Path(__file__).resolve().parents[2]
    store = GoldenStore(repo / "golden")
    cases = load_cases(repo / "conformance" / "cases")
    policy = load_policy(repo / "golden" / "tolerances.toml", PATH_NAMES, [c.name for c in cases])
    both = [
        run_conformance(cases, PATHS, store, policy, RunOptions(isolation=isolation))
        for isolation in ("family", "path")
    ]
    assert_same_verdicts(*both)


def test_progress_estimates_the_time_left_from_the_pace_of_the_paths_that_ran(monkeypatch):
    from conformance import runner
    from conformance.results import PathResult

    clock = iter([0.0, 1.0, 60.0, 70.0, 80.0])  # start, an unavailable path, then three that ran, 10 s apart
    monkeypatch.setattr(runner.time, "monotonic", lambda: next(clock))
    lines = []
    progress = runner._Progress(6, lines.append)
    progress("tiny", PathResult("torch-eager-cuda", "unavailable"), ran=False)
    for name in ("torch-eager-cpu", "tf-eager-cpu", "ort-cpu[keras]"):
        progress("tiny", PathResult(name, "pass"))
    assert lines[0] == "[1/6] tiny torch-eager-cuda: unavailable"
    assert lines[1] == "[2/6] tiny torch-eager-cpu: pass  (1:00 so far)"
    assert lines[3] == "[4/6] tiny ort-cpu[keras]: pass  (1:20 so far, about 0:20 left)"


def test_progress_shows_each_export_built_before_the_paths(monkeypatch):
    """The exports come first and take most of a run with an empty cache: each says so."""
    from conformance import runner

    monkeypatch.setattr(runner.time, "monotonic", iter([0.0, 45.0, 50.0]).__next__)
    lines = []
    progress = runner._Progress(6, lines.append)
    counter = runner._Counter(lambda: 2)
    progress.built("xlm", "torch-script", *counter(), None)
    progress.built("xlm", "torch-fast@bf16", *counter(), "refused")
    assert lines == [
        "[export 1/2] xlm torch-script: ready  (0:45 so far)",
        "[export 2/2] xlm torch-fast@bf16: refused  (0:50 so far)",
    ]


def test_a_networks_layers_are_written_once_and_their_exports_built_before_its_paths(tmp_path):
    """A network judged layer by layer (a reduced-precision ONNX path): each later layer
    alone is one case for every path of the run, with its golden input and weights, so its
    export is one cache entry that the exporter's family builds before the path runs
    (else the ONNX Runtime worker made it itself, importing torch, once per path)."""
    from conformance.cases import load_cases
    from conformance.export.cache import ExportCache, key_material
    from conformance.golden import GoldenStore
    from conformance.paths import CaseContext, get_path
    from conformance.runner import _export_contexts, golden_layer_case
    from pkm_models.convert import split_layers

    case = load_cases(REPO / "conformance" / "cases", ["stack-3"])[0]
    golden = GoldenStore(REPO / "golden").read("stack-3")
    context = CaseContext(case, golden.weights, cache=ExportCache(tmp_path))
    path = get_path("ort-cpu[torch-fast]@fp16")
    contexts = _export_contexts(path, context, golden)
    assert [c.case.spec.name for c in contexts] == ["stack-3", "stack-3#layer1", "stack-3#layer2"]
    assert _export_contexts(get_path("ort-cpu[torch-fast]"), context, golden) == [context]  # judged end to end
    sub, sub_golden = golden_layer_case(context, golden, 2)
    assert golden_layer_case(context, golden, 2)[0] is sub  # written once
    # the worker that runs the layer alone rebuilds its case from the request: the same cache key
    from conformance.paths.worker import _context

    request = {"case": sub.to_json(), "source": str(sub.source), "weights": str(sub.spec.weights_file)}
    request |= {"export_dir": str(tmp_path / "layer2"), "cache_dir": str(tmp_path)}
    in_worker = _context(request)
    assert contexts[2].case.spec.weights_file == sub.spec.weights_file
    assert key_material(in_worker.case.spec, "torch-fast@fp16") == key_material(
        contexts[2].case.spec, "torch-fast@fp16"
    )
    np.testing.assert_array_equal(sub_golden.input, golden.taps["1/output"])
    written = np.load(sub.spec.weights_file / "values.weight.npy")
    np.testing.assert_array_equal(written, split_layers(golden.weights)[2]["values.weight"])
    folder = sub.spec.weights_file.parents[1]
    context.close()
    assert not folder.exists()


def test_a_networks_layers_are_hard_links_to_its_weights_folder(tmp_path):
    """Where the network's weights are a folder of .npy files (every run's own), a layer
    alone gets links to them: the same files, so the run never reads (and so never holds)
    their pages to copy them; its golden weights are mapped from the links."""
    from conformance.cases import load_cases
    from conformance.golden import GoldenStore
    from conformance.paths import CaseContext
    from conformance.runner import golden_layer_case
    from conformance.spec import read_weights_dir, write_weights_dir

    case = load_cases(REPO / "conformance" / "cases", ["stack-3"])[0]
    golden = GoldenStore(REPO / "golden").read("stack-3")
    folder = write_weights_dir(golden.weights, tmp_path / "network")
    context = CaseContext(case, read_weights_dir(folder), weights_dir=folder)
    sub, sub_golden = golden_layer_case(context, golden, 1)
    for name in ("values.weight", "keys", "query_proj.0.weight"):
        assert os.path.samefile(sub.spec.weights_file / f"{name}.npy", folder / f"layers.1.{name}.npy")
        assert isinstance(sub_golden.weights[name], np.memmap) and sub_golden.weights[name].flags.writeable
        np.testing.assert_array_equal(sub_golden.weights[name], golden.weights[f"layers.1.{name}"])
    context.close()
    assert (folder / "layers.1.values.weight.npy").is_file()  # the network's own files stay


def test_the_sharded_family_runs_one_path_at_a_time_beside_the_others():
    """One worker drives the run's one group of rank processes: two sharded paths never run
    at once, while the other families' paths use the other thread."""
    import collections
    import threading
    import time

    from conformance import runner

    active, most, overlapped = collections.Counter(), collections.Counter(), []
    lock = threading.Lock()

    def work(family):
        def run():
            with lock:
                active[family] += 1
                most[family] = max(most[family], active[family])
                overlapped.append(dict(active))
            time.sleep(0.2)
            with lock:
                active[family] -= 1

        return run

    tasks = [runner._Task(f, work(f)) for f in ["dist"] * 3 + ["torch"] * 3]
    retired = []
    runner._run_tasks(tasks, 2, type("Pool", (), {"retire": staticmethod(retired.append)})())
    assert most["dist"] == 1 and any(seen.get("dist") and seen.get("torch") for seen in overlapped)
    assert sorted(retired) == ["dist", "torch"]


def test_an_export_that_does_not_fit_makes_its_paths_unavailable_without_running_them(project, tmp_path):
    """The build before an ONNX path is admitted like a path; when it cannot fit, the path
    is unavailable with the figures (it would otherwise make the export itself, in a worker
    whose estimate does not count the exporter)."""
    from conformance import runner
    from conformance.paths import CaseContext, get_path
    from conformance.results import PathResult

    (case,) = project.cases("tiny")
    options = RunOptions(available=lambda: 10 << 20)
    context = CaseContext(case, export_dir=tmp_path)
    build = runner._Task("tf")
    lines = []
    progress = runner._Progress(1, lines.append)
    build.run = runner._export_task(context, "tf2onnx", None, options, progress, runner._Counter(lambda: 1), build)
    build.run()
    assert build.refused.startswith("its export tf2onnx of tiny was not built: needs ")
    assert lines[0].startswith("[export 1/1] tiny tf2onnx: not built: needs ")
    results = {}
    path = runner._Task("ort", after=[build])
    path.run = runner._path_task(
        get_path("ort-cpu[tf2onnx]"), context, None, None, options, None, results, progress, path
    )
    path.run()
    result = results[("tiny", "ort-cpu[tf2onnx]")]
    assert isinstance(result, PathResult) and result.status == "unavailable" and result.reason == build.refused
