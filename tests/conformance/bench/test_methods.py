"""The Keras methods measurement: usage errors and one measured method."""

import json

import pytest

from conformance.bench.methods import main


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--runs", "0"], "--runs must be >= 1"),
        (["--shape", "4,x"], "expected integers separated by commas"),
        (["--shape", "4,128,5"], "ending in the preset's input_dim (768)"),
        (["--preset", "nope"], "invalid choice: 'nope'"),
    ],
)
def test_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_one_method_and_mode(capsys):
    assert main(["--preset", "tiny", "--shape", "2,3,16", "--runs", "2", "--one", "fused", "function"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (row["method"], row["mode"]) == ("fused", "function")
    assert row["median_ms"] > 0 and row["peak_extra_mb"] >= 0
