"""The design holds: dvc.yaml matches the stage catalog, pipeline's parts only import downwards, no import cycles."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
import pipeline
from pipeline.core.catalog import STAGES
from pipeline.orchestration.dvcyaml import imported_modules, module_file


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
    result = subprocess.run([sys.executable, "-m", "pipeline.commands.dvc_yaml", "--check"], cwd=REPO,
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


def _part(module: str) -> str | None:
    """The part of pipeline/ a module belongs to ("core", "stages", ...), None for pipeline/__init__ and gpt."""
    parts = module.split(".")
    return parts[1] if parts[0] == "pipeline" and len(parts) > 1 else None


RANK = {part: rank for rank, layer in enumerate(pipeline.LAYERS) for part in layer}
STAGE_MODULES = {stage.module for stage in STAGES.values()}


def layering_violations(root: Path) -> list[str]:
    """Every import in the pipeline/ tree at `root` (anywhere in a module, lazy ones too) that breaks the
    layering: into a higher layer or a sibling part, of a stage module, or of a verb from outside commands/."""
    found = []
    for path in sorted((root / "pipeline").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mine = _part(name)
        for other in sorted(imported_modules(path)):
            theirs = _part(other)
            if module_file(other, root) is None or theirs is None or theirs == mine:
                continue
            if other in STAGE_MODULES:
                found.append(f"{name} imports stage {other}: stages are run by dvc.yaml's commands, never imported")
            elif theirs == "commands":
                found.append(f"{name} imports verb {other}: only the command line imports its verbs")
            elif mine is not None and RANK[theirs] >= RANK[mine]:
                found.append(f"{name} ({mine}) imports {other} ({theirs}): a part imports only layers below it")
    return found


def test_every_part_of_pipeline_has_a_layer():
    on_disk = {path.name for path in (REPO / "pipeline").iterdir() if (path / "__init__.py").is_file()}
    assert on_disk == set(RANK)


def test_pipeline_imports_only_downwards():
    assert layering_violations(REPO) == []


def test_layering_check_catches_planted_violations(tmp_path: Path):
    """The same check on a copy of the tree with three bad imports planted, lazy ones included."""
    shutil.copytree(REPO / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    plant = {"core/errors.py": "from pipeline.registry.tracking import configure\n",
             "orchestration/services.py": "def f():\n    from pipeline.commands.cli import COMMANDS\n",
             "registry/versions.py": "import pipeline.stages.evaluate\n"}
    for file, line in plant.items():
        with (tmp_path / "pipeline" / file).open("a", encoding="utf-8") as out:
            out.write(line)
    found = layering_violations(tmp_path)
    assert found == [
        "pipeline.core.errors (core) imports pipeline.registry (registry): a part imports only layers below it",
        "pipeline.core.errors (core) imports pipeline.registry.tracking (registry): a part imports only layers below it",
        "pipeline.orchestration.services imports verb pipeline.commands: only the command line imports its verbs",
        "pipeline.orchestration.services imports verb pipeline.commands.cli: only the command line imports its verbs",
        "pipeline.registry.versions (registry) imports pipeline.stages (stages): a part imports only layers below it",
        "pipeline.registry.versions imports stage pipeline.stages.evaluate: stages are run by dvc.yaml's commands, "
        "never imported",
    ]


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
