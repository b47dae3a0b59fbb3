"""Stage `finetune_classifier`: finetune the base GPT into a text classifier, evaluate it, register it."""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from gpt.classifier import (POSITIONS, ClassifierSpec, add_class_head, classification_logits, classification_metrics,
                            collate, confusion_matrix, encode_texts, predict_logits, save_classifier)
from gpt.data import EpochBatchSampler
from gpt.files import atomic_write_json, sha256_file
from gpt.finetune import select_trainable
from gpt.model import GPTModel, count_parameters
from gpt.runtime import pick_device
from gpt.tokenizer import load_tokenizer
from pipeline.core.catalog import STAGES, command_line
from pipeline.core.errors import DataError
from pipeline.core.layout import (BPE_DIR, CLASSES_JSON, CLASSIFICATION_TOKENS as SPLITS_DIR,
                                  CLASSIFIER_MODEL_DIR as MODEL_DIR, PLOTS)
from pipeline.core.params import Float, Int, Section, Str, load_params
from pipeline.registry.policy import standard_error
from pipeline.registry.tracking import LOGGING_PARAMS, log_history, log_path, log_step_metrics, project_tracking, stage_run
from pipeline.registry.versions import DIGEST_TAG, register_trained
from pipeline.training.finetuning import COMMON_PARAMS, base_hash, load_base, report_trainable, train
from pipeline.training.plots import plot_confusion, plot_curves, write_rows

STAGE = STAGES["finetune_classifier"]
SPLITS = ("train", "val", "test")
CURVE_CSV = PLOTS / "classifier_loss.csv"
EVAL_CSV = PLOTS / "classifier_eval.csv"
CURVE_PNG = PLOTS / "classifier_loss.png"
CONFUSION_JSON = PLOTS / "classifier_confusion.json"
CONFUSION_PNG = PLOTS / "classifier_confusion.png"
SCALARS = ("accuracy", "accuracy_se", "macro_precision", "macro_recall", "macro_f1")
# A label fit for an MLflow metric key as it is; others get no per-class metric rather than a mangled,
# possibly colliding, name.
METRIC_SAFE_LABEL = re.compile(r"[\w.-]+")
PARAMS = {
    "finetune_classifier": Section(
        **COMMON_PARAMS,
        position=Str(choices=POSITIONS),
        max_length=Int(low=1, optional=True),
        label_smoothing=Float(0, 1, bounds="[)"),
    ),
    **LOGGING_PARAMS,
}


@dataclass(frozen=True)
class Classes:
    """classes.json: the labels in class-index order and the training loss's class weights (None: unweighted)."""

    labels: tuple[str, ...]
    weights: tuple[float, ...] | None


def _valid_weights(weights: object, n_classes: int) -> bool:
    return (isinstance(weights, list) and len(weights) == n_classes
            and all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0
                    for w in weights))


def read_classes(path: Path = CLASSES_JSON) -> Classes:
    """The tokenize stage's classes.json, checked: 2+ distinct string labels, class_weights null or a
    positive number per label."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: missing; run the tokenize stage") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path}: not valid JSON; run the tokenize stage") from None
    labels = found.get("labels") if isinstance(found, dict) else None
    if not (isinstance(labels, list) and len(labels) >= 2 and all(isinstance(x, str) and x for x in labels)
            and len(set(labels)) == len(labels)):
        raise DataError(f"{path}: labels must be a list of 2 or more distinct names; run the tokenize stage")
    weights = found.get("class_weights")
    if weights is not None and not _valid_weights(weights, len(labels)):
        raise DataError(f"{path}: class_weights must be null or {len(labels)} positive numbers, one per label; "
                        "run the tokenize stage")
    return Classes(tuple(labels), None if weights is None else tuple(float(w) for w in weights))


def read_split(path: Path, labels: tuple[str, ...]) -> pd.DataFrame:
    """A split written by tokenize (label,text), every label one of `labels` and every text non-blank."""
    if not path.is_file():
        raise DataError(f"{path}: missing; run the tokenize stage first")
    try:
        # keep_default_na=False: a message reading "NA" is text, not a missing value.
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV ({' '.join(str(exc).split())}); run the tokenize stage") from None
    if list(frame.columns) != ["label", "text"]:
        raise DataError(f"{path}: columns must be label,text, got {','.join(frame.columns)}")
    # Rows are 1-based among the data rows, as the validate stage counts them.
    bad = frame.index[~frame["label"].isin(labels)]
    if len(bad):
        raise DataError(f"{path}: row {bad[0] + 1} has label {frame['label'][bad[0]]!r}, not one of the classes "
                        f"{list(labels)} in {CLASSES_JSON.name}")
    blank = frame.index[frame["text"].str.strip() == ""]
    if len(blank):
        raise DataError(f"{path}: row {blank[0] + 1} has an empty text")
    return frame


def resolve_max_length(requested: int | None, train_seqs: list[list[int]], context_length: int) -> int:
    """The padded length: `requested`, else the longest training text; never past the model's context."""
    if requested is not None and requested > context_length:
        raise DataError(f"params.yaml: finetune_classifier.max_length ({requested}) exceeds the base model's "
                        f"context length ({context_length})")
    return requested or min(max(map(len, train_seqs)), context_length)


def loss_and_accuracy(model: GPTModel, sequences: list[list[int]], targets: torch.Tensor, spec: ClassifierSpec,
                      batch_size: int) -> dict[str, float]:
    """Mean cross-entropy and accuracy of the model on encoded texts."""
    logits = predict_logits(model, sequences, spec, batch_size)
    return {"loss": F.cross_entropy(logits, targets).item(),
            "accuracy": (logits.argmax(-1) == targets).float().mean().item()}


def split_report(targets: torch.Tensor, predictions: torch.Tensor, labels: tuple[str, ...]) -> dict:
    """classification_metrics of one split, the accuracy's standard error (promote's noise) and the confusion
    counts {true: {predicted: n}}."""
    confusion = confusion_matrix(targets.tolist(), predictions.tolist(), len(labels))
    counts = {true: dict(zip(labels, row)) for true, row in zip(labels, confusion)}
    return {**classification_metrics(confusion, labels),
            "accuracy_se": standard_error((predictions == targets).float().tolist()), "confusion": counts}


def scalar_metrics(reports: dict[str, dict]) -> dict[str, float]:
    """What MLflow gets: accuracy and the macro averages per split, and the test F1 of each class whose
    label is safe in a metric key (`test_f1_<label>`)."""
    flat = {f"{split}_{name}": report[name] for split, report in reports.items() for name in SCALARS}
    flat.update({f"test_f1_{label}": scores["f1"] for label, scores in reports["test"]["per_class"].items()
                 if METRIC_SAFE_LABEL.fullmatch(label)})
    return flat


@dataclass
class ClassSplits:
    """The encoded splits (cut to the classifier's max_length), their class indices, the training loss's
    class weights (None: unweighted) and the content hashes of the inputs."""

    encoded: dict[str, list[list[int]]]
    targets: dict[str, torch.Tensor]
    spec: ClassifierSpec
    class_weights: tuple[float, ...] | None
    hashes: dict[str, str]


def read_inputs(cfg: dict, context_length: int) -> ClassSplits:
    """data/tokens/classification/{train,val,test}.csv encoded with the GPT-2 BPE, labels checked against
    classes.json, whose order gives the class indices."""
    classes = read_classes()
    tokenizer = load_tokenizer(BPE_DIR)
    paths = {split: SPLITS_DIR / f"{split}.csv" for split in SPLITS}
    frames = {split: read_split(path, classes.labels) for split, path in paths.items()}
    full = {split: encode_texts(tokenizer, frame["text"].tolist(), context_length) for split, frame in frames.items()}
    spec = ClassifierSpec(classes.labels, cfg["position"],
                          resolve_max_length(cfg["max_length"], full["train"], context_length))
    if len(full["train"]) < cfg["batch_size"]:
        raise DataError(f"{paths['train']}: {len(full['train'])} rows is fewer than one batch "
                        f"(finetune_classifier.batch_size {cfg['batch_size']})")
    index = {label: i for i, label in enumerate(classes.labels)}
    return ClassSplits(
        # Truncation keeps each text's first max_length tokens, as encode_texts does at inference.
        encoded={split: [seq[: spec.max_length] for seq in seqs] for split, seqs in full.items()},
        targets={split: torch.tensor([index[x] for x in frame["label"]]) for split, frame in frames.items()},
        spec=spec,
        class_weights=classes.weights,
        hashes={**{path.name: sha256_file(path) for path in (*paths.values(), CLASSES_JSON)},
                "base": base_hash(cfg["base"])},
    )


def finetune(model: GPTModel, data: ClassSplits, cfg: dict, device: torch.device) -> list[dict]:
    """Train the classifier on the train split (val and train scored at each evaluation); fit()'s history."""
    eval_rows = None if cfg["eval_batches"] is None else cfg["eval_batches"] * cfg["batch_size"]
    encoded, targets, spec = data.encoded, data.targets, data.spec
    # None leaves cross_entropy unweighted, exactly the loss of a run without class weights.
    weight = None if data.class_weights is None else torch.tensor(data.class_weights, device=device)

    def batches(epoch: int):
        # The book's loader: shuffled each epoch, the last partial batch dropped.
        for rows in EpochBatchSampler(len(encoded["train"]), cfg["batch_size"], seed=cfg["seed"], epoch=epoch):
            ids, lengths = collate([encoded["train"][r] for r in rows], spec)
            yield ids.to(device), lengths, targets["train"][rows].to(device)

    def loss_fn(net: GPTModel, batch) -> torch.Tensor:
        ids, lengths, labels = batch
        # Class weights and smoothing shape the training loss (the per-step loss curve) only; the train/val
        # evaluations are plain, unweighted cross-entropy, comparable across runs.
        return F.cross_entropy(classification_logits(net, ids, lengths, spec.position), labels, weight=weight,
                               label_smoothing=cfg["label_smoothing"])

    def evaluate() -> dict[str, float]:
        out = {}
        for split in ("train", "val"):
            scores = loss_and_accuracy(model, encoded[split][:eval_rows], targets[split][:eval_rows], spec,
                                       cfg["batch_size"])
            out.update({f"{split}_{name}": value for name, value in scores.items()})
        return out

    steps = len(encoded["train"]) // cfg["batch_size"] * cfg["epochs"]
    return train(model, cfg, "finetune_classifier", batches, loss_fn, evaluate, steps, lambda r: (
        f"train loss {r['train_loss']:.3f} acc {r['train_accuracy']:.3f}, "
        f"val loss {r['val_loss']:.3f} acc {r['val_accuracy']:.3f}"))


def write_plots(history: list[dict], data: ClassSplits, predicted_test: torch.Tensor, counts: dict) -> None:
    """Loss and accuracy curves (CSV + PNG) and the test confusion matrix (JSON + PNG)."""
    labels = data.spec.labels
    evals = [record for record in history if "val_loss" in record]
    write_rows(CURVE_CSV, history, ("step", "epoch", "loss", "examples_seen"))
    write_rows(EVAL_CSV, evals, ("step", "examples_seen", "train_loss", "val_loss", "train_accuracy", "val_accuracy"))
    plot_curves(CURVE_PNG, "Classifier finetuning loss", history, evals)
    atomic_write_json(CONFUSION_JSON, [{"actual": labels[t], "predicted": labels[p]} for t, p in
                                       zip(data.targets["test"].tolist(), predicted_test.tolist())])
    plot_confusion(CONFUSION_PNG, "Classifier, test split",
                   [[counts[true][predicted] for predicted in labels] for true in labels], labels)


def main(params_path: Path) -> None:
    started = time.perf_counter()
    params = load_params(params_path, PARAMS)
    tracking = project_tracking(params_path)
    cfg = params["finetune_classifier"]
    device = pick_device(cfg["device"])
    model = load_base(cfg["base"], cfg["drop_rate"]).to(device)
    data = read_inputs(cfg, model.cfg.context_length)
    labels = data.spec.labels

    torch.manual_seed(cfg["seed"])
    add_class_head(model, len(labels))
    select_trainable(model, cfg["trainable"], cfg["n_blocks"], cfg["lora_rank"], cfg["lora_alpha"],
                     always=[model.out_head])
    trainable = report_trainable(model, cfg["trainable"])
    sizes = {f"{split}.csv": f"{len(rows)} rows" for split, rows in data.encoded.items()}
    with stage_run("finetune_classifier", cfg, data.hashes, tracking, sizes):
        history = finetune(model, data, cfg, device)
        predictions = {split: predict_logits(model, data.encoded[split], data.spec, 64).argmax(-1) for split in SPLITS}
        reports = {split: split_report(data.targets[split], predictions[split], labels) for split in SPLITS}
        flat = scalar_metrics(reports)
        for split, report in reports.items():
            print(f"{split}: accuracy {report['accuracy']:.4f}, macro precision {report['macro_precision']:.4f}, "
                  f"recall {report['macro_recall']:.4f}, F1 {report['macro_f1']:.4f}")
        save_classifier(model, data.spec, MODEL_DIR, extra={"stage": "finetune_classifier", "base": cfg["base"],
                                                            "metrics": flat, "data": data.hashes, "sizes": sizes})
        write_plots(history, data, predictions["test"], reports["test"]["confusion"])
        log_history(history)
        log_step_metrics(flat, step=history[-1]["step"])
        for path in (CURVE_PNG, CURVE_CSV, EVAL_CSV, CONFUSION_JSON, CONFUSION_PNG):
            log_path(path)
        # The base's sha256 reaches the version with the run's data tags; `champion` is the promote stage's.
        version = register_trained(STAGE, tracking)
        STAGE.write_results({
            **reports, "max_length": data.spec.max_length,
            "steps": history[-1]["step"], "trainable_parameters": trainable, "parameters": count_parameters(model),
            "train_time_s": round(history[-1]["elapsed_s"], 2), "wall_time_s": round(time.perf_counter() - started, 2),
            "device": device.type, DIGEST_TAG: version.tags[DIGEST_TAG]}, flat)


if __name__ == "__main__":
    command_line("finetune_classifier", main)
