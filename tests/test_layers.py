"""Imports run one way, along the pipeline: nothing imports a module above it, and outside the CLI
no function imports a care module (which would hide a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "care"

#: Each part of the package and its height: a module may import lower parts, and its own part.
#: train and evaluate share a height, so neither may import the other.
LAYERS: dict[str, int] = {
    "errors": 0,
    "geometry": 1,
    "progress": 1,
    "config": 2,
    "distributed": 2,
    "data": 3,
    "hardware": 3,
    "augment": 4,
    "models": 5,
    "losses": 6,
    "metrics": 6,
    "runs": 7,
    "plots": 8,
    "methods": 9,
    "train": 10,
    "evaluate": 10,
    "ablate": 11,
    "cli": 12,
    "__main__": 13,
    "__init__": 13,
}


def _part(module: str) -> str:
    """``care.data.registry`` → ``data``; ``care`` → ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    parts = ["care", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _care_imports(tree: ast.Module) -> list[tuple[str, bool]]:
    """(imported care module, whether the import sits inside a function) for every import."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module == "care" or child.module.startswith("care."):
                    found.append((child.module, nested))
            elif isinstance(child, ast.Import):
                found.extend(
                    (a.name, nested) for a in child.names if a.name.split(".")[0] == "care"
                )
            visit(child, nested)

    visit(tree, False)
    return found


MODULES = sorted(SRC.rglob("*.py"))


def test_every_part_of_the_package_has_a_layer() -> None:
    assert {_part(_module_name(p)) for p in MODULES} == set(LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_run_down_the_pipeline(path: Path) -> None:
    name = _module_name(path)
    part = _part(name)
    for imported, in_function in _care_imports(ast.parse(path.read_text())):
        target = _part(imported)
        if in_function:
            assert part == "cli", f"{name} imports {imported} inside a function"
        if target == part:
            continue
        assert LAYERS[target] < LAYERS[part], f"{name} imports {imported}, which is not below it"
