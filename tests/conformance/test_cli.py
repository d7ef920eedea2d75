import pytest

from conformance.cli import main
from pkm_models import get_preset, make_weights
from pkm_models.convert import save_checkpoint

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
