"""Stage `finetune_classifier`: finetune the base GPT into a ham/spam classifier, evaluate it, register it."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from gpt.classifier import (
    POSITIONS,
    ClassifierSpec,
    add_class_head,
    binary_metrics,
    classification_logits,
    collate,
    confusion_matrix,
    encode_texts,
    predict_logits,
    save_classifier,
)
from gpt.data import EpochBatchSampler
from gpt.files import atomic_write_json, sha256_file
from gpt.finetune import select_trainable
from gpt.model import GPTModel, count_parameters
from gpt.tokenizer import load_tokenizer
from gpt.train import pick_device
from pipeline.errors import DataError
from pipeline.finetuning import COMMON_PARAMS, base_hash, load_base, report_trainable, train
from pipeline.mlflow_models import spam_classifier
from pipeline.layout import BPE_DIR, CLASSIFIER_MODEL_DIR as MODEL_DIR, PLOTS, SPAM_TOKENS as SPAM_DIR
from pipeline.params import Float, Int, Section, Str, load_params
from pipeline.plots import plot_confusion, plot_curves, write_rows
from pipeline.schemas import SPAM_LABELS
from pipeline.stages import STAGES, command_line
from pipeline.tracking import (
    MLFLOW_SECTION,
    log_history,
    log_path,
    log_pyfunc,
    log_step_metrics,
    stage_run,
)

STAGE = STAGES["finetune_classifier"]
SPLITS = ("train", "val", "test")
CURVE_CSV = PLOTS / "classifier_loss.csv"
EVAL_CSV = PLOTS / "classifier_eval.csv"
CURVE_PNG = PLOTS / "classifier_loss.png"
CONFUSION_JSON = PLOTS / "classifier_confusion.json"
CONFUSION_PNG = PLOTS / "classifier_confusion.png"
POSITIVE = SPAM_LABELS.index("spam")
PARAMS = {
    "finetune_classifier": Section(
        **COMMON_PARAMS,
        position=Str(choices=POSITIONS),
        max_length=Int(low=1, optional=True),
        label_smoothing=Float(0, 1, bounds="[)"),
    ),
    "mlflow": MLFLOW_SECTION,
}


def read_split(path: Path) -> pd.DataFrame:
    """A spam split written by tokenize (label,text), with every label checked."""
    if not path.is_file():
        raise DataError(f"{path}: missing; run the tokenize stage first")
    # keep_default_na=False: a message reading "NA" is text, not a missing value.
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(frame.columns) != ["label", "text"]:
        raise DataError(f"{path}: columns must be label,text, got {','.join(frame.columns)}")
    bad = frame.index[~frame["label"].isin(SPAM_LABELS)]
    if len(bad):
        raise DataError(f"{path}: row {bad[0] + 1} has label {frame['label'][bad[0]]!r}; expected one of {SPAM_LABELS}")
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


def split_report(targets: torch.Tensor, predictions: torch.Tensor) -> dict:
    """Accuracy, precision/recall/F1 for spam and the confusion counts {true: {predicted: n}}."""
    confusion = confusion_matrix(targets.tolist(), predictions.tolist(), len(SPAM_LABELS))
    counts = {true: dict(zip(SPAM_LABELS, row)) for true, row in zip(SPAM_LABELS, confusion)}
    return {**binary_metrics(confusion, POSITIVE), "confusion": counts}


@dataclass
class SpamSplits:
    """The encoded splits (cut to the classifier's max_length), their labels and content hashes."""

    encoded: dict[str, list[list[int]]]
    targets: dict[str, torch.Tensor]
    spec: ClassifierSpec
    hashes: dict[str, str]


def read_inputs(cfg: dict, context_length: int) -> SpamSplits:
    """data/tokens/spam/{train,val,test}.csv encoded with the GPT-2 BPE, labels checked."""
    tokenizer = load_tokenizer(BPE_DIR)
    frames = {split: read_split(SPAM_DIR / f"{split}.csv") for split in SPLITS}
    full = {split: encode_texts(tokenizer, frame["text"].tolist(), context_length) for split, frame in frames.items()}
    spec = ClassifierSpec(SPAM_LABELS, cfg["position"], resolve_max_length(cfg["max_length"], full["train"], context_length))
    if len(full["train"]) < cfg["batch_size"]:
        raise DataError(f"{SPAM_DIR / 'train.csv'}: {len(full['train'])} rows is fewer than one batch "
                        f"(finetune_classifier.batch_size {cfg['batch_size']})")
    return SpamSplits(
        # Truncation keeps each text's first max_length tokens, as encode_texts does at inference.
        encoded={split: [seq[: spec.max_length] for seq in seqs] for split, seqs in full.items()},
        targets={split: torch.tensor([SPAM_LABELS.index(x) for x in frame["label"]]) for split, frame in frames.items()},
        spec=spec,
        hashes={**{f"{split}.csv": sha256_file(SPAM_DIR / f"{split}.csv") for split in SPLITS},
                "base": base_hash(cfg["base"])},
    )


def finetune(model: GPTModel, data: SpamSplits, cfg: dict, device: torch.device) -> list[dict]:
    """Train the classifier on the train split (val and train scored at each evaluation); fit()'s history."""
    eval_rows = None if cfg["eval_batches"] is None else cfg["eval_batches"] * cfg["batch_size"]
    encoded, targets, spec = data.encoded, data.targets, data.spec

    def batches(epoch: int):
        # The book's loader: shuffled each epoch, the last partial batch dropped.
        for rows in EpochBatchSampler(len(encoded["train"]), cfg["batch_size"], seed=cfg["seed"], epoch=epoch):
            ids, lengths = collate([encoded["train"][r] for r in rows], spec)
            yield ids.to(device), lengths, targets["train"][rows].to(device)

    def loss_fn(net: GPTModel, batch) -> torch.Tensor:
        ids, lengths, labels = batch
        # Smoothing shapes the training loss only; every reported loss is plain cross-entropy.
        return F.cross_entropy(classification_logits(net, ids, lengths, spec.position), labels,
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


def write_plots(history: list[dict], data: SpamSplits, predicted_test: torch.Tensor, counts: dict) -> None:
    """Loss and accuracy curves (CSV + PNG) and the test confusion matrix (JSON + PNG)."""
    evals = [record for record in history if "val_loss" in record]
    write_rows(CURVE_CSV, history, ("step", "epoch", "loss", "examples_seen"))
    write_rows(EVAL_CSV, evals, ("step", "examples_seen", "train_loss", "val_loss", "train_accuracy", "val_accuracy"))
    plot_curves(CURVE_PNG, "Spam classifier finetuning loss", history, evals)
    atomic_write_json(CONFUSION_JSON, [{"actual": SPAM_LABELS[t], "predicted": SPAM_LABELS[p]} for t, p in
                                       zip(data.targets["test"].tolist(), predicted_test.tolist())])
    plot_confusion(CONFUSION_PNG, "Spam classifier, test split",
                   [[counts[true][predicted] for predicted in SPAM_LABELS] for true in SPAM_LABELS], SPAM_LABELS)


def main(params_path: Path) -> None:
    started = time.perf_counter()
    params = load_params(params_path, PARAMS)
    cfg = params["finetune_classifier"]
    device = pick_device(cfg["device"])
    model = load_base(cfg["base"], cfg["drop_rate"]).to(device)
    data = read_inputs(cfg, model.cfg.context_length)

    torch.manual_seed(cfg["seed"])
    add_class_head(model, len(SPAM_LABELS))
    select_trainable(model, cfg["trainable"], cfg["n_blocks"], cfg["lora_rank"], cfg["lora_alpha"],
                     always=[model.out_head])
    trainable = report_trainable(model, cfg["trainable"])
    with stage_run("finetune_classifier", cfg, data.hashes, params["mlflow"]):
        history = finetune(model, data, cfg, device)
        predictions = {split: predict_logits(model, data.encoded[split], data.spec, 64).argmax(-1) for split in SPLITS}
        reports = {split: split_report(data.targets[split], predictions[split]) for split in SPLITS}
        flat = {f"{split}_{name}": value for split, report in reports.items()
                for name, value in report.items() if name != "confusion"}
        for split, report in reports.items():
            print(f"{split}: accuracy {report['accuracy']:.4f}, spam precision {report['precision']:.4f}, "
                  f"recall {report['recall']:.4f}, F1 {report['f1']:.4f}")
        save_classifier(model, data.spec, MODEL_DIR, extra={"stage": "finetune_classifier", "base": cfg["base"],
                                                            "metrics": flat, "data": data.hashes})
        write_plots(history, data, predictions["test"], reports["test"]["confusion"])
        log_history(history)
        log_step_metrics(flat, step=history[-1]["step"])
        for path in (CURVE_PNG, CURVE_CSV, EVAL_CSV, CONFUSION_JSON, CONFUSION_PNG):
            log_path(path)
        # The base's sha256 reaches the version with the run's data tags; `champion` is the promote stage's.
        version = log_pyfunc(spam_classifier, {"classifier": MODEL_DIR, "bpe": BPE_DIR}, STAGE.model.name,
                             {"base": cfg["base"]}, flat)
        atomic_write_json(STAGE.metrics, {
            **reports, "test_accuracy": reports["test"]["accuracy"], "max_length": data.spec.max_length,
            "steps": history[-1]["step"], "trainable_parameters": trainable, "parameters": count_parameters(model),
            "train_time_s": round(history[-1]["elapsed_s"], 2), "wall_time_s": round(time.perf_counter() - started, 2),
            "device": device.type, "registered_version": int(version.version)})


if __name__ == "__main__":
    command_line("finetune_classifier", main)
