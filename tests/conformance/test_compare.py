"""The verdict: every wrong answer fails, at every precision, on one layer and on a
network, and never raises.

The answers are the shipped goldens' own taps (with the query rounded to the declared
type at fp16 / bf16, which is what a path computing in that type returns at best): each
test first checks that the untouched answer passes at that precision, then plants one
defect and checks that the path fails at the planted tap, with a message."""

import gc
from pathlib import Path

import numpy as np
import pytest
import torch

from conformance.golden import GoldenStore
from conformance.paths import PATH_NAMES, ExecutionPath
from conformance.runner import RunOptions, run_conformance
from conformance.tolerances import load_policy
from pkm_models.selection import slot_scores
from pkm_models.torch_reduced import DTYPES

REPO = Path(__file__).resolve().parents[2]
CASES_DIR = REPO / "conformance" / "cases"
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
TAPS = ("query", "scores", "indices", "weights", "output")
ALL_CASES = [p.stem for p in CASES_DIR.glob("*.toml")]
STORE = GoldenStore(REPO / "golden")


@pytest.fixture(scope="module", autouse=True)
def _frozen_frameworks():
    """The frameworks a run's report imports, loaded once and frozen out of the garbage
    collector: the runner collects after each case, which would walk their millions of
    objects every time (seconds a case)."""
    from conformance.environment import environment

    environment()
    gc.freeze()
    yield
    gc.unfreeze()


def _rounded(a: np.ndarray, precision: str) -> np.ndarray:
    return torch.from_numpy(np.asarray(a, np.float32)).to(DTYPES[precision]).float().numpy()


class Planted(ExecutionPath):
    """Returns the golden taps of whatever it is run on (the network, or one of its layers
    alone on its golden input), rounded to its precision, with ``plant`` applied to the
    taps of layer ``layer``."""

    def __init__(self, golden, precision: str, plant, layer: int):
        self.name = "torch-eager-cpu" if precision == "fp32" else f"torch-eager-cpu@{precision}"
        self.golden, self.precision, self.plant, self.layer = golden, precision, plant, layer
        self.layers = len([t for t in golden.taps if t == "output" or t.endswith("/output")])

    def tolerances_per_layer(self, case):
        return self.precision != "fp32"

    def prepare(self, context):
        case = context.case

        def run(x):
            if case.spec.layers == self.layers:  # the whole case
                taps = {k: v.copy() for k, v in self.golden.taps.items()}
                prefix = "" if self.layers == 1 else f"{self.layer}/"
                layer_names = [""] if self.layers == 1 else [f"{i}/" for i in range(self.layers)]
            else:  # one layer alone, on its golden input
                i = int(case.spec.name.rpartition("#layer")[2])
                taps = {
                    t: self.golden.taps[f"{i}/{t}"].copy() for t in ("query", "scores", "indices", "weights", "output")
                }
                prefix = "" if i == self.layer else None
                layer_names = [""]
            if self.precision in ("fp16", "bf16"):
                for p in layer_names:
                    taps[p + "query"] = _rounded(taps[p + "query"], self.precision)
            if prefix is not None:
                self.plant(taps, prefix, case.config, self.golden, self.layer)
            return taps

        return run


# --- the wrong answers ------------------------------------------------------------------------
def _weights(golden, layer):
    prefix = "" if "keys" in golden.weights else f"layers.{layer}."
    return golden.weights[prefix + "keys"], golden.weights[prefix + "values.weight"]


def nothing(taps, p, config, golden, layer):
    pass


def nan_output(taps, p, config, golden, layer):
    taps[p + "output"].reshape(-1)[3] = np.nan


def inf_scores(taps, p, config, golden, layer):
    taps[p + "scores"][1, 0] = np.inf


def negative_slot(taps, p, config, golden, layer):
    taps[p + "indices"][2, 1] = -1


def slot_out_of_range(taps, p, config, golden, layer):
    taps[p + "indices"][2, 1] = config.size


def repeated_slot(taps, p, config, golden, layer):
    taps[p + "indices"][2, 1] = taps[p + "indices"][2, 0]


def slot_zero_everywhere(taps, p, config, golden, layer):
    """The issue's reproducer: slot 0 in every position, and an output that is the
    weighted sum of those rows."""
    _, values = _weights(golden, layer)
    taps[p + "indices"][:] = 0
    w = taps[p + "weights"].reshape(-1, config.heads * config.knn).astype(np.float64)
    out = w.sum(axis=1, keepdims=True) * values[0].astype(np.float64)
    taps[p + "output"] = out.astype(np.float32).reshape(taps[p + "output"].shape)


def not_a_top_k(taps, p, config, golden, layer):
    """Row 0's last slot replaced by the slot with the lowest exact score."""
    keys, _ = _weights(golden, layer)
    query = taps[p + "query"][0:1].astype(np.float64)
    head = 0
    every = np.arange(config.size)[None, :]
    scores = slot_scores(query, keys[head : head + 1], every)[0]
    taps[p + "indices"][0, -1] = int(np.argmin(scores))


def indices_int32(taps, p, config, golden, layer):
    taps[p + "indices"] = taps[p + "indices"].astype(np.int32)


def output_float64(taps, p, config, golden, layer):
    taps[p + "output"] = taps[p + "output"].astype(np.float64)


def scores_short(taps, p, config, golden, layer):
    taps[p + "scores"] = taps[p + "scores"][:-1]


def missing_weights(taps, p, config, golden, layer):
    del taps[p + "weights"]


WRONG = {
    nan_output: "output",
    inf_scores: "scores",
    negative_slot: "indices",
    slot_out_of_range: "indices",
    repeated_slot: "indices",
    slot_zero_everywhere: "indices",
    not_a_top_k: "indices",
    indices_int32: "indices",
    output_float64: "output",
    scores_short: "scores",
    missing_weights: "weights",
}


def _verdict(case_name, precision, plant, layer=0):
    golden = STORE.read(case_name)
    from conformance.cases import load_cases

    cases = load_cases(CASES_DIR, [case_name])
    policy = load_policy(REPO / "golden" / "tolerances.toml", PATH_NAMES, ALL_CASES)
    result = run_conformance(
        cases, [Planted(golden, precision, plant, layer)], STORE, policy, RunOptions(isolate=False)
    )
    (path,) = result.cases[0].paths
    return path


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(("case", "layer"), [("boundary-tie", 0), ("stack-3", 1)])
def test_the_right_answer_passes(case, layer, precision):
    path = _verdict(case, precision, nothing, layer)
    assert path.status == "pass", path.reason


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("plant", list(WRONG), ids=[f.__name__ for f in WRONG])
@pytest.mark.parametrize(("case", "layer"), [("boundary-tie", 0), ("stack-3", 1)])
def test_every_wrong_answer_fails_with_a_message(case, layer, plant, precision):
    path = _verdict(case, precision, plant, layer)
    tap = WRONG[plant]
    wanted = {tap} if case == "boundary-tie" else {f"{layer}/{tap}", f"{layer}/{tap}@golden-input"}
    assert path.status == "fail", (path.status, path.reason)
    assert path.first_divergence in wanted, path.reason
    failing = next(t for t in path.tensors if t.name == path.first_divergence)
    assert failing.message


def test_a_wrong_slot_names_its_kind():
    path = _verdict("boundary-tie", "int8", repeated_slot)
    assert "a slot selected twice" in path.reason
    path = _verdict("boundary-tie", "fp16", slot_out_of_range)
    assert "a slot outside the memory" in path.reason
    path = _verdict("boundary-tie", "bf16", not_a_top_k)
    assert "not a correct top-5" in path.reason and "no bf16 rounding explains" in path.reason


def test_an_exception_inside_judging_is_that_paths_error_and_the_run_goes_on(monkeypatch, tmp_path):
    from conformance import compare
    from conformance.report import write_reports

    def broken(*args, **kwargs):
        raise RuntimeError("a defect in the toolkit")

    monkeypatch.setattr(compare, "_judge_output", broken)
    golden = STORE.read("boundary-tie")
    from conformance.cases import load_cases

    cases = load_cases(CASES_DIR, ["boundary-tie"])
    policy = load_policy(REPO / "golden" / "tolerances.toml", PATH_NAMES, ALL_CASES)
    paths = [Planted(golden, "fp32", nothing, 0), Planted(golden, "int8", nothing, 0)]
    result = run_conformance(cases, paths, STORE, policy, RunOptions(isolate=False))
    statuses = [(p.name, p.status) for p in result.cases[0].paths]
    assert statuses == [("torch-eager-cpu", "error"), ("torch-eager-cpu@int8", "error")]
    assert all("RuntimeError: a defect in the toolkit" in p.reason for p in result.cases[0].paths)
    assert not result.ok
    written = write_reports(result, tmp_path / "reports")
    assert (tmp_path / "reports" / "report.json").is_file() and written


def test_a_projected_layers_final_output_is_judged():
    """Meta's memory layers: the read (``output``) and the projected ``layer_output``; a
    wrong projection fails at ``layer_output`` though every read is right."""

    def projected_wrong(taps, p, config, golden, layer):
        taps[p + "layer_output"] = taps[p + "layer_output"] * np.float32(1.01)

    assert _verdict("memory-layers", "fp32", nothing, 1).status == "pass"
    path = _verdict("memory-layers", "fp32", projected_wrong, 1)
    assert path.status == "fail" and path.first_divergence == "1/layer_output", path.reason
