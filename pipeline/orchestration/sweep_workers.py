"""A sweep across machines: each point a flow run of deployment `sweep-point/sweep`, run by a Prefect worker in its
own clone as `dvc exp run --temp` of the sweep's commit and pushed to the shared git and DVC remotes.

The submitting clone and every worker's clone share a git repository (their `origin`) and a DVC remote; the
stages report to the shared MLflow server. A point's experiment is found again as DVC finds any pushed experiment:
`dvc exp pull origin NAME-<i>` brings its commit (params, metrics, dvc.lock) and its outputs.
"""
from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

# First: flows sets Prefect's settings before Prefect is imported.
from pipeline.orchestration.flows import FlowError, StageFailed, dvc_logged, last_error, project_dir

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from tqdm import tqdm

from pipeline.core.errors import DataError
from pipeline.core.processes import BIN, run_server, tool_env
from pipeline.orchestration.dvc_repo import dvc_env
from pipeline.orchestration.services import SWEEP_POOL
from pipeline.orchestration.sweeps import WORKER_DEPLOYMENT, Point, dvc_output

SWEEP_FLOW = WORKER_DEPLOYMENT.split("/")[0]
GIT_REMOTE = "origin"  # the repository every clone of the team shares
CLONE_ENV = "LLM_PIPELINE_WORKER_CLONE"  # set by `llm-pipeline flow worker`: the clone its flow runs work in
WORKER_LOCK = Path(".dvc") / "tmp" / "sweep-point.lock"
POLL_S = 3.0
WORKER_STOP_GRACE_S = 10.0  # a Prefect worker told to stop has been seen to linger: killed this long after
FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


# -- on a worker ----------------------------------------------------------------------------------------------

def enter_worker_clone() -> dict[str, str]:
    """prefect.yaml's pull step of the sweep deployment: go to the clone of the worker that took the flow run
    (its $LLM_PIPELINE_WORKER_CLONE), wherever the deployment was created."""
    clone = os.environ.get(CLONE_ENV)
    if not clone:
        raise FlowError(f"${CLONE_ENV} is not set: start sweep workers with `llm-pipeline flow worker` in their clone")
    root = project_dir(clone)
    os.chdir(root)
    return {"directory": str(root)}


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise FlowError(f"git {' '.join(args[:2])} in {root}: {lines[-1] if lines else 'failed'}")
    return done.stdout.strip()


def _tracked_changes(root: Path) -> list[str]:
    return _git(root, "status", "--porcelain", "--untracked-files=no").splitlines()


@contextmanager
def _one_point_at_a_time(root: Path) -> Iterator[None]:
    # A point checks out its sweep's commit: two at once in one clone would move HEAD under each other.
    path = root / WORKER_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FlowError(f"another sweep point runs in {root}: a clone takes one at a time "
                            "(`llm-pipeline flow worker` starts its worker with --limit 1)") from None
        yield


def _checkout(root: Path, commit: str) -> None:
    """Make the clone's HEAD the sweep's commit, fetched from origin; a clone with uncommitted changes is refused."""
    _git(root, "fetch", "--quiet", GIT_REMOTE)
    if subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=root, capture_output=True).returncode:
        raise FlowError(f"commit {commit[:8]} is not on {GIT_REMOTE}: push it from the sweep's clone")
    if _git(root, "rev-parse", "HEAD") == commit:
        return
    if _tracked_changes(root):
        raise FlowError(f"{root} has uncommitted changes: a sweep worker's clone checks out each sweep's commit")
    _git(root, "checkout", "--quiet", "--detach", commit)


def _dvc(root: Path, env: Mapping[str, str], what: str, *args: str) -> None:
    returncode, _, err = dvc_logged(args, root, env)
    if returncode:
        raise StageFailed(f"{what} failed: {last_error(err, returncode)}")


@flow(name=SWEEP_FLOW)
def sweep_point(name: str, overrides: list[str], commit: str) -> dict[str, str]:
    """One point of a sweep in this worker's clone: check out `commit`, `dvc exp run --temp --pull -n NAME -S ...`
    (stage outputs the clone lacks come from the DVC remote), then `dvc exp push origin NAME`; where it ran."""
    root = project_dir(None)
    logger = get_run_logger()
    with _one_point_at_a_time(root):
        _checkout(root, commit)
        env = dvc_env(f"prefect-{flow_run.id}")
        _dvc(root, env, f"experiment {name}", "exp", "run", "--temp", "--pull", "-n", name,
             *(arg for override in overrides for arg in ("-S", override)))
        _dvc(root, env, f"dvc exp push {name}", "exp", "push", GIT_REMOTE, name)
    where = {"experiment": name, "host": socket.gethostname(), "clone": str(root)}
    logger.info("%s ran in %s:%s and is on %s and the DVC remote", name, where["host"], where["clone"], GIT_REMOTE)
    return where


def run_worker(project: str | None, pool: str = SWEEP_POOL, name: str | None = None) -> int:
    """A Prefect worker of `pool` for this clone, one flow run at a time, until interrupted; its exit status. The
    clone must share a git remote (origin) and a DVC remote with the team, and MLflow must be the team's server."""
    from prefect.settings import PREFECT_API_URL

    root = project_dir(project)
    if not PREFECT_API_URL.value():
        raise FlowError("a sweep worker takes its flow runs from the team's Prefect server: set PREFECT_API_URL")
    if not os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")):
        raise FlowError("a sweep worker reports to the team's MLflow server: set MLFLOW_TRACKING_URI=http://...")
    _git(root, "remote", "get-url", GIT_REMOTE)
    if not dvc_output(root, tool_env(), "remote", "default").strip():
        raise FlowError(f"{root}: no default DVC remote (dvc remote add -d NAME URL): points push their outputs there")
    command = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process", "--limit", "1"]
    return run_server(command + (["--name", name] if name else []), {**tool_env(), CLONE_ENV: str(root)},
                      WORKER_STOP_GRACE_S)


# -- on the submitting clone ----------------------------------------------------------------------------------

def pushed_commit(project: Path) -> str:
    """HEAD, which the workers will check out: refused (DataError) with uncommitted changes or when not on origin."""
    try:
        if _tracked_changes(project):
            raise DataError("uncommitted changes: the workers run the sweep on HEAD; commit (and push) them first")
        _git(project, "fetch", "--quiet", GIT_REMOTE)
        head = _git(project, "rev-parse", "HEAD")
        if not _git(project, "branch", "--remotes", "--contains", head):
            raise DataError(f"HEAD ({head[:8]}) is not on {GIT_REMOTE}: `git push` first, the workers fetch it")
    except FlowError as exc:
        raise DataError(str(exc)) from None
    return head


def submit(deployment: str, points: Sequence[Point], commit: str) -> dict[str, Any]:
    """One flow run of `deployment` per point, named after it, once a worker polls its pool; {point: flow run id}."""
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise DataError("a sweep on workers needs the team's Prefect server: set PREFECT_API_URL")
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_deployment_by_name(deployment).work_pool_name
        except ObjectNotFound:
            raise DataError(f"no deployment {deployment} on {PREFECT_API_URL.value()}: "
                            "`prefect deploy --all` in the project first") from None
        if not any(worker.status == "ONLINE" for worker in client.read_workers_for_work_pool(pool)):
            raise DataError(f"no worker polls work pool {pool}: start one in each worker's clone with "
                            "`llm-pipeline flow worker`")
    return {point.name: run_deployment(deployment, parameters={
        "name": point.name, "overrides": list(point.overrides), "commit": commit},
        flow_run_name=point.name, timeout=0).id for point in points}


def wait(runs: Mapping[str, Any], label: str) -> dict[str, str]:
    """Wait until every flow run is final; {point: its final state type}."""
    from prefect import get_client

    with get_client(sync_client=True) as client, tqdm(total=len(runs), desc=label, unit="experiment") as bar:
        while True:
            states = {name: client.read_flow_run(run_id).state_type.value for name, run_id in runs.items()}
            done = {name: state for name, state in states.items() if state in FINAL_STATES}
            bar.update(len(done) - bar.n)
            if len(done) == len(runs):
                return done
            time.sleep(POLL_S)


def pull(project: Path, names: Sequence[str]) -> None:
    """`dvc exp pull origin NAME` for each: the experiments' commits and outputs, for `dvc exp show` and the table."""
    for name in names:
        dvc_output(project, tool_env(), "exp", "pull", GIT_REMOTE, name)
