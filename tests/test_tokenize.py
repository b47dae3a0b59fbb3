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
from gpt.tokenizer import END_OF_TEXT_ID, load_tokenizer
from pipeline.encoding import encode_text, safe_cuts
from pipeline.stages.tokenize_data import split_corpus


@pytest.fixture(scope="module")
def enc(bpe_dir: Path):
    return load_tokenizer(bpe_dir)


@pytest.mark.parametrize("name", ["the-verdict.txt", "tinyshakespeare.txt", "instruction-data.json", "SMSSpamCollection"])
@pytest.mark.parametrize("chunk_chars", [97, 4096, 1 << 18])
def test_chunked_encoding_equals_whole_text(enc, mirror: Path, name: str, chunk_chars: int):
    text = (mirror / name).read_text(encoding="utf-8")
    if chunk_chars < 1000:
        assert len(safe_cuts(text, chunk_chars)) > len(text) // 2000  # really cut into many pieces
    assert encode_text(enc, text, chunk_chars, threads=2).tolist() == enc.encode_ordinary(text)


def test_chunked_encoding_on_tricky_whitespace(enc):
    text = ("A\nb  \n\nC\n 's\n's d\n\n\n  e\r\nF\t\nG\n7x\nÉté\n\u00a0H\nI\n \nJ  \n" * 50) + "end\n\n   "
    assert len(safe_cuts(text, 1)) > 500  # cuts at nearly every safe spot
    assert encode_text(enc, text, chunk_chars=1, threads=2).tolist() == enc.encode_ordinary(text)


def test_chunked_encoding_on_random_text(enc):
    rng = random.Random(0)
    alphabet = [" ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "\u3000", "\x1c", "\x85", "a", "Bc", "7",
                "'s", "'", "é", "日本", ".", "--", "<|endoftext|>", "\U0001F600"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        assert encode_text(enc, text, chunk_chars=1, threads=2).tolist() == enc.encode_ordinary(text), repr(text)


def test_cuts_elsewhere_in_a_whitespace_run_would_be_wrong(enc):
    # Why cuts go only just before a run's last character: "\n\n" is one token at the end
    # of a run, and the last space joins the word after it.
    for text, wrong_cut in (("a\n\n b", 2), ("x  \n  y", 6)):
        assert enc.encode_ordinary(text[:wrong_cut]) + enc.encode_ordinary(text[wrong_cut:]) != enc.encode_ordinary(text)
        assert wrong_cut not in safe_cuts(text, 1)


def test_the_verdict_has_5145_tokens(enc, mirror: Path):
    assert len(encode_text(enc, (mirror / "the-verdict.txt").read_text(encoding="utf-8"))) == 5145


def test_one_document_split_matches_the_book(enc, mirror: Path):
    text = (mirror / "the-verdict.txt").read_text(encoding="utf-8")
    split_idx = int(0.9 * len(text))
    train, val = split_corpus(enc, [text], 0.9)
    assert train.tolist() == enc.encode(text[:split_idx]) and val.tolist() == enc.encode(text[split_idx:])


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory: pytest.TempPathFactory, downloaded: Path) -> Path:
    """A project after validate + tokenize with a two-document corpus."""
    root = tmp_path_factory.mktemp("tokenized")
    shutil.copy(downloaded / "params.yaml", root / "params.yaml")
    shutil.copytree(downloaded / "data" / "raw", root / "data" / "raw")
    set_param(root, "tokenize.corpus", ["the-verdict.txt", "tinyshakespeare.txt"])
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
    assert [s["file"] for s in meta["sources"]] == ["the-verdict.txt", "tinyshakespeare.txt"]
    metrics = json.loads((tokenized / "data" / "metrics" / "tokenize.json").read_text())
    assert metrics["pretrain"]["train_tokens"] == len(expected_train) and metrics["pretrain"]["tokens_per_s"] > 0
    assert leftovers(tokenized) == []


def test_spam_splits_match_the_book(tokenized: Path):
    out = tokenized / "data" / "tokens" / "spam"
    splits = {s: pd.read_csv(out / f"{s}.csv") for s in ("train", "val", "test")}
    assert {s: len(f) for s, f in splits.items()} == {"train": 1045, "val": 149, "test": 300}
    assert all(list(f.columns) == ["label", "text"] for f in splits.values())
    labels = pd.concat(splits.values())["label"].value_counts().to_dict()
    assert labels == {"ham": 747, "spam": 747}
    assert splits["train"]["text"].iloc[0] == "Dude how do you like the buff wind."
    stats = json.loads((tokenized / "data" / "metrics" / "tokenize.json").read_text())["spam"]
    assert set(stats["train"]) == {"rows", "spam", "tokens_max", "tokens_mean", "tokens_p95"}


def test_instruction_splits_match_the_book(tokenized: Path, mirror: Path):
    records = json.loads((mirror / "instruction-data.json").read_text())
    out = tokenized / "data" / "tokens" / "instruct"
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
    assert not (project / "data" / "metrics" / "tokenize.json").exists()
    assert leftovers(project) == []


def test_refuses_without_a_validate_report(raw_project: Path):
    result = run_stage(raw_project, "tokenize")
    assert_refused(raw_project, result, "data/metrics/validate.json is missing; run the validate stage first")


def test_refuses_when_raw_data_changed_after_validation(raw_project: Path):
    _validated(raw_project)
    with open(raw_project / "data/raw/instruction-data.json", "a") as handle:
        handle.write("\n")
    result = run_stage(raw_project, "tokenize")
    assert_refused(raw_project, result, "data/raw/instruction-data.json changed since validation")


def test_refuses_a_split_shorter_than_one_window(raw_project: Path):
    set_param(raw_project, "tokenize.corpus", ["the-verdict.txt"])
    set_param(raw_project, "pretrain.context_length", 1000)
    _validated(raw_project)  # 5,145 tokens are enough in total, but not for the 10% val split
    result = run_stage(raw_project, "tokenize")
    assert_refused(raw_project, result, "the val split has 534 tokens, fewer than pretrain.context_length + 1 = 1001")


def test_late_failure_leaves_no_partial_output(raw_project: Path):
    set_param(raw_project, "tokenize.spam.val_frac", 0.0001)  # fails after pretrain files were written
    _validated(raw_project)
    result = run_stage(raw_project, "tokenize")
    assert_refused(raw_project, result, "tokenize.spam: the val split is empty")


def test_module_name_does_not_shadow_stdlib_tokenize(tmp_path: Path):
    code = "import pipeline.stages.tokenize_data, tokenize, linecache; print(tokenize.__file__); tokenize.generate_tokens"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=stage_env(None),
                            capture_output=True, text=True, check=True)
    assert "pipeline" not in result.stdout
