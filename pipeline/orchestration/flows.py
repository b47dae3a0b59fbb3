"""Prefect flows over dvc.yaml: a `dvc repro --single-item` task per stage, end-to-end flow, nightly deployment."""
from __future__ import annotations

import os
import sys
from pathlib import Path

# Prefect reads these when it is imported. Keep its state in the project, send nothing anywhere
# (server analytics, and the SDK's telemetry, which honours DO_NOT_TRACK), serve any local API on
# 127.0.0.1, and give an ephemeral server time to start on a busy 2-core machine.
_PREFECT_DEFAULTS = {
    "PREFECT_HOME": str(Path(__file__).resolve().parents[2] / ".prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_API_HOST": "127.0.0.1",
    "PREFECT_SERVER_EPHEMERAL_ENABLED": "true",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}
for _name, _value in _PREFECT_DEFAULTS.items():
    os.environ.setdefault(_name, _value)

import logging  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from pathlib import PurePosixPath  # noqa: E402
from typing import IO, Any, Callable, Mapping, Sequence  # noqa: E402

from prefect import Flow, Task, flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402
from prefect.settings import PREFECT_API_URL  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402
from prefect.types.entrypoint import EntrypointType  # noqa: E402

from pipeline.core.catalog import RUN_GROUP_ENV, STAGES  # noqa: E402
from pipeline.core.errors import TEMPORARY_FAILURE  # noqa: E402
from pipeline.core.params import ParamsError, document_text, load_params, read_document, read_yaml  # noqa: E402
from pipeline.core.presets import load_preset, overlay  # noqa: E402
from pipeline.orchestration.dvc_repo import (DVC_LOCK_ADVICE, RepositoryBusy, dvc_env, dvc_status,  # noqa: E402
                                             lock_error, wait_for_lock)
from pipeline.orchestration import run_summary  # noqa: E402
from pipeline.orchestration.dvcyaml import refresh  # noqa: E402

PIPELINE_FLOW = "pipeline"
DEFAULT_DEPLOYMENT = "nightly"
DEFAULT_CRON = "0 2 * * *"  # 02:00 UTC every night
# A scheduled run that meets someone's `dvc repro` waits for it, up to an hour, rather than fail the night.
DEFAULT_SERVE_LOCK_WAIT_S = 3600.0
# Only the download stage touches the network, where a retry can help; a failed training run
# must stop and be looked at, not silently start again.
RETRIES = {"download": 3}
RETRY_BACKOFF_S = 10  # waits 10 s, 20 s, 40 s
_DVC_WRAPPER = "ERROR: failed to reproduce"


class FlowError(RuntimeError):
    """An expected failure of a flow command, reported in one line."""


class StageFailed(FlowError):
    """`dvc repro` of one stage exited non-zero (names the stage and its last stderr line); `temporary` when the
    stage exited with TEMPORARY_FAILURE (a network failure), the one failure a retry is for."""

    def __init__(self, message: str, temporary: bool = False):
        super().__init__(message)
        self.temporary = temporary


class _NoTracebackForExpected(logging.Filter):
    """Prefect logs a failed task or flow with its traceback; an expected failure (a stage that failed, a
    locked repository) says all in its one line, so its records keep the line and lose the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (FlowError, RepositoryBusy)):
            record.exc_info, record.exc_text = None, None
        return True


for _logger in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_logger).addFilter(_NoTracebackForExpected())


def project_dir(project: str | os.PathLike | None) -> Path:
    """The project folder (default: the current one), which must hold dvc.yaml."""
    root = Path(project or Path.cwd()).resolve()
    if not (root / "dvc.yaml").is_file():
        raise ParamsError(f"{root}: no dvc.yaml here; pass the project folder")
    return root


def dvc_stages(project: Path) -> dict[str, dict]:
    """dvc.yaml's stages by name, in file order."""
    stages = read_yaml(project / "dvc.yaml").get("stages")
    if not isinstance(stages, dict) or not stages:
        raise ParamsError(f"{project / 'dvc.yaml'}: no stages")
    return stages


def _paths(entries: Sequence[str | Mapping]) -> list[PurePosixPath]:
    # An entry is a path, or {path: options} for outs, metrics and plots with options.
    return [PurePosixPath(next(iter(e)) if isinstance(e, Mapping) else e) for e in entries]


def _overlaps(a: PurePosixPath, b: PurePosixPath) -> bool:
    return a == b or a in b.parents or b in a.parents


def upstream(stages: Mapping[str, dict], name: str) -> list[str]:
    """The stages whose outputs `name` reads directly (a dep equal to, inside or above an out)."""
    deps = _paths(stages[name].get("deps", []))
    return [other for other, spec in stages.items() if other != name and any(
        _overlaps(dep, out) for dep in deps
        for out in _paths([*spec.get("outs", []), *spec.get("metrics", []), *spec.get("plots", [])]))]


def plan(stages: Mapping[str, dict], targets: Sequence[str] | None = None) -> list[str]:
    """The stages to run for `targets` (default: all) with everything they depend on, each after
    its inputs and otherwise in dvc.yaml's order."""
    unknown = [t for t in targets or [] if t not in stages]
    if unknown:
        raise ParamsError(f"unknown stage {unknown[0]}; dvc.yaml has {', '.join(stages)}")
    ordered: list[str] = []

    def visit(name: str) -> None:
        for before in upstream(stages, name):
            visit(before)
        if name not in ordered:
            ordered.append(name)

    for name in stages:
        if targets is None or name in targets:
            visit(name)
    return ordered


def nested(overrides: Mapping[str, Any]) -> dict:
    """{"a.b.c": v} as {"a": {"b": {"c": v}}}, the shape presets.overlay merges."""
    out: dict = {}
    for dotted, value in overrides.items():
        *parents, last = dotted.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def _within(a: str, b: str) -> bool:
    return a == b or a.startswith(f"{b}.") or b.startswith(f"{a}.")


def readers(stages: Mapping[str, dict], keys: Sequence[str]) -> list[str]:
    """The stages whose dvc.yaml `params` read any of the dotted keys (or a key inside one)."""
    return [name for name, spec in stages.items()
            if any(_within(key, p) for p in spec.get("params", []) if isinstance(p, str) for key in keys)]


def check_params(params_path: Path, names: Sequence[str]) -> None:
    """Load params_path with the param specs of stages `names` (see pipeline.core.catalog; a dvc.yaml stage
    added by hand, outside the declaration, is not checked)."""
    for name in names:
        if name in STAGES:
            load_params(params_path, STAGES[name].load().PARAMS)


def apply_params(project: Path, preset: str | None = None, overrides: Mapping[str, Any] | None = None) -> list[str]:
    """Write preset `preset`, then the dotted `overrides`, into project/params.yaml; return the
    changed keys.

    Like `dvc exp run -S`, the values stay in params.yaml (its comments and layout are kept; `git diff`
    shows the change), so a later `dvc repro` sees the same params. The result is first checked
    with the param specs of every stage that reads a changed key, then replaces params.yaml in one
    rename; on any error params.yaml is unchanged.
    """
    if not preset and not overrides:
        return []
    path = project / "params.yaml"
    # A draft named params.yaml, so that errors read "params.yaml: ...", beside the real one
    # (same file system) for an atomic rename.
    with tempfile.TemporaryDirectory(dir=project, prefix=".params-") as tmp:
        draft = Path(tmp) / path.name
        params = read_document(path)
        changed = overlay(params, load_preset(preset)) if preset else []
        changed += overlay(params, nested(overrides or {}))
        draft.write_text(document_text(params), encoding="utf-8")
        stages = dvc_stages(project)
        check_params(draft, readers(stages, changed))
        if changed:
            os.replace(draft, path)
    if any(_within(key, "datasets") or _within(key, "download.sources") for key in changed):
        refresh(project / "dvc.yaml")  # local sources and tracked downloads are written into dvc.yaml
    return changed


def _pump(stream: IO[str], log: Callable[[str], None], lines: list[str]) -> None:
    for line in stream:
        lines.append(line.rstrip("\n"))
        if not DVC_LOCK_ADVICE.search(line + "\n"):  # wrong while the holder lives: never passed on
            log(lines[-1])


def last_error(err: list[str], returncode: int) -> str:
    """The line that says why a DVC command failed."""
    lines = [line.strip() for line in err if line.strip()]
    # The stage's own error line says more than DVC's "ERROR: failed to reproduce" after it.
    own = [line for line in lines if not line.startswith(_DVC_WRAPPER)]
    return (own or lines or [f"exit status {returncode}"])[-1]


def dvc_logged(args: Sequence[str], cwd: Path, env: Mapping[str, str]) -> tuple[int, list[str], list[str]]:
    """Run `dvc ARGS` in cwd, its stdout logged line by line to the flow run's log at info level and its stderr
    at warning level (it carries the stages' errors and DVC's complaints); (exit status, stdout, stderr lines)."""
    logger = get_run_logger()
    with subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1) as proc:
        out: list[str] = []
        err: list[str] = []
        reader = threading.Thread(target=_pump, args=(proc.stderr, logger.warning, err), daemon=True)
        reader.start()
        _pump(proc.stdout, logger.info, out)
        reader.join()
    return proc.returncode, out, err


@task(name="dvc repro", cache_policy=NO_CACHE)  # skipping an up-to-date stage is DVC's decision
def repro(stage: str, project: str, run_group: str, lock_wait_s: float = 0.0) -> bool:
    """`dvc repro --single-item <stage>` in project once its lock is free (waiting up to lock_wait_s, else
    RepositoryBusy naming the holder), its output streamed line by line to the task log; return whether
    the stage ran (False: DVC found it up to date or restored it from cache)."""
    logger = get_run_logger()
    wait_for_lock(Path(project), lock_wait_s, logger.info)
    returncode, out, err = dvc_logged(["repro", "--single-item", stage], Path(project), dvc_env(run_group))
    if returncode:
        busy = lock_error(Path(project), "\n".join(err))  # taken by another process after the check
        if busy is not None:
            raise busy
        raise StageFailed(f"stage {stage} failed: {last_error(err, returncode)}",
                          temporary=f"exited with {TEMPORARY_FAILURE}" in "\n".join(err))
    return any(line.startswith(f"Running stage '{stage}'") for line in out + err)


def all_up_to_date(project: Path, names: Sequence[str], run_group: str) -> bool:
    """Whether `dvc status` finds every stage of `names` up to date; any doubt (an error, a stage that is
    always changed, such as download with a tracked source) answers False, and the tasks decide."""
    return dvc_status(project, list(names), dvc_env(run_group)) == {}


def temporary_failure(task: Task, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition: retry only a stage that failed with a network error (StageFailed.temporary);
    never a locked repository, bad data or a failed training run."""
    failure = state.result(raise_on_failure=False)
    return isinstance(failure, StageFailed) and failure.temporary


def task_for(stage: str) -> Task:
    """The `dvc repro` task of one stage: retried with exponential backoff for download's network errors only."""
    retries = RETRIES.get(stage, 0)
    return repro.with_options(name=f"dvc repro {stage}", retries=retries,
                              retry_delay_seconds=exponential_backoff(RETRY_BACKOFF_S) if retries else 0,
                              retry_condition_fn=temporary_failure if retries else None)


def run_stages(targets: Sequence[str] | None, preset: str | None, overrides: Mapping[str, Any] | None,
               project: str | None, lock_wait_s: float = 0.0) -> dict[str, str]:
    """The body of every flow: apply params, then one task per planned stage; {stage: ran | up to date}."""
    root = project_dir(project)
    stages = dvc_stages(root)
    names = plan(stages, targets)
    logger = get_run_logger()
    # One MLflow parent run for all stages of this flow run, unless the caller chose a group.
    group = os.environ.get(RUN_GROUP_ENV) or f"prefect-{flow_run.id}"
    results = dict.fromkeys(names, "not reached")
    try:
        wait_for_lock(root, lock_wait_s, logger.info)  # before params.yaml changes under a running pipeline
        changed = apply_params(root, preset, overrides)
        if changed:
            logger.info("params.yaml: changed %s", ", ".join(changed))
        if all_up_to_date(root, names, group):
            # A night with nothing new costs one DVC process, not one per stage.
            logger.info("dvc status: all %d stages up to date (%s)", len(names), ", ".join(names))
            results = dict.fromkeys(names, "up to date")
        else:
            for name in names:
                results[name] = "failed"  # until its task returns
                results[name] = "ran" if task_for(name)(name, str(root), group, lock_wait_s) else "up to date"
    except Exception as exc:
        _publish_summary(root, results, group, str(exc))
        raise
    _publish_summary(root, results, group)
    return results


def _publish_summary(root: Path, results: Mapping[str, str], group: str, failure: str | None = None) -> None:
    # The summary reports on the run; it never changes the run's outcome (a store down, params unreadable).
    try:
        run_summary.publish(run_summary.summary(root, results, group, failure))
    except Exception as exc:
        get_run_logger().warning("the run's summary was not published: %s", exc)


# What a failed (or crashed) flow run calls: the team's notification block.
ON_FAILURE = {"on_failure": [run_summary.notify_failure], "on_crashed": [run_summary.notify_failure]}


@flow(name=PIPELINE_FLOW, **ON_FAILURE)
def pipeline_flow(stages: list[str] | None = None, preset: str | None = None,
                  overrides: dict[str, Any] | None = None, project: str | None = None,
                  lock_wait_s: float = 0.0) -> dict[str, str]:
    """Run dvc.yaml end to end (or only `stages` and what they depend on), one `dvc repro` task per
    stage; `preset` and `overrides` ({"pretrain.epochs": 1}) are written into params.yaml first. A repository
    locked by another process is waited for up to `lock_wait_s` seconds (0: the flow fails at once)."""
    return run_stages(stages, preset, overrides, project, lock_wait_s)


def stage_flow(stage: str) -> Flow:
    """The flow of one dvc.yaml stage, named `stage-<stage>`: its upstream stages, then it."""
    def upstream_then_stage(preset: str | None = None, overrides: dict[str, Any] | None = None,
                            project: str | None = None, lock_wait_s: float = 0.0) -> dict[str, str]:
        return run_stages([stage], preset, overrides, project, lock_wait_s)

    return flow(upstream_then_stage, name=f"stage-{stage}", description=f"dvc.yaml stage {stage} after its upstream stages",
                **ON_FAILURE)


def serve(cron: str = DEFAULT_CRON, name: str = DEFAULT_DEPLOYMENT, lock_wait_s: float = DEFAULT_SERVE_LOCK_WAIT_S) -> None:
    """Serve the end-to-end flow as deployment `pipeline/<name>` on `cron` (UTC) until interrupted; its runs
    wait up to lock_wait_s for a repository another process holds."""
    # Without an API URL Prefect would serve against a temporary server that nothing else can reach.
    if not PREFECT_API_URL.value():
        raise FlowError("serve needs a Prefect server: start one with `prefect server start --host 127.0.0.1 "
                        "--port 4200` and set PREFECT_API_URL=http://127.0.0.1:4200/api")
    # By module path: the flow-run process imports pipeline.orchestration.flows as the package module it is.
    # limit=1: DVC locks the repository, so a second concurrent run could only fail.
    pipeline_flow.serve(name=name, cron=cron, limit=1, entrypoint_type=EntrypointType.MODULE_PATH,
                        parameters={"lock_wait_s": lock_wait_s})
