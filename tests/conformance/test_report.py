"""What a person reads first: the matrix, the reasons grouped, what a failure needed."""

import re

from conformance import report
from conformance.report import markdown, table
from conformance.results import FAIL, PASS, CaseResult, PathResult, RunResult, TensorResult
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


def test_coverage_and_streams_are_in_report_md_and_json(tmp_path):
    from conformance.export.audit import AuditResult
    from conformance.sweep import SweepResult

    swept = PathResult("ort-cpu[torch-fast]", PASS)
    swept.add_sweep([SweepResult("values", 262_144, 262_144, seconds=0.5)])
    swept.add_audit(AuditResult("torch-fast.onnx", tensors=4))
    bad = PathResult("ort-cpu[torch-fast]@int8", PASS)
    bad.add_sweep(
        [
            SweepResult(
                "values",
                262_144,
                262_144,
                rows_differing=1,
                bags_differing=1,
                first_bad_row={"row": 65_536, "column": 3, "obtained": 0.5, "expected": 0.25},
            )
        ]
    )
    hist = [0] * 402
    hist[200] = 10
    bad.add_stream(
        {
            "tokens": 1000,
            "agreement": 0.999,
            "ambiguous_rate": 0.0,
            "wrong_selections": 1,
            "wrong_tokens": [417],
            "quantiles": {"output": {"p50": 1e-7, "p99": 1e-6, "p999": 2e-6, "max": 3e-6, "max_rel": 1e-3}},
            "required_atol": {"output": 3e-6},
            "tokens_per_second": 5000.0,
            "failure": "token 417: indices: wrong",
            "sample": "",
            "histograms": {"output": hist},
        }
    )
    not_swept = PathResult("torch-compile-cpu", PASS)
    not_swept.add_sweep([], "torch.compile fuses the weighted sum")
    result = RunResult(
        [CaseResult("xlm", [swept, bad, not_swept], coverage={"rows": 262_144, "rows_selected": 2_043})], {}
    )
    assert bad.status == FAIL and bad.first_divergence == "sweep:values" and "65,536" in bad.reason
    md = report.markdown(result, tmp_path).decode()
    assert "| xlm | 262,144 | 2,043 (0.78%) | 2 paths (100%) | 1 | 1 paths | 1 paths | 0 |" in md
    assert "torch-compile-cpu: torch.compile fuses the weighted sum" in md
    assert "| xlm | ort-cpu[torch-fast]@int8 | 1,000 | 99.9% |" in md and "token 417" in md
    assert (tmp_path / "stream-xlm-ort-cpu_torch-fast_@int8.png").is_file()
    data = result.to_json()["cases"][0]
    assert data["coverage"] == {"rows": 262_144, "rows_selected": 2_043}
    first = data["paths"][0]
    assert first["sweep"]["rows_read"] == 262_144 and first["audit"]["differing"] == []
    assert data["paths"][1]["sweep"]["first_bad_row"]["row"] == 65_536
    assert "histograms" not in data["paths"][1]["stream"]
    assert data["paths"][2]["sweep"] == {"reason": "torch.compile fuses the weighted sum"}
