"""Where the pipeline keeps its data: the folders under data/ that more than one stage or command uses."""
from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import DataError

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


def raw_file(name: str) -> Path:
    """data/raw/<name>, which must exist."""
    path = RAW / name
    if not path.is_file():
        raise DataError(f"{path}: missing; run the download stage first")
    return path
