from pathlib import Path

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
    with pytest.raises(CaseError, match="case names are lower-case"):
        load_case(write(tmp_path, "", "Bad Name"))
