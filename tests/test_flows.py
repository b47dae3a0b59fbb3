"""Prefect flows over dvc.yaml: flow runs and `dvc repro` agree on what is up to date; the nightly deployment runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from uuid import UUID

import pytest
import yaml

from conftest import BIN, MIRROR_ENV, answers, free_port, make_dvc_repo, set_param, sh, stop, wait_until
from pipeline import flows  # first: it points Prefect at a project-local home, offline
from pipeline.params import ParamsError
from pipeline.tracking import RUN_GROUP_ENV
from prefect import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, LogFilter, LogFilterFlowRunId
from prefect.exceptions import ObjectNotFound
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

def deployed(client, name: str) -> bool:
    try:
        return client.read_deployment_by_name(name) is not None
    except ObjectNotFound:  # the runner has not registered it yet
        return False


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory):
    """A real `prefect server start` on a free 127.0.0.1 port; this process talks to it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    log = home / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until("prefect server", lambda: answers(f"{url}/health"), server, log)
        with temporary_settings({PREFECT_API_URL: url, PREFECT_HOME: home}):
            yield url, home
    finally:
        stop(server)


@pytest.fixture
def dvc_repo(tmp_path: Path, mirror: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict]:
    """A scratch git + DVC project (as in test_dvc_stages); this process's env reaches its stages."""
    repo, env = make_dvc_repo(tmp_path, mirror)
    env.pop(RUN_GROUP_ENV, None)  # the flow picks one per flow run
    # In-process flow runs start `dvc repro` with this process's environment.
    monkeypatch.setenv(MIRROR_ENV, str(mirror))
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.delenv("LLM_PIPELINE_OFFLINE", raising=False)
    monkeypatch.delenv(RUN_GROUP_ENV, raising=False)
    return repo, env


def flow_logs(flow_run_id: UUID) -> str:
    """Every log line of a flow run and its tasks, as stored by the Prefect server."""
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def run_flow(flow, **parameters):
    state = flow(**parameters, return_state=True)
    return state, state.state_details.flow_run_id


def test_plan_follows_dvc_yaml_and_only_download_retries(dvc_repo, capsys):
    repo, _ = dvc_repo
    stages = flows.dvc_stages(repo)
    assert flows.plan(stages) == list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])
    assert flows.plan(stages, ["tokenize"]) == ["download", "validate", "tokenize"]
    assert flows.plan(stages, ["evaluate"]) == ["download", "validate", "tokenize", "pretrain", "evaluate"]
    with pytest.raises(ParamsError, match="unknown stage tokenise"):
        flows.plan(stages, ["tokenise"])

    download = flows.task_for("download")
    assert download.retries == 3 and download.retry_delay_seconds == [10, 20, 40]
    assert all(flows.task_for(name).retries == 0 for name in stages if name != "download")

    flows.main(["list", "--project", str(repo)])
    listing = capsys.readouterr().out.splitlines()
    assert listing[0] == "pipeline: " + " ".join(stages)
    assert "stage-tokenize: download validate tokenize" in listing

    with temporary_settings(restore_defaults={PREFECT_API_URL}), pytest.raises(SystemExit) as exit_info:
        flows.main(["serve"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith("llm-pipeline flow: error: serve needs a Prefect server")


def test_flow_runs_and_dvc_repro_share_up_to_date(dvc_repo, prefect_api, capsys):
    repo, env = dvc_repo
    dvc = str(BIN / "dvc")

    # A flow run does the work; dvc then has nothing to redo.
    state, _ = run_flow(flows.stage_flow("tokenize"), project=str(repo))
    assert state.is_completed(), state.message
    assert state.result() == {"download": "ran", "validate": "ran", "tokenize": "ran"}
    for out in ("data/raw/SMSSpamCollection", "data/metrics/validate.json", "data/tokens/pretrain/train.bin",
                "data/tokens/spam/test.csv", "data/metrics/tokenize.json"):
        assert (repo / out).is_file(), out
    assert "Data and pipelines are up to date" in sh(repo, env, dvc, "status", "download", "validate", "tokenize")
    assert "Running stage" not in sh(repo, env, dvc, "repro", "tokenize")

    # Overrides land in params.yaml, rerun only what reads them, and dvc agrees afterwards.
    state, _ = run_flow(flows.pipeline_flow, stages=["tokenize"], overrides={"tokenize.train_ratio": 0.8},
                        project=str(repo))
    assert state.is_completed(), state.message
    assert state.result() == {"download": "up to date", "validate": "up to date", "tokenize": "ran"}
    assert yaml.safe_load((repo / "params.yaml").read_text())["tokenize"]["train_ratio"] == 0.8
    assert "Running stage" not in sh(repo, env, dvc, "repro", "tokenize")

    # The reverse: dvc repro does the work; the flow then skips every stage, and its task logs say so.
    set_param(repo, "tokenize.train_ratio", 0.7)
    assert "Running stage 'tokenize'" in sh(repo, env, dvc, "repro", "tokenize")
    state, run_id = run_flow(flows.stage_flow("tokenize"), project=str(repo))
    assert state.is_completed(), state.message
    assert set(state.result().values()) == {"up to date"}
    logs = flow_logs(run_id)
    for stage in ("download", "validate", "tokenize"):
        assert f"Stage '{stage}' didn't change, skipping" in logs
    assert "Running stage" not in logs

    # A typo in an override fails the run before any stage, naming the key; params.yaml is untouched.
    before = (repo / "params.yaml").read_text()
    state, _ = run_flow(flows.pipeline_flow, overrides={"tokenize.train_ratioo": 0.5}, project=str(repo))
    assert state.is_failed() and "tokenize.train_ratioo" in state.message
    with pytest.raises(SystemExit) as exit_info:
        flows.main(["run", "tokenize", "--project", str(repo), "--set", "tokenize.train_ratio=2"])
    assert exit_info.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("llm-pipeline flow:")]
    assert errors == ["llm-pipeline flow: error: params.yaml: tokenize.train_ratio must be in (0, 1), got 2"]
    assert (repo / "params.yaml").read_text() == before


PROBE_STAGE = {  # a stage a flow must pick up from dvc.yaml; it records the run group it was given
    "cmd": f"python -c \"import os; open('data/probe.txt', 'w').write(os.environ['{RUN_GROUP_ENV}'])\"",
    "deps": ["data/metrics/validate.json"],
    "outs": ["data/probe.txt"],
}


def test_served_deployment_runs_on_trigger(dvc_repo, prefect_api, tmp_path):
    repo, env = dvc_repo
    url, home = prefect_api
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    dvc_yaml["stages"]["probe"] = PROBE_STAGE
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    env.update(PREFECT_API_URL=url, PREFECT_HOME=str(home))
    cron = "0 3 1 1 *"  # never due while the test runs, so the only run is the one triggered here

    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "pipeline.flows", "serve", "--cron", cron],
                                  cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with get_client(sync_client=True) as client:
            wait_until("served deployment", lambda: deployed(client, "pipeline/nightly"), server, log)
            deployment = client.read_deployment_by_name("pipeline/nightly")
            triggered = sh(repo, env, str(BIN / "prefect"), "deployment", "run", "pipeline/nightly",
                           "--param", 'stages=["probe"]', "--watch", "--watch-timeout", "150")
            by_deployment = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
            runs = client.read_flow_runs(deployment_filter=by_deployment)
    finally:
        stop(server)

    assert "Flow run finished successfully in 'Completed'" in triggered, triggered
    assert [schedule.schedule.cron for schedule in deployment.schedules] == [cron]
    completed = [run for run in runs if run.state.is_completed()]
    assert len(completed) == 1, [run.state for run in runs]
    assert (repo / "data/metrics/validate.json").is_file()
    assert (repo / "data/probe.txt").read_text() == f"prefect-{completed[0].id}"
    assert "up to date" in sh(repo, env, str(BIN / "dvc"), "status", "probe")
