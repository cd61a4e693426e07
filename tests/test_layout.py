"""The repository's shape: the card's entry points on top, one package, and the import contracts."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARD_MODULES = {
    "app",
    "job_queue",
    "cache_manager",
    "circuit_breaker_manager",
    "sse_streaming",
    "gunicorn_config",
}


def _tracked_python() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / name for name in listed.stdout.split()]


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _contracts() -> list[dict]:
    """pyproject.toml's import-linter contracts."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _project_modules() -> dict[str, Path]:
    """Every module of the service: the card's on top and the package's, by dotted name."""
    modules = {name: ROOT / f"{name}.py" for name in CARD_MODULES}
    for path in (ROOT / "enrich").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _import_graph() -> dict[str, set[str]]:
    """Module -> the project's modules it imports anywhere in it (late imports inside functions
    included; those under `if TYPE_CHECKING:` left out, as they never run)."""
    modules = _project_modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        typing_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for inner in ast.walk(node)
        }
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from package import module` imports the module, not the package's own code.
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            targets.update(t for t in map(resolve, names) if t and t != module)
        graph[module] = targets
    return graph


def test_no_import_cycle_among_the_projects_modules():
    """lint-imports checks the package; this checks the card's top-level modules with it."""
    graph = _import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_card_modules_sit_in_their_layers():
    """app, job_queue and sse_streaming are routes and entry points: nothing below the routes imports
    them, and the web app never imports the worker's entry point.  cache_manager and
    circuit_breaker_manager are stores: they import only stores and the base."""
    graph = _import_graph()
    entry_points = {"app", "job_queue", "sse_streaming"}
    routes = ("enrich.web", "enrich.cli")
    for module, targets in graph.items():
        if module not in entry_points and not module.startswith(routes):
            assert not targets & entry_points, f"{module} imports {targets & entry_points}"
    assert "job_queue" not in graph["app"]
    layers = next(c["layers"] for c in _contracts() if c["type"] == "layers")
    stores = next(i for i, layer in enumerate(layers) if "enrich.lookups" in layer)
    above_the_stores = tuple(name.strip() for layer in layers[:stores] for name in re.split(r"[|:]", layer))
    for store in ("cache_manager", "circuit_breaker_manager"):
        upward = {t for t in graph[store] if t in entry_points or t.startswith(above_the_stores)}
        assert upward == set(), f"{store} imports {upward}"


def test_the_top_level_holds_the_card_modules_alone():
    top = {path.stem for path in ROOT.glob("*.py")}
    assert top == CARD_MODULES
    assert len(top) <= 8


def test_the_import_contracts_hold():
    """pyproject.toml's contracts: the service never imports devstack; the layers; no cycle."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports")], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_the_card_modules_never_import_the_stand_in_or_the_runner():
    """lint-imports checks packages only: the top-level modules are checked here."""
    for name in CARD_MODULES:
        imported = _imported(ROOT / f"{name}.py")
        assert not {module for module in imported if module.split(".")[0] == "devstack"}, name


def test_no_tracked_module_edits_the_import_path():
    """The project is installed (editable) into .venv and the benchmarks run as `python -m bench.NAME`
    from the repository's root: no module, test or benchmark needs Python's import path edited."""
    needle = "sys." + "path"  # spelt in two parts so that this file does not find itself
    offenders = [
        str(path.relative_to(ROOT))
        for path in _tracked_python()
        if path.is_file() and needle in path.read_text()
    ]
    assert offenders == []
