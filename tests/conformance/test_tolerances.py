import pytest

from conformance.paths import PATH_NAMES
from conformance.tolerances import Tolerance, ToleranceError, parse_policy, path_matches

CASES = ["tiny", "xlm"]


def policy(data):
    return parse_policy(data, "t.toml", PATH_NAMES, CASES)


def test_more_specific_wins():
    p = policy(
        {
            "default": {"atol": 1.0, "rtol": 0.1},
            "tap": {"output": {"atol": 2.0}},
            "path": {"ort-*": {"atol": 3.0, "tap": {"output": {"atol": 4.0}}}},
            "case": {"xlm": {"atol": 5.0, "statistic": "mean", "tap": {"output": {"atol": 6.0}}}},
        }
    )
    assert p.resolve("tiny", "torch-eager-cpu", "query") == Tolerance(1.0, 0.1)
    assert p.resolve("tiny", "torch-eager-cpu", "output").atol == 2.0
    assert p.resolve("tiny", "ort-cpu[torch-fast]", "query").atol == 3.0
    assert p.resolve("tiny", "ort-cpu[torch-fast]", "output").atol == 4.0
    assert p.resolve("xlm", "ort-cpu[torch-fast]", "query") == Tolerance(5.0, 0.1, "mean")
    assert p.resolve("xlm", "ort-cpu[torch-fast]", "output").atol == 6.0


def test_brackets_in_path_names_are_literal():
    assert path_matches("ort-cpu[torch-fast]", "ort-cpu[torch-fast]")
    assert path_matches("ort-cpu[torch-fast]", "ort-*[torch-fast]")
    assert not path_matches("ort-cpu[torch-fast]", "ort-cpu[tf2onnx]")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({}, r"\[default\] table with atol and rtol is required"),
        ({"default": {"atol": 1e-5}}, r"default: missing \['rtol'\]"),
        ({"default": {"atol": -1, "rtol": 0}}, "default.atol: expected a non-negative number, got -1"),
        ({"default": {"atol": "small", "rtol": 0}}, "default.atol: expected a non-negative number"),
        ({"default": {"atol": 1, "rtol": 0, "statistic": "median"}}, r"expected one of \['max', 'mean'\]"),
        (
            {"default": {"atol": 1, "rtol": 0}, "tap": {"logits": {}}},
            r"unknown tap\(s\) \['logits'\]; known: \['query'",
        ),
        ({"default": {"atol": 1, "rtol": 0}, "path": {"jax-*": {}}}, r"path 'jax-\*' matches no execution path; known"),
        ({"default": {"atol": 1, "rtol": 0}, "case": {"huge": {}}}, r"unknown case 'huge'; known: \['tiny', 'xlm'\]"),
        ({"default": {"atol": 1, "rtol": 0, "atoll": 1}}, r"unknown key\(s\) \['atoll'\]"),
        ({"default": {"atol": 1, "rtol": 0}, "defaults": {}}, r"unknown table\(s\) \['defaults'\]"),
        # an indices entry was accepted and never read
        ({"default": {"atol": 1, "rtol": 0}, "tap": {"indices": {"atol": 1}}}, r"tap.indices: indices are compared"),
        (
            {"default": {"atol": 1, "rtol": 0}, "case": {"tiny": {"tap": {"indices": {"atol": 1}}}}},
            r"case.tiny.tap.indices: indices are compared exactly",
        ),
    ],
)
def test_bad_files_name_the_problem(data, match):
    with pytest.raises(ToleranceError, match=match):
        policy(data)


def test_not_toml(tmp_path):
    from conformance.tolerances import load_policy

    (tmp_path / "t.toml").write_text("[default\natol=")
    with pytest.raises(ToleranceError, match="not valid TOML"):
        load_policy(tmp_path / "t.toml", PATH_NAMES, CASES)
    with pytest.raises(ToleranceError, match="no tolerance file"):
        load_policy(tmp_path / "missing.toml", PATH_NAMES, CASES)
