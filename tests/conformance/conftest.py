"""A throw-away project: case files, tolerances and regenerated goldens in a tmp folder."""

import shutil
from pathlib import Path

import pytest

from conformance.cases import load_cases
from conformance.golden import GoldenStore
from conformance.paths import PATH_NAMES
from conformance.regenerate import regenerate
from conformance.tolerances import load_policy

REPO = Path(__file__).resolve().parents[2]

TINY_TIE = """
description = "tiny with every sub-key duplicated: ties everywhere"
preset = "tiny"
seed = 0

[input]
shape = [2, 3, 16]
seed = 7

[weights]
duplicate_subkeys = 4
"""


class Project:
    def __init__(self, root: Path):
        self.root = root
        self.cases_dir = root / "cases"
        self.golden_dir = root / "golden"
        self.store = GoldenStore(self.golden_dir)

    def cases(self, *names):
        return load_cases(self.cases_dir, list(names) or None)

    def policy(self):
        names = [p.stem for p in self.cases_dir.glob("*.toml")]
        return load_policy(self.golden_dir / "tolerances.toml", PATH_NAMES, names)

    def regenerate(self, name, **kwargs):
        return regenerate(self.cases(name)[0], self.store, self.policy(), **kwargs)

    def cli_args(self):
        return ["--golden-dir", str(self.golden_dir), "--cases-dir", str(self.cases_dir)]


@pytest.fixture(scope="session", autouse=True)
def export_cache(tmp_path_factory):
    """The runs of the tests keep their exports in a cache of their own, not the user's."""
    import os

    folder = tmp_path_factory.mktemp("export-cache")
    saved = os.environ.get("PKM_CONFORMANCE_CACHE")
    os.environ["PKM_CONFORMANCE_CACHE"] = str(folder)
    yield folder
    if saved is None:
        os.environ.pop("PKM_CONFORMANCE_CACHE", None)
    else:
        os.environ["PKM_CONFORMANCE_CACHE"] = saved


@pytest.fixture(scope="session")
def pristine_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    (root / "cases").mkdir()
    shutil.copy(REPO / "conformance" / "cases" / "tiny.toml", root / "cases" / "tiny.toml")
    shutil.copy(REPO / "conformance" / "cases" / "tiny-bn.toml", root / "cases" / "tiny-bn.toml")
    (root / "cases" / "tiny-tie.toml").write_text(TINY_TIE)
    (root / "golden").mkdir()
    (root / "golden" / "tolerances.toml").write_text(
        "[default]\natol = 1e-5\nrtol = 1e-4\n\n[tap.weights]\natol = 2e-6\n"
    )
    project = Project(root)
    for name in ("tiny", "tiny-bn", "tiny-tie"):
        project.regenerate(name)
    return root


@pytest.fixture
def project(pristine_project, tmp_path):
    """A fresh copy per test, so tests can corrupt it."""
    root = tmp_path / "project"
    shutil.copytree(pristine_project, root)
    return Project(root)
