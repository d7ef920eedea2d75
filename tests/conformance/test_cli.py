import re

import pytest

from conformance.cli import main
from pkm_models import get_preset, make_weights
from pkm_models.convert import save_checkpoint
from tests.conftest import HAS_CUDA_DRIVER

TINY = get_preset("tiny").config


def test_convert(tmp_path, capsys):
    save_checkpoint(make_weights(TINY, 0), tmp_path / "a.pt", TINY)
    assert main(["convert", str(tmp_path / "a.pt"), str(tmp_path / "a.keras"), "--knn", "4"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "missing.pt"), str(tmp_path / "b.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.pt: no such file" in err and "Traceback" not in err


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert "0.1.0" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "example: python -m conformance convert" in capsys.readouterr().out


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2


# --- run, golden, paths, cases --------------------------------------------------------------
def test_run_writes_reports_and_exits_0(project, tmp_path, capsys, gpu_paths_unavailable):
    import json
    import xml.etree.ElementTree as ET

    reports = tmp_path / "reports"
    args = ["run", "--case", "tiny", "--path", "torch-eager-cpu", "--path", "ort-cpu[torch-fast]"]
    args += ["--path", "*cuda", "--path", "ort-cuda[*]"]  # the float32 CUDA paths: stubs, unavailable
    assert main([*args, *project.cli_args(), "--report-dir", str(reports), "--verbose"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^tiny\s+torch-eager-cpu\s+pass", out, re.M) and "OK:" in out and "  output" in out
    report = json.loads((reports / "report.json").read_text())
    assert report["ok"] is True
    assert {"versions", "providers", "cpu", "gpu"} <= set(report["environment"])
    path = report["cases"][0]["paths"][0]
    assert {"name", "status", "reason", "first_divergence", "tensors"} <= set(path)
    assert {"name", "status", "max_abs", "max_rel", "atol", "rtol", "mismatches", "ambiguous_rows"} <= set(
        path["tensors"][0]
    )
    suite = ET.parse(reports / "junit.xml").getroot()[0]
    paths = report["cases"][0]["paths"]
    assert suite.get("tests") == str(len(paths)) == "9"  # 2 named + 7 float32 CUDA paths
    assert int(suite.get("skipped")) == sum(p["status"] == "unavailable" for p in paths) == 7
    assert (reports / "report.md").read_text().startswith("# Conformance report: OK")


def test_failing_run_exits_1_with_histogram(project, tmp_path, capsys):
    from tests.conformance.helpers import rewrite_tap

    rewrite_tap(project, "tiny", 4, lambda a: a + 1e-3)
    reports = tmp_path / "r"
    args = ["run", "--case", "tiny", "--path", "torch-eager-cpu", *project.cli_args(), "--report-dir", str(reports)]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "tiny torch-eager-cpu: fail: output:" in out
    md = (reports / "report.md").read_text()
    assert "![error histogram](tiny-torch-eager-cpu-output.png)" in md
    assert (reports / "tiny-torch-eager-cpu-output.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--case", "nope"], "unknown case(s) ['nope']; available: ['tiny', 'tiny-bn', 'tiny-tie']"),
        (["--path", "jax-*"], "--path 'jax-*' matches no execution path; known: ['torch-eager-cpu'"),
    ],
)
def test_run_usage_errors_exit_2(project, capsys, args, message):
    assert main(["run", *args, *project.cli_args()]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_data_exits_2(project, capsys):
    (project.golden_dir / "tolerances.toml").write_text("[default]\natol = -1\nrtol = 0\n")
    assert main(["run", "--case", "tiny", "--path", "torch-eager-cpu", *project.cli_args()]) == 2
    assert "tolerances.toml: default.atol: expected a non-negative number, got -1" in capsys.readouterr().err


def test_golden_verify_and_regenerate(project, capsys):
    assert main(["golden", "verify", *project.cli_args()]) == 0
    assert "tiny: ok" in capsys.readouterr().out
    assert main(["golden", "regenerate", "--case", "tiny", *project.cli_args()]) == 0
    out = capsys.readouterr().out
    assert "tiny: drift output   max abs 0" in out and "wrote" in out
    pb = project.store.case_dir("tiny") / "test_data_set_0" / "output_0.pb"
    pb.write_bytes(pb.read_bytes()[:10])
    assert main(["golden", "verify", *project.cli_args()]) == 2
    assert "output_0.pb: sha256" in capsys.readouterr().err


def test_paths_and_cases_listings(capsys):
    assert main(["paths"]) == 0
    out = capsys.readouterr().out
    assert "torch-eager-cpu" in out and "available" in out
    line = next(x for x in out.splitlines() if x.startswith("ort-cuda[torch-fast] "))
    if HAS_CUDA_DRIVER:  # it may run here, or say why not
        assert line.split()[1] == "available" or "unavailable: CUDAExecutionProvider" in line, line
    else:
        assert "unavailable: CUDAExecutionProvider: no NVIDIA driver" in line, line
    assert main(["cases"]) == 0
    assert "near-tie" in capsys.readouterr().out


# --- export --------------------------------------------------------------------------------
def test_export_one_failing_exporter_does_not_stop_the_others(tmp_path, capsys):
    args = ["export", "--preset", "tiny", "--exporter", "torch-fast", "--exporter", "tf2onnx", "--opset", "20"]
    assert main([*args, "--out", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert "tf2onnx: FAILED: ExportUnsupported: tf2onnx: tf2onnx 1.17 supports opsets up to 18, got 20" in out.out
    assert "torch-fast: " in out.out and "ops: " in out.out
    assert (tmp_path / "torch-fast.onnx").is_file() and not (tmp_path / "tf2onnx.onnx").exists()
    assert "1 of 2 exporter(s) failed: ['tf2onnx']" in out.err


def test_export_a_case_tapped(tmp_path, capsys):
    import onnx

    assert main(["export", "--case", "tiny-bn", "--exporter", "torch-script", "--tapped", "--out", str(tmp_path)]) == 0
    model = onnx.load(str(tmp_path / "torch-script.onnx"))
    assert [o.name for o in model.graph.output] == ["query", "scores", "indices", "weights", "output"]
    assert "warning: 1 x Loop" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--preset", "tiny", "--exporter", "onnx-magic"],
            "unknown exporter(s) ['onnx-magic']; available: ['torch-dynamo'",
        ),
        (["--preset", "huge"], "unknown preset 'huge'; available:"),
        (["--case", "nope"], "unknown case(s) ['nope']; available:"),
        (["--preset", "tiny", "--out", "/proc/forbidden"], "cannot write to output folder /proc/forbidden"),
    ],
)
def test_export_usage_errors(tmp_path, capsys, args, message):
    full = ["export", *args] if "--out" in args else ["export", *args, "--out", str(tmp_path)]
    assert main(full) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_read_only_report_folder_is_a_clear_error_and_leaves_nothing(project, tmp_path, capsys):
    import os

    if os.geteuid() == 0:  # root ignores permission bits: use a path under a file instead
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        folder = blocker / "reports"
    else:
        folder = tmp_path / "ro"
        folder.mkdir(mode=0o500)
    args = ["run", "--case", "tiny", "--path", "torch-eager-cpu", *project.cli_args(), "--report-dir", str(folder)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write to output folder") and "Traceback" not in err
    assert not (folder / "report.json").exists()


@pytest.mark.parametrize(
    "command",
    [
        ["run"],
        ["golden"],
        ["golden", "regenerate"],
        ["golden", "verify"],
        ["export"],
        ["convert"],
        ["bench"],
        ["paths"],
        ["cases"],
    ],
)
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "example" in capsys.readouterr().out


def test_disk_full_while_writing_leaves_no_report(project, tmp_path, capsys, monkeypatch):
    import errno

    from conformance import report

    def full(result):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "junit", full)
    folder = tmp_path / "reports"
    args = ["run", "--case", "tiny", "--path", "torch-eager-cpu", *project.cli_args(), "--report-dir", str(folder)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot write the report to" in err and "No space left on device" in err
    assert not [p for p in folder.iterdir() if p.suffix in (".json", ".xml", ".md") or p.name.startswith(".")]


def test_a_run_in_family_workers_loads_no_framework_in_its_own_process(project, tmp_path):
    """The parent of a default run judges and reports; torch, TensorFlow and ONNX Runtime
    load in the workers only."""
    import subprocess
    import sys

    args = ["run", "--case", "tiny", "--path", "torch-eager-cpu", "--path", "tf-eager-cpu"]
    args += ["--path", "ort-cpu[torch-fast]", "--path", "torch-eager-cuda", *project.cli_args()]
    code = (
        "import sys\nfrom conformance.cli import main\ncode = main(sys.argv[1:])\n"
        "print(sorted({'torch', 'tensorflow', 'keras', 'onnxruntime'} & set(sys.modules)), code)"
    )
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600).stdout
    assert re.search(r"^tf-eager-cpu\s+\+$", out, re.M) and "OK: 3 pass, 1 unavailable" in out, out
    assert out.strip().splitlines()[-1] == "[] 0"
