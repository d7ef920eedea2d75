"""Token streams (conformance.stream, conformance.runner.run_stream): many tokens through a
path against the live reference, statistics kept as the stream goes, and the planted
defects a golden batch cannot see."""

from __future__ import annotations

import numpy as np
import pytest

from conformance.cases import CaseError, load_case
from conformance.golden import GoldenError
from conformance.paths import CaseContext, get_path
from conformance.runner import RunOptions, run_stream
from conformance.stream import StreamSpec, StreamStats, TapStats, batches, sample_input, sample_rows

TINY_STREAM = """
description = "tiny, with a generated stream"
preset = "tiny"
seed = 0

[input]
shape = [2, 3, 16]
seed = 7

[stream]
tokens = {tokens}
seed = 3
batch = {batch}
"""


@pytest.fixture
def streamed(project):
    def make(tokens=100_000, batch=25_000, name="tiny-stream"):
        path = project.cases_dir / f"{name}.toml"
        path.write_text(TINY_STREAM.format(tokens=tokens, batch=batch))
        project.regenerate(name)
        case = load_case(path)
        return case, project.store.read(name)

    return make


def test_a_generated_stream_is_the_same_tokens_whatever_the_batch():
    a = StreamSpec(10_000, batch=4096, seed=1)
    b = StreamSpec(10_000, batch=999, seed=1)
    xa = np.concatenate([x[0] for _, x in batches(a, 8)])
    xb = np.concatenate([x[0] for _, x in batches(b, 8)])
    assert xa.shape == (10_000, 8) and np.array_equal(xa, xb)
    picked = sample_rows(a)
    assert np.array_equal(sample_input(a, 8)[0], xa[picked])


def test_quantiles_come_from_the_log_histogram_and_never_fall_below_the_true_one():
    stats = TapStats()
    err = np.random.default_rng(0).lognormal(-12, 2, 100_000)
    stats.add(err, np.zeros_like(err), None)
    for q in (0.5, 0.99, 0.999):
        true = float(np.quantile(err, q))
        assert true <= stats.quantile(q) <= true * 10 ** (1 / 20) * (1 + 1e-9)
    assert stats.max_abs == pytest.approx(err.max())


def test_a_stream_file_with_the_wrong_last_dimension_or_type_or_no_rows_is_refused(tmp_path):
    case_file = tmp_path / "c.toml"
    for array, message in (
        (np.zeros((10, 15), np.float32), "last dimension must be input_dim = 16"),
        (np.zeros((10, 16), np.float64), "holds float64"),
        (np.zeros((0, 16), np.float32), "an empty stream"),
    ):
        np.save(tmp_path / "acts.npy", array)
        case_file.write_text('preset = "tiny"\n[input]\nshape = [1, 2, 16]\n[stream]\nfile = "acts.npy"\n')
        with pytest.raises(CaseError, match=message):
            load_case(case_file)


def test_a_correct_path_passes_a_stream_and_peak_statistics_do_not_keep_the_stream(project, streamed):
    case, golden = streamed(tokens=20_000, batch=5_000)
    context = CaseContext(case)
    result = run_stream(get_path("ort-cpu[torch-fast]"), context, golden, project.policy(), RunOptions(isolate=False))
    assert result["tokens"] == 20_000 and not result["failure"], result["failure"]
    assert result["agreement"] > 0.99 and result["wrong_selections"] == 0
    assert "as the golden's" in result["sample"]
    assert set(result["quantiles"]) == {"query", "scores", "weights", "output"}
    context.close()


def test_one_token_in_100000_selecting_a_wrong_set_fails_naming_the_token(project, streamed, monkeypatch):
    case, golden = streamed()
    bad_token = 73_421
    real = __import__("conformance.paths.worker", fromlist=["stream_taps"]).stream_taps

    def planted(context, name, first, count):
        x, got, want, seconds = real(context, name, first, count)
        if first <= bad_token < first + count:
            got = dict(got)
            heads = case.config.heads
            row = (bad_token - first) * heads
            indices = got["indices"].copy()
            taken = set(indices[row].tolist())
            indices[row, -1] = next(i for i in range(case.config.size) if i not in taken)  # a slot far from the top
            got["indices"] = indices
        return x, got, want, seconds

    import conformance.paths.worker as worker

    monkeypatch.setattr(worker, "stream_taps", planted)
    context = CaseContext(case)
    result = run_stream(get_path("torch-eager-cpu[fast]"), context, golden, project.policy(), RunOptions(isolate=False))
    context.close()
    assert result["failure"].startswith(f"token {bad_token:,}:"), result["failure"]
    assert result["wrong_tokens"] == [bad_token]
    assert result["agreement"] == pytest.approx(1 - 1 / (100_000 * case.config.heads))


def test_a_changed_stream_file_fails_golden_verify(project, tmp_path):
    acts = project.cases_dir / "acts.npy"
    np.save(acts, np.random.default_rng(0).standard_normal((3000, 16), dtype=np.float32))
    path = project.cases_dir / "tiny-file-stream.toml"
    path.write_text(
        'preset = "tiny"\n[input]\nshape = [1, 2, 16]\nseed = 1\n[stream]\nfile = "acts.npy"\nbatch = 1000\n'
    )
    project.regenerate("tiny-file-stream")
    project.store.verify("tiny-file-stream", load_case(path))
    golden = project.store.read("tiny-file-stream")
    assert golden.stream_input.shape == (1, 3, 16)  # tokens 0, 1000 and 2000
    changed = np.load(acts)
    changed[1500] += 1
    np.save(acts, changed)
    with pytest.raises(GoldenError, match=r"the stream's file .*acts\.npy changed since its golden"):
        project.store.verify("tiny-file-stream", load_case(path))


def test_a_reference_that_changed_since_the_golden_fails_the_stream(project, streamed):
    case, golden = streamed(tokens=5_000, batch=5_000)
    golden.stream_taps = {k: v.copy() for k, v in golden.stream_taps.items()}
    golden.stream_taps["output"][..., 0] += 0.5  # as if the reference computed differently then
    context = CaseContext(case)
    result = run_stream(get_path("torch-eager-cpu"), context, golden, project.policy(), RunOptions(isolate=False))
    context.close()
    assert "the live reference differs from the golden's sample" in result["failure"]


def test_an_empty_record_has_no_rates():
    stats = StreamStats()
    assert stats.to_json()["agreement"] is None and stats.to_json()["tokens_per_second"] is None
