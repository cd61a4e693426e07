"""The repository's shape: the card's entry points on top, one package, and the import contracts."""

from __future__ import annotations

import ast
import subprocess
import sys
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


def test_the_top_level_holds_the_card_modules_alone():
    top = {path.stem for path in ROOT.glob("*.py")}
    assert top == CARD_MODULES
    assert len(top) <= 8


def test_the_import_contracts_hold():
    """pyproject.toml's contracts: the service never imports devstack; routes above batches."""
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


def test_no_module_of_the_service_or_its_tests_edits_sys_path():
    """The project is installed (editable) into .venv: nothing needs sys.path edited.  bench/ still
    inserts its own directory for its shared harness (issue 16 is not finished there)."""
    offenders = [
        str(path.relative_to(ROOT))
        for path in _tracked_python()
        if "sys.path" in path.read_text()
        and path.parts[len(ROOT.parts)] != "bench"
        and path != Path(__file__)
    ]
    assert offenders == []
