"""The per-stage timings check every runtime's result before timing it."""

import numpy as np
import pytest

from conformance.bench import stages


def test_every_runtime_is_checked_and_timed():
    result = stages.measure("tiny", tokens=6, runs=2)
    assert result["read_gb_per_s"] > 0
    for stage in ("top-k", "rows"):
        assert set(result[stage]) == {"torch", "onnxruntime", "tf.function", "xla"}
        assert all(ms > 0 for ms in result[stage].values())


def test_a_runtime_that_computes_something_else_is_refused(monkeypatch):
    right = stages._ort_rows

    def off_by_one_slot(n, slots=stages.SLOTS):
        run = right(n, slots)
        return lambda values, indices, weights: run(values, np.roll(indices, 1, axis=1), weights)

    monkeypatch.setattr(stages, "_ort_rows", off_by_one_slot)
    with pytest.raises(AssertionError, match="rows: onnxruntime"):
        stages.measure("tiny", tokens=6, runs=1)


def test_command_prints_the_table(capsys):
    assert stages.main(["--preset", "tiny", "--tokens", "4", "--runs", "1", "--slots", "3"]) == 0
    out = capsys.readouterr().out
    assert "XLA-fused sum: 3 slots per block" in out
    assert "| stage | torch | onnxruntime | tf.function | xla |" in out and "| rows |" in out


@pytest.mark.parametrize("option", ["--runs", "--tokens", "--slots"])
def test_rejects_zero(option, capsys):
    with pytest.raises(SystemExit):
        stages.main([option, "0"])
    assert "--tokens, --runs and --slots must be >= 1" in capsys.readouterr().err


def test_rejects_an_unknown_preset(capsys):
    with pytest.raises(SystemExit) as exit_info:
        stages.main(["--preset", "nope"])
    assert exit_info.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
