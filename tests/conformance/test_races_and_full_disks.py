"""Slow fault tests: a run racing a regeneration, and a disk that fills under every writer.

The disk is filled with a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored), which makes
every write past the limit fail with EFBIG, as a full file system fails with ENOSPC."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conformance.golden import sha256

REPO = Path(__file__).resolve().parents[2]
LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from conformance.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _cli(args, limit=None):
    cmd = [sys.executable, "-m", "conformance", *args]
    if limit is not None:
        cmd = [sys.executable, "-c", LIMITED, str(limit), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_run_racing_a_regeneration_never_gives_a_wrong_verdict(project):
    """30 runs of the reference path while the golden is regenerated in a loop with two
    alternating inputs: each run passes, or (when the case file changed under it) is
    refused as bad data; it never fails, never errors."""
    case_file = project.cases_dir / "tiny.toml"
    text = case_file.read_text()
    inputs = [text, text.replace("seed = 1", "seed = 2")]
    assert inputs[0] != inputs[1]
    stop = threading.Event()
    regenerations = []

    def regenerate_loop():
        i = 0
        while not stop.is_set():
            case_file.write_text(inputs[i % 2])
            done = _cli(["golden", "regenerate", "--case", "tiny", "--accept-drift", *project.cli_args()])
            regenerations.append(done.returncode)
            i += 1

    thread = threading.Thread(target=regenerate_loop)
    thread.start()
    verdicts = []
    try:
        for _ in range(30):
            done = _cli(["run", "--case", "tiny", "--path", "torch-eager-cpu", *project.cli_args()])
            verdicts.append((done.returncode, done.stdout[-300:] + done.stderr[-300:]))
    finally:
        stop.set()
        thread.join()
    wrong = [v for v in verdicts if v[0] == 1 or (v[0] == 2 and "changed since its golden" not in v[1])]
    assert not wrong, wrong
    assert sum(rc == 0 for rc, _ in verdicts) >= 5, verdicts  # the race was real, and runs got through
    assert len(regenerations) >= 5 and all(rc in (0, 2) for rc in regenerations), regenerations


@pytest.mark.slow
def test_every_writer_keeps_the_original_on_a_full_disk(project, tmp_path):
    # convert: an existing .npz destination
    from pkm_models import get_preset, make_weights
    from pkm_models.convert import save_checkpoint

    tiny = get_preset("tiny").config
    work = tmp_path / "convert"
    work.mkdir()
    save_checkpoint(make_weights(tiny, 0), work / "src.pt", tiny)
    save_checkpoint(make_weights(tiny, 1), work / "dst.npz", tiny)
    before = sha256(work / "dst.npz")
    done = _cli(["convert", str(work / "src.pt"), str(work / "dst.npz"), "--knn", "4"], limit=1024)
    assert done.returncode == 2 and "error:" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert sha256(work / "dst.npz") == before
    assert sorted(p.name for p in work.iterdir()) == ["dst.npz", "src.pt"]

    # export: an existing .onnx
    out = tmp_path / "exports"
    assert _cli(["export", "--preset", "tiny", "--exporter", "torch-fast", "--out", str(out)]).returncode == 0
    before = _tree(out)
    done = _cli(
        ["export", "--preset", "tiny", "--seed", "3", "--exporter", "torch-fast", "--force", "--out", str(out)], 2048
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert _tree(out) == before

    # regenerate: the old golden stays whole
    golden = project.store.case_dir("tiny")
    before = _tree(golden)
    case_file = project.cases_dir / "tiny.toml"
    case_file.write_text(case_file.read_text().replace("seed = 1", "seed = 2"))
    done = _cli(["golden", "regenerate", "--case", "tiny", "--accept-drift", *project.cli_args()], limit=512)
    assert done.returncode == 2 and "the old golden is kept" in done.stderr, done.stderr
    assert _tree(golden) == before
    assert not [p for p in project.golden_dir.iterdir() if p.name.startswith(".staging")]

    # reports: a previous run's reports stay whole
    reports = tmp_path / "reports"
    args = ["run", "--case", "tiny-bn", "--path", "torch-eager-cpu", "--in-process", "--report-dir", str(reports)]
    args += project.cli_args()
    assert _cli(args).returncode == 0
    before = _tree(reports)
    largest = max(p.stat().st_size for p in reports.iterdir())
    done = _cli(args, limit=largest // 2)  # the largest report no longer fits
    assert done.returncode == 2 and "cannot write the report" in done.stderr, done.stderr
    assert _tree(reports) == before
    assert not [p for p in os.listdir(reports) if p.startswith(".")]
