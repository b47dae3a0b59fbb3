"""The finetune_instruct stage on the real instruction splits: a short run, its outputs, the registry, the chat CLI."""
from __future__ import annotations

import json
import statistics
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from conftest import POLICY, REPO, UNREACHABLE, run_stage, set_param
from gpt.checkpoint import load_model, save_model
from gpt.model import GPTConfig, GPTModel
from pipeline.commands import chat
from pipeline.core.params import load_params
from pipeline.core.presets import apply_preset
from pipeline.data import sources
from pipeline.registry.versions import output_digest
from pipeline.stages import finetune_instruct, tokenize_data as tokenize
from pipeline.stages.finetune_instruct import SPLITS
from pipeline.stages.promote import promote
from pipeline.stages.tokenize_data import write_instructions

# The first records of each split: 6 training batches of 8 per epoch, 2 of val and test, fast even on a
# busy CPU (the 50257-way output head dominates a micro model's cost), yet enough to move the loss.
CUT = {"train": 48, "val": 16, "test": 16}
SHORT = {
    "finetune_instruct.lr": 0.005,
    "finetune_instruct.eval_batches": 1,
    "finetune_instruct.max_new_tokens": 5,
    "finetune_instruct.max_test_examples": 3,
    "finetune_instruct.device": "cpu",
}


@pytest.fixture
def instruct_project(raw_project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tokenize stage's instruction splits (train cut to its first records) and a random micro base."""
    project = raw_project
    monkeypatch.chdir(project)  # the stages' data paths are relative
    params = load_params(project / "params.yaml", tokenize.PARAMS)
    SPLITS.parent.mkdir(parents=True)
    files = sources.resolve("instructions", params["datasets"]["instructions"]["sources"], params["download.sources"])
    write_instructions(SPLITS, files, params["datasets"]["instructions"], params["tokenize"]["instructions"])
    for split, keep in CUT.items():
        path = SPLITS / f"{split}.json"
        path.write_text(json.dumps(json.loads(path.read_text())[:keep]))
    torch.manual_seed(0)
    save_model(GPTModel(GPTConfig.from_preset("micro")), project / "data/models/base")
    for key, value in SHORT.items():
        set_param(project, key, value)
    return project


@pytest.mark.slow(25)
def test_short_run_learns_scores_registers_and_chats(instruct_project: Path, fake_ollama,
                                                     monkeypatch, capsys):
    project = instruct_project
    set_param(project, "finetune_instruct.judge", {"enabled": True, "url": fake_ollama.url, "model": "judge",
                                                   "timeout_s": 10.0})
    result = run_stage(project, "finetune_instruct")
    assert result.returncode == 0, result.stderr

    lean = json.loads((project / "data/metrics/finetune_instruct.json").read_text())
    assert list(lean) == ["val_rouge_l_f1", "rouge_l_f1", "test_loss", "judge_score"]
    metrics = json.loads((project / "data/reports/finetune_instruct.json").read_text())
    assert {key: metrics[key] for key in lean} == lean
    assert metrics["val_loss"] < metrics["val_loss_before"]
    assert 0.0 <= metrics["val_rouge_l_f1"] <= 1.0 and "val_rouge_l_f1_se" in metrics
    assert metrics["max_length"] == 64  # min(max_length 1024, the base's context 64)
    assert metrics["steps"] == 2 * CUT["train"] // 8
    assert metrics["responses_scored"] == 3 and metrics["test_examples"] == CUT["test"]
    assert 0.0 <= metrics["rouge_l_f1"] <= 1.0 and 0.0 <= metrics["token_f1"] <= 1.0
    assert metrics["judge_score"] == 87 and metrics["judge_scored"] == 3 and len(fake_ollama.requests) == 3
    assert metrics["model_sha256"] == output_digest(project / "data/models/instruct")

    responses = json.loads((project / "data/samples/instruct_responses.json").read_text())
    test = json.loads((project / "data/tokens/instructions/test.json").read_text())
    assert len(responses) == 3
    scores = [item["rouge_l_f1"] for item in responses]  # the mean and its standard error are of these
    assert metrics["rouge_l_f1"] == pytest.approx(sum(scores) / 3)
    assert metrics["rouge_l_f1_se"] == pytest.approx(statistics.stdev(scores) / 3 ** 0.5)
    for item, record in zip(responses, test):
        assert {"instruction", "input", "reference", "response"} <= item.keys()
        assert (item["instruction"], item["input"], item["reference"]) == (
            record["instruction"], record["input"], record["output"])
        assert isinstance(item["response"], str)
    assert (project / "data/plots/instruct_loss.png").is_file()
    assert (project / "data/plots/instruct_loss.csv").read_text().startswith(
        "step,epoch,loss,examples_seen,train_loss,val_loss\n")
    load_model(project / "data/models/instruct")  # a plain checkpoint

    # Through main(argv), in process: the local checkpoint, then the registered champion in this project's store,
    # both answering the first test record exactly as the stage did (greedy, same prompt format).
    first = ["--input", test[0]["input"], "--max-new-tokens", "5", test[0]["instruction"]]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    promote(MlflowClient(f"sqlite:///{project / 'mlflow.db'}"), "instruct", "gpt-instruct", 1, POLICY)  # the first: champion
    try:
        chat.main(first)
        local = capsys.readouterr().out
        chat.main(["--model", "models:/gpt-instruct@champion", *first])
        registered = capsys.readouterr().out
    finally:
        mlflow.set_tracking_uri(None)
    assert local == registered == responses[0]["response"] + "\n"


def test_unreachable_judge_fails_in_one_line_before_training(project: Path):
    set_param(project, "finetune_instruct.judge.enabled", True)
    set_param(project, "finetune_instruct.judge.url", UNREACHABLE)
    result = run_stage(project, "finetune_instruct")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"finetune_instruct: error: LLM judge {UNREACHABLE} is unreachable")
    assert not (project / "data").exists()


def test_book_preset_is_chapter_7(tmp_path: Path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    apply_preset("book", tmp_path / "params.yaml")
    cfg = load_params(tmp_path / "params.yaml", finetune_instruct.PARAMS)["finetune_instruct"]
    assert (cfg["trainable"], cfg["lr"], cfg["weight_decay"], cfg["epochs"], cfg["batch_size"]) == (
        "all", 5e-5, 0.1, 2, 8)
    assert cfg["base"] == "pipeline"  # gpt2-medium needs a download; see pipeline/core/presets.yaml
