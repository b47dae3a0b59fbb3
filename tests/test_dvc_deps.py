"""dvc.yaml lists, for every stage, each project module that running the stage imports."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    """The repo file of module (or module attribute) `name`, if it is one of ours."""
    path = REPO.joinpath(*name.split(".")).with_suffix(".py")
    return path if path.is_file() else None


def imported_at_load(path: Path) -> set[Path]:
    """Our modules that `path` imports at module level (imports inside functions load only when called)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("gpt", "pipeline"):
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return {file for file in map(module_file, names) if file is not None}


def closure(path: Path) -> set[Path]:
    seen, todo = set(), [path]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += imported_at_load(current)
    return seen


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_deps_cover_its_imports(stage: str):
    module = re.search(r"-m (pipeline\.\w+)", STAGES[stage]["cmd"]).group(1)
    needed = {str(p.relative_to(REPO)) for p in closure(module_file(module))}
    listed = {dep if isinstance(dep, str) else next(iter(dep)) for dep in STAGES[stage]["deps"]}
    assert sorted(needed - listed) == [], f"add these to {stage}'s deps in dvc.yaml"
