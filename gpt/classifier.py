"""Text classification with the GPT: a class head, padded batches, the classifying token, metrics, save/load."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import tiktoken
import torch
from torch import nn

from gpt.checkpoint import load_state, read_config, save_model
from gpt.errors import CheckpointError
from gpt.model import GPTConfig, GPTModel
from gpt.tokenizer import END_OF_TEXT_ID

# "last": the final position of the padded row, as the book does; "last_nonpad": the last real
# token, the only one that has attended to the whole text and nothing else.
POSITIONS = ("last", "last_nonpad")


@dataclass(frozen=True)
class ClassifierSpec:
    """How a classifier reads text: its class labels, which token classifies, and the padded length."""

    labels: tuple[str, ...]
    position: str = "last_nonpad"
    max_length: int = 128

    def __post_init__(self):
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"a classifier needs at least two distinct labels, got {list(self.labels)}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown classifying position {self.position!r}; choose one of {', '.join(POSITIONS)}")
        if not isinstance(self.max_length, int) or self.max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {self.max_length!r}")

    def to_dict(self) -> dict:
        return {"labels": list(self.labels), "position": self.position, "max_length": self.max_length}


def add_class_head(model: GPTModel, n_classes: int) -> GPTModel:
    """Replace the vocabulary head with a fresh `n_classes` linear head (with bias, as the book); return model.

    The new head owns its weight, so a tied model becomes untied and its config says so:
    checkpoints then store the head and the token embedding separately.
    """
    model.out_head = nn.Linear(model.cfg.emb_dim, n_classes).to(model.tok_emb.weight.device)
    model.cfg = replace(model.cfg, tie_weights=False)
    return model


def encode_texts(tokenizer: tiktoken.Encoding, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to the FIRST `max_length` tokens (the rest is dropped).

    Special-token text such as "<|endoftext|>" is encoded as ordinary text. A missing, empty
    or blank text is a ValueError naming its 1-based row.
    """
    encoded = []
    for row, text in enumerate(texts, start=1):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"row {row}: empty text, nothing to classify")
        encoded.append(tokenizer.encode(text, disallowed_special=())[:max_length])
    return encoded


def pad_batch(sequences: Sequence[Sequence[int]], length: int,
              pad_id: int = END_OF_TEXT_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids of shape (batch, length) right-padded with `pad_id`, true lengths of shape (batch,))."""
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if not 1 <= len(seq) <= length:
            raise ValueError(f"sequence {row} has {len(seq)} tokens; pad_batch needs 1 to {length}")
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return ids, torch.tensor([len(seq) for seq in sequences], dtype=torch.long)


def collate(sequences: Sequence[Sequence[int]], spec: ClassifierSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """pad_batch to spec.max_length for "last"; for "last_nonpad" only to the batch's longest text, which
    gives the same logits faster: causal attention keeps later padding from reaching the last real token."""
    length = spec.max_length if spec.position == "last" else max(map(len, sequences))
    return pad_batch(sequences, length)


def classification_logits(model: GPTModel, ids: torch.Tensor, lengths: torch.Tensor,
                          position: str = "last") -> torch.Tensor:
    """Class logits (batch, n_classes) from the hidden state at `position` (see POSITIONS)."""
    hidden = model.hidden_states(ids)
    if position == "last":
        picked = hidden[:, -1]
    elif position == "last_nonpad":
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths.to(hidden.device) - 1]
    else:
        raise ValueError(f"unknown classifying position {position!r}; choose one of {', '.join(POSITIONS)}")
    return model.out_head(picked)


@torch.no_grad()
def predict_logits(model: GPTModel, sequences: Sequence[Sequence[int]], spec: ClassifierSpec,
                   batch_size: int = 32) -> torch.Tensor:
    """Class logits (n, n_classes) of encoded texts, computed in eval mode on the model's device, returned on CPU."""
    device = model.tok_emb.weight.device
    was_training = model.training
    model.eval()
    chunks = [torch.empty(0, model.out_head.out_features)]
    for start in range(0, len(sequences), batch_size):
        ids, lengths = collate(sequences[start : start + batch_size], spec)
        chunks.append(classification_logits(model, ids.to(device), lengths, spec.position).float().cpu())
    model.train(was_training)
    return torch.cat(chunks)


def classify_texts(model: GPTModel, tokenizer: tiktoken.Encoding, texts: Sequence[str], spec: ClassifierSpec,
                   batch_size: int = 32) -> tuple[list[str], torch.Tensor]:
    """(predicted label per text, class probabilities (n, n_classes)); texts are truncated as encode_texts says."""
    logits = predict_logits(model, encode_texts(tokenizer, texts, spec.max_length), spec, batch_size)
    probabilities = logits.softmax(-1)
    return [spec.labels[i] for i in probabilities.argmax(-1).tolist()], probabilities


def confusion_matrix(targets: Sequence[int], predictions: Sequence[int], n_classes: int) -> list[list[int]]:
    """counts[true class][predicted class]."""
    counts = [[0] * n_classes for _ in range(n_classes)]
    for target, predicted in zip(targets, predictions, strict=True):
        counts[target][predicted] += 1
    return counts


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def classification_metrics(confusion: list[list[int]], labels: Sequence[str]) -> dict:
    """Accuracy; per-class precision, recall, F1 and support (true count) keyed by label; and their
    macro averages (unweighted means over all classes). An undefined ratio counts as 0."""
    if not labels or len(confusion) != len(labels):
        raise ValueError(f"the confusion matrix has {len(confusion)} rows for {len(labels)} labels")
    per_class = {}
    for index, label in enumerate(labels):
        hits = confusion[index][index]
        precision = _ratio(hits, sum(row[index] for row in confusion))
        recall = _ratio(hits, sum(confusion[index]))
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": sum(confusion[index])}
    scores = list(per_class.values())
    return {
        "accuracy": _ratio(sum(confusion[i][i] for i in range(len(confusion))), sum(map(sum, confusion))),
        **{f"macro_{name}": sum(s[name] for s in scores) / len(scores) for name in ("precision", "recall", "f1")},
        "per_class": per_class,
    }


def save_classifier(model: GPTModel, spec: ClassifierSpec, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the classifier as one of our checkpoints whose extra.classifier holds the spec (merge LoRA first)."""
    if model.out_head.out_features != len(spec.labels):
        raise ValueError(f"the head has {model.out_head.out_features} outputs but the spec {len(spec.labels)} labels")
    return save_model(model, path, extra={**(extra or {}), "classifier": spec.to_dict()})


def read_spec(path: str | os.PathLike, config: dict | None = None) -> ClassifierSpec:
    """The classifier spec in the config.json of a folder written by save_classifier (`config`: already read)."""
    saved = (config or read_config(path)).get("extra", {}).get("classifier")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: a language-model checkpoint, not a classifier")
    try:
        return ClassifierSpec(tuple(saved["labels"]), saved["position"], saved["max_length"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad classifier settings in config.json ({exc})") from None


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPTModel, ClassifierSpec]:
    """Load a folder written by save_classifier, checking its weights' sha256; the model comes in eval mode."""
    config = read_config(path)
    spec = read_spec(path, config)
    model = add_class_head(GPTModel(GPTConfig.from_dict(config["model"])), len(spec.labels))
    load_state(path, model)
    return model.to(device).eval(), spec
