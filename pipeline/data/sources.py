"""What the pipeline learns from (params `datasets`): each dataset's sources, resolved to the files to read.

A source is either the name of a `download.sources` entry, fetched into data/raw/ by the download
stage, or a local file, folder or glob, read where it is. DVC tracks a local source as a dependency
of the stages that read it (`llm-pipeline dvc-yaml` writes it into dvc.yaml from params.yaml), so
changing, adding or removing a file reruns those stages and what follows them, nothing else.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Mapping

import yaml

from pipeline.core.errors import DataError
from pipeline.core.layout import DATA, project_root, raw_file
from pipeline.core.params import List, Section, Str

SECTION = "datasets"
NAMES = ("corpus", "classification", "instructions")
_SOURCES = List(Str(pattern=r"\S(.*\S)?"), min_items=1)
_FIELD = Str(pattern=r"\S(.*\S)?")
PARAMS = Section(
    corpus=Section(sources=_SOURCES, text_field=_FIELD),
    classification=Section(
        sources=_SOURCES,
        format=Str(choices=("auto", "csv", "tsv", "jsonl")),
        columns=List(_FIELD, min_items=2, optional=True),
        text_column=_FIELD,
        label_column=_FIELD,
        labels=List(_FIELD, min_items=2, optional=True),
        quoting=Str(choices=("book", "none")),
    ),
    instructions=Section(sources=_SOURCES, instruction_field=_FIELD, input_field=_FIELD, output_field=_FIELD),
)
GLOB_CHARS = frozenset("*?[")


def is_glob(entry: str) -> bool:
    return any(char in GLOB_CHARS for char in entry)


def local_dep(entry: str) -> str:
    """The path DVC tracks for a local source: the file or folder itself, or a glob's fixed folder
    (the folder above its first wildcard), so a file added there later reruns the readers."""
    expanded = os.path.expanduser(entry)
    if not is_glob(expanded):
        return os.path.normpath(expanded)
    fixed = []
    for part in Path(expanded).parts:
        if is_glob(part):
            break
        fixed.append(part)
    if not fixed:
        raise DataError(f"{entry}: a glob needs a fixed folder before its first wildcard, e.g. corpus/*.txt")
    return os.path.normpath(os.path.join(*fixed))


def local_deps(datasets: Mapping, downloads: Mapping) -> list[str]:
    """What DVC must track for the local sources of every dataset (see local_dep), in params order, once each."""
    return list(dict.fromkeys(local_dep(entry) for name in NAMES for entry in datasets[name]["sources"]
                              if entry not in downloads))


def check_local(entry: str) -> None:
    """Refuse a local source inside data/, which holds the pipeline's own outputs."""
    path = Path(local_dep(entry))
    if not path.is_absolute() and path.parts[:1] == DATA.parts:
        raise DataError(f"{entry}: data/ holds the pipeline's outputs; keep your own data in another folder")


def _folder_files(folder: Path) -> list[Path]:
    # Hidden files and folders (.git, .DS_Store, editor swap files) are never data.
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def resolve(dataset: str, entries: list[str], downloads: Mapping) -> list[Path]:
    """The files of one dataset's sources, in order: a download name is data/raw/<its filename>; a
    folder gives every non-hidden file under it, a glob every file it matches (both sorted)."""
    files: list[Path] = []
    for entry in entries:
        where = f"{SECTION}.{dataset}.sources: {entry!r}"
        if entry in downloads:
            files.append(raw_file(downloads[entry]["filename"]))
            continue
        check_local(entry)
        expanded = os.path.expanduser(entry)
        if is_glob(expanded):
            matched = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
            if not matched:
                raise _absent(where, entry, "matches no file")
            files += matched
        elif os.path.isdir(expanded):
            found = _folder_files(Path(expanded))
            if not found:
                raise DataError(f"{where} is an empty folder")
            files += found
        elif os.path.isfile(expanded):
            files.append(Path(expanded))
        else:
            raise _absent(where, entry, "is neither a name in download.sources nor an existing file, folder or glob")
    return list(dict.fromkeys(files))


def _absent(where: str, entry: str, what: str) -> DataError:
    # In a DVC experiment's temporary workspace (`dvc exp run --queue` or `--temp`) a local source that git
    # does not track is missing although the project has it: say so, and how to bring it along.
    root = project_root()
    if root != Path.cwd().resolve() and (root / local_dep(entry)).exists():
        return DataError(f"{where} is not in this experiment's temporary workspace (DVC copies there only the "
                         f"files git tracks): commit it, or queue with `--copy-paths {local_dep(entry)}`")
    return DataError(f"{where} {what}")


def require_tracked(stage: str, deps: list[str], dvc_yaml: Path = Path("dvc.yaml")) -> None:
    """Refuse to read a local source that the project's dvc.yaml does not list as a dep of `stage`:
    DVC would not see it change. (Without a dvc.yaml, as when a stage runs on its own, nothing to check.)"""
    if not dvc_yaml.is_file():
        return
    stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")).get("stages") or {}
    listed = {dep for dep in (stages.get(stage) or {}).get("deps", []) if isinstance(dep, str)}
    missing = [dep for dep in deps if dep not in listed]
    if missing:
        raise DataError(f"{dvc_yaml}: stage {stage} does not track the local source {missing[0]}; run "
                        "`llm-pipeline dvc-yaml` so that DVC reruns what reads it when it changes")
