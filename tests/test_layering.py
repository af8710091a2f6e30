"""Imports go one way: no module of zsadkit imports a module of a higher layer (`zsadkit.layering.LAYERS`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from zsadkit.layering import LAYERS, layer_of

PACKAGE = Path(__file__).resolve().parent.parent / "zsadkit"
RANK = {name: rank for rank, (name, _) in enumerate(LAYERS)}
MODULES = sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every zsadkit import in `source` (the text of `module`), at any depth: imports inside
    functions count. `from zsadkit.methods import vand` counts the submodule `zsadkit.methods.vand`."""
    package = module if is_package else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("zsadkit")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if base.startswith("zsadkit"):
                found += [(node.lineno, f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base)
                          for alias in node.names]
    return found


def upward_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    own = RANK[layer_of(module)]
    return [f"line {line}: {name} ({layer_of(name)})" for line, name in imported_modules(source, module, is_package)
            if RANK[layer_of(name)] > own]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_higher_layer(path: Path) -> None:
    module = module_name(path)
    upward = upward_imports(path.read_text(), module, path.name == "__init__.py")
    assert not upward, f"{module} ({layer_of(module)}) imports a higher layer: {upward}"


def test_an_upward_import_inside_a_function_is_found() -> None:
    source = "import torch\nfrom zsadkit.models import tokenize\n\ndef f():\n    from zsadkit.engine import evaluate\n"
    assert upward_imports(source, "zsadkit.maps") == ["line 5: zsadkit.engine (engine)"]
    assert upward_imports("from . import engine\n", "zsadkit.methods", is_package=True) == []
    assert upward_imports("from ..recipes import vand\n", "zsadkit.methods.vand") == [
        "line 1: zsadkit.recipes.vand (engine)"]


def test_every_module_is_in_a_layer() -> None:
    assert {layer_of(module_name(path)) for path in MODULES} <= set(RANK)
    with pytest.raises(KeyError, match="no layer"):
        layer_of("numpy")
