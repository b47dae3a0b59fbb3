"""MLflow pyfunc classifier (logged as code): texts in column `text` to `label` and a `p_<label>` column per class."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd
import tiktoken
from mlflow.models import ModelSignature, set_model
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from gpt.classifier import ClassifierSpec, classify_texts, load_classifier, read_spec
from gpt.model import GPTModel
from gpt.runtime import pick_device
from gpt.tokenizer import load_tokenizer
from pipeline.registry.pyfuncs.inputs import check_texts

BATCH_SIZE = 32
PROBABILITY_PREFIX = "p_"
# What every classifier shares; the class columns join the outputs in signature(), once labels are known.
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "text")]),
    outputs=Schema([ColSpec("string", "label")]),
    params=ParamSchema([ParamSpec("batch_size", "long", BATCH_SIZE)]),
)
# Logged with the model (serving_input_example.json) and predicted once before registering it.
INPUT_EXAMPLE = (pd.DataFrame({"text": ["You won a free prize! Text WIN to claim it now."]}), {"batch_size": 1})
ARTIFACT = "classifier"  # the artifact holding the classifier folder


def probability_column(label: str) -> str:
    """The output column holding P(label), e.g. `p_spam`."""
    return PROBABILITY_PREFIX + label


def signature(labels: Sequence[str]) -> ModelSignature:
    """SIGNATURE with a double column `p_<label>` per class, in class-index order, after `label`."""
    columns = [ColSpec("double", probability_column(label)) for label in labels]
    return ModelSignature(inputs=SIGNATURE.inputs, outputs=Schema([*SIGNATURE.outputs.inputs, *columns]),
                          params=SIGNATURE.params)


def folder_signature(folder: Path) -> ModelSignature:
    """The signature of a model logged from classifier `folder`: its labels' probability columns."""
    return signature(read_spec(folder).labels)


def predict_frame(model: GPTModel, spec: ClassifierSpec, tokenizer: tiktoken.Encoding, texts: list[str],
                  batch_size: int = BATCH_SIZE) -> pd.DataFrame:
    """Column `label` (the most probable class) and `p_<label>` per class (summing to 1), one row per text
    (see gpt.classifier.encode_texts for truncation)."""
    labels, probabilities = classify_texts(model, tokenizer, texts, spec, batch_size)
    columns = {probability_column(label): probabilities[:, i].double().numpy() for i, label in enumerate(spec.labels)}
    return pd.DataFrame({"label": labels, **columns})


class Classifier(PythonModel):
    """Our classifier folder (artifact `classifier`) and GPT-2 BPE files (artifact `bpe`)."""

    def load_context(self, context: PythonModelContext) -> None:
        device = pick_device("auto")
        self.model, self.spec = load_classifier(context.artifacts[ARTIFACT], device=device)
        self.tokenizer = load_tokenizer(context.artifacts["bpe"])

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict | None = None) -> pd.DataFrame:
        model_input = check_texts(model_input, ["text"])
        batch_size = int((params or {}).get("batch_size", BATCH_SIZE))
        return predict_frame(self.model, self.spec, self.tokenizer, list(model_input["text"]), batch_size)


set_model(Classifier())
