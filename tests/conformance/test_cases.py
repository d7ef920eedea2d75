from pathlib import Path

import numpy as np
import pytest

from conformance.cases import CaseError, load_case, load_cases

REPO_CASES = Path(__file__).resolve().parents[2] / "conformance" / "cases"


def test_shipped_cases():
    cases = {c.name: c for c in load_cases(REPO_CASES)}
    assert set(cases) >= {"tiny", "tiny-bn", "small", "xlm", "near-tie"}
    assert cases["tiny-bn"].config.query_batchnorm
    assert not cases["xlm"].store_weights and cases["tiny"].store_weights
    assert cases["near-tie"].spec.duplicate_subkeys > 0


def write(tmp_path, text, name="c"):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('preset = "tiny"\n[input]\nshape=[1,2,15]', "ends in 15, but the model's input_dim is 16"),
        ('preset = "tiny"\n[config]\nk_dim = 7\n[input]\nshape=[1,2,16]', r"PKMConfig\.k_dim: must be even"),
        ('preset = "tiny"\n[config]\nknn = 100\n[input]\nshape=[1,2,16]', r"PKMConfig\.knn"),
        ('preset = "tiny"\n[config]\nheads = 0\n[input]\nshape=[1,2,16]', r"PKMConfig\.heads: must be positive"),
        ('preset = "huge"\n[input]\nshape=[1,2,16]', r"unknown preset 'huge'"),
        ('preset = "seed-bench"\n[input]\nshape=[1,2,768]', "single-layer presets"),
        ('preset = "tiny"', r"\[input\] shape is required"),
        ('preset = "tiny"\n[input]\nshape=[2,16]', "must be 3 positive integers"),
        ('preset = "tiny"\ncolour = 1\n[input]\nshape=[1,2,16]', r"unknown key\(s\) \['colour'\]"),
        ('preset = "tiny"\n[input]\nshape=[1,2,16]\nsize=3', r"unknown key\(s\) \['size'\] in \[input\]"),
        ('preset = "tiny"\n[input]\nshape=[1,2,16]\n[weights]\nduplicate_subkeys=9', "duplicate_subkeys must be"),
        ('preset = "tiny"\nseed = -1\n[input]\nshape=[1,2,16]', "seed: expected an integer >= 0"),
        ("preset = [", "not valid TOML"),
        # a group name with a newline was accepted (and broke the tables it is printed in)
        ('preset = "tiny"\ngroup = "large\\n"\n[input]\nshape=[1,2,16]', r"group must be a name .*'large\\n'"),
        ('preset = "tiny"\n[deploy]\nonnx = ["missing.onnx"]\n[input]\nshape=[1,2,16]', r"\[deploy\].*is not a file"),
        ('preset = "tiny"\n[deploy]\nonnx = "m.onnx"\n[input]\nshape=[1,2,16]', r"onnx must be a non-empty list"),
    ],
)
def test_invalid_case_files_name_the_problem(tmp_path, text, match):
    with pytest.raises(CaseError, match=match):
        load_case(write(tmp_path, text))


def test_unknown_case_lists_the_known_ones(tmp_path):
    write(tmp_path, 'preset = "tiny"\n[input]\nshape=[1,2,16]', "a")
    with pytest.raises(CaseError, match=r"unknown case\(s\) \['b'\]; available: \['a'\]"):
        load_cases(tmp_path, ["b"])
    with pytest.raises(CaseError, match="no cases folder"):
        load_cases(tmp_path / "missing")
    with pytest.raises(CaseError, match="case names are letters, digits"):
        load_case(write(tmp_path, "", "Bad Name"))


BAD_NAMES = ["nl\n", "a/b", "a b", "..", ".", ".hidden", "tab\t", "", "é"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_case_name_that_is_not_plain_is_refused_everywhere_before_anything_is_written(project, capsys, name):
    from conformance.cli import main
    from conformance.golden import GoldenStore

    before = sorted(p.name for p in project.golden_dir.iterdir())
    assert main(["golden", "regenerate", "--case", name, *project.cli_args()]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "case names are letters, digits" in err, err
    assert sorted(p.name for p in project.golden_dir.iterdir()) == before
    with pytest.raises(CaseError, match="case names are letters, digits"):
        GoldenStore(project.golden_dir).case_dir(name)


def test_a_case_file_whose_name_ends_in_a_newline_is_refused(project, capsys):
    (project.cases_dir / "nl\n.toml").write_text((project.cases_dir / "tiny.toml").read_text())
    before = sorted(p.name for p in project.golden_dir.iterdir())
    for args in (["--case", "nl\n"], []):  # named, or among all the cases
        assert main_regenerate(project, args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "got 'nl\\n'" in err, err
    assert sorted(p.name for p in project.golden_dir.iterdir()) == before


def test_plain_names_with_dots_and_capitals_are_cases(tmp_path):
    write(tmp_path, 'preset = "tiny"\n[input]\nshape=[1,2,16]', "My_case-2.v1")
    assert [c.name for c in load_cases(tmp_path, ["My_case-2.v1"])] == ["My_case-2.v1"]


def main_regenerate(project, args):
    from conformance.cli import main

    return main(["golden", "regenerate", *args, *project.cli_args()])


def test_listing_a_case_does_not_read_its_input_file_into_memory(tmp_path):
    """A 2 GiB sparse .npy cost 2.6 GB just to list the cases; the check reads it in blocks."""
    import subprocess
    import sys

    big = np.lib.format.open_memmap(tmp_path / "big.npy", "w+", np.float32, ((1 << 28) // 16, 16))  # 256 MiB, sparse
    big[-1, -1] = np.nan  # the last block is read too
    del big
    (tmp_path / "big.toml").write_text(f'preset = "tiny"\n[input]\nfile = "{tmp_path / "big.npy"}"\n')
    code = (
        "from pathlib import Path; from conformance.cases import load_case, CaseError\n"
        f"try: load_case(Path({str(tmp_path / 'big.toml')!r}))\n"
        "except CaseError as exc: print(exc)\n"
        # VmHWM: this program's peak (ru_maxrss would keep the forking test process's across exec)
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert "the input holds 1 NaN and 0 Inf values" in out[0]
    assert int(out[1]) < 160, f"peak {out[1]} MB"  # was the whole file and more


def test_the_estimate_covers_what_drawing_the_weights_allocates(tmp_path):
    """input_dim = 100,000,000 on tiny was estimated at 17.5 GiB and admitted; drawing its
    query projection made a 12.8 GB float64 block first. Measured on a smaller one."""
    import subprocess
    import sys

    (tmp_path / "wide.toml").write_text(
        'preset = "tiny"\n[config]\ninput_dim = 100000000\n[input]\nshape = [1, 1, 100000000]\n'
    )
    huge = load_case(tmp_path / "wide.toml")
    assert huge.memory_bytes() > 2 * huge.spec.weight_bytes + 16 * 100_000_000 * 8  # the float64 block counted
    with pytest.raises(CaseError, match="this case needs about"):
        huge.check_fits(available=24 << 30)  # a 24 GB machine: refused before anything is drawn
    (tmp_path / "wide.toml").write_text(
        'preset = "tiny"\n[config]\ninput_dim = 2000000\n[input]\nshape = [1, 1, 2000000]\n'
    )
    code = (
        "import sys, tempfile; from pathlib import Path; from conformance.cases import load_case\n"
        f"case = load_case(Path({str(tmp_path / 'wide.toml')!r}))\n"
        "case.spec.write_weights(Path(tempfile.mkdtemp(dir=sys.argv[1])))\n"
        "peak = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) * 1024\n"
        "print(peak, case.memory_bytes())\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    peak, estimate = map(int, done.stdout.split())
    assert peak < estimate, (peak, estimate)  # the interpreter and numpy (~60 MB) fit in the activations' margin


# --- fuzzing the case-file reader ----------------------------------------------------------
def _toml_value(value) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if value == value and abs(value) != float("inf") else "nan"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for what JSON escapes
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def _toml(data: dict) -> str:
    top = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    tables = [
        f"[{k}]\n" + "\n".join(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())
        for k, v in data.items()
        if isinstance(v, dict)
    ]
    return "\n".join(top) + "\n" + "\n".join(tables) + "\n"


def _case_files():
    from hypothesis import strategies as st

    scalar = st.one_of(
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
        st.sampled_from(["tiny", "small", "xlm", "large", "a.npy", "missing.pth", "../x", "/dev/zero", ""]),
    )
    value = st.one_of(scalar, st.lists(scalar, max_size=4))
    fields = [
        *("shape", "seed", "file", "key", "store", "duplicate_subkeys", "checkpoint", "memories", "tokens"),
        *("batch", "noise", "sample", "embeddings", "onnx", "precision", "knn", "heads", "input_dim", "layers"),
    ]
    table = st.dictionaries(st.sampled_from(fields), value, max_size=4)
    top = st.fixed_dictionaries(
        {"preset": st.one_of(st.just("tiny"), scalar)},
        optional={
            "seed": value,
            "layers": value,
            "group": value,
            "description": value,
            "input": table,
            "config": table,
            "weights": table,
            "stream": table,
            "deploy": table,
        },
    )
    return top


def test_no_case_file_makes_the_reader_raise_anything_but_a_case_error(tmp_path_factory):
    """Whatever a case file holds, reading it ends in a CaseError (a one-line message) or a
    case, never another exception (a traceback)."""
    import contextlib

    from hypothesis import HealthCheck, given, settings

    folder = tmp_path_factory.mktemp("fuzz")

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_case_files())
    def read(data):
        path = folder / "fuzzed.toml"
        path.write_text(_toml(data))
        with contextlib.suppress(CaseError):
            load_case(path)

    read()
