"""dvc.yaml end to end in a scratch git repo: repro, no-op repro, and a tokenize-only rerun."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, set_param, stage_env

DVC = Path(sys.executable).with_name("dvc")


def sh(cwd: Path, env: dict, *args: str) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture
def dvc_repo(tmp_path: Path, mirror: Path) -> tuple[Path, dict]:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(REPO / name, repo / name)
    for package in ("pipeline", "gpt"):
        shutil.copytree(REPO / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    env = stage_env(mirror, DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
                    GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    # `python` in the stage commands must be this interpreter.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    sh(repo, env, "git", "init", "-q")
    sh(repo, env, str(DVC), "init", "-q")
    sh(repo, env, "git", "add", "-A")
    sh(repo, env, "git", "commit", "-q", "-m", "init")
    return repo, env


def test_repro_then_noop_then_tokenize_only(dvc_repo):
    repo, env = dvc_repo
    first = sh(repo, env, str(DVC), "repro", "tokenize")
    for stage in ("download", "validate", "tokenize"):
        assert f"Running stage '{stage}'" in first
    for out in ("data/raw/SMSSpamCollection", "data/metrics/validate.json", "data/tokens/pretrain/train.bin",
                "data/tokens/spam/test.csv", "data/tokens/instruct/val.json", "data/metrics/tokenize.json"):
        assert (repo / out).is_file(), out

    second = sh(repo, env, str(DVC), "repro", "tokenize")
    assert "Running stage" not in second
    assert "up to date" in sh(repo, env, str(DVC), "status", "tokenize")

    set_param(repo, "tokenize.train_ratio", 0.8)
    third = sh(repo, env, str(DVC), "repro", "tokenize")
    assert "Stage 'download' didn't change, skipping" in third
    assert "Stage 'validate' didn't change, skipping" in third
    assert "Running stage 'tokenize'" in third
    assert "Running stage 'download'" not in third and "Running stage 'validate'" not in third
    metrics = sh(repo, env, str(DVC), "metrics", "show")
    assert "data/metrics/tokenize.json" in metrics and "data/metrics/validate.json" in metrics


SMALL_TRAINING = {
    "tokenize.corpus": ["the-verdict.txt"],
    "pretrain.model": "micro",
    "pretrain.context_length": 32,
    "pretrain.batch_size": 4,
    "pretrain.max_steps": 6,
    "pretrain.eval_every": 3,
    "pretrain.eval_batches": 2,
    "pretrain.sample_every": 3,
    "pretrain.sample_tokens": 5,
    "pretrain.checkpoint_every": 2,
    "evaluate.max_batches": 2,
    "evaluate.max_new_tokens": 5,
    "finetune_classifier.epochs": 1,
    "finetune_classifier.batch_size": 32,
    "finetune_classifier.eval_batches": 1,
}


def test_full_pipeline_logs_runs_and_registers_gpt_base(dvc_repo, monkeypatch):
    import mlflow

    repo, env = dvc_repo
    for key, value in SMALL_TRAINING.items():
        set_param(repo, key, value)
    env["LLM_PIPELINE_RUN_GROUP"] = "e2e-test"
    out = sh(repo, env, str(DVC), "repro")
    for stage in ("download", "validate", "tokenize", "pretrain", "evaluate", "finetune_classifier"):
        assert f"Running stage '{stage}'" in out
    for path in ("data/models/base/model.safetensors", "data/metrics/pretrain.json", "data/metrics/evaluate.json",
                 "data/plots/pretrain_loss.png", "data/plots/pretrain_loss.csv", "data/samples/evaluate.json"):
        assert (repo / path).is_file(), path
    assert "Running stage" not in sh(repo, env, str(DVC), "repro")

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llm-pipeline")
    runs = client.search_runs([experiment.experiment_id], "tags.run_group = 'e2e-test'")
    by_stage = {r.data.tags.get("stage"): r for r in runs if "stage" in r.data.tags}
    assert {"pretrain", "evaluate"} <= set(by_stage)
    parents = {r.data.tags["mlflow.parentRunId"] for r in by_stage.values()}
    assert len(parents) == 1  # one pipeline execution, one parent run
    pretrain = by_stage["pretrain"]
    assert pretrain.data.params["model"] == "micro"
    assert len(client.get_metric_history(pretrain.info.run_id, "loss")) == 6
    assert "val_loss" in by_stage["evaluate"].data.metrics

    version = client.get_model_version("gpt-base", "1")
    assert version.tags["eval.val_loss"] == str(by_stage["evaluate"].data.metrics["val_loss"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")  # restored after the test
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    try:
        model = mlflow.pyfunc.load_model("models:/gpt-base/1")
        texts = model.predict({"prompt": ["I had always"]}, params={"max_new_tokens": 4})
    finally:
        mlflow.set_tracking_uri(None)
    assert isinstance(texts["text"][0], str) and texts["text"][0]
