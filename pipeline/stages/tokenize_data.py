"""Stage `tokenize`: corpus -> uint16 token files, spam -> balanced CSV splits, instructions -> JSON splits."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tiktoken

from gpt.data import save_tokens
from gpt.files import atomic_dir, atomic_write_json, sha256_file
from gpt.tokenizer import BPE_FILES, END_OF_TEXT_ID, load_tokenizer
from pipeline.errors import DataError
from pipeline.layout import BPE_DIR, TOKENS, raw_file
from pipeline.encoding import encode_text
from pipeline.params import CONTEXT_LENGTH, CORPUS, FILENAME, Bool, Float, Int, ParamsError, Section, load_params
from pipeline.schemas import (SPAM_PARSING, instruction_failures, read_corpus, read_instructions, read_spam,
                              require_valid, spam_failures)
from pipeline.stages import STAGES, command_line

VALIDATE_REPORT = STAGES["validate"].metrics
METRICS_FILE = STAGES["tokenize"].metrics
FRACTION = Float(0, 1, bounds="()")
PARAMS = {
    "tokenize": Section(
        corpus=CORPUS,
        train_ratio=FRACTION,
        spam=Section(seed=Int(low=0), train_frac=FRACTION, val_frac=FRACTION),
        instruct=Section(train_frac=FRACTION, test_frac=FRACTION, shuffle=Bool(), seed=Int(low=0)),
    ),
    "validate.spam_file": FILENAME,
    "validate.spam_parsing": SPAM_PARSING,
    "validate.instructions_file": FILENAME,
    "pretrain.context_length": CONTEXT_LENGTH,
}


def require_validated(filenames: list[str]) -> None:
    """Refuse to run unless validate passed on exactly the raw files about to be read."""
    try:
        report = json.loads(VALIDATE_REPORT.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{VALIDATE_REPORT} is missing; run the validate stage first") from None
    except json.JSONDecodeError:
        raise DataError(f"{VALIDATE_REPORT} is not valid JSON; rerun the validate stage") from None
    if report.get("status") != "passed":
        raise DataError(f"{VALIDATE_REPORT} says status {report.get('status')!r}; fix the data and rerun validate")
    for name in filenames:
        recorded = report.get("inputs", {}).get(name)
        if recorded is None:
            raise DataError(f"{name} is not in {VALIDATE_REPORT}; rerun the validate stage")
        if recorded != sha256_file(raw_file(name)):
            raise DataError(f"data/raw/{name} changed since validation; rerun the validate stage")


def _join_documents(parts: list[np.ndarray]) -> np.ndarray:
    pieces = []
    for i, part in enumerate(parts):
        if i:
            pieces.append(np.array([END_OF_TEXT_ID], dtype=np.uint32))
        pieces.append(part)
    return np.concatenate(pieces)


def split_corpus(enc: tiktoken.Encoding, texts: list[str], train_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Cut each document at character int(train_ratio * len) as the book does; join each
    side's pieces with <|endoftext|> into (train, val) token arrays."""
    train, val = [], []
    for text in texts:
        cut = int(train_ratio * len(text))
        train.append(encode_text(enc, text[:cut]))
        val.append(encode_text(enc, text[cut:]))
    return _join_documents(train), _join_documents(val)


def write_pretrain(out: Path, enc: tiktoken.Encoding, cfg: dict, context_length: int) -> dict:
    """Write pretrain/{train,val}.bin and meta.json; return the metrics."""
    names = cfg["corpus"]
    texts = [read_corpus(raw_file(name)) for name in names]
    start = time.perf_counter()
    train, val = split_corpus(enc, texts, cfg["train_ratio"])
    seconds = time.perf_counter() - start
    for split, tokens in (("train", train), ("val", val)):
        if len(tokens) < context_length + 1:
            raise DataError(f"tokenize.corpus: the {split} split has {len(tokens)} tokens, fewer than "
                            f"pretrain.context_length + 1 = {context_length + 1}; add text or change train_ratio")
    out.mkdir()
    save_tokens(train, out / "train.bin")
    save_tokens(val, out / "val.bin")
    meta = {
        "dtype": "uint16",
        "tokenizer": {"name": "gpt2", **BPE_FILES},
        "end_of_text_id": END_OF_TEXT_ID,
        "train_ratio": cfg["train_ratio"],
        "sources": [{"file": n, "sha256": sha256_file(raw_file(n)), "chars": len(t)} for n, t in zip(names, texts)],
        "train_tokens": len(train),
        "val_tokens": len(val),
    }
    atomic_write_json(out / "meta.json", meta)
    return {"documents": len(names), "train_tokens": len(train), "val_tokens": len(val),
            "encode_seconds": round(seconds, 4),
            "tokens_per_s": round((len(train) + len(val)) / max(seconds, 1e-9))}


def split_spam(frame: pd.DataFrame, seed: int, train_frac: float, val_frac: float) -> dict[str, pd.DataFrame]:
    """The book's balanced split: undersample ham to the spam count, shuffle, cut train/val/test."""
    spam = frame[frame["label"] == "spam"]
    ham = frame[frame["label"] == "ham"]
    if len(ham) < len(spam) or spam.empty:
        raise DataError(f"spam table has {len(ham)} ham and {len(spam)} spam rows; cannot balance")
    balanced = pd.concat([ham.sample(len(spam), random_state=seed), spam])
    balanced = balanced.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(balanced) * train_frac)
    val_end = train_end + int(len(balanced) * val_frac)
    return {"train": balanced[:train_end], "val": balanced[train_end:val_end], "test": balanced[val_end:]}


def write_spam(out: Path, enc: tiktoken.Encoding, cfg: dict, filename: str, parsing: str) -> dict:
    """Write spam/{train,val,test}.csv (label,text); return sizes and token-length stats."""
    frame = read_spam(raw_file(filename), parsing)
    require_valid(filename, spam_failures(frame))
    out.mkdir()
    metrics = {}
    for split, part in split_spam(frame, cfg["seed"], cfg["train_frac"], cfg["val_frac"]).items():
        if part.empty:
            raise DataError(f"tokenize.spam: the {split} split is empty; change train_frac/val_frac")
        part.to_csv(out / f"{split}.csv", index=False)
        lengths = np.array([len(ids) for ids in enc.encode_ordinary_batch(part["text"].tolist())])
        metrics[split] = {"rows": len(part), "spam": int((part["label"] == "spam").sum()),
                          "tokens_max": int(lengths.max()), "tokens_mean": round(float(lengths.mean()), 2),
                          "tokens_p95": round(float(np.percentile(lengths, 95)), 2)}
    return metrics


def split_instructions(records: list, cfg: dict) -> dict[str, list]:
    """The book's split, in file order unless shuffle: train first, then test, val the rest."""
    if cfg["shuffle"]:
        records = random.Random(cfg["seed"]).sample(records, len(records))
    train_end = int(len(records) * cfg["train_frac"])
    test_end = train_end + int(len(records) * cfg["test_frac"])
    return {"train": records[:train_end], "test": records[train_end:test_end], "val": records[test_end:]}


def write_instructions(out: Path, cfg: dict, filename: str) -> dict:
    """Write instruct/{train,test,val}.json; return the split sizes."""
    records = read_instructions(raw_file(filename))
    require_valid(filename, instruction_failures(records))
    out.mkdir()
    sizes = {}
    for split, part in split_instructions(records, cfg).items():
        if not part:
            raise DataError(f"tokenize.instruct: the {split} split is empty; change train_frac/test_frac")
        (out / f"{split}.json").write_text(json.dumps(part, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        sizes[split] = len(part)
    return sizes


def _check_fractions(params: dict, origin: str) -> None:
    for key, (a, b) in {"tokenize.spam": ("train_frac", "val_frac"),
                        "tokenize.instruct": ("train_frac", "test_frac")}.items():
        section = params["tokenize"][key.split(".")[1]]
        if section[a] + section[b] >= 1:
            raise ParamsError(f"{origin}: {key}.{a} + {key}.{b} must be < 1 (the last split needs rows), "
                              f"got {section[a] + section[b]:g}")


def main(params_path: Path) -> None:
    """Build data/tokens/ (all or nothing) and data/metrics/tokenize.json."""
    params = load_params(params_path, PARAMS)
    _check_fractions(params, params_path.name)
    cfg = params["tokenize"]
    spam_file, instructions_file = params["validate.spam_file"], params["validate.instructions_file"]
    require_validated([*cfg["corpus"], spam_file, instructions_file])
    enc = load_tokenizer(BPE_DIR)
    with atomic_dir(TOKENS) as staging:
        metrics = {
            "pretrain": write_pretrain(staging / "pretrain", enc, cfg, params["pretrain.context_length"]),
            "spam": write_spam(staging / "spam", enc, cfg["spam"], spam_file, params["validate.spam_parsing"]),
            "instruct": write_instructions(staging / "instruct", cfg["instruct"], instructions_file),
        }
    atomic_write_json(METRICS_FILE, metrics)
    print(f"tokenize: {metrics['pretrain']['train_tokens']} train / {metrics['pretrain']['val_tokens']} val "
          f"tokens at {metrics['pretrain']['tokens_per_s']:,} tokens/s; outputs in {TOKENS}")


if __name__ == "__main__":
    command_line("tokenize", main)
