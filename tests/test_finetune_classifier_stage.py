"""Stage finetune_classifier: on the real spam split it learns, registers a champion and the CLI classifies;
on a hand-made 3-class folder it builds an N-class head, per-class metrics and class-weighted training."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from conftest import POLICY, run_stage, set_param, stage_env
from gpt.checkpoint import load_model, save_model
from gpt.classifier import ClassifierSpec, add_class_head, encode_texts, load_classifier, predict_logits
from gpt.model import GPTConfig, GPTModel
from gpt.tokenizer import load_tokenizer
from pipeline.core.errors import DataError
from pipeline.core.params import load_params
from pipeline.registry.versions import output_digest
from pipeline.stages import finetune_classifier as stage
from pipeline.stages.promote import promote

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
SCORE = re.compile(r"(.+?)=([01]\.\d{4})(?: |$)")
TEXTS = ["Ok lar... Joking wif u oni...", "WINNER!! You have won a 1000 cash prize. Call 09061701461 to claim now"]


def classify(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.commands.classify", *args], cwd=project, env=stage_env(None),
                          capture_output=True, text=True, timeout=120)


def classified(stdout: str) -> list[tuple[str, dict[str, float], str]]:
    """classify's lines as (label, {class: probability}, text); a class name may hold spaces, its
    probability always has 4 decimals."""
    rows = []
    for line in stdout.splitlines():
        label, scores, text = line.split("\t")
        rows.append((label, {name: float(p) for name, p in SCORE.findall(scores)}, text))
    return rows


def untrained_test_accuracy(project: Path, max_length: int, seed: int) -> float:
    """Test accuracy of the base with a fresh head, initialised as the stage initialises it."""
    folder = project / "data/tokens/classification"
    labels = tuple(json.loads((folder / "classes.json").read_text())["labels"])
    model = load_model(project / "data/models/base", drop_rate=0.0)
    torch.manual_seed(seed)
    add_class_head(model, len(labels))
    frame = pd.read_csv(folder / "test.csv", dtype=str, keep_default_na=False)
    encoded = encode_texts(load_tokenizer(project / "data/raw/gpt2_bpe"), frame["text"].tolist(), max_length)
    predictions = predict_logits(model, encoded, ClassifierSpec(labels, "last_nonpad", max_length)).argmax(-1)
    return (predictions == torch.tensor([labels.index(x) for x in frame["label"]])).float().mean().item()


@pytest.mark.slow(120)
def test_short_run_learns_registers_a_champion_and_classifies(quick_project: Path):
    project = quick_project
    for key, value in QUICK.items():
        set_param(project, key, value)
    assert run_stage(project, "pretrain").returncode == 0
    result = run_stage(project, "finetune_classifier")
    assert result.returncode == 0, result.stderr

    metrics = json.loads((project / "data/metrics/finetune_classifier.json").read_text())
    assert list(metrics) == ["val_accuracy", "test_accuracy", "test_macro_f1"]  # the numbers people compare
    assert metrics["test_accuracy"] > untrained_test_accuracy(project, 48, seed=123) + 0.1
    report = json.loads((project / "data/reports/finetune_classifier.json").read_text())
    assert report["max_length"] == 48 and report["model_sha256"] == output_digest(project / "data/models/classifier")
    test = report["test"]
    assert test["accuracy"] == metrics["test_accuracy"] and test["macro_f1"] == metrics["test_macro_f1"]
    n = 300  # sqrt(p(1-p)/n), with the sample deviation's n-1
    assert test["accuracy_se"] == pytest.approx((test["accuracy"] * (1 - test["accuracy"]) / (n - 1)) ** 0.5)
    assert sum(sum(row.values()) for row in test["confusion"].values()) == 300
    assert {"accuracy", "macro_precision", "macro_recall", "macro_f1"} <= test.keys()
    assert list(test["per_class"]) == ["ham", "spam"] and sum(c["support"] for c in test["per_class"].values()) == 300
    plots = project / "data/plots"
    for name in ("classifier_loss.csv", "classifier_eval.csv", "classifier_loss.png", "classifier_confusion.png"):
        assert (plots / name).stat().st_size > 0
    assert len(json.loads((plots / "classifier_confusion.json").read_text())) == 300
    evals = pd.read_csv(plots / "classifier_eval.csv")
    assert {"train_accuracy", "val_accuracy", "train_loss", "val_loss"} <= set(evals.columns) and len(evals) >= 2

    local = classify(project, *TEXTS)
    assert local.returncode == 0, local.stderr
    rows = classified(local.stdout)
    assert [text for _, _, text in rows] == [" ".join(t.split()) for t in TEXTS]
    for label, probabilities, _ in rows:
        assert list(probabilities) == ["ham", "spam"] and sum(probabilities.values()) == pytest.approx(1, abs=1e-3)
        assert label == max(probabilities, key=probabilities.get)

    # The promote stage's step for this model: its first version becomes champion.
    promote(MlflowClient(f"sqlite:///{project / 'mlflow.db'}"), "classifier", "gpt-spam-classifier", 1, POLICY)
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


# -- a hand-made 3-class folder: what tokenize writes for any labelled table ----------------------
# Sorted, as tokenize orders classes; "sport & games" is no MLflow metric key, so it gets no test_f1_<label>.
CLASSES = ("animal", "food", "sport & games")
WORDS = {"animal": ["cat", "dog", "horse", "lion", "owl", "goat"],
         "food": ["bread", "soup", "rice", "cheese", "pasta", "salad"],
         "sport & games": ["football", "chess", "tennis", "rugby", "poker", "golf"]}
# Imbalanced training rows, the case class weights are for; val and test balanced.
ROWS = {"train": {"animal": 24, "food": 12, "sport & games": 6},
        "val": dict.fromkeys(CLASSES, 3), "test": dict.fromkeys(CLASSES, 4)}
# tokenize's balance: class_weight, rows / (classes * class rows) on the train split.
WEIGHTS = [42 / (3 * 24), 42 / (3 * 12), 42 / (3 * 6)]
THREE_CLASS = {
    "finetune_classifier.trainable": "all",
    "finetune_classifier.lr": 0.005,
    "finetune_classifier.warmup_steps": 2,
    "finetune_classifier.epochs": 2,
    "finetune_classifier.batch_size": 8,
    "finetune_classifier.max_length": 16,
    "finetune_classifier.eval_every": 0,
    "finetune_classifier.eval_batches": 1,
    "finetune_classifier.device": "cpu",
}


def write_classes(folder: Path, weights: list[float] | None) -> None:
    balance = "none" if weights is None else "class_weight"
    (folder / "classes.json").write_text(json.dumps({"labels": list(CLASSES), "balance": balance,
                                                      "class_weights": weights}))


@pytest.fixture
def three_class_project(project: Path, bpe_dir: Path) -> Path:
    """data/tokens/classification with 3 classes (class-weighted), the BPE files and a random micro base."""
    folder = project / "data/tokens/classification"
    folder.mkdir(parents=True)
    for split, counts in ROWS.items():
        rows = [(label, f"the {WORDS[label][i % 6]} and the {WORDS[label][(i * 5 + 1) % 6]} number {i}")
                for label, n in counts.items() for i in range(n)]
        pd.DataFrame(rows, columns=["label", "text"]).sample(frac=1, random_state=0).to_csv(
            folder / f"{split}.csv", index=False)
    write_classes(folder, WEIGHTS)
    shutil.copytree(bpe_dir, project / "data/raw/gpt2_bpe")
    torch.manual_seed(0)
    save_model(GPTModel(GPTConfig.from_preset("micro")), project / "data/models/base")
    for key, value in THREE_CLASS.items():
        set_param(project, key, value)
    return project


@pytest.mark.slow(25)
def test_three_classes_head_metrics_confusion_registry_and_pyfunc(three_class_project: Path, store: MlflowClient):
    project = three_class_project  # also the store fixture's cwd: the stage logs to project/mlflow.db
    result = run_stage(project, "finetune_classifier")
    assert result.returncode == 0, result.stderr

    model, spec = load_classifier(project / "data/models/classifier")
    assert model.out_head.out_features == 3 and spec.labels == CLASSES

    reports = json.loads((project / "data/reports/finetune_classifier.json").read_text())
    for split in ("train", "val", "test"):
        report = reports[split]
        assert {"accuracy", "macro_precision", "macro_recall", "macro_f1"} <= report.keys()
        assert list(report["per_class"]) == list(CLASSES)
        assert {label: c["support"] for label, c in report["per_class"].items()} == ROWS[split]
        confusion = report["confusion"]
        assert list(confusion) == list(CLASSES) and all(list(row) == list(CLASSES) for row in confusion.values())
        assert {label: sum(row.values()) for label, row in confusion.items()} == ROWS[split]
        assert report["accuracy"] == pytest.approx(sum(confusion[c][c] for c in CLASSES) / sum(ROWS[split].values()))
        assert report["macro_f1"] == pytest.approx(sum(c["f1"] for c in report["per_class"].values()) / 3)
    metrics = json.loads((project / "data/metrics/finetune_classifier.json").read_text())
    assert metrics["test_accuracy"] == reports["test"]["accuracy"] and reports["model_sha256"]

    pairs = json.loads((project / "data/plots/classifier_confusion.json").read_text())
    assert len(pairs) == 12 and {p["actual"] for p in pairs} == set(CLASSES)
    assert sum(p["actual"] == p["predicted"] for p in pairs) == round(reports["test"]["accuracy"] * 12)
    assert (project / "data/plots/classifier_confusion.png").stat().st_size > 0

    tags = store.get_model_version("gpt-spam-classifier", "1").tags
    assert {"metric.test_accuracy", "metric.test_macro_f1", "metric.test_f1_animal", "metric.test_f1_food",
            "data.classes.json.sha256"} <= tags.keys()
    assert not any(key.startswith("metric.test_f1_sport") for key in tags)

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model("models:/gpt-spam-classifier/1")
    columns = ["label", "p_animal", "p_food", "p_sport & games"]
    assert served.metadata.get_output_schema().input_names() == columns
    frame = served.predict(pd.DataFrame({"text": TEXTS}))
    assert list(frame.columns) == columns
    probabilities = frame[columns[1:]].to_numpy()
    assert probabilities.sum(axis=1) == pytest.approx([1.0, 1.0])
    assert frame["label"].tolist() == [CLASSES[i] for i in probabilities.argmax(axis=1)]

    local = classify(project, *TEXTS)
    assert local.returncode == 0, local.stderr
    assert [(label, list(p)) for label, p, _ in classified(local.stdout)] == [
        (label, list(CLASSES)) for label in frame["label"]]


def finetune_losses(cfg: dict, weights: list[float] | None) -> list[float]:
    """The per-step training losses of the stage's finetune() from one fixed micro model, with these class weights."""
    write_classes(stage.SPLITS_DIR, weights)
    data = stage.read_inputs(cfg, context_length=64)
    torch.manual_seed(0)
    model = add_class_head(GPTModel(GPTConfig.from_preset("micro", drop_rate=0.0)), len(CLASSES))
    return [record["loss"] for record in stage.finetune(model, data, cfg, torch.device("cpu"))]


def test_class_weights_change_the_training_loss_and_null_is_unweighted(three_class_project: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(three_class_project)  # the stage's data paths are relative
    cfg = load_params(Path("params.yaml"), stage.PARAMS)["finetune_classifier"]
    unweighted = finetune_losses(cfg, None)
    assert finetune_losses(cfg, [1.0, 1.0, 1.0]) == pytest.approx(unweighted, rel=1e-5)
    weighted = finetune_losses(cfg, WEIGHTS)
    assert len(weighted) == len(unweighted) == 2 * (42 // 8)
    assert abs(weighted[0] - unweighted[0]) > 1e-3  # same model, same first batch: only the weights differ


def test_bad_classes_and_labels_are_one_line(three_class_project: Path, monkeypatch: pytest.MonkeyPatch):
    project = three_class_project
    folder = project / "data/tokens/classification"
    (folder / "classes.json").unlink()
    result = run_stage(project, "finetune_classifier")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "finetune_classifier: error: data/tokens/classification/classes.json: missing; run the tokenize stage"]

    monkeypatch.chdir(project)
    for found, complaint in [({"labels": ["a"]}, "labels must be a list of 2 or more distinct names"),
                             ({"labels": ["a", "a"]}, "labels must be a list of 2 or more distinct names"),
                             ({"labels": ["a", "b"], "class_weights": [1.0]}, "class_weights must be null or 2 positive"),
                             ({"labels": ["a", "b"], "class_weights": [1.0, -2]}, "class_weights must be null or 2")]:
        (folder / "classes.json").write_text(json.dumps(found))
        with pytest.raises(DataError, match=f"^data/tokens/classification/classes.json: {complaint}"):
            stage.read_classes()
    (folder / "classes.json").write_text("{")
    with pytest.raises(DataError, match="classes.json: not valid JSON; run the tokenize stage$"):
        stage.read_classes()

    val = stage.SPLITS_DIR / "val.csv"
    val.write_text("label,text\nfood,a soup\nplant,a fern\n")
    with pytest.raises(DataError) as error:
        stage.read_split(val, CLASSES)
    assert str(error.value) == ("data/tokens/classification/val.csv: row 2 has label 'plant', not one of the classes "
                                "['animal', 'food', 'sport & games'] in classes.json")
    val.write_text("label,text\nfood,a soup\nfood,  \n")
    with pytest.raises(DataError, match="^data/tokens/classification/val.csv: row 2 has an empty text$"):
        stage.read_split(val, CLASSES)
