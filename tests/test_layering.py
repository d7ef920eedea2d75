"""The package's layers, read from the source: no import from a lower layer to a higher
one, no import circle, and a quiet start-up that loads only what the command needs."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"pkm_models": REPO / "models", "conformance": REPO / "conformance"}

# Low to high; a module may import its own layer and the layers below. The first prefix
# that matches a module decides its layer (longest prefixes first within a layer list).
LAYERS = [
    ("pkm_models",),
    (
        "conformance.files",
        "conformance.results",
        "conformance.environment",
        "conformance.isolation",
        "conformance.pool",
        "conformance.text",
    ),
    # precision: path names and the rounding bounds, read by export, the paths and the verdict;
    # memory: a case's estimated peak and the admission of paths; sweep: reading a table through
    # a lookup a path hands in; deploy: a user's ONNX file, named by a case
    (
        "conformance.cases",
        "conformance.deploy",
        "conformance.spec",
        "conformance.golden",
        "conformance.tolerances",
        "conformance.precision",
        "conformance.memory",
        "conformance.sweep",
        "conformance.stream",
    ),
    ("conformance.export",),
    ("conformance.paths",),
    (
        "conformance.compare",
        "conformance.runner",
        "conformance.regenerate",
        "conformance.report",
        "conformance.merge",
        "conformance.bench",
    ),
    ("conformance.cli", "conformance.__main__"),
]


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def layer(module: str) -> int:
    if module == "conformance":  # the package itself: a version string
        return 1
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} has no layer: add it to LAYERS")


def imports(module: str) -> set[str]:
    """The project's modules ``module`` imports, at the top or inside functions."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in MODULES else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in MODULES and m != module}


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    for module in MODULES:
        layer(module)


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
        for m, deps in GRAPH.items()
        for d in deps
        if layer(d) > layer(m)
    ]
    assert not upward, "\n".join(upward)


def _own_package(a: str, b: str) -> bool:
    """A package and its own submodules may import each other (a registry in __init__)."""
    return (MODULES[a].name == "__init__.py" and b.startswith(a + ".")) or (
        MODULES[b].name == "__init__.py" and a.startswith(b + ".")
    )


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_in_the_toolkit():
    graph = {
        m: {d for d in deps if d.startswith("conformance") and not _own_package(m, d)}
        for m, deps in GRAPH.items()
        if m.startswith("conformance")
    }
    assert _circles(graph) == []


def test_the_checker_sees_a_planted_circle_and_an_upward_import():
    graph = {**GRAPH, "conformance.merge": GRAPH["conformance.merge"] | {"conformance.bench.merge"}}
    graph["conformance.bench.merge"] = graph["conformance.bench.merge"] | {"conformance.merge"}
    assert ["conformance.bench.merge", "conformance.merge"] in _circles(graph)
    graph = {**GRAPH, "conformance.isolation": GRAPH["conformance.isolation"] | {"conformance.paths.tf_paths"}}
    assert any(layer(d) > layer(m) for m, deps in graph.items() for d in deps)  # the import the fix removed


def test_fsync_is_written_once():
    callers = [m for m, path in MODULES.items() if "os.fsync(" in path.read_text()]
    assert callers == ["conformance.files"], callers


PROBE = """
import json, sys
from conformance.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # --help
    code = exc.code
print(json.dumps({"code": code, "loaded": sorted(m for m in sys.modules
      if m.split(".")[0] in ("tensorflow", "keras") or m.startswith("conformance.paths"))}))
"""


@pytest.mark.parametrize("command", ["help", "npz-to-pt"])
def test_convert_starts_without_tensorflow_or_the_path_registry(tmp_path, command):
    from pkm_models import get_preset, make_weights
    from pkm_models.convert import save_checkpoint

    config = get_preset("tiny").config
    save_checkpoint(make_weights(config, 0), tmp_path / "w.npz", config)
    args = ["convert", "--help"]
    if command == "npz-to-pt":
        args = ["convert", str(tmp_path / "w.npz"), str(tmp_path / "w.pt"), "--knn", str(config.knn)]
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, done.stderr
    assert result["loaded"] == [], result["loaded"]
    if command == "npz-to-pt":
        assert (tmp_path / "w.pt").is_file()
