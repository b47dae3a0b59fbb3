"""Where the pipeline keeps its data: the folders under data/ that more than one stage or command uses."""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.core.errors import DataError

# DVC names the main workspace's root here in every stage it runs; in `dvc exp run --queue` and `--temp`
# runs too, whose stages run in a temporary copy under .dvc/tmp/exps that is deleted afterwards.
DVC_ROOT_ENV = "DVC_ROOT"

DATA = Path("data")
RAW = DATA / "raw"  # download's output: the verified source files
BPE_DIR = RAW / "gpt2_bpe"  # what gpt.tokenizer.load_tokenizer reads
TRACKED = DATA / "tracked"  # download's memory of tracked sources: last copy + ETag/Last-Modified each
TOKENS = DATA / "tokens"  # tokenize's output, one folder per consumer:
PRETRAIN_TOKENS = TOKENS / "pretrain"  # train.bin / val.bin
CLASSIFICATION_TOKENS = TOKENS / "classification"  # train/val/test.csv + classes.json
CLASSES_JSON = CLASSIFICATION_TOKENS / "classes.json"  # labels in class-index order, and the loss weights
INSTRUCTION_TOKENS = TOKENS / "instructions"  # train/val/test.json
MODELS = DATA / "models"
BASE_MODEL_DIR = MODELS / "base"  # pretrain's model
CLASSIFIER_MODEL_DIR = MODELS / "classifier"  # finetune_classifier's
INSTRUCT_MODEL_DIR = MODELS / "instruct"  # finetune_instruct's
METRICS = DATA / "metrics"  # <stage>.json: the few numbers people compare (see pipeline.stages.STAGES)
REPORTS = DATA / "reports"  # <stage>.json: everything else a stage found (statistics, hashes, versions)
PLOTS = DATA / "plots"
SAMPLES = DATA / "samples"


def project_root() -> Path:
    """The project's main workspace: where its own stores live (the embedded MLflow store and its artifacts).
    DVC's root when DVC runs us, even in an experiment's temporary copy; else the current folder."""
    return Path(os.environ.get(DVC_ROOT_ENV) or Path.cwd()).resolve()


def raw_file(name: str) -> Path:
    """data/raw/<name>, which must exist."""
    path = RAW / name
    if not path.is_file():
        raise DataError(f"{path}: missing; run the download stage first")
    return path
