"""The user's own model through the conformance run: cases from checkpoints (XLM's layout
included) and input files, networks of several layers with per-layer taps, ties at the
selection boundary, and selections that must still be a correct top-k."""

import json

import numpy as np
import pytest
import torch

from conformance.cli import main
from conformance.golden import GoldenError
from conformance.paths import ExecutionPath
from tests.conformance.helpers import rewrite_tap, run_stub
from tests.models.test_checkpoint import DIM, KNN, write_xlm, xlm_forward, xlm_params

RUN = ["run", "--path", "torch-eager-cpu", "--in-process"]


def _one_error_line(err: str, *fragments: str) -> None:
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def _xlm_case(project, tmp_path, memories=("1_in", "4_after"), extra=""):
    checkpoint, raw = write_xlm(tmp_path)
    x = np.random.default_rng(0).standard_normal((2, 5, DIM)).astype(np.float32)
    np.save(tmp_path / "acts.npy", x)
    (project.cases_dir / "xlm-user.toml").write_text(
        f'description = "an XLM checkpoint"\n[weights]\ncheckpoint = "{checkpoint}"\n'
        f'memories = {json.dumps(list(memories))}\n[input]\nfile = "{tmp_path / "acts.npy"}"\n{extra}'
    )
    return checkpoint, raw, x


def test_a_golden_from_an_xlm_checkpoint_is_what_xlm_computes(project, tmp_path, capsys):
    checkpoint, raw, x = _xlm_case(project, tmp_path)
    assert main(["golden", "regenerate", "--case", "xlm-user", *project.cli_args()]) == 0
    golden = project.store.read("xlm-user")
    meta = golden.meta
    assert meta["checkpoint"]["memories"] == ["1_in", "4_after"] and meta["layers"] == 2
    assert meta["checkpoint"]["size"] == checkpoint.stat().st_size and len(meta["checkpoint"]["sha256"]) == 64
    # XLM's forward, transcribed on the raw tensors: memory 1_in, then 4_after on its output
    h = torch.from_numpy(x.reshape(-1, DIM))
    for i, name in enumerate(["1_in", "4_after"]):
        indices, out = xlm_forward(h, raw[name], KNN)
        np.testing.assert_array_equal(golden.taps[f"{i}/indices"], indices.numpy())
        np.testing.assert_allclose(golden.taps[f"{i}/output"].reshape(-1, DIM), out.numpy(), rtol=1e-5, atol=1e-6)
        h = out
    assert main([*RUN, "--path", "ort-cpu[torch-fast]", "--case", "xlm-user", *project.cli_args()]) == 0


def test_a_changed_or_missing_checkpoint_is_bad_data(project, tmp_path, capsys):
    checkpoint, _, _ = _xlm_case(project, tmp_path)
    assert main(["golden", "regenerate", "--case", "xlm-user", *project.cli_args()]) == 0
    capsys.readouterr()
    checkpoint2, _ = write_xlm(tmp_path, xlm_params(mem_query_bias=False), name="other.pth", bias=False)
    checkpoint.write_bytes(checkpoint2.read_bytes())  # the same file name, other weights
    assert main([*RUN, "--case", "xlm-user", *project.cli_args()]) == 2
    _one_error_line(capsys.readouterr().err, "checkpoint", "changed since its golden was made", "regenerate")
    checkpoint.unlink()
    assert main([*RUN, "--case", "xlm-user", *project.cli_args()]) == 2
    _one_error_line(capsys.readouterr().err, "does not exist")


def test_golden_verify_checks_the_pinned_files_as_run_does(project, tmp_path, capsys):
    checkpoint, _, x = _xlm_case(project, tmp_path)
    assert main(["golden", "regenerate", "--case", "xlm-user", *project.cli_args()]) == 0
    verify = ["golden", "verify", "--case", "xlm-user", *project.cli_args()]
    assert main(verify) == 0
    capsys.readouterr()
    original = checkpoint.read_bytes()
    data = torch.load(checkpoint, weights_only=True)
    data["model"]["module.memories.1_in.values.weight"][0, 0] += 1  # one value
    torch.save(data, checkpoint)
    for command in (verify, [*RUN, "--case", "xlm-user", *project.cli_args()]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "checkpoint" in err and "changed since its golden was made" in err, err
    checkpoint.write_bytes(original)
    np.save(tmp_path / "acts.npy", x + 1)  # the input file: same shape and size, other values
    size = (tmp_path / "acts.npy").stat().st_size
    for command in (verify, [*RUN, "--case", "xlm-user", *project.cli_args()]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "input file" in err and "changed since its golden was made" in err, err
        assert err.count(f"{size} bytes") == 2 and "size ?" not in err, err


@pytest.mark.parametrize(
    ("extra_config", "match"),
    [
        ("[config]\nk_dim = 64\n", "k_dim = 64 contradicts the checkpoint's k_dim = "),
        (f"[config]\nknn = {KNN + 1}\n", f"{KNN + 1}"),
        ("layers = 2\n", "layers = 2 but the checkpoint's selected memories are"),
    ],
)
def test_a_case_that_contradicts_its_checkpoint_names_both(project, tmp_path, capsys, extra_config, match):
    checkpoint = write_xlm(tmp_path)[0]
    np.save(tmp_path / "acts.npy", np.zeros((2, 3, DIM), np.float32))
    top, _, table = extra_config.partition("[config]")
    (project.cases_dir / "bad.toml").write_text(
        f'{top}[weights]\ncheckpoint = "{checkpoint}"\n[input]\nfile = "{tmp_path / "acts.npy"}"\n'
        + (f"[config]{table}" if table else "")
    )
    assert main(["golden", "regenerate", "--case", "bad", *project.cli_args()]) == 2
    _one_error_line(capsys.readouterr().err, match)
    assert not project.store.case_dir("bad").exists()


def _bad_inputs(tmp_path):
    x = np.ones((2, 3, 16), np.float32)
    nan = x.copy()
    nan[0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "f64.npy", x.astype(np.float64))
    np.save(tmp_path / "wide.npy", np.ones((2, 3, 17), np.float32))
    np.savez(tmp_path / "two.npz", a=x, b=x)
    (tmp_path / "junk.pb").write_bytes(b"\x08\x01garbage")
    import zipfile

    with zipfile.ZipFile(tmp_path / "text.npz", "w") as z:  # gave a raw AttributeError
        z.writestr("notes.txt", "not an array")
    from tests.models.test_checkpoint import _npz_bomb

    _npz_bomb(tmp_path / "bomb.npz")
    return {
        "nan.npy": "1 NaN and 0 Inf",
        "f64.npy": "must be float32, got float64",
        "wide.npy": "last dimension is 17, the model's input_dim is 16",
        "two.npz": "say which with [input] key",
        "junk.pb": "cannot read the input",
        "text.npz": "'notes.txt' is not an array (.npy) member",
        "bomb.npz": "refused before reading it",
        "absent.npy": "does not exist",
    }


def test_bad_input_files_exit_2_naming_the_file_and_write_nothing(project, tmp_path, capsys):
    for name, match in _bad_inputs(tmp_path).items():
        (project.cases_dir / "bad.toml").write_text(f'preset = "tiny"\n[input]\nfile = "{tmp_path / name}"\n')
        assert main(["golden", "regenerate", "--case", "bad", *project.cli_args()]) == 2, name
        _one_error_line(capsys.readouterr().err, name, match)
        assert not project.store.case_dir("bad").exists()


def test_an_input_file_that_changed_since_its_golden_is_bad_data(project, tmp_path, capsys):
    np.save(tmp_path / "acts.npy", np.ones((2, 3, 16), np.float32))
    (project.cases_dir / "real.toml").write_text(f'preset = "tiny"\n[input]\nfile = "{tmp_path / "acts.npy"}"\n')
    assert main(["golden", "regenerate", "--case", "real", *project.cli_args()]) == 0
    assert main([*RUN, "--case", "real", *project.cli_args()]) == 0
    np.save(tmp_path / "acts.npy", np.full((2, 3, 16), 2, np.float32))
    capsys.readouterr()
    assert main([*RUN, "--case", "real", *project.cli_args()]) == 2
    _one_error_line(capsys.readouterr().err, "input file", "changed since its golden was made")


def test_a_pb_input_with_external_data_is_read_beside_it_confined_and_pinned(project, tmp_path, capsys, monkeypatch):
    """Its location was read relative to the current folder, and its sha256 pin did not cover
    the data file: golden verify passed after that file changed."""
    import onnx
    from onnx import numpy_helper

    folder = tmp_path / "acts"
    folder.mkdir()
    tensor = numpy_helper.from_array(np.ones((2, 3, 16), np.float32), "x")
    onnx.external_data_helper.set_external_data(tensor, "acts.bin")
    (folder / "acts.bin").write_bytes(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    (folder / "acts.pb").write_bytes(tensor.SerializeToString())
    (project.cases_dir / "ext.toml").write_text(f'preset = "tiny"\n[input]\nfile = "{folder / "acts.pb"}"\n')
    monkeypatch.chdir(tmp_path)  # not the .pb's folder
    assert main(["golden", "regenerate", "--case", "ext", *project.cli_args()]) == 0
    assert main(["golden", "verify", *project.cli_args()]) == 0
    (folder / "acts.bin").write_bytes(np.full((2, 3, 16), 2, np.float32).tobytes())  # the data, the same size
    capsys.readouterr()
    assert main(["golden", "verify", *project.cli_args()]) == 2
    assert "changed since its golden was made" in capsys.readouterr().err
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = str(tmp_path / "elsewhere.bin")  # an absolute location
    (folder / "acts.pb").write_bytes(tensor.SerializeToString())
    assert main(["golden", "verify", *project.cli_args()]) == 2
    assert "leaves its folder" in capsys.readouterr().err


# --- several layers --------------------------------------------------------------------------
STACK = 'preset = "tiny"\nlayers = 3\n[config]\noutput_dim = 16\n[input]\nshape = [2, 3, 16]\nseed = 4\n'


def _stub(project, name, edit):
    return run_stub(project, name, edit)[0]


@pytest.fixture
def stacked(project):
    (project.cases_dir / "stack.toml").write_text(STACK)
    project.regenerate("stack")
    return project


def test_a_stack_has_per_layer_taps_and_passes(stacked, capsys):
    golden = stacked.store.read("stack")
    assert list(golden.taps)[:6] == ["0/query", "0/scores", "0/indices", "0/weights", "0/output", "1/query"]
    assert len(golden.taps) == 15
    paths = ["--path", "tf-function-cpu", "--path", "ort-cpu[torch-fast]", "--path", "onnx-reference[torch-script]"]
    assert main([*RUN, *paths, "--case", "stack", *stacked.cli_args()]) == 0


@pytest.mark.parametrize("tap", ["query", "weights", "output"])
def test_an_error_planted_in_layer_1_is_reported_at_layer_1(stacked, tap):
    def plant(taps):
        taps[f"1/{tap}"] = taps[f"1/{tap}"] + 1e-2
        return taps

    result = _stub(stacked, "stack", plant)
    assert result.status == "fail" and result.first_divergence == f"1/{tap}", result.reason
    assert all(t for t in result.tensors if t.name.startswith("0/"))


# --- ties at the boundary, and what an ambiguous row must still be -------------------------
BOUNDARY = (
    'preset = "small"\nseed = 11\n[config]\nknn = 5\n[input]\nshape = [2, 6, 64]\nseed = 11\n'
    "[weights]\nduplicate_subkeys = 16\n"
)


def test_boundary_ties_pass_with_the_differing_rows_counted_ambiguous(project):
    (project.cases_dir / "boundary.toml").write_text(BOUNDARY)
    project.regenerate("boundary")
    golden = project.store.read("boundary")
    case = project.cases("boundary")[0]
    n_keys = case.config.n_keys
    values = golden.weights["values.weight"]

    def twin_at_the_boundary(taps):  # the k-th slot's twin: same score, another slot
        idx = taps["indices"]
        hi, lo = idx[:, -1] // n_keys, idx[:, -1] % n_keys
        idx[:, -1] = hi * n_keys + (lo ^ 1)
        taps["indices"] = idx
        w = taps["weights"].reshape(-1, case.config.heads * case.config.knn).astype(np.float64)
        rows = values[idx.reshape(w.shape)]
        taps["output"] = np.einsum("bn,bnd->bd", w, rows).astype(np.float32).reshape(taps["output"].shape)
        return taps

    result = _stub(project, "boundary", twin_at_the_boundary)
    indices = next(t for t in result.tensors if t.name == "indices")
    assert result.status == "pass", result.reason
    assert indices.ambiguous_rows > 0 and "selected differently" in indices.message


def test_an_ambiguous_row_must_still_select_a_correct_top_k(project):
    """tiny-tie: every row is ambiguous. A path that swaps its last slot for slot 0, with a
    self-consistent output, must fail at indices."""
    golden = project.store.read("tiny-tie")
    case = project.cases("tiny-tie")[0]
    values = golden.weights["values.weight"]

    def slot_zero(taps):
        idx = taps["indices"]
        idx[:, -1] = 0
        w = taps["weights"].reshape(-1, case.config.heads * case.config.knn).astype(np.float64)
        rows = values[idx.reshape(w.shape)]
        taps["output"] = np.einsum("bn,bnd->bd", w, rows).astype(np.float32).reshape(taps["output"].shape)
        return taps

    result = _stub(project, "tiny-tie", slot_zero)
    assert result.status == "fail" and result.first_divergence == "indices", result.reason
    assert "not a correct top-4" in result.reason


# --- what a failing path leaves for the user ------------------------------------------------
def test_a_failing_path_shows_its_worst_elements_and_keeps_what_it_obtained(project, tmp_path, capsys):
    rewrite_tap(
        project, "tiny", 4, lambda a: (a + np.where(np.arange(a.size).reshape(a.shape) == 5, 0.5, 0)).astype(a.dtype)
    )
    reports = tmp_path / "reports"
    assert main([*RUN, "--case", "tiny", *project.cli_args(), "--report-dir", str(reports)]) == 1
    md = (reports / "report.md").read_text()
    assert "## Worst elements of failing tensors" in md and "| index | obtained | expected | difference |" in md
    assert "| [0, 0, 5] |" in md  # element 5 of (3, 5, 8): the planted one, first
    report = json.loads((reports / "report.json").read_text())
    worst = report["cases"][0]["paths"][0]["tensors"][4]["worst_elements"][0]
    assert worst["index"] == [0, 0, 5] and abs(worst["difference"] - 0.5) < 1e-6
    with np.load(reports / "obtained" / "tiny" / "torch-eager-cpu.npz") as obtained:
        assert set(obtained.files) == {"query", "scores", "indices", "weights", "output"}
        golden = project.store.read("tiny").taps["output"]
        assert abs(float(golden[0, 0, 5] - obtained["output"][0, 0, 5]) - 0.5) < 1e-6


def test_a_golden_folder_of_a_stack_with_the_wrong_tap_count_is_bad_data(stacked):
    path = stacked.store.case_dir("stack") / "case.json"
    meta = json.loads(path.read_text())
    meta["layers"] = 2
    path.write_text(json.dumps(meta))
    with pytest.raises(GoldenError, match="differ from the contract"):
        stacked.store.read("stack")


# --- a flip upstream: later layers judged alone, on their golden inputs ---------------------
TIED_STACK = (
    'preset = "small"\nseed = 11\nlayers = 2\n[config]\nknn = 5\n[input]\nshape = [2, 3, 64]\nseed = 11\n'
    "[weights]\nduplicate_subkeys = 16\n"
)


@pytest.fixture
def tied_stack(project):
    (project.cases_dir / "tied.toml").write_text(TIED_STACK)
    project.regenerate("tied")
    return project


def test_after_a_legitimate_flip_later_layers_are_judged_alone_on_their_golden_inputs(tied_stack):
    from conformance.paths import select_paths
    from conformance.runner import RunOptions, run_conformance

    result = run_conformance(
        tied_stack.cases("tied"),
        select_paths(["tf-function-cpu"]),
        tied_stack.store,
        tied_stack.policy(),
        RunOptions(isolate=False),
    )
    (path,) = result.cases[0].paths
    assert path.status == "pass", path.reason
    assert path.downstream_tokens > 0  # TensorFlow breaks the boundary ties the other way
    alone = [t for t in path.tensors if t.name.endswith("@golden-input")]
    assert [t.name for t in alone] == [
        f"1/{tap}@golden-input" for tap in ("query", "scores", "indices", "weights", "output")
    ]
    assert all(alone)


class FlipThenWrong(ExecutionPath):
    """Layer 0 takes the tied twin at the boundary (a legitimate flip, output consistent);
    layer 1, run alone, returns a wrong output."""

    name = "torch-eager-cpu"

    def __init__(self, golden, n_keys, values):
        self.golden, self.n_keys, self.values = golden, n_keys, values

    def prepare(self, context):
        taps = {k: v.copy() for k, v in self.golden.taps.items()}
        if context.case.spec.name.endswith("#layer1"):
            alone = {t: taps[f"1/{t}"] for t in ("query", "scores", "indices", "weights", "output")}
            alone["output"] = alone["output"] + 1e-2
            return lambda x: alone
        idx = taps["0/indices"]
        hi, lo = idx[:, -1] // self.n_keys, idx[:, -1] % self.n_keys
        idx[:, -1] = hi * self.n_keys + (lo ^ 1)
        w = taps["0/weights"].reshape(idx.shape[0] // 4, -1).astype(np.float64)
        rows = self.values[idx.reshape(w.shape)]
        taps["0/output"] = np.einsum("bn,bnd->bd", w, rows).astype(np.float32).reshape(taps["0/output"].shape)
        return lambda x: taps


def test_a_wrong_layer_alone_fails_at_its_golden_input(tied_stack, monkeypatch):
    from conformance.runner import RunOptions, run_conformance

    golden = tied_stack.store.read("tied")
    stub = FlipThenWrong(golden, 32, golden.weights["layers.0.values.weight"])
    result = run_conformance(
        tied_stack.cases("tied"), [stub], tied_stack.store, tied_stack.policy(), RunOptions(isolate=False)
    )
    (path,) = result.cases[0].paths
    assert path.downstream_tokens > 0
    assert path.status == "fail" and path.first_divergence == "1/output@golden-input", path.reason


# --- a network at reduced precision: every layer alone on its golden input -----------------
def test_a_network_at_reduced_precision_is_judged_layer_by_layer(stacked):
    from conformance.paths import select_paths
    from conformance.runner import RunOptions, run_conformance

    result = run_conformance(
        stacked.cases("stack"),
        select_paths(["torch-eager-cpu@fp16"]),
        stacked.store,
        stacked.policy(),
        RunOptions(isolate=False),
    )
    (path,) = result.cases[0].paths
    assert path.status == "pass", path.reason
    taps = ("query", "scores", "indices", "weights", "output")
    # the network end to end, layer 0 judged (it sees the golden input); each later layer alone
    assert [t.name for t in path.tensors] == [f"0/{tap}" for tap in taps] + [
        f"{i}/{tap}@golden-input" for i in (1, 2) for tap in taps
    ]


class Fp16Stub(ExecutionPath):
    """The reference cast to fp16, judged as a reduced-precision path; ``edit`` plants a
    defect in the taps of a given case."""

    name = "torch-eager-cpu@fp16"

    def tolerances_per_layer(self, case):
        return case.spec.layers > 1

    def edit(self, case, taps) -> None:
        pass

    def prepare(self, context):
        from pkm_models.torch_reduced import DTYPES, CastModel

        model = CastModel(context.torch_model, DTYPES["fp16"]).eval()

        def run(x):
            with torch.inference_mode():
                taps = model(torch.tensor(x), return_taps=True)
            taps = {k: v.numpy() if v.dtype == torch.int64 else v.float().numpy() for k, v in taps.items()}
            self.edit(context.case, taps)
            return taps

        return run


class Fp16NanInLayer2(Fp16Stub):
    """Correct fp16 layers alone; end to end, layer 2's output is NaN."""

    def edit(self, case, taps):
        if case.spec.layers > 1:
            taps["2/output"] = np.full_like(taps["2/output"], np.nan)


def test_a_network_at_reduced_precision_runs_end_to_end_too(stacked):
    """The network's own chain runs: a later layer's taps that are not even finite fail,
    though every layer alone is right."""
    from conformance.runner import RunOptions, run_conformance

    result = run_conformance(
        stacked.cases("stack"), [Fp16NanInLayer2()], stacked.store, stacked.policy(), RunOptions(isolate=False)
    )
    (path,) = result.cases[0].paths
    assert path.status == "fail" and path.first_divergence == "2/output", path.reason
    assert "NaN" in path.reason


class Fp16WrongInLayer1(Fp16Stub):
    """fp16 taps of whichever layer it is given; layer 1 alone has its output off by 1e-2."""

    def edit(self, case, taps):
        if case.spec.name.endswith("#layer1"):
            taps["output"] = taps["output"] + np.float32(1e-2)


def test_a_network_at_reduced_precision_fails_at_the_wrong_layer(stacked):
    from conformance.runner import RunOptions, run_conformance

    result = run_conformance(
        stacked.cases("stack"), [Fp16WrongInLayer1()], stacked.store, stacked.policy(), RunOptions(isolate=False)
    )
    (path,) = result.cases[0].paths
    assert path.status == "fail" and path.first_divergence == "1/output@golden-input", path.reason
    assert all(t for t in path.tensors if t.name.startswith(("0/", "2/")))
