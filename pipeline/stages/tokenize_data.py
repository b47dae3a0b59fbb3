"""Stage `tokenize`: corpus -> uint16 token files, labelled table -> class-balanced CSV splits, instructions -> JSON splits."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import tiktoken

from gpt.files import atomic_dir, atomic_write_json, sha256_file
from gpt.tokenizer import BPE_FILES, END_OF_TEXT_ID, load_tokenizer
from pipeline.core.catalog import STAGES, command_line
from pipeline.core.errors import DataError
from pipeline.core.layout import (BPE_DIR, CLASSES_JSON, CLASSIFICATION_TOKENS, INSTRUCTION_TOKENS, PRETRAIN_TOKENS,
                                  TOKENS)
from pipeline.core.params import (CONTEXT_LENGTH, DOWNLOAD_SOURCES, Bool, Float, Int, ParamsError, Section, Str,
                                  load_params)
from pipeline.data import sources
from pipeline.data.contracts import class_counts, read_instructions, read_tables, require_valid, table_failures
from pipeline.data.corpus import write_corpus_tokens

VALIDATE_REPORT = STAGES["validate"].report
REPORT = STAGES["tokenize"].report
BALANCES = ("none", "undersample", "class_weight")
FRACTION = Float(0, 1, bounds="()")
PARAMS = {
    "tokenize": Section(
        corpus=Section(train_ratio=FRACTION, split=Str(choices=("cut", "document"))),
        classification=Section(balance=Str(choices=BALANCES), stratify=Bool(), duplicates=Str(choices=("keep", "drop")),
                               seed=Int(low=0), train_frac=FRACTION, val_frac=FRACTION),
        instructions=Section(train_frac=FRACTION, test_frac=FRACTION, shuffle=Bool(), seed=Int(low=0)),
    ),
    sources.SECTION: sources.PARAMS,
    "download.sources": DOWNLOAD_SOURCES,
    "pretrain.context_length": CONTEXT_LENGTH,
}


def require_validated(files: list[Path]) -> dict[Path, str]:
    """Refuse to run unless validate passed on exactly the files about to be read; return their sha256."""
    try:
        report = json.loads(VALIDATE_REPORT.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{VALIDATE_REPORT} is missing; run the validate stage first") from None
    except json.JSONDecodeError:
        raise DataError(f"{VALIDATE_REPORT} is not valid JSON; rerun the validate stage") from None
    if report.get("status") != "passed":
        raise DataError(f"{VALIDATE_REPORT} says status {report.get('status')!r}; fix the data and rerun validate")
    hashes = {}
    for path in files:
        recorded = report.get("inputs", {}).get(str(path))
        if recorded is None:
            raise DataError(f"{path} is not in {VALIDATE_REPORT}; rerun the validate stage")
        if recorded != sha256_file(path):
            raise DataError(f"{path} changed since validation; rerun the validate stage")
        hashes[path] = recorded
    return hashes


def write_pretrain(out: Path, enc: tiktoken.Encoding, files: dict[Path, str], text_field: str, cfg: dict,
                   context_length: int) -> dict:
    """Write pretrain/{train,val}.bin and meta.json from `files` ({path: sha256}), streaming; return the statistics."""
    out.mkdir()
    stats = write_corpus_tokens(list(files), text_field, enc, cfg["train_ratio"], cfg["split"], out / "train.bin",
                                out / "val.bin")
    for split in ("train", "val"):
        if stats[f"{split}_tokens"] < context_length + 1:
            raise DataError(f"tokenize.corpus: the {split} split has {stats[f'{split}_tokens']} tokens, fewer than "
                            f"pretrain.context_length + 1 = {context_length + 1}; add text or change train_ratio")
    atomic_write_json(out / "meta.json", {
        "dtype": "uint16", "tokenizer": {"name": "gpt2", **BPE_FILES}, "end_of_text_id": END_OF_TEXT_ID, **cfg,
        "sources": [{"file": str(path), "sha256": digest} for path, digest in files.items()],
        "train_tokens": stats["train_tokens"], "val_tokens": stats["val_tokens"]})
    return stats


def balance_rows(frame: pd.DataFrame, balance: str, seed: int) -> pd.DataFrame:
    """With undersample, every class cut to the smallest one's size by a seeded sample (the book's
    chapter 6, which samples ham down to the spam count); the classes then follow in label order."""
    if balance != "undersample":
        return frame
    smallest = frame["label"].value_counts().min()
    parts = [part.sample(smallest, random_state=seed) if len(part) > smallest else part
             for _, part in frame.groupby("label", sort=True)]
    return pd.concat(parts)


def split_table(frame: pd.DataFrame, cfg: dict) -> dict[str, pd.DataFrame]:
    """train/val/test, seeded. Unstratified: shuffle all rows, then cut (the book). Stratified: cut each
    label's shuffled rows at the same fractions, so every split keeps the label proportions."""
    shuffled = frame.sample(frac=1, random_state=cfg["seed"]).reset_index(drop=True)
    groups = [part for _, part in shuffled.groupby("label", sort=True)] if cfg["stratify"] else [shuffled]
    splits: dict[str, list[pd.DataFrame]] = {"train": [], "val": [], "test": []}
    for group in groups:
        train_end = int(len(group) * cfg["train_frac"])
        val_end = train_end + int(len(group) * cfg["val_frac"])
        for name, part in zip(splits, (group[:train_end], group[train_end:val_end], group[val_end:])):
            splits[name].append(part)
    # Stratified parts are shuffled again so a split's rows do not come class by class.
    return {name: pd.concat(parts).sample(frac=1, random_state=cfg["seed"]) if cfg["stratify"] else parts[0]
            for name, parts in splits.items()}


def write_classification(out: Path, enc: tiktoken.Encoding, files: list[Path], reading: dict, cfg: dict) -> dict:
    """Write classification/{train,val,test}.csv (label,text) and classes.json; return sizes and length stats."""
    frame = read_tables(files, reading)
    require_valid(table_failures(frame, reading["labels"]))
    labels = list(class_counts(frame, reading["labels"]))
    if cfg["duplicates"] == "drop":
        frame = frame.drop_duplicates(subset="text").reset_index(drop=True)
    splits = split_table(balance_rows(frame, cfg["balance"], cfg["seed"]), cfg)
    out.mkdir()
    metrics: dict = {"classes": len(labels)}
    for split, part in splits.items():
        if part.empty:
            raise DataError(f"tokenize.classification: the {split} split is empty; change train_frac/val_frac")
        part[["label", "text"]].to_csv(out / f"{split}.csv", index=False)
        lengths = np.array([len(ids) for ids in enc.encode_ordinary_batch(part["text"].tolist())])
        metrics[split] = {"rows": len(part), "per_class": {label: int((part["label"] == label).sum()) for label in labels},
                          "tokens_max": int(lengths.max()), "tokens_mean": round(float(lengths.mean()), 2),
                          "tokens_p95": round(float(np.percentile(lengths, 95)), 2)}
    train_counts = metrics["train"]["per_class"]
    missing = [label for label in labels if not train_counts[label]]
    if missing:
        raise DataError(f"tokenize.classification: no training rows of class {missing[0]!r}; add rows or set "
                        "tokenize.classification.stratify: true")
    # Inverse frequency, scaled so that a balanced train split gets weight 1 for every class.
    weights = ([len(splits["train"]) / (len(labels) * train_counts[label]) for label in labels]
               if cfg["balance"] == "class_weight" else None)
    atomic_write_json(out / CLASSES_JSON.name, {"labels": labels, "balance": cfg["balance"], "class_weights": weights})
    return metrics


def split_instructions(records: list, cfg: dict) -> dict[str, list]:
    """The book's split, in file order unless shuffle: train first, then test, val the rest."""
    if cfg["shuffle"]:
        records = random.Random(cfg["seed"]).sample(records, len(records))
    train_end = int(len(records) * cfg["train_frac"])
    test_end = train_end + int(len(records) * cfg["test_frac"])
    return {"train": records[:train_end], "test": records[train_end:test_end], "val": records[test_end:]}


def write_instructions(out: Path, files: list[Path], reading: dict, cfg: dict) -> dict:
    """Write instructions/{train,test,val}.json as {instruction, input, output} records; return the split sizes."""
    records, failures = read_instructions(files, reading)
    require_valid(failures)
    out.mkdir()
    sizes = {}
    for split, part in split_instructions(records, cfg).items():
        if not part:
            raise DataError(f"tokenize.instructions: the {split} split is empty; change train_frac/test_frac")
        (out / f"{split}.json").write_text(json.dumps(part, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        sizes[split] = len(part)
    return sizes


def _check_fractions(params: dict, origin: str) -> None:
    for key, (a, b) in {"classification": ("train_frac", "val_frac"), "instructions": ("train_frac", "test_frac")}.items():
        section = params["tokenize"][key]
        if section[a] + section[b] >= 1:
            raise ParamsError(f"{origin}: tokenize.{key}.{a} + tokenize.{key}.{b} must be < 1 (the last split "
                              f"needs rows), got {section[a] + section[b]:g}")


def main(params_path: Path) -> None:
    """Build data/tokens/ (all or nothing) and data/reports/tokenize.json."""
    params = load_params(params_path, PARAMS)
    _check_fractions(params, params_path.name)
    cfg, data = params["tokenize"], params[sources.SECTION]
    sources.require_tracked("tokenize", sources.local_deps(data, params["download.sources"]))
    files = {name: sources.resolve(name, data[name]["sources"], params["download.sources"]) for name in sources.NAMES}
    hashes = require_validated([path for paths in files.values() for path in paths])
    enc = load_tokenizer(BPE_DIR)
    with atomic_dir(TOKENS) as staging:
        def inside(folder: Path) -> Path:
            return staging / folder.relative_to(TOKENS)

        report = {
            "corpus": write_pretrain(inside(PRETRAIN_TOKENS), enc, {path: hashes[path] for path in files["corpus"]},
                                     data["corpus"]["text_field"], cfg["corpus"], params["pretrain.context_length"]),
            "classification": write_classification(inside(CLASSIFICATION_TOKENS), enc, files["classification"],
                                                   data["classification"], cfg["classification"]),
            "instructions": write_instructions(inside(INSTRUCTION_TOKENS), files["instructions"],
                                               data["instructions"], cfg["instructions"]),
        }
    atomic_write_json(REPORT, report)
    corpus = report["corpus"]
    print(f"tokenize: {corpus['train_tokens']} train / {corpus['val_tokens']} val tokens at "
          f"{corpus['mb_per_s']:.1f} MB/s; outputs in {TOKENS}")


if __name__ == "__main__":
    command_line("tokenize", main)
