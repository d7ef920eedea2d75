"""The per-operator profile reads the export's real kernels."""

import pytest

from conformance.bench.profile import main, profile


@pytest.mark.parametrize(("exporter", "expected"), [("torch-fast", {"TopK", "Gather"}), ("torch-script", {"Loop"})])
def test_profile_lists_the_exports_operators(tmp_path, exporter, expected):
    result = profile("tiny", exporter, runs=2, export_dir=tmp_path)
    ops = {op: ms for op, count, ms in result["ops"]}
    assert expected <= set(ops)
    assert exporter != "torch-fast" or "Loop" not in ops
    assert all(ms >= 0 for ms in ops.values())
    assert [ms for _, _, ms in result["ops"]] == sorted(ops.values(), reverse=True)
    # every timed pass got its own kernels, the same number each time
    counts = result["kernels_per_pass"]
    assert len(counts) == 2 and counts[0] == counts[1] > 0
    assert counts[0] == sum(count for _, count, _ in result["ops"])
    assert not list(tmp_path.glob("ort-profile*"))  # the profiler's trace is not left behind
    # kernels run one after another inside the pass; a Loop's body is counted once
    assert 0 < result["kernels_ms"] <= result["pass_ms"]
    if "Loop" in ops:
        assert result["kernels_ms"] == pytest.approx(sum(ops.values()) - ops["Loop"])


def test_command_prints_a_table(tmp_path, capsys):
    assert main(["--preset", "tiny", "--runs", "1", "--export-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| TopK |" in out and "| whole pass |" in out
    assert (tmp_path / "torch-fast.onnx").is_file()  # kept where asked


def test_rejects_zero_runs(capsys):
    with pytest.raises(SystemExit):
        main(["--runs", "0"])
    assert "--runs must be >= 1" in capsys.readouterr().err
