"""The design holds: dvc.yaml matches the stage declaration, no import cycles, no stage imports another."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from pipeline.dvcyaml import imported_modules, module_file
from pipeline.stages import STAGES


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = sorted(p for package in ("gpt", "pipeline") for p in (REPO / package).rglob("*.py"))
# Imports at module level: those run when a module loads, so only they can form a cycle.
LOAD_TIME = {module_name(path): {module_name(f) for f in map(module_file, imported_modules(path, at_load=True))
                                 if f is not None and f != path}
             for path in SOURCES}


def test_dvc_yaml_is_current():
    """`llm-pipeline dvc-yaml --check`: cmd, params, metrics and code deps as the declaration writes them."""
    result = subprocess.run([sys.executable, "-m", "pipeline.dvcyaml", "--check"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_code_deps_cover_what_it_loads(stage: str):
    """Independent of the generator's reading of the sources: every file of ours that Python
    actually loads when the stage's module is imported is one of the stage's deps in dvc.yaml."""
    code = (f"import sys, {STAGES[stage].module}\n"
            "for m in list(sys.modules.values()): print(getattr(m, '__file__', None) or '')")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    loaded = {str(Path(f).relative_to(REPO)) for f in result.stdout.split()
              if Path(f).is_relative_to(REPO) and Path(f).relative_to(REPO).parts[0] in ("gpt", "pipeline")}
    listed = set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["deps"])
    assert loaded and sorted(loaded - listed) == []


def test_no_import_cycles():
    """Depth-first search over module-level imports; a back edge is a cycle."""
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in sorted(LOAD_TIME.get(name, ())):
            if state.get(other) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(other):], other]))
            if other not in state:
                visit(other, [*path, other])
        state[name] = 2

    for name in LOAD_TIME:
        if name not in state:
            visit(name, [name])


def test_no_stage_imports_another():
    stage_modules = {stage.module for stage in STAGES.values()}
    for path in SOURCES:
        name = module_name(path)
        if name in stage_modules:
            imported = {module_name(f) for f in map(module_file, imported_modules(path)) if f is not None}
            assert imported & stage_modules <= {name}, f"{name} imports another stage"


def test_gpt_depends_on_no_pipeline_tooling():
    forbidden = ("pipeline", "dvc", "mlflow", "prefect", "pandas", "pandera", "urllib", "zipfile")
    for path in (REPO / "gpt").rglob("*.py"):
        for name in imported_modules(path):
            assert name.split(".")[0] not in forbidden, f"{path.relative_to(REPO)} imports {name}"


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_declared_stage_module_defines_the_contract(stage: str):
    """PARAMS and main, named per stage (dvc.yaml's params are checked against PARAMS by the --check above)."""
    module = STAGES[stage].load()
    assert module.PARAMS and module.main.__module__ == STAGES[stage].module


def test_stage_mains_read_as_outlines():
    """A stage's main is the outline of its steps (helpers do the work): a screen at most."""
    for stage in STAGES.values():
        tree = ast.parse(module_file(stage.module).read_text())
        main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
        assert main.end_lineno - main.lineno < 50, f"{stage.module}.main is {main.end_lineno - main.lineno + 1} lines"
