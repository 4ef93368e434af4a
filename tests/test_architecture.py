"""The architecture rules that import-linter cannot express (its contracts run as ``lint-imports`` in ``make
test``): no module imports another module's private names, and the library's imports sit at module top (a
function-level import was how the old import cycle was dodged); only the command line imports lazily, for its
start-up time, and the packages' ``__getattr__`` facades."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mergesmith"
LAZY_IMPORTS_ALLOWED = {"cli.py", "methods/__init__.py", "__init__.py"}


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _module_name(path: Path) -> str:
    if not path.is_relative_to(SRC):
        return ""
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _label(path: Path) -> str:
    return str(path.relative_to(SRC)) if path.is_relative_to(SRC) else path.name


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def private_imports(path: Path) -> list[str]:
    """``from mergesmith.x import _name`` and ``module._name`` where ``module`` is another mergesmith module."""
    tree = ast.parse(path.read_text())
    problems = []
    modules: dict[str, str] = {}  # local name -> mergesmith module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mergesmith"):
            for alias in node.names:
                if _is_private(alias.name):
                    problems.append(f"{_label(path)}:{node.lineno}: imports {node.module}.{alias.name}")
                elif _is_module(f"{node.module}.{alias.name}"):
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mergesmith"):
                    modules[alias.asname or alias.name.split(".")[0]] = alias.name
    own = _module_name(path)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and _is_private(node.attr)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and modules[node.value.id] != own
        ):
            problems.append(f"{_label(path)}:{node.lineno}: uses {modules[node.value.id]}.{node.attr}")
    return problems


def function_level_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    problems = []
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mergesmith"):
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("mergesmith")]
            problems += [f"{_label(path)}:{node.lineno}: imports {n} inside {func.name}()" for n in names]
    return problems


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_private_name_crosses_modules(path):
    assert private_imports(path) == []


@pytest.mark.parametrize(
    "path",
    [p for p in _modules() if str(p.relative_to(SRC)) not in LAZY_IMPORTS_ALLOWED],
    ids=lambda p: str(p.relative_to(SRC)),
)
def test_library_imports_sit_at_module_top(path):
    assert function_level_imports(path) == []


def test_the_checks_find_what_they_look_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from mergesmith.engine.execute import _load\nfrom mergesmith.engine import plan\n"
        "plan._renumber\n\ndef f():\n    from mergesmith.api import merge\n"
    )
    assert len(private_imports(bad)) == 2
    assert len(function_level_imports(bad)) == 1
