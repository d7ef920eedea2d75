"""The goldens in the repository: intact, small, and consistent with their case files."""

from pathlib import Path

from conformance.cases import load_cases
from conformance.golden import GoldenStore, check_golden_matches_case
from conformance.paths import PATH_NAMES
from conformance.tolerances import load_policy

REPO = Path(__file__).resolve().parents[2]


def test_every_shipped_case_has_an_intact_golden():
    store = GoldenStore(REPO / "golden")
    cases = load_cases(REPO / "conformance" / "cases", groups=["large"])
    for case in cases:
        check_golden_matches_case(case, store.read(case.name), store)
    assert sorted(store.names()) == sorted(c.name for c in cases)
    load_policy(REPO / "golden" / "tolerances.toml", PATH_NAMES, [c.name for c in cases])


def test_large_cases_are_left_out_unless_asked():
    folder = REPO / "conformance" / "cases"
    default = {c.name for c in load_cases(folder)}
    large = {c.name for c in load_cases(folder, groups=["large"])} - default
    assert large == {"mega", "seednet", "xlm-stream"}
    assert [c.name for c in load_cases(folder, ["mega"])] == ["mega"]


def test_large_goldens_hold_no_weights():
    """A golden of a seed-derived case of GB-sized weights is case.json, the input and the
    taps: under 4 MB (seednet: 6 layers of taps at 64 tokens)."""
    for name in ("mega", "seednet"):
        folder = REPO / "golden" / name
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        assert "weights.npz" not in files and "model.onnx" not in files, files
        assert sum((folder / f).stat().st_size for f in files) < 4 * 2**20


def test_golden_store_stays_under_10_mb():
    total = sum(p.stat().st_size for p in (REPO / "golden").rglob("*") if p.is_file())
    assert total < 10 * 2**20, f"golden/ holds {total / 2**20:.1f} MB"
