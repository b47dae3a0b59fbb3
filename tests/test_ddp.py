"""Distributed pretraining: `torchrun --nproc_per_node=2 -m pipeline.stages.pretrain` (DDP, gloo on CPU)
gives the one-process loss curve for the same global batch, and only rank 0 writes."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import leftovers, set_param, stage_env

from gpt import distributed
from gpt.checkpoint import weights_state_dict
from gpt.data import EpochBatchSampler
from gpt.model import GPTConfig, GPTModel
from gpt.train import Trainer, TrainConfig, TrainingError

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
TOLERANCE = 1e-5
DDP = {  # ~10 steps of the tiny model, global batch 4, no dropout (its masks differ per rank)
    "pretrain.max_steps": 10,
    "pretrain.batch_size": 4,
    "pretrain.drop_rate": 0.0,
    "pretrain.eval_every": 5,
    "pretrain.checkpoint_every": 5,
}


def run_pretrain(project: Path, processes: int) -> subprocess.CompletedProcess:
    """The pretrain stage in `project`: plain python for 1 process, torchrun otherwise."""
    launcher = ([sys.executable] if processes == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"])
    env = stage_env(None, OMP_NUM_THREADS="1", LLM_PIPELINE_RUN_GROUP=f"ddp-{processes}")
    return subprocess.run([*launcher, "-m", "pipeline.stages.pretrain"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)


def rows(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def max_diff(ours: list[dict], theirs: list[dict], key: str) -> float:
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    return max(abs(a[key] - b[key]) for a, b in zip(ours, theirs))


@pytest.fixture
def ddp_project(quick_project: Path) -> Path:
    project = quick_project
    for key, value in DDP.items():
        set_param(project, key, value)
    return project


@pytest.mark.slow(60)
def test_two_processes_give_the_one_process_curve_and_only_rank_0_writes(ddp_project: Path, tmp_path: Path):
    single = tmp_path / "single"
    shutil.copytree(ddp_project, single)
    one = run_pretrain(single, 1)
    assert one.returncode == 0, one.stderr
    two = run_pretrain(ddp_project, 2)
    assert two.returncode == 0, two.stderr

    plots = ddp_project / "data" / "plots"
    curve, reference = rows(plots / "pretrain_loss.csv"), rows(single / "data/plots/pretrain_loss.csv")
    assert len(curve) == DDP["pretrain.max_steps"]
    print(f"max |loss difference| 1 vs 2 processes: {max_diff(curve, reference, 'loss'):.2e}")
    assert max_diff(curve, reference, "loss") <= TOLERANCE
    assert [r["tokens_seen"] for r in curve] == [r["tokens_seen"] for r in reference]  # global tokens
    evals, reference_evals = rows(plots / "pretrain_eval.csv"), rows(single / "data/plots/pretrain_eval.csv")
    assert len(evals) == 2
    assert max(max_diff(evals, reference_evals, k) for k in ("train_loss", "val_loss")) <= TOLERANCE
    ours = load_file(ddp_project / "data/models/base/model.safetensors")
    theirs = load_file(single / "data/models/base/model.safetensors")
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-4
    metrics = json.loads((ddp_project / "data/reports/pretrain.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 10

    # Rank 0 alone wrote: one progress bar, one checkpoint holding rank 1's RNG, one MLflow run, one version.
    assert two.stderr.count("pretrain:   0%") == 1, two.stderr
    checkpoints = list((ddp_project / "data/checkpoints/pretrain").iterdir())
    assert len(checkpoints) == 1
    assert "rng.torch.rank1" in load_file(checkpoints[0] / "optimizer.safetensors")
    assert leftovers(ddp_project) == []
    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{ddp_project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llm-pipeline")
    stage_runs = client.search_runs([experiment.experiment_id], "tags.stage = 'pretrain'")
    assert len(stage_runs) == 1 and stage_runs[0].info.status == "FINISHED"
    assert [int(v.version) for v in client.search_model_versions("name = 'gpt-base'")] == [1]


@pytest.mark.slow(20)
def test_batch_size_not_divisible_by_the_processes_is_one_clear_line(ddp_project: Path):
    set_param(ddp_project, "pretrain.batch_size", 5)
    result = run_pretrain(ddp_project, 2)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("pretrain: error:")]
    assert errors and all(line == errors[0] for line in errors)
    assert errors[0] == ("pretrain: error: batch_size 5 must be divisible by the number of processes (2): "
                         "each takes an equal share of every batch")
    assert not (ddp_project / "data" / "models").exists() and not (ddp_project / "mlflow.db").exists()


def test_shards_of_a_global_batch_are_the_one_process_batch():
    whole = list(EpochBatchSampler(23, 6, seed=4, epoch=1))
    shards = [list(EpochBatchSampler(23, 6, seed=4, epoch=1, rank=r, world_size=3)) for r in range(3)]
    assert [sum((s[i] for s in shards), []) for i in range(len(whole))] == whole
    with pytest.raises(ValueError, match=r"batch_size 6 must be divisible by the number of processes \(4\)"):
        EpochBatchSampler(23, 6, rank=0, world_size=4)


def test_trainer_refuses_an_uneven_split_and_an_unset_up_torchrun_launch(monkeypatch: pytest.MonkeyPatch):
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("micro", vocab_size=64, context_length=8))
    tokens = np.arange(400, dtype=np.uint16) % 64
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(TrainingError, match=r"batch_size 4 must be divisible by the number of processes \(3\)"):
        Trainer(model, tokens, tokens, TrainConfig(batch_size=4, max_steps=1))
    monkeypatch.undo()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="call gpt.distributed.setup"):
        Trainer(model, tokens, tokens, TrainConfig(batch_size=4, max_steps=1))


@pytest.mark.slow
def test_trainer_under_torchrun_matches_one_process_and_resumes_exactly(tmp_path: Path):
    """tests/ddp_worker.py: grad_accum 2 (no_sync), eval every 4 steps, crash + resume with dropout."""
    from ddp_worker import train

    script = Path(__file__).with_name("ddp_worker.py")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(tmp_path)], env=stage_env(None, OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    runs = json.loads((tmp_path / "result.json").read_text())
    assert runs["ranks_agree"]
    reference, model = train(0.0)  # this process: no torchrun, one process
    two = runs["straight"]
    assert [h["step"] for h in two] == [h["step"] for h in reference] == list(range(1, 9))
    assert max(abs(a[k] - b[k]) for a, b in zip(two, reference) for k in ("loss", "lr")) <= TOLERANCE
    evals = [(a, b) for a, b in zip(two, reference) if "val_loss" in b]
    assert len(evals) == 2 and all("val_loss" in a for a, _ in evals)
    assert max(abs(a[k] - b[k]) for a, b in evals for k in ("train_loss", "val_loss")) <= TOLERANCE
    assert [h["tokens_seen"] for h in two] == [h["tokens_seen"] for h in reference]
    weights = load_file(tmp_path / "weights.safetensors")
    ours = weights_state_dict(model)
    assert max((weights[k] - ours[k]).abs().max().item() for k in ours) <= 1e-4
    # Dropout on: a crash after the step-3 checkpoint, then a fresh start, gives the uninterrupted curve.
    assert runs["resumed"] == runs["dropout"]
    assert runs["dropout"] != runs["straight"]
