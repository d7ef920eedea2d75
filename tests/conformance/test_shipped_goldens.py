"""The goldens in the repository: intact, small, and consistent with their case files."""

from pathlib import Path

from conformance.cases import load_cases
from conformance.golden import GoldenStore, check_golden_matches_case
from conformance.paths import PATH_NAMES
from conformance.tolerances import load_policy

REPO = Path(__file__).resolve().parents[2]


def test_every_shipped_case_has_an_intact_golden():
    store = GoldenStore(REPO / "golden")
    cases = load_cases(REPO / "conformance" / "cases")
    for case in cases:
        check_golden_matches_case(case, store.read(case.name), store)
    assert sorted(store.names()) == sorted(c.name for c in cases)
    load_policy(REPO / "golden" / "tolerances.toml", PATH_NAMES, [c.name for c in cases])


def test_golden_store_stays_under_10_mb():
    total = sum(p.stat().st_size for p in (REPO / "golden").rglob("*") if p.is_file())
    assert total < 10 * 2**20, f"golden/ holds {total / 2**20:.1f} MB"
