"""Reduced-precision paths judged against the float32 goldens: names, formats, bounds, and
planted defects that must fail at the right tap while legitimate flips pass."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from conformance.compare import compare_taps
from conformance.golden import GoldenStore
from conformance.paths import PATH_NAMES
from conformance.precision import (
    PrecisionError,
    check_model_bytes,
    half_steps,
    int8_output_bound,
    join_name,
    quantize_rows,
    query_error_bound,
    representable,
    split_name,
)
from conformance.tolerances import ToleranceError, load_policy, parse_policy
from pkm_models.config import TAPS, PKMConfig
from pkm_models.selection import selection_agreement, slot_scores
from pkm_models.torch_pkm import build_torch_model
from pkm_models.torch_reduced import DTYPES, CastModel, int8_module, model_bytes, pack_rows

REPO = Path(__file__).resolve().parents[2]
CASES = [p.stem for p in (REPO / "conformance" / "cases").glob("*.toml")]


# --- names ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "base", "precision"),
    [
        ("torch-eager-cpu", "torch-eager-cpu", "fp32"),
        ("torch-eager-cpu@bf16", "torch-eager-cpu", "bf16"),
        ("ort-cpu[torch-fast]@int8", "ort-cpu[torch-fast]", "int8"),
        ("ort-cuda[torch-fast]@fp16", "ort-cuda[torch-fast]", "fp16"),
    ],
)
def test_split_and_join_are_inverse(name, base, precision):
    assert split_name(name) == (base, precision)
    assert join_name(base, precision) == name


@pytest.mark.parametrize("name", ["torch-eager-cpu@fp8", "torch-eager-cpu@fp32", "@int8"])
def test_bad_suffixes_are_errors(name):
    with pytest.raises(PrecisionError):
        split_name(name)


def test_registry_names_the_issue_variants():
    wanted = ("torch-eager-cpu@bf16", "ort-cpu[torch-fast]@int8", "ort-cuda[torch-fast]@fp16", "tf-function-cpu@bf16")
    assert set(wanted) <= set(PATH_NAMES)


# --- number formats --------------------------------------------------------------------------
def test_representable_tells_the_types_apart():
    x = np.array([1.0, 1.0 + 2.0**-10, 1.0 + 2.0**-20], np.float32)
    assert representable(x, "fp16").tolist() == [True, True, False]
    assert representable(x, "bf16").tolist() == [True, False, False]


def test_int8_rows_match_pytorch_and_stay_within_half_a_step():
    rng = np.random.default_rng(0)
    values = rng.standard_normal((50, 24)).astype(np.float32) * rng.uniform(0.01, 3, (50, 1)).astype(np.float32)
    codes, scale, offset = quantize_rows(values)
    t_codes, t_scale, t_offset = pack_rows(torch.from_numpy(values))
    np.testing.assert_array_equal(codes, t_codes.numpy())
    np.testing.assert_array_equal(scale, t_scale.numpy())
    np.testing.assert_array_equal(offset, t_offset.numpy())
    in_blocks = pack_rows(torch.from_numpy(values), block_bytes=7 * 24 * 4)  # 7 rows at a time: the same
    for got, want in zip(in_blocks, (codes, scale, offset), strict=True):
        np.testing.assert_array_equal(got.numpy(), want)
    error = np.abs(codes.astype(np.float64) * scale[:, None] + offset[:, None] - values)
    step = (values.max(1).astype(np.float64) - values.min(1)) / 255
    assert np.all(error <= step[:, None] / 2 * (1 + 1e-4) + 1e-7)  # half a step, independently computed
    assert np.all(error <= half_steps(values)[:, None])


# --- a small real case: the shipped golden ---------------------------------------------------
@pytest.fixture(scope="module")
def small():
    golden = GoldenStore(REPO / "golden").read("small")
    config = PKMConfig.from_dict(golden.meta["config"])
    model = build_torch_model(config, 1, seed=None)
    model.load_weights(golden.weights)
    policy = load_policy(REPO / "golden" / "tolerances.toml", PATH_NAMES, CASES)
    return golden, config, model.eval(), policy


def _taps(module, x) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        taps = module(torch.tensor(x), return_taps=True)
    return {k: v.float().numpy() if v.dtype != torch.int64 else v.numpy() for k, v in taps.items()}


def _compare(small, got, path):
    golden, config, _, policy = small
    return compare_taps(
        got,
        golden.taps,
        config=config,
        weights=golden.weights,
        policy=policy,
        case="small",
        path=path,
        layer_input=golden.input,
    )


def test_fp16_passes_with_legitimate_flips_and_reports_figures(small):
    golden, _, model, _ = small
    got = _taps(CastModel(copy.deepcopy(model), DTYPES["fp16"]), golden.input)
    flipped = ~selection_agreement(got["indices"], golden.taps["indices"])
    assert flipped.any(), "this case is meant to flip some fp16 selections"
    result = _compare(small, got, "torch-eager-cpu@fp16")
    assert result.ok, [t.message for t in result.tensors if not t]
    indices = next(t for t in result.tensors if t.name == "indices")
    assert indices.figures["selection_agreement"] == pytest.approx(1 - flipped.mean())
    assert indices.figures["ambiguous_rows"] >= flipped.sum()
    output = next(t for t in result.tensors if t.name == "output")
    assert output.figures["output_rel_rms"] > 0


def test_fp16_flip_that_no_rounding_explains_fails_at_indices(small):
    golden, config, model, _ = small
    got = _taps(CastModel(copy.deepcopy(model), DTYPES["fp16"]), golden.input)
    assert _compare(small, got, "torch-eager-cpu@fp16").ok
    # in a row that agrees with the golden, swap in the slot with the lowest exact score
    row = int(np.flatnonzero(selection_agreement(got["indices"], golden.taps["indices"]))[0])
    every_slot = np.arange(config.size)[None, :]
    query = golden.taps["query"][row : row + 1]
    head = row % config.heads
    keys = golden.weights["keys"][head : head + 1]
    worst = int(np.argmin(slot_scores(query, keys, every_slot)))
    got["indices"][row, -1] = worst
    result = _compare(small, got, "torch-eager-cpu@fp16")
    assert result.first_divergence == "indices"
    assert "no fp16 rounding explains" in next(t for t in result.tensors if t.name == "indices").message


def test_float32_path_labelled_fp16_fails_at_query(small):
    golden, _, model, _ = small
    got = _taps(model, golden.input)
    result = _compare(small, got, "torch-eager-cpu@fp16")
    assert result.first_divergence == "query"
    assert "did not compute in fp16" in next(t for t in result.tensors if t.name == "query").message
    assert _compare(small, got, "torch-eager-cpu").ok  # the same taps under their real name


def test_fp16_wrong_value_row_fails_at_output(small):
    golden, config, model, _ = small
    got = _taps(CastModel(copy.deepcopy(model), DTYPES["fp16"]), golden.input)
    got["output"] = got["output"].copy()
    got["output"].reshape(-1, config.v_dim)[3] += 0.05 * np.abs(got["output"]).max()
    assert _compare(small, got, "torch-eager-cpu@fp16").first_divergence == "output"


def _rounded(a, precision: str) -> np.ndarray:
    """``a`` rounded to the type (round to nearest even), back as float32."""
    return torch.from_numpy(np.asarray(a, np.float32)).to(DTYPES[precision]).float().numpy()


@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_the_query_bound_holds_for_a_projection_computed_in_the_type(precision, batchnorm):
    """An emulation independent of the bound's formula: operands rounded to the type, their
    products summed in float32, each op's result rounded; against the float32 projection
    its error stays within query_error_bound: on random inputs up to 30x the shipped
    cases', and on an adversarial one where every operand rounds down by almost u (all
    errors add up), which comes within a factor 2.5 of the bound (4 with batchnorm)."""
    rng = np.random.default_rng(0)
    config = PKMConfig(input_dim=96, output_dim=8, k_dim=8, heads=2, knn=4, n_keys=8, query_batchnorm=batchnorm)
    hk, f32 = config.heads * config.k_dim, np.float32
    u = {"fp16": 2.0**-11, "bf16": 2.0**-8}[precision]
    random = {"query_proj.0.weight": rng.normal(0, 0.3, (hk, 96)), "query_proj.0.bias": rng.normal(0, 1, hk)}
    below_half_step = 1 + 0.99 * u  # rounds down to 1 in the type, by almost u
    adversarial = {"query_proj.0.weight": np.full((hk, 96), below_half_step), "query_proj.0.bias": np.zeros(hk)}
    if batchnorm:
        bn = {"running_mean": rng.normal(0, 2, hk), "running_var": rng.uniform(0.25, 2, hk)}
        bn.update(weight=rng.normal(1, 0.5, hk), bias=rng.normal(0, 1, hk))
        for w in (random, adversarial):
            w.update({f"query_proj.1.{k}": v for k, v in bn.items()})
    trials = [
        (rng.standard_normal((64, 96)), random),
        (30 * rng.standard_normal((64, 96)), random),
        (np.full((64, 96), below_half_step), adversarial),
    ]
    ratios = []
    for x, w in trials:
        x, w = x.astype(f32), {k: v.astype(f32) for k, v in w.items()}
        exact = x @ w["query_proj.0.weight"].T + w["query_proj.0.bias"]  # the float32 golden
        r = lambda a: _rounded(a, precision)  # noqa: E731
        q = r(r(r(x) @ r(w["query_proj.0.weight"]).T) + r(w["query_proj.0.bias"]))
        if batchnorm:
            m, v = w["query_proj.1.running_mean"], w["query_proj.1.running_var"]
            g, b = w["query_proj.1.weight"], w["query_proj.1.bias"]
            exact = (exact - m) / np.sqrt(v + f32(1e-5)) * g + b
            inv = r(1 / np.sqrt(r(r(v) + f32(1e-5))))
            q = r(r(r(r(q - r(m)) * inv) * r(g)) + r(b))
        size = np.maximum(np.abs(q), np.abs(exact))
        bound = query_error_bound(x, w, config, precision, size).reshape(q.shape)
        err = np.abs(q.astype(np.float64) - exact)
        assert (err <= bound).all(), float((err / bound).max())
        ratios.append(float((err / bound).max()))
    assert ratios[-1] > (0.2 if batchnorm else 0.4), ratios  # the adversarial input comes close to the bound


def test_fp16_query_off_by_more_than_rounding_fails_at_query(small):
    golden, config, model, _ = small
    got = _taps(CastModel(copy.deepcopy(model), DTYPES["fp16"]), golden.input)
    assert _compare(small, got, "torch-eager-cpu@fp16").ok
    weights = {k: v for k, v in golden.weights.items() if k.startswith("query_proj")}
    bound = query_error_bound(golden.input, weights, config, "fp16", np.abs(golden.taps["query"]))
    got["query"] = got["query"].copy()
    got["query"][5, 3] = _rounded(got["query"][5, 3] + 4 * bound[5, 3], "fp16")
    result = _compare(small, got, "torch-eager-cpu@fp16")
    assert result.first_divergence == "query"
    assert "the fp16 projection bound" in next(t for t in result.tensors if t.name == "query").message


def test_int8_passes_within_its_derived_bound(small):
    golden, config, model, _ = small
    got = _taps(int8_module(copy.deepcopy(model)), golden.input)
    result = _compare(small, got, "torch-eager-cpu@int8")
    assert result.ok, [t.message for t in result.tensors if not t]
    # the bound is not vacuous: the output does move, by less than the bound and more than float32 rounding
    own = np.einsum(
        "bn,bnd->bd",
        got["weights"].reshape(-1, config.heads * config.knn).astype(np.float64),
        golden.weights["values.weight"][got["indices"].reshape(-1, config.heads * config.knn)].astype(np.float64),
    )
    error = np.abs(got["output"].reshape(own.shape) - own).max(axis=1)
    bound = int8_output_bound(
        got["indices"], got["weights"], golden.weights["values.weight"], config.heads * config.knn
    )
    assert np.all(error <= bound) and error.max() > 0.1 * bound.max()


def test_int8_wrong_scale_fails_at_output(small):
    golden, _, model, _ = small
    module = int8_module(copy.deepcopy(model))
    packed = module.packed.clone()
    scale = packed[:, -8:-4].contiguous().view(torch.float32) * 1.02  # 2% too large, every row
    packed[:, -8:-4] = scale.view(torch.uint8)
    module.packed = packed
    result = _compare(small, _taps(module, golden.input), "torch-eager-cpu@int8")
    assert result.first_divergence == "output"


def test_int8_dropped_row_fails_at_output(small):
    golden, _, model, _ = small
    module = int8_module(copy.deepcopy(model))
    plain = module.weighted_sum

    def drop_last(flat_indices, flat_weights):
        w = flat_weights.clone()
        w[..., -1] = 0  # the last slot of every token is not read
        return plain(flat_indices, w)

    module.weighted_sum = drop_last
    result = _compare(small, _taps(module, golden.input), "torch-eager-cpu@int8")
    assert result.first_divergence == "output"


def test_int8_model_bytes_and_a_mislabelled_float32_model():
    config = PKMConfig(input_dim=16, output_dim=64, k_dim=8, heads=2, knn=4, n_keys=32)  # values dominate
    model = build_torch_model(config, 1, seed=0).eval()
    fp32 = model_bytes(model)
    values, rows = config.size * config.v_dim * 4, config.size
    assert check_model_bytes("int8", model_bytes(int8_module(copy.deepcopy(model))), fp32, values, rows) is None
    assert "declared int8" in check_model_bytes("int8", fp32, fp32, values, rows)
    assert check_model_bytes("fp16", model_bytes(copy.deepcopy(model).half()), fp32, values, rows) is None
    assert "declared bf16" in check_model_bytes("bf16", fp32, fp32, values, rows)


def test_a_float32_model_labelled_int8_is_refused_by_its_path(small, monkeypatch):
    """docs/precision.md: a declared int8 model as large as the float32 one is refused."""
    from conformance.cases import load_cases
    from conformance.paths import CaseContext, get_path
    from conformance.precision import PrecisionError

    golden = small[0]
    (case,) = load_cases(REPO / "conformance" / "cases", ["small"])
    path = get_path("torch-eager-cpu@int8")
    context = CaseContext(case, golden.weights)
    assert path.prepare(context)(golden.input)["output"].shape == golden.taps["output"].shape  # the real one runs
    monkeypatch.setattr(type(path), "model_bytes", lambda self, context: case.spec.weight_bytes)
    with pytest.raises(PrecisionError, match="declared int8 but its model holds"):
        path.prepare(context)


# --- tolerances: the precision level -----------------------------------------------------------
def _policy(data):
    return parse_policy(data, "t.toml", ["torch-eager-cpu", "torch-eager-cpu@fp16"], ["xlm"])


def test_precision_level_applies_to_its_suffix_and_is_a_floor():
    policy = _policy(
        {
            "default": {"atol": 1e-5, "rtol": 1e-4},
            "precision": {"fp16": {"tap": {"query": {"atol": 4e-3}}}},
            "case": {"xlm": {"atol": 3e-5}},
        }
    )
    assert policy.resolve("xlm", "torch-eager-cpu", "query").atol == 3e-5
    assert policy.resolve("xlm", "torch-eager-cpu@fp16", "query").atol == 4e-3  # the case does not tighten it
    assert policy.resolve("other", "torch-eager-cpu@fp16", "scores").atol == 1e-5
    assert policy.resolve("other", "torch-eager-cpu@bf16", "query").atol == 1e-5  # another precision


def test_unknown_precision_in_tolerances_is_an_error():
    with pytest.raises(ToleranceError, match="unknown precision 'fp8'"):
        _policy({"default": {"atol": 1e-5, "rtol": 1e-4}, "precision": {"fp8": {"atol": 1.0}}})


# --- an int8 ONNX export --------------------------------------------------------------------------
def test_int8_export_is_standard_onnx_and_conforms(small, tmp_path):
    import onnxruntime as ort

    from conformance.export import export
    from conformance.spec import ModelSpec

    golden, config, _, _ = small
    spec = ModelSpec(name="small", config=config, seed=golden.meta["weight_seed"])
    report = export(spec, "torch-fast", tmp_path, tapped=True, precision="int8")
    assert report.path.name == "torch-fast@int8.onnx"
    assert "Gather" in report.op_histogram and not any(":" in op for op in report.op_histogram)
    assert any("standard ONNX" in note for note in report.notes)
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    got = dict(zip(TAPS, session.run(list(TAPS), {"input": golden.input}), strict=True))
    assert _compare(small, got, "ort-cpu[torch-fast]@int8").ok


def test_report_md_shows_the_precision_figures(tmp_path):
    from conformance.report import markdown
    from conformance.results import CaseResult, PathResult, RunResult, TensorResult

    tensors = [
        TensorResult(
            "indices", "pass", figures={"precision": "int8", "selection_agreement": 0.98, "ambiguous_rows": 3}
        ),
        TensorResult("output", "pass", figures={"output_rel_rms": 0.007, "output_max_rel_rms": 0.02}),
    ]
    result = RunResult([CaseResult("xlm", [PathResult("ort-cpu[torch-fast]@int8", "pass", tensors=tensors)])], {})
    md = markdown(result, tmp_path).decode()
    assert "## Reduced precision" in md
    assert "| xlm | ort-cpu[torch-fast]@int8 | pass | 98.0% | 3 | 0.007 | 0.02 | - |" in md


@pytest.mark.parametrize(
    "path",
    ["torch-eager-cpu@bf16", "ort-cpu[torch-fast]@fp16", "ort-cpu[torch-fast]@bf16", "ort-cpu[torch-fast]@int8"],
)
def test_reduced_precision_runs_and_passes_on_a_network(path, tmp_path):
    """stack-3: a cast model's layers hand each other their own type (a bf16 table of XLM's
    layer cast whole is not Meta's bf16 table), and the size check weighs an export's
    weights, not its 3-layer tapped graph."""
    from conformance.cli import main

    report = tmp_path / "report"
    args = ["run", "--case", "stack-3", "--path", path, "--jobs", "1", "--no-cache", "--report-dir", str(report)]
    assert main(args) == 0, (report / "report.md").read_text()
