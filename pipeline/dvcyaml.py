"""Keep dvc.yaml's code-facing parts true: each stage's cmd, params, metrics and the code it imports.

They are written from the stage declaration (pipeline.stages) and the imports of each stage's module,
so changing retry logic in pipeline/fetch.py reruns the download stage and nothing else, and no list
is kept by hand. Data deps, outs and plots stay hand-written in dvc.yaml. `llm-pipeline dvc-yaml`
rewrites the file; `--check` (CI) fails when it is stale.
"""
from __future__ import annotations

import argparse
import ast
import io
import re
import sys
from functools import cache
from pathlib import Path

from ruamel.yaml import YAML

from gpt.files import atomic_write_text
from pipeline.errors import reporting_errors
from pipeline.stages import STAGES, Stage

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gpt", "pipeline")
DVC_YAML = "dvc.yaml"


def module_file(name: str) -> Path | None:
    """Our source file of module `name` (a module or a package's __init__), or None if it is not ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
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
    seen: set[Path] = set()
    todo = [start, *(p for p in packages if p is not None)]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [f for f in map(module_file, imported_modules(path)) if f is not None]
    return sorted(str(p.relative_to(ROOT)) for p in seen)


def _is_code(dep: str) -> bool:
    return dep.split("/")[0] in PACKAGES and dep.endswith(".py")


def render(text: str) -> str:
    """dvc.yaml's text with every declared stage's generated parts rewritten."""
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
        data = [dep for dep in entry.get("deps", []) if not (isinstance(dep, str) and _is_code(dep))]
        entry["deps"] = [*code_deps(stage), *data]
        entry["params"] = list(stage.load().PARAMS)
        if stage.metrics is not None:
            entry["metrics"] = [str(stage.metrics)]
    out = io.StringIO()
    yaml.dump(document, out)
    # One blank line before each stage, however the hand-written file spaced them.
    return re.sub(r"\n+(  [A-Za-z_][\w-]*:\n)", r"\n\n\1", out.getvalue())


def main(argv: list[str] | None = None) -> None:
    """`llm-pipeline dvc-yaml [--check]`: rewrite dvc.yaml's generated parts, or check they are current."""
    parser = argparse.ArgumentParser(prog="llm-pipeline dvc-yaml", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if dvc.yaml is stale")
    parser.add_argument("--file", type=Path, default=ROOT / DVC_YAML, help="(default: the project's dvc.yaml)")
    args = parser.parse_args(argv)
    with reporting_errors("dvc-yaml"):
        current = args.file.read_text(encoding="utf-8")
        wanted = render(current)
        if args.check:
            if wanted != current:
                print(f"dvc-yaml: error: {args.file} is stale; run `llm-pipeline dvc-yaml`", file=sys.stderr)
                sys.exit(1)
            return
        if wanted != current:
            atomic_write_text(args.file, wanted)
            print(f"dvc-yaml: rewrote {args.file}")


if __name__ == "__main__":
    main()
