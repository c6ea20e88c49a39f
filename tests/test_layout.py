"""The house's rules, read from the source: which layer may import which, and what stays out of training.

Every import counts, also those inside functions and under ``TYPE_CHECKING``: a lazy import is
still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hpo"
COMMANDS = {"hpo.run", "hpo.best", "hpo.report", "hpo.dashboard", "hpo.submit"}
FOUNDATION = {"hpo.errors", "hpo.folders"}
# Layer → the layers it may import (besides itself and the foundation).
ALLOWED: dict[str, set[str]] = {
    "hpo.studyfile": set(),
    "hpo.cli": {"hpo.studyfile"},
    # The ``hpo COMMAND`` dispatcher imports the one command asked for by name (importlib), never statically.
    "hpo.__main__": {"hpo.cli"},
    "hpo.training": {"hpo.studyfile"},
    "hpo.tuning": {"hpo.studyfile", "hpo.training"},
    "hpo.results": {"hpo.studyfile", "hpo.training", "hpo.tuning"},
    "hpo.launching": {"hpo.cli", "hpo.studyfile", "hpo.training", "hpo.tuning"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it, by its full name."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # from hpo import cli
    return found


def _layer(module: str) -> str:
    if module in COMMANDS or module in FOUNDATION or module in ("hpo", "hpo.cli"):
        return module
    return ".".join(module.split(".")[:2])


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_each_module_imports_only_the_layers_below_it(path: Path) -> None:
    module = _module_name(path)
    layer = _layer(module)
    ours = {name for name in _imports(path) if name == "hpo" or name.startswith("hpo.")}
    imported = {_layer(name) for name in ours if _layer(name) != "hpo"} - {layer}
    if layer == "hpo":
        return  # the package's lazy map of the Python API names every layer
    if layer in COMMANDS:
        assert not imported & COMMANDS, f"{module} imports another command: {sorted(imported & COMMANDS)}"
        return
    allowed = FOUNDATION if layer in FOUNDATION else FOUNDATION | ALLOWED[layer]
    assert imported <= allowed, f"{module} imports {sorted(imported - allowed)}; {layer} may import {sorted(allowed)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_training_never_imports_optuna_and_the_study_file_never_torch(path: Path) -> None:
    module = _module_name(path)
    top = {name.split(".")[0] for name in _imports(path)}
    if module.startswith("hpo.training"):
        assert "optuna" not in top
    if module.startswith("hpo.studyfile") or module in FOUNDATION:
        assert not top & {"torch", "torchvision", "optuna"}, f"{module} imports {sorted(top & {'torch', 'torchvision', 'optuna'})}"


def test_no_function_runs_over_50_lines_without_saying_why() -> None:
    long = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 50:
                if "Over 50 lines:" not in (ast.get_docstring(node) or ""):
                    long.append(f"{_module_name(path)}.{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_no_private_optuna_attribute_is_used() -> None:
    """Only Optuna's public API: no ``optuna._x`` module and no ``._attribute`` of an Optuna object we own."""
    offenders = []
    for path in MODULES:
        for name in _imports(path):
            if name.startswith("optuna.") and any(part.startswith("_") for part in name.split(".")):
                offenders.append(f"{_module_name(path)} imports {name}")
    assert not offenders, offenders
