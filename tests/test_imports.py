"""The dependency direction of DESIGN.md: the worker never imports the coordinator; the coordinator
names only the worker's entry points (a training run, an evaluation) that it submits to Ray; the shared package imports neither side, except the CLI
(and the demo), which import a side inside the command that needs it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What the coordinator submits to Ray: a training run, and an evaluation task.
ENTRY_POINTS = {"worker.task", "worker.task.run_units", "worker.evaluate", "worker.evaluate.run_evaluation"}


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Modules ``path`` imports; with ``top_level_only``, not those imported inside a function."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from worker import task`
        elif top_level_only and isinstance(node, (ast.If, ast.Try)):  # TYPE_CHECKING blocks, fallbacks
            found.update(imports_in(node))
    return found


def imports_in(node: ast.AST) -> set[str]:
    found = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Import):
            found.update(alias.name for alias in child.names)
        elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
            found.add(child.module)
    return found


def package(name: str) -> list[Path]:
    return sorted((ROOT / name).glob("*.py"))


def side(module: str) -> str:
    return module.split(".")[0]


@pytest.mark.parametrize("path", package("worker"), ids=lambda p: p.name)
def test_the_worker_never_imports_the_coordinator(path: Path) -> None:
    assert not {m for m in imports(path) if side(m) == "coordinator"}, path


@pytest.mark.parametrize("path", package("coordinator"), ids=lambda p: p.name)
def test_the_coordinator_names_only_the_workers_entry_points(path: Path) -> None:
    named = {m for m in imports(path) if side(m) == "worker"}
    assert named <= {"worker", *ENTRY_POINTS}, (path, named)


@pytest.mark.parametrize("path", package("nomoat"), ids=lambda p: p.name)
def test_the_shared_package_imports_a_side_only_inside_a_command(path: Path) -> None:
    assert not {m for m in imports(path, top_level_only=True) if side(m) in ("coordinator", "worker")}, path


def loaded_after(statement: str) -> set[str]:
    """Top-level packages of the modules a fresh interpreter has loaded after ``statement``."""
    code = f"import sys\n{statement}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_importing_every_worker_module_loads_no_coordinator_module() -> None:
    statement = "; ".join(f"import worker.{p.stem}" for p in package("worker") if p.stem != "__init__")
    assert "coordinator" not in loaded_after(statement)


def test_the_cli_loads_neither_side_until_a_command_needs_it() -> None:
    loaded = loaded_after("import nomoat.cli")
    assert not loaded & {"coordinator", "worker"}, loaded
