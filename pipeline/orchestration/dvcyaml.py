"""Keep dvc.yaml's generated parts true: each stage's cmd, params, metrics, the code it imports, the
local data sources it reads, and whether download must run every time.

They are written from the stage declaration (pipeline.core.catalog), the imports of each stage's module and
params.yaml's datasets, so changing retry logic in pipeline/data/fetch.py reruns the download stage and
nothing else, a file added to a local source folder reruns the stages that read it, and no list is
kept by hand. The deps under data/, outs and plots stay hand-written in dvc.yaml. `llm-pipeline
dvc-yaml` rewrites the file; `--check` (CI) fails when it is stale.
"""
from __future__ import annotations

import ast
import io
import re
from functools import cache
from pathlib import Path

from ruamel.yaml import YAML

from gpt.files import atomic_write_text
from gpt.native import CSRC
from pipeline.core.catalog import STAGES, Stage, registered_by
from pipeline.core.layout import DATA
from pipeline.core.params import DOWNLOAD_SOURCES, load_params
from pipeline.data import sources

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gpt", "pipeline")
DVC_YAML = "dvc.yaml"


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """Our source file of module `name` (a module or a package's __init__) in the tree at `root`, or None if it
    is not ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@cache
def imported_modules(path: Path, at_load: bool = False) -> frozenset[str]:
    """The modules `path` imports, with their packages: anywhere (inside functions too, as a stage
    may run them), or with `at_load` only those its module level imports when it loads."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body if at_load else ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
    return frozenset(".".join(name.split(".")[:i]) for name in names for i in range(1, name.count(".") + 2))


def code_deps(stage: Stage) -> list[str]:
    """Every file of ours that running the stage can import, relative to the project root, sorted."""
    start = module_file(stage.module)
    assert start is not None, stage.module
    # The packages above the module run first too (pipeline/__init__.py, pipeline/stages/__init__.py).
    packages = [module_file(".".join(stage.module.split(".")[:i])) for i in range(1, stage.module.count(".") + 1)]
    # A registered model's pyfunc module is loaded by name (ModelSpec.flavour), not imported.
    flavours = [module_file(model.flavour) for model in registered_by(stage)]
    seen: set[Path] = set()
    todo = [start, *(p for p in [*packages, *flavours] if p is not None)]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [f for f in map(module_file, imported_modules(path)) if f is not None]
    if module_file("gpt.native") in seen:  # it builds the C++ sources at run time: they are code the stage runs
        seen |= {path for path in CSRC.iterdir() if path.suffix in (".cpp", ".h")}
    return sorted(str(p.relative_to(ROOT)) for p in seen)


def _hand_written(dep: object) -> bool:
    # A stage's own inputs from other stages live under data/; code and local sources are generated.
    return not isinstance(dep, str) or dep.split("/")[0] == DATA.name


def render(text: str, params_path: Path) -> str:
    """dvc.yaml's text with every declared stage's generated parts rewritten (local sources and tracked
    downloads as params_path declares them)."""
    params = load_params(params_path, {sources.SECTION: sources.PARAMS, "download.sources": DOWNLOAD_SOURCES})
    downloads = params["download.sources"]
    local = sources.local_deps(params[sources.SECTION], downloads)
    yaml = YAML()  # round trip: comments, order and layout of the hand-written parts are kept
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 120
    document = yaml.load(text)
    stages = document["stages"]
    for name, stage in STAGES.items():
        entry = stages.get(name)
        if entry is None:
            raise ValueError(f"{DVC_YAML}: no stage {name}; add its entry (data deps, outs) by hand first")
        entry["cmd"] = stage.command
        reads = stage.load().PARAMS
        data = [dep for dep in entry.get("deps", []) if _hand_written(dep)]
        entry["deps"] = [*code_deps(stage), *(local if sources.SECTION in reads else []), *data]
        entry["params"] = list(reads)
        if "download" in reads:  # the stage that fetches: tracked sources must be fetched on every run
            if any(spec["track"] for spec in downloads.values()):
                entry["always_changed"] = True
            else:
                entry.pop("always_changed", None)
        if stage.report is not None and str(stage.report) not in entry.setdefault("outs", []):
            entry["outs"].append(str(stage.report))
        if stage.metrics is not None:
            entry["metrics"] = [str(stage.metrics)]
        else:
            entry.pop("metrics", None)
    out = io.StringIO()
    yaml.dump(document, out)
    # One blank line before each stage, however the hand-written file spaced them.
    return re.sub(r"\n+(  [A-Za-z_][\w-]*:\n)", r"\n\n\1", out.getvalue())


def refresh(dvc_yaml: Path, write: bool = True) -> bool:
    """Whether dvc_yaml's generated parts differ from what the code and the params.yaml beside it say;
    if so and `write`, rewrite them."""
    current = dvc_yaml.read_text(encoding="utf-8")
    wanted = render(current, dvc_yaml.parent / "params.yaml")
    if write and wanted != current:
        atomic_write_text(dvc_yaml, wanted)
    return wanted != current
