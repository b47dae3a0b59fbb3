"""Stage finetune_classifier on the real spam split: it learns, registers a champion, and the CLI classifies."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch
from mlflow import MlflowClient

from conftest import run_stage, set_param, stage_env, tokenized
from gpt.checkpoint import load_model
from gpt.classifier import ClassifierSpec, add_class_head, encode_texts, predict_logits
from gpt.tokenizer import load_tokenizer
from pipeline.stages.promote import promote
from pipeline.schemas import SPAM_LABELS

# A micro base pretrained for a few steps and one short finetuning epoch: seconds, not minutes.
QUICK = {
    "pretrain.model": "micro",
    "pretrain.max_steps": 5,
    "pretrain.checkpoint_every": 0,
    "pretrain.eval_every": 0,
    "finetune_classifier.trainable": "all",
    "finetune_classifier.lr": 0.002,
    "finetune_classifier.epochs": 1,
    "finetune_classifier.batch_size": 16,
    "finetune_classifier.max_length": 48,
    "finetune_classifier.eval_every": 20,
    "finetune_classifier.eval_batches": 2,
}
TEXTS = ["Ok lar... Joking wif u oni...", "WINNER!! You have won a 1000 cash prize. Call 09061701461 to claim now"]


def classify(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.commands.classify", *args], cwd=project, env=stage_env(None),
                          capture_output=True, text=True, timeout=120)


def untrained_test_accuracy(project: Path, max_length: int, seed: int) -> float:
    """Test accuracy of the base with a fresh head, initialised as the stage initialises it."""
    model = load_model(project / "data/models/base", drop_rate=0.0)
    torch.manual_seed(seed)
    add_class_head(model, len(SPAM_LABELS))
    frame = pd.read_csv(project / "data/tokens/spam/test.csv", dtype=str, keep_default_na=False)
    encoded = encode_texts(load_tokenizer(project / "data/raw/gpt2_bpe"), frame["text"].tolist(), max_length)
    predictions = predict_logits(model, encoded, ClassifierSpec(SPAM_LABELS, "last_nonpad", max_length)).argmax(-1)
    return (predictions == torch.tensor([SPAM_LABELS.index(x) for x in frame["label"]])).float().mean().item()


def test_short_run_learns_registers_a_champion_and_classifies(raw_project: Path):
    project = tokenized(raw_project)
    for key, value in QUICK.items():
        set_param(project, key, value)
    assert run_stage(project, "pretrain").returncode == 0
    result = run_stage(project, "finetune_classifier")
    assert result.returncode == 0, result.stderr

    metrics = json.loads((project / "data/metrics/finetune_classifier.json").read_text())
    assert metrics["test_accuracy"] > untrained_test_accuracy(project, 48, seed=123) + 0.1
    assert metrics["max_length"] == 48 and metrics["registered_version"] == 1
    test = metrics["test"]
    assert sum(sum(row.values()) for row in test["confusion"].values()) == 300
    assert {"accuracy", "precision", "recall", "f1"} <= test.keys()
    plots = project / "data/plots"
    for name in ("classifier_loss.csv", "classifier_eval.csv", "classifier_loss.png", "classifier_confusion.png"):
        assert (plots / name).stat().st_size > 0
    assert len(json.loads((plots / "classifier_confusion.json").read_text())) == 300
    evals = pd.read_csv(plots / "classifier_eval.csv")
    assert {"train_accuracy", "val_accuracy", "train_loss", "val_loss"} <= set(evals.columns) and len(evals) >= 2

    local = classify(project, *TEXTS)
    assert local.returncode == 0, local.stderr
    rows = [line.split("\t") for line in local.stdout.splitlines()]
    assert [row[2] for row in rows] == [" ".join(t.split()) for t in TEXTS]
    assert all(row[0] in SPAM_LABELS and 0.0 <= float(row[1]) <= 1.0 for row in rows)

    # The promote stage's step for this model: its first version becomes champion.
    promote(MlflowClient(f"sqlite:///{project / 'mlflow.db'}"), "gpt-spam-classifier", 1, margin=0.0)
    registered = classify(project, "--model", "models:/gpt-spam-classifier@champion", *TEXTS)
    assert registered.returncode == 0, registered.stderr
    assert registered.stdout == local.stdout  # the registered model is the local one

    empty = classify(project, "fine", " ")
    assert empty.returncode == 1
    assert empty.stderr.strip() == "classify: error: row 2: empty text, nothing to classify"


def test_bad_param_is_one_line_before_any_work(project: Path):
    set_param(project, "finetune_classifier.position", "first")
    result = run_stage(project, "finetune_classifier")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [(
        "finetune_classifier: error: params.yaml: finetune_classifier.position must be one of last, last_nonpad, "
        "got 'first'")]
