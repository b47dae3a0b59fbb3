"""MLflow tracking against a real sqlite store in a temp project: run groups, params, metrics, models."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from conftest import stage_env
from gpt.checkpoint import load_model, save_model
from gpt.generate import generate_text
from gpt.model import GPTConfig, GPTModel
from gpt.tokenizer import load_tokenizer
from pipeline.core.errors import EXPECTED_ERRORS
from pipeline.core.params import check
from pipeline.registry.pyfuncs import gpt_generator
from pipeline.registry.tracking import (MLFLOW_SECTION, RUN_GROUP_ENV, TrackingError, configure, git_state, log_path,
                                        log_pyfunc, log_step_metrics, params_digest, run_group, stage_run, tracking_uri)


def test_stages_share_a_parent_and_land_in_the_project_store(store: MlflowClient, tmp_path: Path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.txt").write_text("a")
    (tmp_path / "report.json").write_text("{}")
    params = {"tokenize": {"spam": {"seed": 123}, "corpus": ["a.txt"]}, "odd+key": "x" * 10_000, "none": None}
    with stage_run("tokenize", params, {"train.bin": "ab" * 32}) as first:
        for step, loss in enumerate([1.0, 0.5, 0.25]):
            log_step_metrics({"loss": torch.tensor(loss)}, step)
        log_path(tmp_path / "out")
        log_path(tmp_path / "report.json", "reports")
    with stage_run("pretrain", {"lr": 1e-3}) as second:
        pass

    first, second = store.get_run(first.info.run_id), store.get_run(second.info.run_id)
    parent_id = first.data.tags["mlflow.parentRunId"]
    assert second.data.tags["mlflow.parentRunId"] == parent_id
    parent = store.get_run(parent_id)
    assert parent.data.tags["run_group"] == "g1" and parent.info.status == "FINISHED"
    assert first.data.params["tokenize.spam.seed"] == "123"
    assert first.data.params["tokenize.corpus"] == '["a.txt"]'
    assert first.data.params["none"] == "null"
    assert len(first.data.params["odd_key"]) == MAX_PARAM_VAL_LENGTH
    assert second.data.params == {"lr": "0.001"}
    tags = first.data.tags
    assert tags["stage"] == "tokenize" and tags["run_group"] == "g1"
    assert tags["data.train.bin.sha256"] == "ab" * 32
    assert {"git_commit", "git_dirty"} <= tags.keys()
    assert tags["params_digest"] == params_digest(params) != second.data.tags["params_digest"]
    history = store.get_metric_history(first.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.25)]
    assert {a.path for a in store.list_artifacts(first.info.run_id)} == {"out", "reports"}
    experiment = store.get_experiment(first.info.experiment_id)
    assert experiment.name == "llm-pipeline"
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert (tmp_path / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()


def test_params_digest_is_canonical():
    digest = params_digest({"a": 1, "b": {"c": [1, 2], "d": None}})
    assert digest == params_digest({"b": {"d": None, "c": [1, 2]}, "a": 1})  # key order does not matter
    assert digest != params_digest({"a": 1, "b": {"c": [2, 1], "d": None}})
    assert re.fullmatch(r"[0-9a-f]{64}", digest)


def test_another_group_gets_another_parent_and_failures_show(store: MlflowClient, monkeypatch: pytest.MonkeyPatch):
    with stage_run("download", {}) as first:
        pass
    monkeypatch.setenv(RUN_GROUP_ENV, "g2")
    with pytest.raises(RuntimeError), stage_run("download", {}) as failed:
        raise RuntimeError("boom")
    failed = store.get_run(failed.info.run_id)
    parent_id = failed.data.tags["mlflow.parentRunId"]
    assert parent_id != store.get_run(first.info.run_id).data.tags["mlflow.parentRunId"]
    assert failed.info.status == "FAILED" and store.get_run(parent_id).info.status == "FAILED"
    monkeypatch.setenv(RUN_GROUP_ENV, "it's")
    with pytest.raises(TrackingError, match=RUN_GROUP_ENV):
        run_group("abc", "false")


def git(*args: str) -> str:
    """Run git in the current folder (a test's own repository) as a throwaway committer; its output."""
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def test_run_group_defaults_to_the_git_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(RUN_GROUP_ENV, raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # never see an enclosing repo
    assert git_state() == ("unknown", "unknown")

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-qm", "init")
    commit = git("rev-parse", "HEAD")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")  # rewritten by dvc repro between stages
    assert git_state() == (commit, "false") and run_group(*git_state()) == commit
    (tmp_path / "code.py").write_text("x = 2\n")
    assert run_group(*git_state()) == f"{commit}-dirty"


def test_only_changed_tracked_files_make_the_work_tree_dirty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # never see an enclosing repo
    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-qm", "init")
    commit = git("rev-parse", "HEAD")
    (tmp_path / "notes.txt").write_text("a scratch note\n")
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / "try.py").write_text("print(1)\n")
    assert git_state() == (commit, "false")  # untracked files are not the commit's code

    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_state() == (commit, "true")  # a tracked file changed, unstaged
    git("add", "code.py")
    assert git_state() == (commit, "true")  # staged
    git("commit", "-qm", "x = 2")
    commit = git("rev-parse", "HEAD")
    assert git_state() == (commit, "false")
    git("add", "notes.txt")
    assert git_state() == (commit, "true")  # a new file staged: tracked now


def test_tracking_config_order_and_params_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    models = {"base": "b", "classifier": "c", "instruct": "i"}
    section = check({"experiment": "llm-pipeline", "models": models}, MLFLOW_SECTION, "mlflow")
    assert section == {"tracking_uri": None, "experiment": "llm-pipeline", "models": models}
    assert tracking_uri(section) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking_uri({"tracking_uri": "sqlite:////x.db"}) == "sqlite:////x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////env.db")
    assert tracking_uri({"tracking_uri": "sqlite:////x.db"}) == "sqlite:////env.db"


@pytest.mark.parametrize("via_env", [True, False])
def test_unreachable_server_fails_fast_with_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            via_env: bool):
    monkeypatch.chdir(tmp_path)
    uri = "http://127.0.0.1:9"  # discard port on loopback: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    if not via_env:
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
    start = time.monotonic()
    with pytest.raises(TrackingError, match=rf"^MLflow tracking server {uri} is unreachable \(.+\)$") as error:
        configure(None if via_env else {"tracking_uri": uri, "experiment": "llm-pipeline"})
    assert time.monotonic() - start < 10
    assert isinstance(error.value, EXPECTED_ERRORS)


def test_gpt_model_is_registered_as_code_and_generates(store: MlflowClient, tmp_path: Path, bpe_dir: Path):
    torch.manual_seed(0)
    checkpoint = save_model(GPTModel(GPTConfig.from_preset("micro")), tmp_path / "checkpoint")
    artifacts = {"checkpoint": checkpoint, "bpe": bpe_dir}
    with stage_run("pretrain", {"lr": 0.001}, {"train.bin": "cd" * 32}):
        first = log_pyfunc(gpt_generator, artifacts, "gpt-base", None, None)
        second = log_pyfunc(gpt_generator, artifacts, "gpt-base", tags={"corpus": "tiny"},
                            metrics={"val_loss": 2.5, "device": "cpu", "champion": True})
    assert (first.version, second.version) == (1, 2)
    assert second.tags["corpus"] == "tiny" and second.tags["metric.val_loss"] == "2.5"
    assert "metric.device" not in second.tags and "metric.champion" not in second.tags  # numbers only
    # The version carries its run's lineage: code, params and data.
    assert second.tags["stage"] == "pretrain" and second.tags["run_group"] == "g1" and "git_commit" in second.tags
    assert second.tags["params_digest"] == params_digest({"lr": 0.001})
    assert second.tags["data.train.bin.sha256"] == "cd" * 32
    assert not first.aliases and not second.aliases  # stages set no alias; the promote stage does

    model = mlflow.pyfunc.load_model("models:/gpt-base/2")
    long_prompt = "the cat sat on the mat " * 40  # far more tokens than the 64-token context
    prompts = ["Every effort moves you", "Hello, I am", long_prompt]
    texts = model.predict(pd.DataFrame({"prompt": prompts}), params={"max_new_tokens": 6})["text"].tolist()
    direct, tokenizer = load_model(checkpoint), load_tokenizer(bpe_dir)
    assert len(tokenizer.encode(long_prompt)) > direct.cfg.context_length
    assert texts == [generate_text(direct, tokenizer, p, max_new_tokens=6, temperature=0.0) for p in prompts]
    sampled = model.predict({"prompt": ["Hello"]}, params={"max_new_tokens": 3, "temperature": 1.0, "top_k": 5})
    assert sampled["text"].map(type).tolist() == [str]
    # A dict of lists (the `inputs` request form) is one row per item, as a DataFrame would be.
    greedy = {"max_new_tokens": 4, "temperature": 0.0}
    assert model.predict({"prompt": prompts[:2]}, params=greedy)["text"].tolist() == model.predict(
        pd.DataFrame({"prompt": prompts[:2]}), params=greedy)["text"].tolist()

    logged = list((tmp_path / "mlartifacts").rglob("MLmodel"))
    assert len(logged) == 2 and not (tmp_path / "mlruns").exists()
    assert not list((tmp_path / "mlartifacts").rglob("*.pkl"))
    example = json.loads((logged[0].parent / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == ["prompt"]



# Opens the store at $MLFLOW_TRACKING_URI (seconds), says it is ready, waits for the go file, then configures
# the project's tracking (milliseconds); prints the experiment's id.
CONFIGURE_AT_ONCE = """
import os, sys, time
from pathlib import Path
import mlflow
from pipeline.registry.tracking import configure
mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).search_experiments()
Path(sys.argv[1]).touch()
while not Path(sys.argv[2]).exists():
    time.sleep(0.005)
print(configure({"experiment": "at-once"}))
"""


@pytest.mark.slow(20)
def test_processes_creating_the_experiment_at_once_all_get_it(tmp_path: Path):
    """Two runs' stages, or queued experiments, that start together: each looks for the experiment, most
    find none, one creates it; the others read it back rather than fail."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # the store's tables exist, as after any earlier run
    go, env = tmp_path / "go", stage_env(None, MLFLOW_TRACKING_URI=uri)
    processes = [subprocess.Popen([sys.executable, "-c", CONFIGURE_AT_ONCE, str(tmp_path / f"ready-{i}"), str(go)],
                                  cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(4)]
    while not all((tmp_path / f"ready-{i}").exists() for i in range(4)):
        assert all(process.poll() is None for process in processes)
        time.sleep(0.01)
    go.touch()
    results = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0] * 4, [err for _, err in results]
    ids = {out.strip() for out, _ in results}
    assert ids == {MlflowClient(uri).get_experiment_by_name("at-once").experiment_id}
