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

from conftest import REPO, run_stage, set_param, stage_env
from pipeline.core.presets import apply_preset

def checkpoint_step(project: Path) -> int:
    states = list((project / "data" / "checkpoints" / "pretrain").glob("*/trainer.json"))
    return json.loads(states[0].read_text())["state"]["step"] if states else 0


# How close a resumed run must come to one never interrupted. Two processes need not add the same
# floats in the same order (MKL picks kernels by thread count and buffer alignment), so single
# values differ in the last bit of float32 (eps 1.2e-7): measured across 1 and 2 threads, at most
# 1.8e-7 relative in a loss (2 ulp) and 5.2e-7 in a weight. A broken resume moved the first loss
# after the kill by 5.5e-5 relative (one batch skipped) or more (no RNG state, fresh AdamW moments).
LOSS_RTOL = 2e-6
WEIGHT_ATOL = 1e-5


def read_curve(project: Path) -> list[dict[str, float]]:
    rows = (project / "data/plots/pretrain_loss.csv").read_text().splitlines()
    header = rows[0].split(",")
    return [dict(zip(header, map(float, row.split(",")))) for row in rows[1:]]


def assert_same_run(ours: Path, theirs: Path, loss_rtol: float, weight_atol: float) -> None:
    """Same loss curve, metrics and final weights, up to the given float tolerances."""
    curves = read_curve(ours), read_curve(theirs)
    assert [r["step"] for r in curves[0]] == [r["step"] for r in curves[1]]
    for a, b in zip(*curves):
        assert (a["lr"], a["tokens_seen"]) == (b["lr"], b["tokens_seen"]), a["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=loss_rtol, abs=0), a["step"]
    metrics = [json.loads((p / "data/reports/pretrain.json").read_text()) for p in (ours, theirs)]
    assert metrics[0]["val_loss"] is not None
    assert (metrics[0]["steps"], metrics[0]["tokens_seen"]) == (metrics[1]["steps"], metrics[1]["tokens_seen"])
    for key in ("last_batch_loss", "train_loss", "val_loss"):
        assert metrics[0][key] == pytest.approx(metrics[1][key], rel=loss_rtol, abs=0), key
    weights = [load_file(p / "data/models/base/model.safetensors") for p in (ours, theirs)]
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) <= weight_atol


@pytest.mark.slow(130)
def test_kill_9_then_rerun_resumes_to_the_same_result(quick_project: Path, tmp_path: Path):
    reference = tmp_path / "reference"
    shutil.copytree(quick_project, reference)
    assert run_stage(reference, "pretrain", OMP_NUM_THREADS="2").returncode == 0

    # The killed run uses one thread and the others two (whatever a parallel test run sets), so the float
    # noise between processes is always there, whatever this machine's CPU, and the tolerances must cover it.
    env = stage_env(None, LLM_PIPELINE_RUN_GROUP="kill-test", OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "pipeline.stages.pretrain"], cwd=quick_project, env=env,
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

    resumed = run_stage(quick_project, "pretrain", OMP_NUM_THREADS="2")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from the checkpoint at step {killed_at}" in resumed.stdout
    assert_same_run(quick_project, reference, LOSS_RTOL, WEIGHT_ATOL)


@pytest.mark.slow(50)
def test_deterministic_runs_are_bit_identical(quick_project: Path, tmp_path: Path):
    """pretrain.deterministic with a fixed thread count: two processes give the very same bits."""
    set_param(quick_project, "pretrain.deterministic", True)
    set_param(quick_project, "pretrain.max_steps", 12)
    twin = tmp_path / "twin"
    shutil.copytree(quick_project, twin)
    for project in (quick_project, twin):
        result = run_stage(project, "pretrain", OMP_NUM_THREADS="2")
        assert result.returncode == 0, result.stderr
    assert_same_run(quick_project, twin, loss_rtol=0, weight_atol=0)
    assert (quick_project / "data/plots/pretrain_loss.csv").read_bytes() == (twin / "data/plots/pretrain_loss.csv").read_bytes()


@pytest.mark.slow(40)
def test_evaluate_reports_perplexity_and_samples(quick_project: Path):
    set_param(quick_project, "pretrain.max_steps", 4)
    assert run_stage(quick_project, "pretrain").returncode == 0
    result = run_stage(quick_project, "evaluate")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((quick_project / "data/metrics/evaluate.json").read_text())
    report = json.loads((quick_project / "data/reports/evaluate.json").read_text())
    assert list(metrics) == ["val_loss"] and report["val_loss"] == metrics["val_loss"]
    assert report["val_perplexity"] == pytest.approx(2.718281828 ** metrics["val_loss"], rel=1e-6)
    assert 0 < report["val_loss_se"] < metrics["val_loss"] / 10  # over the val windows
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
    assert "pretrain.model" in changed and "datasets.corpus.sources" in changed
    import yaml
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert params["pretrain"]["model"] == "gpt2-small" and params["pretrain"]["batch_size"] == 2
    assert params["pretrain"]["epochs"] == 10 and params["pretrain"]["lr"] == 0.0004
    assert params["pretrain"]["weight_decay_all"] is True  # the book's AdamW decays every parameter
    assert params["datasets"]["corpus"]["sources"] == ["the-verdict"]
    from pipeline.stages import pretrain
    from pipeline.core.params import load_params
    load_params(tmp_path / "params.yaml", pretrain.PARAMS)  # the result is valid
