"""conformance.files: a command never writes over what it reads; one fsync."""

import os
from pathlib import Path

import pytest

from conformance.cli import main
from conformance.files import FileProblem, atomic_write, refuse_overwriting_inputs, write_files_together
from pkm_models import get_preset, make_weights
from pkm_models.convert import save_checkpoint

TINY = get_preset("tiny").config


def _one_error_line(err: str, *parts: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, err


# --- the rule, on names and inodes ---------------------------------------------------------
def _aliases(tmp_path: Path, src: Path) -> dict[str, Path]:
    (tmp_path / "h").mkdir(exist_ok=True)
    os.symlink(src, tmp_path / f"sym{src.suffix}")
    os.link(src, tmp_path / f"hard{src.suffix}")
    return {
        "itself": src,
        "dot-dot": tmp_path / "h" / ".." / src.name,
        "relative": Path(os.path.relpath(src)),
        "symlink": tmp_path / f"sym{src.suffix}",
        "hard link": tmp_path / f"hard{src.suffix}",
    }


def test_every_name_of_an_input_is_refused_as_an_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "my.pth"
    src.write_bytes(b"mine")
    for how, dst in _aliases(tmp_path, src).items():
        with pytest.raises(FileProblem, match="which the command reads; writing it would destroy that input"):
            refuse_overwriting_inputs([src], [dst])
        with pytest.raises(FileProblem):  # the other way round too: the input named through the alias
            refuse_overwriting_inputs([dst], [src])
        assert src.read_bytes() == b"mine", how


def test_other_files_and_new_files_pass(tmp_path):
    src, other = tmp_path / "a.pt", tmp_path / "b.pt"
    src.write_bytes(b"a")
    other.write_bytes(b"a")  # same bytes, another file
    refuse_overwriting_inputs([src, None], [other, tmp_path / "new.pt", tmp_path / "no" / "such.pt"])


def test_an_input_inside_a_folder_the_command_replaces_is_refused(tmp_path):
    folder = tmp_path / "golden" / "mine"
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"x")
    os.symlink(folder / "model.pt", tmp_path / "model.pt")  # named from outside: still inside
    for name in (folder / "model.pt", tmp_path / "model.pt"):
        with pytest.raises(FileProblem, match=r"lies inside .*mine, which the command replaces"):
            refuse_overwriting_inputs([name], folders=[folder])
    refuse_overwriting_inputs([tmp_path / "golden" / "elsewhere.pt"], folders=[folder])
    refuse_overwriting_inputs([folder / "model.pt"], folders=[tmp_path / "missing"])


# --- every command with inputs and outputs -------------------------------------------------
@pytest.mark.parametrize("suffix", [".pth", ".npz", ".keras"])
@pytest.mark.parametrize("how", ["itself", "dot-dot", "relative", "symlink", "hard link"])
def test_convert_refuses_to_write_over_its_source_before_reading_it(tmp_path, monkeypatch, capsys, suffix, how):
    import pkm_models.checkpoint

    def never(*args, **kwargs):
        raise AssertionError("the source was read")

    monkeypatch.setattr(pkm_models.checkpoint, "read_checkpoint", never)
    monkeypatch.chdir(tmp_path)
    src = tmp_path / f"my{suffix}"
    src.write_bytes(b"the user's training checkpoint")
    dst = _aliases(tmp_path, src)[how]
    assert main(["convert", str(src), str(dst), "--knn", "4"]) == 2
    _one_error_line(capsys.readouterr().err, str(dst), "which the command reads")
    assert src.read_bytes() == b"the user's training checkpoint"
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_convert_to_another_file_still_works(tmp_path, capsys):
    save_checkpoint(make_weights(TINY, 0), tmp_path / "a.pt", TINY)
    assert main(["convert", str(tmp_path / "a.pt"), str(tmp_path / "b.npz"), "--knn", str(TINY.knn)]) == 0
    assert (tmp_path / "b.npz").is_file()


def test_export_refuses_to_replace_an_existing_file_unless_forced(tmp_path, capsys):
    out = tmp_path / "exports"
    out.mkdir()
    (out / "torch-fast.onnx").write_bytes(b"my deployed model")
    args = ["export", "--preset", "tiny", "--exporter", "torch-fast", "--out", str(out)]
    assert main(args) == 2
    _one_error_line(capsys.readouterr().err, str(out / "torch-fast.onnx"), "already exists", "--force")
    assert (out / "torch-fast.onnx").read_bytes() == b"my deployed model"
    assert sorted(p.name for p in out.iterdir()) == ["torch-fast.onnx"]
    assert main([*args, "--force"]) == 0
    assert (out / "torch-fast.onnx").read_bytes() != b"my deployed model"


def test_merge_refuses_to_write_its_report_over_an_input(tmp_path, capsys):
    for machine in ("ci", "gpu"):
        (tmp_path / machine).mkdir()
        (tmp_path / machine / "report.json").write_text("{}")  # never read: refused first
    files = [str(tmp_path / "ci" / "report.json"), str(tmp_path / "gpu" / "report.json")]
    assert main(["merge", *files, "--report-dir", str(tmp_path / "gpu")]) == 2
    _one_error_line(capsys.readouterr().err, "gpu/report.json", "which the command reads")
    assert (tmp_path / "gpu" / "report.json").read_text() == "{}"


def test_regenerate_refuses_a_case_whose_checkpoint_lives_in_its_golden_folder(project, capsys):
    folder = project.golden_dir / "mine"
    folder.mkdir()
    save_checkpoint(make_weights(TINY, 0), folder / "model.pt", TINY)
    (project.cases_dir / "mine.toml").write_text(
        f'description = "a checkpoint kept in the golden folder"\n\n[weights]\ncheckpoint = "{folder / "model.pt"}"\n\n'
        f"[config]\nknn = {TINY.knn}\n\n[input]\nshape = [1, 2, {TINY.input_dim}]\nseed = 1\n"
    )
    before = (folder / "model.pt").read_bytes()
    assert main(["golden", "regenerate", "--case", "mine", *project.cli_args()]) == 2
    _one_error_line(capsys.readouterr().err, "model.pt", "lies inside", "which the command replaces")
    assert (folder / "model.pt").read_bytes() == before


def test_run_refuses_a_report_folder_that_would_replace_an_input(project, capsys):
    import numpy as np

    obtained = project.root / "reports" / "obtained"
    obtained.mkdir(parents=True)
    np.save(obtained / "acts.npy", np.ones((2, TINY.input_dim), np.float32))
    (project.cases_dir / "acts.toml").write_text(
        f'description = "input kept in the report folder"\npreset = "tiny"\nseed = 0\n\n'
        f'[input]\nfile = "{obtained / "acts.npy"}"\n'
    )
    args = ["run", "--case", "acts", "--in-process", "--report-dir", str(project.root / "reports")]
    assert main([*args, *project.cli_args()]) == 2
    _one_error_line(capsys.readouterr().err, "acts.npy", "which the command replaces")


# --- durability: one fsync -----------------------------------------------------------------
def test_every_write_is_synced_through_the_one_helper(tmp_path, monkeypatch):
    import conformance.files

    synced = []
    real = conformance.files.fsync
    monkeypatch.setattr(conformance.files, "fsync", lambda p: synced.append(Path(p)) or real(p))
    atomic_write(tmp_path / "a.bin", b"a")
    write_files_together(tmp_path / "r", {"x.json": b"{}", "y.md": b"#"})
    assert tmp_path in synced and tmp_path / "r" in synced  # the folders, after the renames
    assert len(synced) == 5  # a.bin's temporary file, its folder, x and y's, their folder
    assert (tmp_path / "a.bin").read_bytes() == b"a"


def test_a_staging_folder_left_by_a_killed_process_is_removed_by_the_next_one(tmp_path):
    """``kill -9`` leaves a staging folder (an export's, its weights folder, a cache
    build's); the next command that stages there removes it, and never a live process's."""
    import signal
    import subprocess
    import sys

    from conformance.files import remove_abandoned, staging_dir

    code = (
        "import sys, time; from pathlib import Path; from conformance.files import staging_dir\n"
        "with staging_dir(Path(sys.argv[1]), '.weights-') as s:\n"
        "    (s / 'values.weight.npy').write_bytes(b'x' * 100); print(s, flush=True); time.sleep(60)\n"
    )
    killed = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    left = Path(killed.stdout.readline().strip())
    live = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    alive = Path(live.stdout.readline().strip())
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert left.exists() and alive.exists()
        with staging_dir(tmp_path, ".weights-") as staging:
            assert not left.exists() and alive.exists()  # the live process's folder stays
        assert not staging.exists()
        assert remove_abandoned(tmp_path, ".weights-") == []
    finally:
        live.kill()
        live.wait()
    assert remove_abandoned(tmp_path, ".weights-") == [alive.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == []
