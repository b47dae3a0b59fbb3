"""Prefect flows over dvc.yaml: flow runs and `dvc repro` agree on what is up to date; the nightly deployment runs."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from uuid import UUID

import psutil
import pytest
import yaml

from conftest import (BIN, MIRROR_ENV, UNREACHABLE, answers, copy_mirror, free_port, make_dvc_repo, own_data_examples,
                      set_param, sh, stop, wait_until, write_own_data, write_topics)
from pipeline.commands import flow as flow_command
from pipeline.core.catalog import RUN_GROUP_ENV, STAGES
from pipeline.core.params import ParamsError, read_yaml
from pipeline.core.presets import overlay
from pipeline.orchestration import flows  # before prefect: it points Prefect at a project-local home, offline
from pipeline.orchestration.dvc_repo import RepositoryBusy
from pipeline.orchestration.run_summary import ARTIFACT_KEY, FAILURE_BLOCK, FAILURE_BLOCK_ENV, WEBHOOK_ENV
from mlflow import MlflowClient
from prefect import flow, get_client, task
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey, DeploymentFilter,
                                           DeploymentFilterId, LogFilter, LogFilterFlowRunId)
from prefect.exceptions import ObjectNotFound
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogHandler, APILogWorker
from prefect.server.api.server import SubprocessASGIServer
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
            try:
                yield url, home
            finally:
                # Send the logs and events this process still holds while the server runs, and stop the
                # temporary server that a log worker started outside these settings (a task's retries do):
                # at exit Prefect would do both after pytest has closed its streams, with a traceback.
                APILogWorker.drain_all()
                EventsWorker.drain_all()
                for temporary in list(SubprocessASGIServer._instances.values()):
                    temporary.stop()
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


def flow_logs(flow_run_id: UUID, timeout_s: float = 60) -> str:
    """Every log line of a flow run and its tasks, as stored by the Prefect server, once its last line has
    arrived: logs travel in batches, and a flush gives up after 5 s on a busy machine."""
    deadline = time.monotonic() + timeout_s
    while True:
        APILogHandler().flush()
        with get_client(sync_client=True) as client:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        text = "\n".join(log.message for log in logs)
        if "Finished in state" in text or time.monotonic() > deadline:
            return text
        time.sleep(1)


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
    assert download.retry_condition_fn is flows.temporary_failure  # network failures only
    assert all(flows.task_for(name).retries == 0 for name in stages if name != "download")

    flow_command.main(["list", "--project", str(repo)])
    listing = capsys.readouterr().out.splitlines()
    assert listing[0] == "pipeline: " + " ".join(stages)
    assert "stage-tokenize: download validate tokenize" in listing

    with temporary_settings(restore_defaults={PREFECT_API_URL}), pytest.raises(SystemExit) as exit_info:
        flow_command.main(["serve"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith("llm-pipeline flow: error: serve needs a Prefect server")


@pytest.mark.slow(80)
def test_flow_runs_and_dvc_repro_share_up_to_date(dvc_repo, prefect_api, capsys):
    repo, env = dvc_repo
    dvc = str(BIN / "dvc")

    # A flow run does the work; dvc then has nothing to redo.
    state, _ = run_flow(flows.stage_flow("tokenize"), project=str(repo))
    assert state.is_completed(), state.message
    assert state.result() == {"download": "ran", "validate": "ran", "tokenize": "ran"}
    for out in ("data/raw/SMSSpamCollection", "data/reports/validate.json", "data/tokens/pretrain/train.bin",
                "data/tokens/classification/test.csv", "data/reports/tokenize.json"):
        assert (repo / out).is_file(), out
    assert "Data and pipelines are up to date" in sh(repo, env, dvc, "status", "download", "validate", "tokenize")
    assert "Running stage" not in sh(repo, env, dvc, "repro", "tokenize")

    # Overrides land in params.yaml, rerun only what reads them, and dvc agrees afterwards.
    state, _ = run_flow(flows.pipeline_flow, stages=["tokenize"], overrides={"tokenize.corpus.train_ratio": 0.8},
                        project=str(repo))
    assert state.is_completed(), state.message
    assert state.result() == {"download": "up to date", "validate": "up to date", "tokenize": "ran"}
    assert yaml.safe_load((repo / "params.yaml").read_text())["tokenize"]["corpus"]["train_ratio"] == 0.8
    assert "Running stage" not in sh(repo, env, dvc, "repro", "tokenize")

    # The reverse: dvc repro does the work; the flow then skips every stage after one `dvc status`.
    set_param(repo, "tokenize.corpus.train_ratio", 0.7)
    assert "Running stage 'tokenize'" in sh(repo, env, dvc, "repro", "tokenize")
    state, run_id = run_flow(flows.stage_flow("tokenize"), project=str(repo))
    assert state.is_completed(), state.message
    assert set(state.result().values()) == {"up to date"}
    logs = flow_logs(run_id)
    assert "dvc status: all 3 stages up to date (download, validate, tokenize)" in logs
    assert "Running stage" not in logs

    # A typo in an override fails the run before any stage, naming the key; params.yaml is untouched.
    before = (repo / "params.yaml").read_text()
    state, _ = run_flow(flows.pipeline_flow, overrides={"tokenize.corpus.train_ratioo": 0.5}, project=str(repo))
    assert state.is_failed() and "tokenize.corpus.train_ratioo" in state.message
    with pytest.raises(SystemExit) as exit_info:
        flow_command.main(["run", "tokenize", "--project", str(repo), "--set", "tokenize.corpus.train_ratio=2"])
    assert exit_info.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("llm-pipeline flow:")]
    assert errors == ["llm-pipeline flow: error: params.yaml: tokenize.corpus.train_ratio must be in (0, 1), got 2"]
    assert (repo / "params.yaml").read_text() == before


PROBE_STAGE = {  # a stage a flow must pick up from dvc.yaml; it records the run group it was given
    "cmd": f"python -c \"import os; open('data/probe.txt', 'w').write(os.environ['{RUN_GROUP_ENV}'])\"",
    "deps": ["data/reports/validate.json"],
    "outs": ["data/probe.txt"],
}


@pytest.mark.slow(40)
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
        server = subprocess.Popen([sys.executable, "-m", "pipeline.commands.flow", "serve", "--cron", cron],
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
    assert (repo / "data/reports/validate.json").is_file()
    assert (repo / "data/probe.txt").read_text() == f"prefect-{completed[0].id}"
    assert "up to date" in sh(repo, env, str(BIN / "dvc"), "status", "probe")


# The own-data examples of docs/data.md on a model small enough for a test: seconds per stage.
OWN_DATA_SMALL = {
    "pretrain": {"model": "micro", "context_length": 32, "batch_size": 4, "max_steps": 4, "eval_every": 0,
                 "sample_every": 0, "checkpoint_every": 0, "device": "cpu"},
    "evaluate": {"max_batches": 1, "max_new_tokens": 3, "prompts": ["Hi"], "device": "cpu"},
    "finetune_classifier": {"epochs": 1, "eval_every": 0, "warmup_steps": 0, "device": "cpu"},
    "finetune_instruct": {"epochs": 1, "batch_size": 4, "max_length": 64, "max_test_examples": 2,
                          "max_new_tokens": 3, "device": "cpu"},
}
RETRAINED = ["validate", "tokenize", "finetune_classifier", "promote"]


def ran_stages(output: str) -> list[str]:
    return [name for name in STAGES if f"Running stage '{name}'" in output]


def summary_of(flow_run_id: UUID) -> str:
    """The markdown summary a flow run published, read back through Prefect's API."""
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[ARTIFACT_KEY])))
    assert len(artifacts) == 1, artifacts
    assert artifacts[0].type == "markdown"
    return artifacts[0].data


def trigger(repo: Path, env: dict) -> tuple[float, str, str]:
    """Run the served deployment now and wait for it; (seconds the flow run took, its logs, its summary)."""
    watched = sh(repo, env, str(BIN / "prefect"), "deployment", "run", "pipeline/nightly",
                 "--watch", "--watch-timeout", "300")
    assert "Flow run finished successfully in 'Completed'" in watched, watched
    run_id = UUID(re.search(r"UUID: ([0-9a-f-]{36})", watched).group(1))
    logs = flow_logs(run_id)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
    return (run.end_time - run.start_time).total_seconds(), logs, summary_of(run_id)


@pytest.mark.slow(300)
def test_nightly_run_retrains_only_on_new_data(dvc_repo, prefect_api, tmp_path, mirror):
    """The three own-data examples of docs/data.md through `dvc repro`, then the served nightly deployment twice:
    nothing new skips every stage; a new labelled CSV in the folder retrains the classifier alone."""
    repo, env = dvc_repo
    url, home = prefect_api
    write_own_data(repo, mirror)
    params = read_yaml(repo / "params.yaml")
    for example in [*own_data_examples(), OWN_DATA_SMALL]:
        overlay(params, example)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(repo, env, str(BIN / "llm-pipeline"), "dvc-yaml")
    assert ran_stages(sh(repo, env, str(BIN / "dvc"), "repro")) == list(STAGES)

    # The examples were read as written: a corpus folder, three topics, renamed instruction fields.
    tokens = repo / "data" / "tokens"
    meta = json.loads((tokens / "pretrain" / "meta.json").read_text())
    assert [s["file"] for s in meta["sources"]] == ["my-data/corpus/notes.md", "my-data/corpus/verdict.txt"]
    classes = json.loads((tokens / "classification" / "classes.json").read_text())
    assert classes["labels"] == ["art", "chat", "drama"] and classes["balance"] == "class_weight"
    assert classes["class_weights"][0] > 1 > classes["class_weights"][1]  # art is rare, chat common
    confusion = json.loads((repo / "data" / "plots" / "classifier_confusion.json").read_text())
    assert {row["actual"] for row in confusion} == {"art", "chat", "drama"}
    first = json.loads((tokens / "instructions" / "train.json").read_text())[0]
    assert set(first) == {"instruction", "input", "output"} and first["instruction"].startswith("Evaluate")

    env.update(PREFECT_API_URL=url, PREFECT_HOME=str(home))
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "pipeline.commands.flow", "serve", "--cron", "0 3 1 1 *"],
                                  cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with get_client(sync_client=True) as client:
            wait_until("served deployment", lambda: deployed(client, "pipeline/nightly"), server, log)
        idle_s, idle, idle_summary = trigger(repo, env)
        write_topics(repo / "my-data" / "topics" / "part-2.csv", mirror, {"art": 10, "drama": 10, "chat": 10}, 100)
        _, retrained, summary = trigger(repo, env)
    finally:
        stop(server)
    print(f"nothing new: the nightly run took {idle_s:.1f} s")
    assert ran_stages(idle) == [] and idle_s < 20, (idle_s, idle)
    assert f"dvc status: all {len(STAGES)} stages up to date" in idle, idle
    assert ran_stages(retrained) == RETRAINED, retrained
    for stage in ("download", "pretrain", "evaluate", "finetune_instruct"):
        assert f"Stage '{stage}' didn't change, skipping" in retrained
    registry = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    assert sorted(int(v.version) for v in registry.search_model_versions("name='gpt-spam-classifier'")) == [1, 2]
    assert len(registry.search_model_versions("name='gpt-base'")) == 1
    decision = json.loads((repo / STAGES["promote"].report).read_text())["classifier"]
    assert decision["version"] == 2 and decision["decision"] in ("promoted", "kept")

    # What each night did, in Prefect's UI: the flow run's markdown artifact, read back through the API.
    assert idle_summary.startswith("## Pipeline run `prefect-") and ": completed" in idle_summary.splitlines()[0]
    assert all(f"| {stage} | up to date |" in idle_summary for stage in STAGES)
    assert "from an earlier run (it did not run in this one)" in idle_summary and "none: no stage ran" in idle_summary
    for stage in STAGES:
        assert f"| {stage} | {'ran' if stage in RETRAINED else 'up to date'} |" in summary, summary
    assert "Decisions of `promote` in this run, under experiment `llm-pipeline`" in summary
    row = next(line for line in summary.splitlines() if line.startswith("| gpt-spam-classifier | 2 |"))
    assert f" val_accuracy {decision['value']:.4g} ± {decision['se']:.2g} | 1 | " in row
    assert f" | {decision['champion_value']:.4g} ± {decision['champion_se']:.2g} | " in row
    assert row.endswith(f"| {decision['decision']} |")
    assert f"- gpt-spam-classifier version 2: {decision['decision']}; {decision['reason']}" in summary
    runs = registry.search_runs([registry.get_experiment_by_name("llm-pipeline").experiment_id],
                                "tags.run_group LIKE 'prefect-%' AND tags.stage = 'finetune_classifier'")
    assert f"- finetune_classifier (finished, run `{runs[0].info.run_id}`)" in summary

    # dvc repro agrees: nothing to do, then the same four stages for the next file.
    assert ran_stages(sh(repo, env, str(BIN / "dvc"), "repro")) == []
    write_topics(repo / "my-data" / "topics" / "part-3.csv", mirror, {"art": 5, "drama": 5, "chat": 5}, 150)
    assert ran_stages(sh(repo, env, str(BIN / "dvc"), "repro")) == RETRAINED


@pytest.mark.slow(25)
def test_a_failed_flow_run_says_where_it_stopped_and_notifies_the_webhook(dvc_repo, prefect_api, monkeypatch, capsys):
    """`llm-pipeline flow notify` saves a webhook block on the server; a flow run that fails at a stage publishes
    a summary naming it, and its failure hook posts subject and reason to the webhook (a receiver on loopback)."""
    repo, _ = dvc_repo
    received: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    block = FAILURE_BLOCK.split("/")[1]
    try:
        monkeypatch.delenv(FAILURE_BLOCK_ENV, raising=False)
        monkeypatch.setenv(WEBHOOK_ENV, "not a url")
        with pytest.raises(SystemExit):
            flow_command.main(["notify"])
        assert capsys.readouterr().err.startswith(f"llm-pipeline flow: error: ${WEBHOOK_ENV}: set it to the webhook's")
        monkeypatch.setenv(WEBHOOK_ENV, f"http://127.0.0.1:{receiver.server_port}/hook")
        flow_command.main(["notify"])
        assert capsys.readouterr().out.startswith("saved notification block custom-webhook/llm-pipeline-failures:")
        # Valid params, but labels the data does not have: validate fails, after download ran.
        state, run_id = run_flow(flows.stage_flow("tokenize"), project=str(repo),
                                 overrides={"datasets.classification.labels": ["yes", "no"]})
        assert state.is_failed()
        deadline = time.monotonic() + 30
        while not received and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        receiver.shutdown()
        with contextlib.suppress(ObjectNotFound):  # the server is the module's: later failures notify no one
            CustomWebhookNotificationBlock.delete(block)
    with get_client(sync_client=True) as client:
        name = client.read_flow_run(run_id).name
    [message] = received
    assert message["subject"] == f"llm-pipeline: stage-tokenize run {name} failed"
    assert message["body"].startswith(f"Flow run {name} of stage-tokenize ended Failed: ")
    assert "stage validate failed" in message["body"]
    summary = summary_of(run_id)
    assert summary.splitlines()[0].endswith(": failed") and "**stage validate failed: " in summary
    assert "| download | ran |" in summary and "| validate | failed |" in summary and "| tokenize | not reached |" in summary


def _line_with(proc: subprocess.Popen, text: str, seen: list[str], timeout_s: float = 240) -> str:
    """Read proc's output (text, merged) until a line containing `text`; every line read goes to `seen`."""
    deadline = time.monotonic() + timeout_s
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return line
        assert time.monotonic() < deadline, "".join(seen)
    pytest.fail(f"no line with {text!r}:\n{''.join(seen)}")


@pytest.mark.slow(25)
def test_a_locked_repository_names_its_holder_and_is_waited_for_not_retried(dvc_repo, prefect_api):
    """Two real concurrent runs: while `llm-pipeline run` trains, a second run and a flow run fail at once
    with one line naming the process that holds the lock; with --lock-wait a third waits, then runs."""
    repo, env = dvc_repo
    url, home = prefect_api
    for key, value in {"datasets.corpus.sources": ["the-verdict"], "pretrain.model": "micro",
                       "pretrain.context_length": 32, "pretrain.max_steps": 1_000_000, "pretrain.eval_every": 0,
                       "pretrain.sample_every": 0, "pretrain.checkpoint_every": 0}.items():
        set_param(repo, key, value)  # a pretrain that runs until it is stopped
    holder = subprocess.Popen([str(BIN / "llm-pipeline"), "run", "pretrain"], cwd=repo, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    seen: list[str] = []
    try:
        _line_with(holder, "Running stage 'pretrain'", seen)
        # Keep reading its progress bars: a full pipe would block the holder, and then its Ctrl-C, mid-write.
        threading.Thread(target=lambda: seen.extend(holder.stdout), daemon=True).start()
        dvc_pids = {child.pid for child in psutil.Process(holder.pid).children(recursive=True)}
        holding = re.compile(rf"^(.+): error: {re.escape(str(repo))}: the DVC repository is locked by process "
                             r"(\d+) \((.*dvc repro pretrain)\); run again when it has finished, or pass "
                             r"--lock-wait SECONDS to wait for it$")

        start = time.monotonic()
        second = subprocess.run([str(BIN / "llm-pipeline"), "run", "evaluate"], cwd=repo, env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 1 and time.monotonic() - start < 30, second.stderr
        found = holding.match(second.stderr.strip())
        assert found and found.group(1) == "run" and int(found.group(2)) in dvc_pids, second.stderr

        start = time.monotonic()
        flow = subprocess.run([str(BIN / "llm-pipeline"), "flow", "run", "evaluate", "--project", str(repo)],
                              cwd=repo, env={**env, "PREFECT_API_URL": url, "PREFECT_HOME": str(home)},
                              capture_output=True, text=True, timeout=300)
        output = flow.stdout + flow.stderr
        assert flow.returncode == 1 and time.monotonic() - start < 60, output  # no 10/20/40 s retries
        found = holding.match(flow.stderr.strip().splitlines()[-1])
        assert found and found.group(1) == "llm-pipeline flow" and int(found.group(2)) in dvc_pids, output
        for wrong in ("Traceback", "manually remove", "Retrying", "rwlock"):
            assert wrong not in output, output

        waiter = subprocess.Popen([str(BIN / "llm-pipeline"), "run", "validate", "--lock-wait", "300"], cwd=repo,
                                  env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        waited: list[str] = []
        line = _line_with(waiter, "waiting for process", waited, timeout_s=60)
        assert re.search(r"waiting for process (\d+) \(.*dvc repro pretrain\) to release the DVC repository's "
                         r"lock \(0 of 300 s\)", line), line
    finally:
        os.killpg(holder.pid, signal.SIGINT)  # Ctrl-C: DVC stops the stage and releases its locks
        try:
            holder.wait(timeout=120)
        except subprocess.TimeoutExpired:
            # Seen twice on a loaded 2-core machine, not yet explained: say which processes outlived Ctrl-C, then
            # end them; the lock this test is about is still checked below (the waiter must then run).
            left = [f"{child.pid} {child.status()} {' '.join(child.cmdline())[:100]}"
                    for child in [psutil.Process(holder.pid), *psutil.Process(holder.pid).children(recursive=True)]]
            warnings.warn(f"llm-pipeline run outlived Ctrl-C by 120 s; processes left: {left}; output: "
                          f"{''.join(seen)[-1000:]}")
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait()
    waited.append(waiter.communicate(timeout=300)[0])
    assert waiter.returncode == 0, "".join(waited)
    assert "Stage 'validate' didn't change, skipping" in "".join(waited)


def test_only_network_failures_are_retried(prefect_api):
    """The retry condition of the download task, in real Prefect task runs: a stage that exited with the
    network-failure status is retried; a locked repository or any other failure is not."""
    attempts: list[str] = []

    @flow
    def failing(error: Exception) -> None:
        @task(retries=2, retry_delay_seconds=0, retry_condition_fn=flows.temporary_failure)
        def stage() -> None:
            attempts.append(type(error).__name__)
            raise error
        stage()

    for error, tries in ((flows.StageFailed("stage download failed: offline", temporary=True), 3),
                         (flows.StageFailed("stage download failed: sha256 mismatch"), 1),
                         (RepositoryBusy("locked by process 1 (dvc repro)"), 1)):
        attempts.clear()
        assert failing(error, return_state=True).is_failed()
        assert len(attempts) == tries, (error, attempts)


def test_a_network_failure_of_download_is_retried(dvc_repo, prefect_api, tmp_path, mirror, monkeypatch):
    """End to end: the download stage exits with the network-failure status under `dvc repro`, and the flow's
    download task tries it 1 + 3 times (the backoff made 0 s here), then fails in one line."""
    repo, env = dvc_repo
    monkeypatch.setenv(MIRROR_ENV, str(copy_mirror(mirror, tmp_path / "partial", without=("the-verdict.txt",))))
    monkeypatch.setattr(flows, "RETRY_BACKOFF_S", 0)
    set_param(repo, "download.sources.the-verdict.urls", [UNREACHABLE])
    set_param(repo, "download.retries", 1)
    state, run_id = run_flow(flows.stage_flow("download"), project=str(repo))
    assert state.is_failed()
    logs = flow_logs(run_id)
    assert logs.count("Running stage 'download'") == 4, logs
    assert "Retry 3/3 will start immediately" in logs and "Traceback" not in logs
    assert "stage download failed: download: error: 1 file(s) not in mirror" in state.message
