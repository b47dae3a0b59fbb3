"""Classify texts, with every class's probability: `llm-pipeline classify [--model PATH_OR_MODELS_URI] TEXT...`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from pipeline.commands.models import is_model_uri, load_mlflow_model
from pipeline.core.errors import reporting_errors
from pipeline.core.layout import BPE_DIR, CLASSIFIER_MODEL_DIR as MODEL_DIR


def classify(texts: list[str], model: str = str(MODEL_DIR), bpe_dir: Path = BPE_DIR,
             params_path: Path | None = None) -> pd.DataFrame:
    """Per text, column `label` and a column `p_<label>` per class (pipeline.registry.pyfuncs.spam_classifier's
    output), from a classifier folder or an MLflow model URI (e.g. models:/gpt-spam-classifier@champion,
    looked up in the store of `params_path`'s mlflow section).

    Texts longer than the model's max_length keep their first max_length tokens; an empty text is an error.
    """
    if is_model_uri(model):
        return load_mlflow_model(model, params_path).predict(pd.DataFrame({"text": texts}))
    # Imported here: `llm-pipeline classify --help` should not wait for torch.
    from gpt.classifier import load_classifier
    from gpt.tokenizer import load_tokenizer
    from pipeline.registry.pyfuncs.spam_classifier import predict_frame

    classifier, spec = load_classifier(model)
    return predict_frame(classifier, spec, load_tokenizer(bpe_dir), texts)


def read_texts(args: argparse.Namespace) -> list[str]:
    """The TEXT arguments, else the lines of --file, else the lines of stdin."""
    if args.texts:
        return args.texts
    if args.file is not None:
        return args.file.read_text(encoding="utf-8").splitlines()
    return sys.stdin.read().splitlines()


def format_row(label: str, probabilities: dict[str, float], text: str) -> str:
    """`label<TAB>class=probability ...<TAB>text` with the text on one line, e.g.
    `spam<TAB>ham=0.0123 spam=0.9877<TAB>WIN now`."""
    scores = " ".join(f"{name}={probability:.4f}" for name, probability in probabilities.items())
    return f"{label}\t{scores}\t{' '.join(text.split())}"


def main(argv: list[str] | None = None) -> None:
    """Print `label<TAB>class=probability ...<TAB>text` per text; an expected error is one line and exit status 1."""
    parser = argparse.ArgumentParser(prog="llm-pipeline classify", description=__doc__)
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify (default: --file or stdin lines)")
    parser.add_argument("--model", default=str(MODEL_DIR),
                        help=f"classifier folder or MLflow model URI (default: {MODEL_DIR})")
    parser.add_argument("--file", type=Path, help="read texts from this file, one per line")
    parser.add_argument("--bpe", type=Path, default=BPE_DIR,
                        help=f"GPT-2 BPE folder for a local model (default: {BPE_DIR})")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="params file whose mlflow section locates the registry (default: params.yaml, if present)")
    args = parser.parse_args(argv)
    with reporting_errors("classify"):
        texts = read_texts(args)
        result = classify(texts, args.model, args.bpe, args.params)
    # Imported here, as in classify(): torch is loaded by now either way.
    from pipeline.registry.pyfuncs.spam_classifier import PROBABILITY_PREFIX

    classes = {column: column.removeprefix(PROBABILITY_PREFIX) for column in result.columns
               if column.startswith(PROBABILITY_PREFIX)}
    for text, row in zip(texts, result.to_dict("records")):
        print(format_row(row["label"], {name: row[column] for column, name in classes.items()}, text))


if __name__ == "__main__":
    main()
