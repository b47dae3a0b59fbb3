"""dvc.yaml end to end in a scratch git repo: repro, no-op repro, and a tokenize-only rerun."""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, SMALL_RUN_GROUP, SMALL_TRAINING, copy_repo, leftovers, make_dvc_repo, set_param, sh

DVC = BIN / "dvc"


@pytest.fixture
def dvc_repo(tmp_path: Path, mirror: Path) -> tuple[Path, dict]:
    return make_dvc_repo(tmp_path, mirror)


@pytest.mark.slow(30)
def test_repro_then_noop_then_tokenize_only(dvc_repo):
    repo, env = dvc_repo
    first = sh(repo, env, str(DVC), "repro", "tokenize")
    for stage in ("download", "validate", "tokenize"):
        assert f"Running stage '{stage}'" in first
    for out in ("data/raw/SMSSpamCollection", "data/reports/validate.json", "data/tokens/pretrain/train.bin",
                "data/tokens/classification/test.csv", "data/tokens/instructions/val.json", "data/reports/tokenize.json"):
        assert (repo / out).is_file(), out

    second = sh(repo, env, str(DVC), "repro", "tokenize")
    assert "Running stage" not in second
    assert "up to date" in sh(repo, env, str(DVC), "status", "tokenize")

    set_param(repo, "tokenize.corpus.train_ratio", 0.8)
    third = sh(repo, env, str(DVC), "repro", "tokenize")
    assert "Stage 'download' didn't change, skipping" in third
    assert "Stage 'validate' didn't change, skipping" in third
    assert "Running stage 'tokenize'" in third
    assert "Running stage 'download'" not in third and "Running stage 'validate'" not in third
    assert not (repo / "data/metrics").exists()  # the data stages' statistics are reports, not metrics


@pytest.mark.slow(80)
def test_second_repro_fails_fast_on_the_lock_and_the_first_completes(dvc_repo):
    repo, env = dvc_repo
    for key, value in SMALL_TRAINING.items():  # download to pretrain: long enough to overlap the second
        set_param(repo, key, value)
    first = subprocess.Popen([str(DVC), "repro", "pretrain"], cwd=repo, env={**env, "PYTHONUNBUFFERED": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in first.stdout:  # DVC holds the workspace lock from before the first stage runs
        output.append(line)
        if "Running stage 'download'" in line:
            break
    start = time.monotonic()
    second = subprocess.run([str(DVC), "repro", "pretrain"], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=120)
    seconds, overlapped = time.monotonic() - start, first.poll() is None
    output.append(first.stdout.read())
    assert first.wait(timeout=300) == 0, "".join(output)

    print(second.stderr)
    assert second.returncode == 255 and overlapped
    # DVC frees its workspace lock while a stage's command runs, but keeps that stage's deps and
    # outs locked: the second run meets one lock or the other, depending on the moment.
    assert ("ERROR: Unable to acquire lock. Most likely another DVC process is running" in second.stderr
            or re.search(r"ERROR: failed to reproduce '\w+': '.+' is busy, it is being blocked by:\n"
                         r"\s*\(PID \d+\): .*dvc repro pretrain", second.stderr))
    assert seconds < 30  # DVC retries the workspace lock for 3 s, then gives up; an output lock at once
    assert "Running stage" not in second.stdout + second.stderr
    assert "Running stage 'pretrain'" in "".join(output)
    assert "up to date" in sh(repo, env, str(DVC), "status", "pretrain")  # outputs match dvc.lock
    assert leftovers(repo) == []


@pytest.mark.slow(45)
def test_full_pipeline_logs_runs_and_registers_gpt_base(small_pipeline, tmp_path, monkeypatch):
    import mlflow

    template, env, out = small_pipeline
    repo = copy_repo(template, tmp_path)
    env = {**env, "LLM_PIPELINE_RUN_GROUP": SMALL_RUN_GROUP}
    for stage in ("download", "validate", "tokenize", "pretrain", "evaluate", "finetune_classifier",
                  "finetune_instruct", "promote"):
        assert f"Running stage '{stage}'" in out
    for path in ("data/models/base/model.safetensors", "data/metrics/pretrain.json", "data/metrics/evaluate.json",
                 "data/plots/pretrain_loss.png", "data/plots/pretrain_loss.csv", "data/samples/evaluate.json"):
        assert (repo / path).is_file(), path
    assert "Running stage" not in sh(repo, env, str(DVC), "repro")

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llm-pipeline")
    runs = client.search_runs([experiment.experiment_id], f"tags.run_group = '{SMALL_RUN_GROUP}'")
    by_stage = {r.data.tags.get("stage"): r for r in runs if "stage" in r.data.tags}
    assert {"pretrain", "evaluate"} <= set(by_stage)
    parents = {r.data.tags["mlflow.parentRunId"] for r in by_stage.values()}
    assert len(parents) == 1  # one pipeline execution, one parent run
    pretrain = by_stage["pretrain"]
    assert pretrain.data.params["model"] == "micro"
    assert len(client.get_metric_history(pretrain.info.run_id, "loss")) == 6
    assert "val_loss" in by_stage["evaluate"].data.metrics

    for name in ("gpt-base", "gpt-spam-classifier", "gpt-instruct"):  # promote made each first version champion
        assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    version = client.get_model_version("gpt-base", "1")
    assert version.tags["eval.val_loss"] == str(by_stage["evaluate"].data.metrics["val_loss"])
    # Whether the C++ kernels ran: in the report, the run's params, the version's tags and card; not in the model.
    assert json.loads((repo / "data/reports/pretrain.json").read_text())["cpu_kernels_used"] == "on"
    assert pretrain.data.params["cpu_kernels_used"] == "on" and version.tags["cpu_kernels_used"] == "on"
    assert "C++ CPU kernels in training: on" in version.description
    assert "cpu_kernels_used" not in (repo / "data/models/base/config.json").read_text()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")  # restored after the test
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    try:
        model = mlflow.pyfunc.load_model("models:/gpt-base/1")
        texts = model.predict({"prompt": ["I had always"]}, params={"max_new_tokens": 4})
    finally:
        mlflow.set_tracking_uri(None)
    assert isinstance(texts["text"][0], str) and texts["text"][0]

    # An experiment keeps its name: the version it registers says which experiment and which params.
    sh(repo, env, "git", "add", "-A")
    sh(repo, env, "git", "commit", "-q", "-m", "first run")
    env.pop("LLM_PIPELINE_RUN_GROUP")
    ran = sh(repo, env, str(DVC), "exp", "run", "-n", "seed-one", "-S", "finetune_classifier.seed=1")
    assert "Running stage 'finetune_classifier'" in ran and "Running stage 'pretrain'" not in ran
    tags = client.get_model_version("gpt-spam-classifier", "2").tags
    baseline = sh(repo, env, "git", "rev-parse", "HEAD").strip()
    assert (tags["dvc_exp"], tags["dvc_exp_baseline"], tags["dvc_exp_changed"], tags["run_group"]) == (
        "seed-one", baseline[:8], "finetune_classifier.seed=1", "exp-seed-one")
    # Its model card says the same, beside the champion it was compared with.
    card = client.get_model_version("gpt-spam-classifier", "2").description
    assert card.startswith("**gpt-spam-classifier, version 2.**")
    assert "| metric | this version (2) | champion (version 1) | difference |" in card
    assert "| **val_accuracy** (decides) |" in card and "| **test_accuracy** (reported) |" in card
    assert f"DVC experiment `seed-one` from baseline `{baseline[:8]}`, changed: `finetune_classifier.seed=1`" in card
    assert "| seed | 1 | 123 |" in card and "| train.csv | " in card and " rows | `" in card
    assert "`classifier_confusion.png`" in card and "`classifier_loss.png`" in card
    generator = client.get_model_version("gpt-instruct", "1").description
    assert generator.count("**Prompt:**") == 3 and "No champion to compare with." in generator
    assert client.get_registered_model("gpt-base").description.startswith("The pretrained GPT")

    # Lean metrics: a handful of numbers per stage. `dvc exp show` pages its table with `less -S`: the
    # metrics come first, so all of them fit the first 160 columns; params and code hashes are to the right.
    shown = json.loads(sh(repo, env, str(DVC), "metrics", "show", "--json"))
    files = shown[next(iter(shown))]["data"]
    numbers = {name for entry in files.values() for name in entry["data"]}
    assert all(len(entry["data"]) <= 12 for entry in files.values()) and len(numbers) <= 12, files
    header = sh(repo, {**env, "COLUMNS": "5000"}, str(DVC), "exp", "show", "--no-pager").splitlines()[1]
    columns = header.split()
    assert columns[:2] == ["Experiment", "Created"] and set(columns[2 : 2 + len(numbers)]) == numbers, header[:300]
    last = columns[1 + len(numbers)]
    assert header.index(f" {last} ") + len(last) <= 160, header[:300]
