"""`llm-pipeline run` and `llm-pipeline register`: `dvc repro` with every stage under one MLflow run group."""
from __future__ import annotations

import os
import sys
import time
from argparse import ArgumentParser
from pathlib import Path

from pipeline.core.catalog import PRETRAIN_LAUNCH_ENV, RUN_GROUP_ENV, TRAINERS
from pipeline.core.errors import reporting_errors
from pipeline.orchestration.dvc_repo import RepositoryBusy, dvc_env, dvc_status, run_dvc

LOCK_WAIT_HELP = ("if another process holds the DVC repository's lock, wait up to this long for it, "
                  "saying whom it waits for (default 0: fail at once, naming that process)")


def _repro(prog: str, arguments: list[str], lock_wait_s: float, env: dict[str, str]) -> None:
    """`dvc repro ARGUMENTS` in the current folder once its lock is free (pipeline.orchestration.dvc_repo.run_dvc);
    exits with DVC's status, or 1 with one line naming the process that holds the lock."""
    with reporting_errors(prog, RepositoryBusy):
        code = run_dvc([sys.executable, "-m", "dvc", "repro", *arguments], Path.cwd(), env, lock_wait_s)
    sys.exit(code)


def _run_group_env() -> dict[str, str]:
    return dvc_env(os.environ.get(RUN_GROUP_ENV) or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))


def run(argv: list[str]) -> None:
    """Run `dvc repro [TARGET...]` in the current folder; every stage it runs logs under one MLflow
    parent run (run group: $LLM_PIPELINE_RUN_GROUP, else the UTC start time)."""
    parser = ArgumentParser(prog="llm-pipeline run", description=run.__doc__)
    parser.add_argument("targets", nargs="*", metavar="STAGE", help="stages to bring up to date (default: all)")
    parser.add_argument("--force", action="store_true", help="rerun stages even when DVC finds them up to date")
    parser.add_argument("--nproc", type=int, default=1,
                        help="pretrain with this many data-parallel processes (torchrun, DDP); default 1")
    parser.add_argument("--lock-wait", type=float, default=0.0, metavar="SECONDS", help=LOCK_WAIT_HELP)
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error("--nproc must be >= 1")
    env = _run_group_env()
    if args.nproc > 1:  # read by dvc.yaml's pretrain cmd
        env[PRETRAIN_LAUNCH_ENV] = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node={args.nproc}"
    _repro("run", [*args.targets, *(["--force"] if args.force else [])], args.lock_wait, env)


def register(argv: list[str]) -> None:
    """Bring the MLflow registry in line with the trained models in data/models, without retraining: rerun the
    promote stage (`dvc repro --force --single-item promote`), which registers every training stage's output
    the registry lacks, found by its content hash (tag model_sha256), so running it again, or after `dvc pull`
    on another machine, adds no duplicate; then it moves the aliases under the promotion policy."""
    parser = ArgumentParser(prog="llm-pipeline register", description=register.__doc__)
    parser.add_argument("--lock-wait", type=float, default=0.0, metavar="SECONDS", help=LOCK_WAIT_HELP)
    args = parser.parse_args(argv)
    env = _run_group_env()
    status = dvc_status(Path.cwd(), [*(stage.name for stage in TRAINERS.values()), "evaluate"], env)
    with reporting_errors("register"):
        if status is None:
            raise ValueError("`dvc status` failed here; run it to see why")
        changed = list(status)
        if changed:
            raise ValueError(f"{', '.join(changed)}: outputs differ from dvc.lock (dvc status); `dvc pull` fetches "
                             "pushed outputs, `dvc repro` retrains (and registers) what changed")
    _repro("register", ["--force", "--single-item", "promote"], args.lock_wait, env)
