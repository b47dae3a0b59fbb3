"""Wall time of one sweep of classifier seeds run one at a time and N at once (`llm-pipeline sweep -j`):

    python benchmarks/bench_sweep.py /path/to/a/project/where/the/pipeline/ran --points 4 --jobs 1 2

Each run takes a fresh copy of the project (git repository, data/, DVC cache, mlflow.db), commits what the
copy holds, and times `llm-pipeline sweep -n bench-jN -S finetune_classifier.seed=1,...,P -j N` from start
to table; every experiment must succeed. The copies are removed afterwards.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def timed_sweep(project: Path, scratch: Path, points: int, jobs: int) -> float:
    copy = scratch / f"j{jobs}"
    shutil.copytree(project, copy, symlinks=True)
    env = {**os.environ, "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])}
    for command in (["git", "add", "-A"], ["git", "commit", "-qm", "bench_sweep", "--allow-empty"]):
        subprocess.run(command, cwd=copy, env=env, check=True, capture_output=True)
    seeds = ",".join(str(seed) for seed in range(1, points + 1))
    start = time.perf_counter()
    result = subprocess.run([str(BIN / "llm-pipeline"), "sweep", "-n", f"bench-j{jobs}", "-S",
                             f"finetune_classifier.seed={seeds}", "-j", str(jobs)], cwd=copy, env=env,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"-j {jobs}: {result.stderr.strip().splitlines()[-1]}")
    print(result.stdout)
    shutil.rmtree(copy)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("project", type=Path, help="a git + DVC project whose pipeline has run (outputs present)")
    parser.add_argument("--points", type=int, default=4, help="classifier seeds in the sweep (default 4)")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2], help="the -j values to time (default 1 2)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as scratch:
        times = {jobs: timed_sweep(args.project.resolve(), Path(scratch), args.points, jobs) for jobs in args.jobs}
    print(f"{args.points} classifier experiments on {os.cpu_count()} cores:")
    for jobs, seconds in times.items():
        print(f"  -j {jobs}: {seconds:7.1f} s")


if __name__ == "__main__":
    main()
