"""``python -m conformance merge``: one matrix from the reports of several machines.

The first machine's report comes from a real run; the other machines' are that report as a
GPU machine would have written it (its hostname, GPU and verdicts edited in)."""

import copy
import hashlib
import json
import platform
import xml.etree.ElementTree as ET

import pytest

from conformance.cli import main
from tests.conftest import STUB_REASON, is_gpu_path

CUDA = "ort-cuda[torch-fast]"


@pytest.fixture(scope="module")
def cpu_report(pristine_project, tmp_path_factory):
    """A real report.json: torch eager (runs here) and ORT CUDA (a stub, unavailable on any machine)."""
    from conformance.paths import select_paths
    from conformance.report import write_reports
    from conformance.runner import RunOptions, run_conformance
    from tests.conformance.conftest import Project

    project = Project(pristine_project)
    paths = select_paths(["torch-eager-cpu", CUDA])
    with pytest.MonkeyPatch.context() as patch:
        for path in paths:
            if is_gpu_path(path.name):
                patch.setattr(path, "check", _unavailable)
        result = run_conformance(
            project.cases("tiny"), paths, project.store, project.policy(), RunOptions(isolate=False)
        )
    out = tmp_path_factory.mktemp("cpu-run")
    write_reports(result, out)
    return json.loads((out / "report.json").read_text()), project


def _unavailable(case=None):
    from conformance.paths import PathUnavailable

    raise PathUnavailable(STUB_REASON)


def gpu_machine(report: dict, statuses: dict[str, str], host: str = "gpu-box") -> dict:
    """``report`` as written on another machine, where the named paths got these statuses."""
    other = copy.deepcopy(report)
    other["environment"]["machine"] = {"hostname": host, "cpu": "some CPU", "gpu": "NVIDIA H100"}
    other["environment"]["gpu"] = "NVIDIA H100"
    tensors = next(p for p in report["cases"][0]["paths"] if p["status"] == "pass")["tensors"]
    for p in other["cases"][0]["paths"]:
        if p["name"] in statuses:
            status = statuses[p["name"]]
            p.update(status=status, reason="" if status == "pass" else f"{status} on {host}", tensors=tensors)
    other["ok"] = all(p["status"] in ("pass", "unavailable") for p in other["cases"][0]["paths"])
    return other


def write(tmp_path, name: str, data) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def rows(merged: dict) -> dict:
    return {p["name"]: p for p in merged["cases"][0]["paths"]}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_run_report_records_its_golden_and_machine(cpu_report):
    report, project = cpu_report
    case_json = (project.golden_dir / "tiny" / "case.json").read_bytes()
    assert report["cases"][0]["golden"] == {"sha256": hashlib.sha256(case_json).hexdigest()}
    assert report["environment"]["machine"]["hostname"] == platform.node()


def test_two_machines_combined_show_each_run_where_it_ran(cpu_report, tmp_path, capsys):
    cpu, _ = cpu_report
    assert rows(cpu)[CUDA]["status"] == "unavailable"
    gpu = gpu_machine(cpu, {CUDA: "pass", "torch-eager-cpu": "unavailable"})
    files = [write(tmp_path, "cpu.json", cpu), write(tmp_path, "gpu.json", gpu)]
    out_dir = tmp_path / "merged"
    assert main(["merge", *files, "--report-dir", str(out_dir)]) == 0
    out = capsys.readouterr().out
    merged = json.loads((out_dir / "report.json").read_text())
    here = f"{platform.node()} ({cpu['environment']['machine']['cpu']})"
    gpu_box = "gpu-box (NVIDIA H100)"
    assert merged["ok"] is True and merged["conflicts"] == []
    assert [m["name"] for m in merged["machines"]] == [here, gpu_box]
    cuda, eager = rows(merged)[CUDA], rows(merged)["torch-eager-cpu"]
    assert (cuda["status"], cuda["machine"]) == ("pass", gpu_box)  # unavailable on the CPU machine, ran on the GPU one
    assert [(m["machine"], m["status"]) for m in cuda["machines"]] == [(here, "unavailable"), (gpu_box, "pass")]
    assert (eager["status"], eager["machine"]) == ("pass", here)
    assert merged["cases"][0]["golden"] == cpu["cases"][0]["golden"]
    assert f"tiny  {CUDA}  pass    {gpu_box}" in out and "OK: 2 pass" in out
    suite = ET.parse(out_dir / "junit.xml").getroot()[0]
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("2", "0", "0")
    md = (out_dir / "report.md").read_text()
    assert md.startswith("# Conformance report, merged from 2 reports: OK")
    assert f"| tiny | {CUDA} | pass | {gpu_box} |" in md and "## Conflicts" not in md


def test_unavailable_everywhere_stays_unavailable_with_each_machines_reason(cpu_report, tmp_path):
    cpu, _ = cpu_report
    gpu = gpu_machine(cpu, {CUDA: "unavailable"})
    assert (
        main(["merge", write(tmp_path, "a.json", cpu), write(tmp_path, "b.json", gpu), "--report-dir", str(tmp_path)])
        == 0
    )
    cuda = rows(json.loads((tmp_path / "report.json").read_text()))[CUDA]
    assert cuda["status"] == "unavailable" and cuda["machine"] is None
    assert "no NVIDIA driver" in cuda["reason"] and "gpu-box (NVIDIA H100): unavailable on gpu-box" in cuda["reason"]


def test_required_but_unavailable_on_one_machine_gives_way_to_the_run_elsewhere(cpu_report, tmp_path):
    cpu, _ = cpu_report
    required = copy.deepcopy(cpu)
    rows(required)[CUDA].update(status="fail", reason="required but unavailable: no NVIDIA driver")
    gpu = gpu_machine(cpu, {CUDA: "pass"})
    files = [write(tmp_path, "a.json", required), write(tmp_path, "b.json", gpu)]
    assert main(["merge", *files, "--report-dir", str(tmp_path / "m")]) == 0
    assert rows(json.loads((tmp_path / "m" / "report.json").read_text()))[CUDA]["status"] == "pass"
    only = [write(tmp_path, "a.json", required), write(tmp_path, "c.json", gpu_machine(cpu, {CUDA: "unavailable"}))]
    assert main(["merge", *only]) == 1  # run nowhere: the requirement still fails


def test_different_verdicts_are_a_conflict_that_fails(cpu_report, tmp_path, capsys):
    cpu, _ = cpu_report
    gpu = gpu_machine(cpu, {CUDA: "pass", "torch-eager-cpu": "fail"})
    files = [write(tmp_path, "cpu.json", cpu), write(tmp_path, "gpu.json", gpu)]
    assert main(["merge", *files, "--report-dir", str(tmp_path / "m")]) == 1
    out = capsys.readouterr().out
    merged = json.loads((tmp_path / "m" / "report.json").read_text())
    eager = rows(merged)["torch-eager-cpu"]
    assert merged["ok"] is False and eager["status"] == "fail" and eager["conflict"] is True
    assert (
        "conflict: the machines disagree" in eager["reason"]
        and "gpu-box (NVIDIA H100): fail (fail on gpu-box)" in eager["reason"]
    )
    assert [(c["case"], c["path"]) for c in merged["conflicts"]] == [("tiny", "torch-eager-cpu")]
    assert [v["status"] for v in merged["conflicts"][0]["verdicts"]] == ["pass", "fail"]
    assert "CONFLICT" in out and "1 conflict(s)" in out and "\nFAILED: 1 fail, 1 pass; 1 conflict(s)\n" in out
    assert ET.parse(tmp_path / "m" / "junit.xml").getroot()[0].get("failures") == "1"
    assert "## Conflicts" in (tmp_path / "m" / "report.md").read_text()


def test_reports_of_different_goldens_are_refused(cpu_report, tmp_path, capsys):
    cpu, _ = cpu_report
    gpu = gpu_machine(cpu, {CUDA: "pass"})
    gpu["cases"][0]["golden"]["sha256"] = "0" * 64
    out_dir = tmp_path / "m"
    assert (
        main(["merge", write(tmp_path, "a.json", cpu), write(tmp_path, "b.json", gpu), "--report-dir", str(out_dir)])
        == 2
    )
    line = one_error_line(capsys)
    assert "different goldens" in line and "'tiny'" in line and "000000000000" in line
    assert not out_dir.exists()


def test_a_report_without_golden_digests_is_refused(cpu_report, tmp_path, capsys):
    cpu, _ = cpu_report
    old = copy.deepcopy(cpu)
    del old["cases"][0]["golden"]
    assert main(["merge", write(tmp_path, "a.json", cpu), write(tmp_path, "old.json", old)]) == 2
    assert "has no golden digest" in one_error_line(capsys)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "is not valid JSON (truncated?)"),  # the real report cut in half
        ("", "is not valid JSON"),
        ("[1, 2]", "expected a JSON object, found list"),
        ('{"hello": 1}', "neither a conformance report.json nor a bench.json"),
        ('{"cases": 3, "environment": {}}', "not a conformance report"),
        (
            '{"cases": [{"name": "tiny", "golden": {"sha256": "a"}, "paths": [{"name": "x", "status": "maybe"}]}], '
            '"environment": {}}',
            "without a name or a known status",
        ),
        (
            '{"cases": [{"name": "tiny", "golden": {"sha256": "a"}, "paths": [{"name": "x", "status": "pass", '
            '"tensors": [3]}]}], "environment": {}}',
            "malformed reason, tensors or seconds",
        ),
        ("MISSING", "cannot read"),
        # these gave a raw RecursionError and ValueError
        ("[" * 100000 + "]" * 100000, "nested too deeply to be a report"),
        ('{"cases": [], "environment": {}, "x": ' + "9" * 5000 + "}", "Exceeds the limit (4300 digits)"),
        # a name with a newline or '|' broke the merged markdown and terminal tables
        (
            '{"cases": [{"name": "tiny", "golden": {"sha256": "a"}, "paths": [{"name": "x\\n| y", '
            '"status": "pass"}]}], "environment": {}}',
            "is not an execution path's name",
        ),
        (
            '{"cases": [{"name": "ti|ny", "golden": {"sha256": "a"}, "paths": []}], "environment": {}}',
            "case name 'ti|ny' is not a plain name",
        ),
    ],
)
def test_bad_or_truncated_reports_exit_2_with_one_error_line(cpu_report, tmp_path, capsys, content, message):
    cpu, _ = cpu_report
    good = write(tmp_path, "good.json", cpu)
    if content is None:
        content = json.dumps(cpu)[: len(json.dumps(cpu)) // 2]
    bad = str(tmp_path / "nope.json") if content == "MISSING" else write(tmp_path, "bad.json", content)
    assert main(["merge", good, bad]) == 2
    assert message in one_error_line(capsys)


def test_control_characters_in_a_reason_leave_junit_valid_xml(cpu_report, tmp_path):
    import xml.etree.ElementTree as ET

    cpu, _ = cpu_report
    gpu = gpu_machine(cpu, {CUDA: "fail"})
    for p in gpu["cases"][0]["paths"]:
        p["reason"] = "a runtime said \x1b[31mno\x00 \x07"
    assert main(
        ["merge", write(tmp_path, "a.json", cpu), write(tmp_path, "b.json", gpu), "--report-dir", str(tmp_path / "m")]
    ) in (0, 1)
    root = ET.parse(tmp_path / "m" / "junit.xml").getroot()  # raised ParseError before
    assert "\\x1b[31mno\\x00 \\x07" in ET.tostring(root, encoding="unicode")


def test_usage_errors(cpu_report, tmp_path, capsys):
    cpu, _ = cpu_report
    assert main(["merge", write(tmp_path, "a.json", cpu)]) == 2
    assert "at least two files" in one_error_line(capsys)
    bench = {"preset": "tiny", "model": "tiny", "input_shape": [3, 5, 16], "runs": 5, "paths": []}
    assert main(["merge", write(tmp_path, "a.json", cpu), write(tmp_path, "bench.json", bench)]) == 2
    assert "cannot merge report.json files with bench.json files" in one_error_line(capsys)
    merged_dir = tmp_path / "m"
    assert (
        main(["merge", write(tmp_path, "a.json", cpu), write(tmp_path, "b.json", cpu), "--report-dir", str(merged_dir)])
        == 0
    )
    assert main(["merge", str(merged_dir / "report.json"), write(tmp_path, "a.json", cpu)]) == 2
    assert "itself a merged report" in one_error_line(capsys)


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "--help"])
    assert exit_.value.code == 0
    assert "example" in capsys.readouterr().out
