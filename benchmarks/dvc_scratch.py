"""Prepare a scratch copy of the project whose DVC pipeline is up to date, for bench_gpt.py's
no-op `dvc repro` row:

    python benchmarks/dvc_scratch.py /tmp/dvc-scratch
    python benchmarks/bench_gpt.py --dvc-repo /tmp/dvc-scratch --dvc-target evaluate

It copies the project's files (git-tracked and untracked-but-not-ignored) and data/ into a new git
repository, then `dvc commit`s every stage whose outputs all exist there, so that `dvc repro` of
the last of them has nothing to do: what remains is DVC's own overhead (start-up, reading
dvc.yaml/dvc.lock and params, checking every dependency and output). Nothing is trained. When the
whole pipeline has run in a checkout and is unchanged, point --dvc-repo at that checkout instead.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _paths(entries: list) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def stage_outputs(dvc_yaml: Path) -> dict[str, list[str]]:
    """Each stage's outs, metrics and plots files, in dvc.yaml order."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    return {name: _paths(s.get("outs")) + _paths(s.get("metrics")) + _paths(s.get("plots")) for name, s in stages.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path, help="a new folder for the scratch repository")
    parser.add_argument("--source", type=Path, default=REPO, help="the project checkout to copy (default: this one)")
    args = parser.parse_args()
    dest, source = args.dest.resolve(), args.source.resolve()
    if dest.exists():
        sys.exit(f"{dest} exists; give a new folder")
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or shutil.which("dvc") or sys.exit("dvc not found")

    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=source, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (source / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / rel, dest / rel)
    if (source / "data").is_dir():
        shutil.copytree(source / "data", dest / "data", dirs_exist_ok=True, symlinks=True)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "scratch copy for bench_gpt.py"], cwd=dest, check=True)

    ready = [name for name, outs in stage_outputs(dest / "dvc.yaml").items()
             if outs and all((dest / path).exists() for path in outs)]
    if not ready:
        sys.exit(f"no stage of {source} has its outputs in data/; run the pipeline there first")
    subprocess.run([dvc, "commit", "-f", "-q", *ready], cwd=dest, check=True)
    last = ready[-1]
    status = subprocess.run([dvc, "status", last], cwd=dest, capture_output=True, text=True)
    print(f"{dest}: committed {', '.join(ready)}; `dvc status {last}`: {status.stdout.strip() or status.stderr.strip()}")
    print(f"next: python benchmarks/bench_gpt.py --dvc-repo {dest} --dvc-target {last}")


if __name__ == "__main__":
    main()
