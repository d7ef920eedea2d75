"""What a person reads first: the matrix, the reasons grouped, what a failure needed."""

import re

from conformance.report import markdown, table
from conformance.results import CaseResult, PathResult, RunResult, TensorResult
from conformance.text import aligned

NO_GPU = "no CUDA device is visible (torch 2.13)"


def result():
    def paths(case):
        failing = TensorResult("output", "fail", 2e-3, 1e-2, 1e-5, 1e-4, mismatches=3, required_atol=2.5e-3)
        return [
            PathResult("torch-eager-cpu", "pass", tensors=[TensorResult("output", "pass", 1e-7, 1e-6, 1e-5, 1e-4)]),
            PathResult("torch-eager-cuda", "unavailable", reason=NO_GPU),
            PathResult("tf-eager-gpu", "unavailable", reason=NO_GPU),
            PathResult("ort-cpu[keras]", "fail", reason="output: 3 elements beyond", tensors=[failing])
            if case == "small"
            else PathResult("ort-cpu[keras]", "error", reason="RuntimeError: boom"),
            PathResult("onnx-reference[keras]", "unavailable", reason="too big")
            if case == "xlm"
            else PathResult("onnx-reference[keras]", "pass", seconds=0.5),
        ]

    return RunResult([CaseResult(c, paths(c)) for c in ("small", "xlm")], {})


def test_the_matrix_has_one_symbol_per_case_and_path():
    out = table(result())
    assert re.search(r"^path\s+small\s+xlm$", out, re.M)
    assert re.search(r"^torch-eager-cpu\s+\+\s+\+$", out, re.M)
    assert re.search(r"^ort-cpu\[keras\]\s+X\s+E$", out, re.M)
    assert re.search(r"^onnx-reference\[keras\]\s+\+\s+-$", out, re.M)
    assert "+ pass   X fail   E error   - unavailable" in out


def test_each_unavailable_reason_is_shown_once_with_its_paths():
    out = table(result())
    assert out.count(NO_GPU) == 1
    assert re.search(r"^    torch-eager-cuda, tf-eager-gpu$", out, re.M)  # on every case: no case named
    assert re.search(r"^- too big\n    onnx-reference\[keras\] \(xlm\)$", out, re.M)


def test_a_failing_tap_shows_the_tolerance_that_would_have_passed():
    out = table(result())
    assert "small ort-cpu[keras]: fail: output: 3 elements beyond (would pass at output atol 0.0025)" in out
    assert "xlm ort-cpu[keras]: error: RuntimeError: boom" in out
    assert out.endswith("FAILED: 1 error, 1 fail, 3 pass, 5 unavailable (the paths' own time: 0.5 s)")


def test_the_per_row_table_only_when_verbose():
    assert "worst tap" not in table(result())
    assert re.search(r"^small\s+torch-eager-cpu\s+pass\s+output", table(result(), verbose=True), re.M)


def test_many_cases_are_numbered_with_a_key():
    many = RunResult(
        [CaseResult(f"a-rather-long-case-name-{i}", [PathResult("torch-eager-cpu", "pass")]) for i in range(6)], {}
    )
    out = table(many)
    assert re.search(r"^path\s+1\s+2\s+3\s+4\s+5\s+6$", out, re.M)
    assert "cases: 1 a-rather-long-case-name-0, 2 a-rather-long-case-name-1" in out


def test_report_md_opens_with_the_matrix(tmp_path):
    md = markdown(result(), tmp_path).decode()
    assert md.index("| path | small | xlm |") < md.index("## Unavailable here") < md.index("## Every path that ran")
    assert "| ort-cpu[keras] | X | E |" in md
    assert md.count(NO_GPU) == 1


def test_one_renderer_aligns_every_table():
    lines = aligned([("a", "long header"), ("wider cell", "x")])
    assert lines == ["a           long header", "----------  -----------", "wider cell  x"]
    assert aligned([("a", "b"), ("cc", "")], header=False) == ["a   b", "cc"]
