"""The tokenize stage: exact chunked encoding, the book's splits, and refusals that leave nothing behind."""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import leftovers, run_stage, set_param, stage_env
from gpt.data import load_tokens
from gpt.files import sha256_file
from gpt.tokenizer import END_OF_TEXT_ID, load_tokenizer
from pipeline.data.encoding import encode_ids, safe_cuts
from pipeline.stages.tokenize_data import balance_rows, split_table


# data/tokens/spam/train.csv of the default pipeline before tokenize read other tables (dvc.lock of 6ba7fa6).
BOOK_TRAIN_SHA256 = "2fc76e0534055393e9aeb1ee292ee1c0a11a7b422f175cf9ed5dd5bf19c64e0f"


def encode_text(enc, text: str, chunk_chars: int = 1 << 18) -> np.ndarray:
    """The text encoded chunk by chunk, cut at safe_cuts, as the tokenize stage encodes a long document."""
    bounds = [0, *safe_cuts(text, chunk_chars), len(text)]
    return np.concatenate([encode_ids(enc, text[a:b]) for a, b in zip(bounds, bounds[1:])])


@pytest.fixture(scope="module")
def enc(bpe_dir: Path):
    return load_tokenizer(bpe_dir)


@pytest.mark.parametrize("name", ["the-verdict.txt", "tinyshakespeare.txt", "instruction-data.json", "SMSSpamCollection"])
@pytest.mark.parametrize("chunk_chars", [97, 4096, 1 << 18])
def test_chunked_encoding_equals_whole_text(enc, mirror: Path, name: str, chunk_chars: int):
    text = (mirror / name).read_text(encoding="utf-8")
    if chunk_chars < 1000:
        assert len(safe_cuts(text, chunk_chars)) > len(text) // 2000  # really cut into many pieces
    assert encode_text(enc, text, chunk_chars).tolist() == enc.encode_ordinary(text)


def test_chunked_encoding_on_tricky_whitespace(enc):
    text = ("A\nb  \n\nC\n 's\n's d\n\n\n  e\r\nF\t\nG\n7x\nÉté\n\u00a0H\nI\n \nJ  \n" * 50) + "end\n\n   "
    assert len(safe_cuts(text, 1)) > 500  # cuts at nearly every safe spot
    assert encode_text(enc, text, chunk_chars=1).tolist() == enc.encode_ordinary(text)


def test_chunked_encoding_on_random_text(enc):
    rng = random.Random(0)
    alphabet = [" ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "\u3000", "\x1c", "\x85", "a", "Bc", "7",
                "'s", "'", "é", "日本", ".", "--", "<|endoftext|>", "\U0001F600"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        assert encode_text(enc, text, chunk_chars=1).tolist() == enc.encode_ordinary(text), repr(text)


def test_cuts_elsewhere_in_a_whitespace_run_would_be_wrong(enc):
    # Why cuts go only just before a run's last character: "\n\n" is one token at the end
    # of a run, and the last space joins the word after it.
    for text, wrong_cut in (("a\n\n b", 2), ("x  \n  y", 6)):
        assert enc.encode_ordinary(text[:wrong_cut]) + enc.encode_ordinary(text[wrong_cut:]) != enc.encode_ordinary(text)
        assert wrong_cut not in safe_cuts(text, 1)


def test_the_verdict_has_5145_tokens(enc, mirror: Path):
    assert len(encode_text(enc, (mirror / "the-verdict.txt").read_text(encoding="utf-8"))) == 5145


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory: pytest.TempPathFactory, downloaded: Path) -> Path:
    """A project after validate + tokenize with a two-document corpus."""
    root = tmp_path_factory.mktemp("tokenized")
    shutil.copy(downloaded / "params.yaml", root / "params.yaml")
    shutil.copytree(downloaded / "data" / "raw", root / "data" / "raw")
    set_param(root, "datasets.corpus.sources", ["the-verdict", "tinyshakespeare"])
    for stage in ("validate", "tokenize"):
        result = run_stage(root, stage)
        assert result.returncode == 0, result.stderr
    return root


def test_pretrain_tokens(tokenized: Path, enc, mirror: Path):
    out = tokenized / "data" / "tokens" / "pretrain"
    texts = [(mirror / n).read_text(encoding="utf-8") for n in ("the-verdict.txt", "tinyshakespeare.txt")]
    cuts = [int(0.9 * len(t)) for t in texts]
    expected_train = enc.encode(texts[0][: cuts[0]]) + [END_OF_TEXT_ID] + enc.encode(texts[1][: cuts[1]])
    expected_val = enc.encode(texts[0][cuts[0]:]) + [END_OF_TEXT_ID] + enc.encode(texts[1][cuts[1]:])
    train, val = load_tokens(out / "train.bin"), load_tokens(out / "val.bin")
    assert train.dtype == np.uint16 and train.tolist() == expected_train and val.tolist() == expected_val
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(expected_train), len(expected_val))
    assert [s["file"] for s in meta["sources"]] == ["data/raw/the-verdict.txt", "data/raw/tinyshakespeare.txt"]
    report = json.loads((tokenized / "data" / "reports" / "tokenize.json").read_text())
    assert report["corpus"]["train_tokens"] == len(expected_train) and report["corpus"]["mb_per_s"] > 0
    assert leftovers(tokenized) == []


def test_spam_splits_match_the_book(tokenized: Path):
    out = tokenized / "data" / "tokens" / "classification"
    splits = {s: pd.read_csv(out / f"{s}.csv") for s in ("train", "val", "test")}
    assert {s: len(f) for s, f in splits.items()} == {"train": 1045, "val": 149, "test": 300}
    assert all(list(f.columns) == ["label", "text"] for f in splits.values())
    labels = pd.concat(splits.values())["label"].value_counts().to_dict()
    assert labels == {"ham": 747, "spam": 747}
    assert splits["train"]["text"].iloc[0] == "Dude how do you like the buff wind."
    # The same rows as before the tokenize stage learned other tables (its train.csv then had this hash).
    assert sha256_file(out / "train.csv") == BOOK_TRAIN_SHA256
    assert json.loads((out / "classes.json").read_text()) == {"labels": ["ham", "spam"], "balance": "undersample",
                                                             "class_weights": None}
    stats = json.loads((tokenized / "data" / "reports" / "tokenize.json").read_text())["classification"]
    assert set(stats["train"]) == {"rows", "per_class", "tokens_max", "tokens_mean", "tokens_p95"}


def test_instruction_splits_match_the_book(tokenized: Path, mirror: Path):
    records = json.loads((mirror / "instruction-data.json").read_text())
    out = tokenized / "data" / "tokens" / "instructions"
    splits = {s: json.loads((out / f"{s}.json").read_text()) for s in ("train", "test", "val")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 935, "test": 110, "val": 55}
    assert splits["train"] + splits["test"] + splits["val"] == records


def _validated(raw_project: Path) -> Path:
    assert run_stage(raw_project, "validate").returncode == 0
    return raw_project


def assert_refused(project: Path, result, message: str) -> None:
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("tokenize: error: ")
    assert message in result.stderr
    assert not (project / "data" / "tokens").exists()
    assert not (project / "data" / "reports" / "tokenize.json").exists()
    assert leftovers(project) == []


def test_refuses_without_a_validate_report(raw_project: Path):
    result = run_stage(raw_project, "tokenize")
    assert_refused(raw_project, result, "data/reports/validate.json is missing; run the validate stage first")


def test_refuses_when_raw_data_changed_after_validation(raw_project: Path):
    _validated(raw_project)
    with open(raw_project / "data/raw/instruction-data.json", "a") as handle:
        handle.write("\n")
    result = run_stage(raw_project, "tokenize")
    assert_refused(raw_project, result, "data/raw/instruction-data.json changed since validation")


def test_refuses_a_split_shorter_than_one_window(raw_project: Path):
    set_param(raw_project, "datasets.corpus.sources", ["the-verdict"])
    set_param(raw_project, "pretrain.context_length", 1000)
    _validated(raw_project)  # 5,145 tokens are enough in total, but not for the 10% val split
    result = run_stage(raw_project, "tokenize")
    assert_refused(raw_project, result, "the val split has 534 tokens, fewer than pretrain.context_length + 1 = 1001")


def test_late_failure_leaves_no_partial_output(raw_project: Path):
    set_param(raw_project, "tokenize.classification.val_frac", 0.0001)  # fails after pretrain files were written
    _validated(raw_project)
    result = run_stage(raw_project, "tokenize")
    assert_refused(raw_project, result, "tokenize.classification: the val split is empty")


def test_module_name_does_not_shadow_stdlib_tokenize(tmp_path: Path):
    code = "import pipeline.stages.tokenize_data, tokenize, linecache; print(tokenize.__file__); tokenize.generate_tokens"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=stage_env(None),
                            capture_output=True, text=True, check=True)
    assert "pipeline" not in result.stdout


def _table(counts: dict[str, int]) -> pd.DataFrame:
    return pd.DataFrame([{"label": label, "text": f"{label} {i}"} for label, n in counts.items() for i in range(n)])


def test_stratified_split_keeps_each_label_in_proportion():
    frame = _table({"a": 600, "b": 300, "c": 100})
    cfg = {"seed": 7, "train_frac": 0.7, "val_frac": 0.1, "stratify": True}
    splits = split_table(frame, cfg)
    sizes = {name: part["label"].value_counts().to_dict() for name, part in splits.items()}
    assert sizes == {"train": {"a": 420, "b": 210, "c": 70}, "val": {"a": 60, "b": 30, "c": 10},
                     "test": {"a": 120, "b": 60, "c": 20}}
    assert pd.concat(splits.values())["text"].sort_values().tolist() == frame["text"].sort_values().tolist()
    again = split_table(frame, cfg)
    assert all(again[name]["text"].tolist() == part["text"].tolist() for name, part in splits.items())
    assert splits["train"]["label"].iloc[:20].nunique() > 1  # shuffled, not class after class
    other_seed = split_table(frame, {**cfg, "seed": 8})
    assert other_seed["test"]["text"].tolist() != splits["test"]["text"].tolist()


def test_undersampling_cuts_every_class_to_the_smallest():
    balanced = balance_rows(_table({"a": 50, "b": 20, "c": 30}), "undersample", seed=1)
    assert balanced["label"].value_counts().to_dict() == {"a": 20, "b": 20, "c": 20}
    assert balance_rows(_table({"a": 50, "b": 20}), "class_weight", seed=1)["label"].value_counts().to_dict() == {
        "a": 50, "b": 20}


def test_duplicates_drop_keeps_the_first_of_identical_texts(raw_project: Path):
    set_param(raw_project, "tokenize.classification.duplicates", "drop")
    _validated(raw_project)
    assert run_stage(raw_project, "tokenize").returncode == 0
    splits = [pd.read_csv(raw_project / f"data/tokens/classification/{s}.csv", keep_default_na=False)
              for s in ("train", "val", "test")]
    texts = pd.concat(splits)["text"]
    assert not texts.duplicated().any()  # so no test message also occurs in train
    assert len(texts) == 2 * 653  # 5,572 rows less 403 repeats leave 653 distinct spam texts
