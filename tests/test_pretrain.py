"""The pretrain and evaluate stages: outputs, kill -9 then exact resume, presets, bad params."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO, run_stage, set_param, stage_env, tokenized
from pipeline.presets import apply_preset

@pytest.fixture
def quick_project(raw_project: Path) -> Path:
    return tokenized(raw_project)


def checkpoint_step(project: Path) -> int:
    states = list((project / "data" / "checkpoints" / "pretrain").glob("*/trainer.json"))
    return json.loads(states[0].read_text())["state"]["step"] if states else 0


def test_kill_9_then_rerun_resumes_to_the_same_result(quick_project: Path, tmp_path: Path):
    reference = tmp_path / "reference"
    shutil.copytree(quick_project, reference)
    assert run_stage(reference, "pretrain").returncode == 0

    env = stage_env(None, LLM_PIPELINE_RUN_GROUP="kill-test")
    process = subprocess.Popen([sys.executable, "-m", "pipeline.pretrain"], cwd=quick_project, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while checkpoint_step(quick_project) < 6 and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "training finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = checkpoint_step(quick_project)
    assert 6 <= killed_at < 40
    assert not (quick_project / "data" / "models" / "base").exists()

    resumed = run_stage(quick_project, "pretrain")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from the checkpoint at step {killed_at}" in resumed.stdout
    # Same loss curve and the same final weights as the run that was never interrupted.
    curve = "data/plots/pretrain_loss.csv"
    assert (quick_project / curve).read_text() == (reference / curve).read_text()
    ours = load_file(quick_project / "data/models/base/model.safetensors")
    theirs = load_file(reference / "data/models/base/model.safetensors")
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6
    metrics = [json.loads((p / "data/metrics/pretrain.json").read_text()) for p in (quick_project, reference)]
    assert metrics[0]["val_loss"] is not None
    for key in ("last_batch_loss", "train_loss", "val_loss", "steps", "tokens_seen"):
        assert metrics[0][key] == metrics[1][key], key


def test_evaluate_reports_perplexity_and_samples(quick_project: Path):
    set_param(quick_project, "pretrain.max_steps", 4)
    assert run_stage(quick_project, "pretrain").returncode == 0
    result = run_stage(quick_project, "evaluate")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((quick_project / "data/metrics/evaluate.json").read_text())
    assert metrics["val_perplexity"] == pytest.approx(2.718281828 ** metrics["val_loss"], rel=1e-6)
    samples = json.loads((quick_project / "data/samples/evaluate.json").read_text())
    assert [s["prompt"] for s in samples] == json.loads(json.dumps(
        __import__("yaml").safe_load((quick_project / "params.yaml").read_text())["evaluate"]["prompts"]))
    assert all(isinstance(s["greedy"], str) and isinstance(s["sampled"], str) for s in samples)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("pretrain.model", "gpt5", "params.yaml: pretrain.model must be one of"),
    ("pretrain.n_heads", 3, "emb_dim (128) must be divisible by n_heads (3)"),
    ("pretrain.device", "tpu", "params.yaml: pretrain.device must be one of auto, cpu, cuda, mps"),
])
def test_bad_params_fail_before_training(quick_project: Path, key, value, message):
    set_param(quick_project, key, value)
    result = run_stage(quick_project, "pretrain")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pretrain: error: ") and message in lines[0]
    assert not (quick_project / "data" / "models").exists()


def test_book_preset_sets_chapter_5(tmp_path: Path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    changed = apply_preset("book", tmp_path / "params.yaml")
    assert "pretrain.model" in changed and "tokenize.corpus" in changed
    import yaml
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert params["pretrain"]["model"] == "gpt2-small" and params["pretrain"]["batch_size"] == 2
    assert params["pretrain"]["epochs"] == 10 and params["pretrain"]["lr"] == 0.0004
    assert params["tokenize"]["corpus"] == ["the-verdict.txt"]
    from pipeline import pretrain
    from pipeline.params import load_params
    load_params(tmp_path / "params.yaml", pretrain.PARAMS)  # the result is valid
