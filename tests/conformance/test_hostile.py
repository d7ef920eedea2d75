"""What a hostile user (or a bit flip) tried: each class of attack on the verdict, on the
user's files and on the store, and the refusal that closes it.

Every test here failed on the code before the fix (see docs/robustness.md)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conformance.cli import main
from conformance.golden import DATA_SET, GoldenError, sha256
from conformance.tolerances import ToleranceError
from tests.conformance.helpers import rewrite_tap

REPO = Path(__file__).resolve().parents[2]
RUN = ["run", "--case", "tiny", "--path", "torch-eager-cpu", "--in-process"]


def _one_error_line(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def _edit_meta(project, case, edit):
    path = project.store.case_dir(case) / "case.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta, indent=2))


# --- the verdict cannot be fooled -----------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_golden_is_bad_data_for_run_and_verify(project, capsys, bad):
    def poison(a):
        a = a.copy()
        a[0, 0, 0] = bad
        return a

    rewrite_tap(project, "tiny", 4, poison)  # hash made consistent
    assert main([*RUN, *project.cli_args()]) == 2
    _one_error_line(capsys.readouterr().err, "output_4.pb", "a golden must be finite")
    assert main(["golden", "verify", "--case", "tiny", *project.cli_args()]) == 2
    assert "a golden must be finite" in capsys.readouterr().err


def test_regenerate_refuses_to_write_non_finite_taps(project, monkeypatch):
    import conformance.regenerate as regen

    real = regen.reference_taps

    def nan_taps(*args):
        taps = real(*args)
        taps["weights"][0, 0] = np.nan
        return taps

    monkeypatch.setattr(regen, "reference_taps", nan_taps)
    folder = project.store.case_dir("tiny")
    before = (folder / "case.json").read_bytes()
    with pytest.raises(GoldenError, match="non-finite values in 'weights'; not written"):
        project.regenerate("tiny", accept_drift=True)
    assert (folder / "case.json").read_bytes() == before


@pytest.mark.parametrize(
    ("tolerances", "match"),
    [
        ("[default]\natol = 1e-5\nrtol = 1e308\n", "would accept zeros for most elements"),
        ("[default]\natol = 1e-5\nrtol = 1.0\n", "would accept zeros for most elements"),
        ("[default]\natol = 1e3\nrtol = 0\n", "would accept zeros for most elements"),
        ("[default]\natol = 1e-5\nrtol = 1e-4\n[tap.scores]\natol = 0.5\n", "exceeds the median top-k margin"),
    ],
)
def test_tolerances_that_switch_a_check_off_are_refused(project, capsys, tolerances, match):
    rewrite_tap(project, "tiny", 4, lambda a: a * 1000)  # a golden that a loose tolerance would pass
    (project.golden_dir / "tolerances.toml").write_text(tolerances)
    assert main([*RUN, *project.cli_args()]) == 2
    _one_error_line(capsys.readouterr().err, match)


def test_tolerance_tables_given_scalars_are_named(project):
    from conformance.tolerances import parse_policy

    for table in ("tap", "path", "case", "default"):
        with pytest.raises(ToleranceError, match=rf"\[{table}\] must be a table"):
            parse_policy({"default": {"atol": 1, "rtol": 0}, table: 3}, "t.toml", ["torch-eager-cpu"], ["tiny"])


# --- the store: confined, typed, hashed as read ---------------------------------------------
@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_files_outside_the_golden_folder_are_refused_without_reading_them(project, tmp_path, monkeypatch, kind):
    folder = project.store.case_dir("tiny")
    outside = tmp_path / "secret.pb"
    outside.write_bytes((folder / DATA_SET / "output_4.pb").read_bytes())
    rel = f"{DATA_SET}/output_4.pb"
    if kind == "symlink":
        (folder / rel).unlink()
        (folder / rel).symlink_to(outside)
        match = "symbolic link"
    else:
        name = str(outside) if kind == "absolute" else os.path.relpath(outside, folder)

        # an extra entry naming the outside file, with its consistent hash
        _edit_meta(project, "tiny", lambda meta: meta["sha256"].update({name: sha256(outside)}))
        match = "leaves its folder"
    digest = sha256(outside)
    reads = _spy_on_opening(monkeypatch, outside)
    with pytest.raises(GoldenError, match=match) as raised:
        project.store.read("tiny")
    assert reads == []  # never opened, by any name (the symbolic link included)
    assert digest[:8] not in str(raised.value)  # nothing about the outside file
    outside.read_bytes()
    assert reads  # the spy does see a read


def _spy_on_opening(monkeypatch, target):
    """Every opening of ``target`` (under any name that resolves to it), by builtins.open,
    io.open (pathlib) or os.open, is recorded in the returned list."""
    import builtins
    import io

    target = os.path.realpath(target)
    reads = []

    def spy(real):
        def opening(file, *args, **kwargs):
            if isinstance(file, str | bytes | os.PathLike) and os.path.realpath(file) == target:
                reads.append(os.fspath(file))
            return real(file, *args, **kwargs)

        return opening

    monkeypatch.setattr(builtins, "open", spy(builtins.open))
    monkeypatch.setattr(io, "open", spy(io.open))
    monkeypatch.setattr(os, "open", spy(os.open))
    return reads


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.update(sha256=["a", "b"]), "sha256 must map file names to digests"),
        (lambda m: m["sha256"].update({f"{DATA_SET}/input_0.pb": 42}), "is not 64 lower-case hex digits"),
        (lambda m: m["sha256"].update({f"{DATA_SET}/input_0.pb": "z" * 64}), "is not 64 lower-case hex digits"),
        (lambda m: m.update(layers="two"), "layers must be a positive integer"),
        (lambda m: m.update(config=[1]), "config must be an object"),
    ],
)
def test_malformed_case_json_entries_are_bad_data(project, capsys, edit, match):
    _edit_meta(project, "tiny", edit)
    assert main([*RUN, *project.cli_args()]) == 2
    _one_error_line(capsys.readouterr().err, match)


def _rewrite_weights(project, arrays):
    folder = project.store.case_dir("tiny")
    path = folder / "weights.npz"
    np.savez(path, **arrays, allow_pickle=True)  # pickles allowed: an object array is one attack
    _edit_meta(project, "tiny", lambda m: m["sha256"].update({"weights.npz": sha256(path)}))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda w: w.pop("keys"), "missing ['keys']"),
        (lambda w: w.update(keys=w["keys"][0]), "keys: expected shape"),
        (lambda w: w.update(keys=w["keys"].astype(np.float64)), "keys is float64, expected float32"),
        (lambda w: w["values.weight"].__setitem__((0, 0), np.nan), "values.weight holds NaN or Inf"),
        (lambda w: w.update(keys=np.array([object()] * 3)), "not a readable .npz of plain arrays"),
    ],
)
def test_bad_golden_weights_are_bad_data_not_a_failed_path(project, capsys, edit, match):
    weights = dict(project.store.read("tiny").weights)
    weights = {k: v.copy() for k, v in weights.items()}
    edit(weights)
    _rewrite_weights(project, weights)
    assert main([*RUN, *project.cli_args()]) == 2
    _one_error_line(capsys.readouterr().err, match)


# --- nothing the user owns is touched; nothing is created before the inputs are valid -------
def test_the_writability_probe_touches_no_user_file(project, tmp_path, capsys):
    reports = tmp_path / "reports"
    reports.mkdir()
    for name in (".write-test", ".pkm-write-probe-x"):
        (reports / name).write_text("mine")
    assert main([*RUN, *project.cli_args(), "--report-dir", str(reports)]) == 0
    assert all((reports / n).read_text() == "mine" for n in (".write-test", ".pkm-write-probe-x"))
    assert not list(reports.glob(".pkm-write-probe-*[!x]"))


def test_an_invalid_run_creates_no_report_folder(project, tmp_path, capsys):
    target = tmp_path / "a" / "b"
    assert main(["run", "--case", "nope", *project.cli_args(), "--report-dir", str(target)]) == 2
    assert "unknown case" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_a_failing_export_keeps_the_existing_file(tmp_path, monkeypatch):
    import conformance.export as export_module
    from conformance.export import ExportError, ModelSpec, export
    from pkm_models import get_preset

    spec = ModelSpec.from_preset(get_preset("tiny"))
    export(spec, "torch-fast", tmp_path)
    before = (tmp_path / "torch-fast.onnx").read_bytes()

    def half_written(spec, path, opset, tapped):
        path.write_bytes(b"truncated")  # as a full disk would leave it
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(export_module.EXPORTERS, "torch-fast", "torch_exporters:export_fast")
    monkeypatch.setattr(export_module, "_exporter", lambda name: half_written)
    with pytest.raises((OSError, ExportError)):
        export(spec, "torch-fast", tmp_path)
    assert (tmp_path / "torch-fast.onnx").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["torch-fast.onnx"]


# --- a case that cannot fit is refused before anything is allocated -------------------------
@pytest.mark.parametrize(
    "body",
    [
        'preset = "tiny"\n[input]\nshape = [200000, 200000, 16]\n',
        'preset = "tiny"\n[config]\nn_keys = 200000\n[input]\nshape = [2, 3, 16]\n',
    ],
)
def test_a_case_too_large_for_the_machine_is_refused_with_the_estimate(project, capsys, body):
    (project.cases_dir / "huge.toml").write_text(body)
    assert main(["golden", "regenerate", "--case", "huge", *project.cli_args()]) == 2
    _one_error_line(capsys.readouterr().err, "needs about", "GiB available")
    assert not project.store.case_dir("huge").exists()


# --- signals end the whole process tree and clean up ----------------------------------------
def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_ends_every_worker_and_removes_temporary_folders(project, tmp_path, signum, code):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    cmd = [sys.executable, "-m", "conformance", "run", "--case", "tiny", "--case", "tiny-bn", "--jobs", "2"]
    cmd += ["--path", "tf-*-cpu", "--path", "torch-compile-cpu", *project.cli_args()]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    workers: set[int] = set()
    while time.monotonic() < deadline and len(workers) < 2:
        time.sleep(0.2)
        workers = _descendants(proc.pid)
    assert workers, "no worker started"
    time.sleep(1.0)
    workers = _descendants(proc.pid)
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == code, proc.stderr.read().decode()
    time.sleep(0.5)
    assert not [pid for pid in workers if _alive(pid)], "orphaned workers"
    assert not list(tmp.glob("pkm-*")), list(tmp.iterdir())


def test_keras_on_another_backend_makes_the_tf_paths_unavailable_with_the_fix(project, tmp_path, monkeypatch, capsys):
    """KERAS_BACKEND=torch in the user's shell made every TF path fail with "Can't call
    numpy() on Tensor that requires grad" and no hint."""
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    reports = tmp_path / "r"
    args = ["run", "--case", "tiny", "--path", "tf-function-cpu", "--report-dir", str(reports)]
    assert main([*args, *project.cli_args()]) == 0
    (path,) = json.loads((reports / "report.json").read_text())["cases"][0]["paths"]
    assert path["status"] == "unavailable"
    assert "KERAS_BACKEND='torch'" in path["reason"] and "KERAS_BACKEND=tensorflow" in path["reason"]


def _replace(path: Path, kind: str) -> None:
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
@pytest.mark.parametrize(
    ("target", "command"),
    [
        ("golden/tiny/case.json", ["golden", "verify"]),
        ("golden/tolerances.toml", ["run", "--case", "tiny", "--path", "torch-eager-cpu"]),
        ("cases/tiny.toml", ["run", "--case", "tiny", "--path", "torch-eager-cpu"]),
    ],
)
def test_a_fifo_or_dev_zero_in_place_of_a_small_file_is_refused_not_waited_on(project, target, command, kind):
    """Each used to hang (a FIFO) or read until memory ran out (/dev/zero)."""
    path = project.root / target
    _replace(path, kind)
    done = subprocess.run(
        [sys.executable, "-m", "conformance", *command, *project.cli_args()],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=project.root,
    )
    assert done.returncode == 2, done.stderr
    said = [line for line in done.stderr.splitlines() if str(path) in line]
    assert said and ("a FIFO" in said[0] or "a character device" in said[0]), done.stderr


def test_a_fifo_lock_and_a_linked_golden_folder_are_refused(project, tmp_path, capsys):
    lock = project.golden_dir / ".lock"
    if lock.exists():
        lock.unlink()
    os.mkfifo(lock)
    assert main(["golden", "verify", *project.cli_args()]) == 2
    assert "a FIFO, where a regular file is expected" in capsys.readouterr().err
    lock.unlink()
    outside = tmp_path / "elsewhere"
    (project.golden_dir / "tiny").rename(outside)
    (project.golden_dir / "tiny").symlink_to(outside)
    assert main(["golden", "verify", *project.cli_args()]) == 2
    assert "a symbolic link; a golden folder must be in the store itself" in capsys.readouterr().err


def test_a_case_file_that_is_not_utf8_is_named(project, capsys):
    (project.cases_dir / "tiny.toml").write_bytes(b'preset = "tiny"\n# caf\xe9\n')
    assert main(["run", "--case", "tiny", "--path", "torch-eager-cpu", *project.cli_args()]) == 2
    err = capsys.readouterr().err
    assert "tiny.toml: not UTF-8 text" in err and "Traceback" not in err


def test_the_weights_folder_a_killed_run_left_is_removed_by_the_next_run(project, tmp_path, monkeypatch):
    """A SIGKILL of run or regenerate left its weights folder in the temporary folder (about
    800 MB for xlm); a live run's folder, whose lock is held, stays."""
    import fcntl
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead, live = tmp_path / "pkm-weights-dead", tmp_path / "pkm-weights-live"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "values.weight.npy").write_bytes(b"\0" * 4096)
        Path(f"{folder}.lock").touch()
    held = os.open(f"{live}.lock", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # as the live run's process holds it
    try:
        args = ["run", "--case", "tiny", "--path", "torch-eager-cpu", "--in-process", *project.cli_args()]
        assert main(args) == 0
        assert not dead.exists() and not Path(f"{dead}.lock").exists()
        assert live.exists()
        assert main(["golden", "regenerate", "--case", "tiny", *project.cli_args()]) == 0
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("pkm-weights-")) == [
            "pkm-weights-live",
            "pkm-weights-live.lock",
        ]  # and neither command left its own
    finally:
        os.close(held)
