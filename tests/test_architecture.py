"""The house's import rules (docs/architecture.md), checked on the source with ``ast``.

* The engine (``foundry_kernel``) imports nothing of Jupyter or the UI; the CLI reaches the
  workbench's commands only through ``importlib`` at the moment one is used.
* Inside the engine, each group may import only the groups below it: the base modules
  (errors, paths, atomic, config, logs, store, supervisor, models) know nothing of data,
  teachers, training or run control; data knows only the base; teachers and training may
  use each other (the built-in teacher is trained by the Trainer) and data; run control
  and the CLI sit on top.
* No import cycle between modules at import time (function-local imports are the
  documented way to defer heavy or upward-looking imports).
* The workbench uses the engine's public surface only: the names ``foundry_kernel``
  exports and its public modules, never a private (``_``) module.
* Nothing installs under a generic top-level name: the wheel holds ``foundry_kernel`` and
  ``widgets`` only (``bench`` is a dev tool run from the checkout).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "foundry_kernel"
JUPYTER = {
    "widgets",
    "ipywidgets",
    "plotly",
    "anywidget",
    "voila",
    "jupyterlab",
    "jupyter_server",
    "jupyter_client",
    "nbformat",
    "nbclient",
    "papermill",
    "ipykernel",
    "IPython",
}
# group -> the groups it may import (besides itself)
BASE = "base"
LAYERS: dict[str, set[str]] = {
    BASE: set(),
    "data": {BASE},
    "teachers": {BASE, "data", "training"},
    "training": {BASE, "data", "teachers"},
    "run": {BASE, "data", "teachers", "training"},
    "cli": {BASE, "data", "teachers", "training", "run"},
}
PUBLIC_ENGINE_MODULES = {
    "foundry_kernel",
    "foundry_kernel.atomic",
    "foundry_kernel.config",
    "foundry_kernel.errors",
    "foundry_kernel.logs",
    "foundry_kernel.metrics",
    "foundry_kernel.paths",
    "foundry_kernel.plaindata",
    "foundry_kernel.progress",
    "foundry_kernel.ranks",
    "foundry_kernel.store",
    "foundry_kernel.summary",
    "foundry_kernel.supervisor",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def group_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in {"__main__"}:
        return "cli"
    if parts[1] in LAYERS:
        return parts[1]
    if parts[1] == "cli":
        return "cli"
    return BASE


def imports(path: Path, *, top_level_only: bool) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import; with ``top_level_only`` the ones that run
    at import time (not inside functions or ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes: list[ast.AST]
    if top_level_only:
        nodes = []
        for node in tree.body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            nodes.append(node)
            if isinstance(node, (ast.If, ast.Try)):
                nodes.extend(ast.walk(node))
    else:
        nodes = list(ast.walk(tree))
    package = module_name(path) if path.name == "__init__.py" else module_name(path.parent)
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            for alias in node.names:  # ``from pkg import module``
                yield node.lineno, f"{base}.{alias.name}"


def engine_files() -> list[Path]:
    return sorted(ENGINE.rglob("*.py"))


def _known(module: str) -> bool:
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


@pytest.mark.parametrize("path", engine_files(), ids=lambda p: module_name(p))
def test_engine_imports_nothing_of_jupyter(path: Path) -> None:
    for line, name in imports(path, top_level_only=False):
        assert name.split(".")[0] not in JUPYTER, (
            f"{module_name(path)}:{line} imports {name}: the engine knows nothing of Jupyter"
        )


@pytest.mark.parametrize("path", engine_files(), ids=lambda p: module_name(p))
def test_engine_imports_only_downward(path: Path) -> None:
    me = module_name(path)
    mine = group_of(me)
    for line, name in imports(path, top_level_only=False):
        if not name.startswith("foundry_kernel.") or not _known(name):
            continue
        theirs = group_of(name)
        if theirs == mine or name == "foundry_kernel":
            continue
        assert theirs in LAYERS[mine], (
            f"{me}:{line} imports {name}: group {mine!r} may import {sorted(LAYERS[mine])}"
        )


def test_no_import_cycles_at_import_time() -> None:
    graph: dict[str, set[str]] = {}
    for path in engine_files():
        me = module_name(path)
        graph[me] = {
            name
            for _line, name in imports(path, top_level_only=True)
            if name.startswith("foundry_kernel") and _known(name) and name != me
        }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep in graph[node] and state.get(dep) == 1 and not node.startswith(dep + "."):
                if dep.startswith(node + "."):
                    continue  # a package's __init__ importing its own module
                cycle = [*stack[stack.index(dep) :], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if state.get(dep) is None:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if state.get(node) is None:
            visit(node)


@pytest.mark.parametrize("path", sorted((ROOT / "widgets").rglob("*.py")), ids=lambda p: p.name)
def test_workbench_uses_the_public_engine_only(path: Path) -> None:
    for line, name in imports(path, top_level_only=False):
        if not name.startswith("foundry_kernel"):
            continue
        if _known(name):
            assert name in PUBLIC_ENGINE_MODULES, (
                f"widgets/{path.name}:{line} imports {name}: use foundry_kernel's public names"
            )


def test_the_cli_reaches_the_workbench_lazily() -> None:
    """The CLI names the workbench modules as data, imported when a command is used."""
    from foundry_kernel.cli import WORKBENCH_COMMANDS

    for module, _named, _help in WORKBENCH_COMMANDS.values():
        assert module.startswith("widgets."), module
        assert _known(module), module


def test_only_two_packages_install() -> None:
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setup["packages"]["find"]["include"] == ["foundry_kernel*", "widgets*"]
    assert "notebooks/*.ipynb" in setup["package-data"]["widgets"]


def test_every_public_name_resolves() -> None:
    """``foundry_kernel.__all__`` is the public surface: each name must import."""
    import foundry_kernel

    for name in foundry_kernel.__all__:
        assert getattr(foundry_kernel, name) is not None, name
