"""Stage `validate`: check the raw datasets against their schemas; write data/metrics/validate.json."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

from gpt.files import atomic_write_json, sha256_file
from gpt.tokenizer import load_tokenizer
from pipeline.encoding import encode_text
from pipeline.errors import DataError
from pipeline.layout import BPE_DIR, raw_file
from pipeline.params import CONTEXT_LENGTH, CORPUS, FILENAME, Int, Section, load_params
from pipeline.schemas import (SPAM_LABELS, SPAM_PARSING, check_corpus_tokens, instruction_failures, read_corpus,
                              read_instructions, read_spam, spam_failures, summarize)
from pipeline.stages import STAGES, command_line

REPORT = STAGES["validate"].metrics

PARAMS = {
    "validate": Section(
        spam_file=FILENAME,
        spam_parsing=SPAM_PARSING,
        instructions_file=FILENAME,
        max_failures_reported=Int(low=0),
    ),
    "tokenize.corpus": CORPUS,
    "pretrain.context_length": CONTEXT_LENGTH,
}


def length_stats(lengths: pd.Series) -> dict:
    """min/max/mean of a series of lengths (zeros when empty)."""
    if lengths.empty:
        return {"min": 0, "max": 0, "mean": 0.0}
    return {"min": int(lengths.min()), "max": int(lengths.max()), "mean": round(float(lengths.mean()), 2)}


def _rows_failed(failures: list[dict], key: str) -> int:
    return len({f[key] for f in failures})


def check_spam(path: Path, parsing: str) -> tuple[dict, list[dict]]:
    """Summary (rows, class balance, text lengths) and row failures of the spam table."""
    frame = read_spam(path, parsing)
    failures = spam_failures(frame)
    counts = frame["label"].value_counts()
    return {
        "parsing": parsing,
        "rows_checked": len(frame),
        "rows_failed": _rows_failed(failures, "row"),
        "class_balance": {label: int(counts.get(label, 0)) for label in SPAM_LABELS},
        "text_chars": length_stats(frame["text"].dropna().str.len()),
    }, failures


def check_instructions(path: Path) -> tuple[dict, list[dict]]:
    """Summary (records, field lengths) and per-record failures of the instruction data."""
    records = read_instructions(path)
    failures = instruction_failures(records)
    fields = pd.DataFrame([r for r in records if isinstance(r, dict)])
    return {
        "rows_checked": len(records),
        "rows_failed": _rows_failed(failures, "record"),
        "text_chars": {k: length_stats(fields[k].dropna().astype(str).str.len())
                       for k in ("instruction", "input", "output") if k in fields},
        "empty_input": int(fields["input"].eq("").sum()) if "input" in fields else 0,
    }, failures


def check_corpus(path: Path, context_length: int) -> tuple[dict, list[dict]]:
    """Summary of a text corpus; raises DataError if it is not UTF-8 or shorter than one window."""
    text = read_corpus(path)
    tokens = len(encode_text(load_tokenizer(BPE_DIR), text))
    check_corpus_tokens(path.name, tokens, context_length)
    return {"rows_checked": 1, "rows_failed": 0, "chars": len(text), "lines": text.count("\n"),
            "tokens": tokens}, []


def main(params_path: Path) -> None:
    """Validate every dataset, write the report (also on failure), then fail if any check failed."""
    params = load_params(params_path, PARAMS)
    cfg = params["validate"]
    checks: dict[str, tuple[str, Callable[[Path], tuple[dict, list[dict]]]]] = {
        "spam": (cfg["spam_file"], lambda p: check_spam(p, cfg["spam_parsing"])),
        "instructions": (cfg["instructions_file"], check_instructions),
    }
    for name in params["tokenize.corpus"]:
        checks[f"corpus:{name}"] = (name, lambda p: check_corpus(p, params["pretrain.context_length"]))
    datasets, inputs, problems = {}, {}, []
    for dataset, (filename, check) in checks.items():
        try:
            path = raw_file(filename)
            inputs[filename] = sha256_file(path)
            summary, failures = check(path)
        except DataError as exc:
            datasets[dataset] = {"file": filename, "error": str(exc)}
            problems.append(str(exc))
            continue
        datasets[dataset] = {"file": filename, **summary, "failures": failures[: cfg["max_failures_reported"]]}
        if failures:
            problems.append(summarize(filename, failures))
    status = "failed" if problems else "passed"
    atomic_write_json(REPORT, {"status": status, "inputs": inputs, "datasets": datasets})
    if problems:
        shown = "; ".join(problems[:3])
        raise DataError(f"{len(problems)} dataset(s) failed: {shown}; see {REPORT}")
    print(f"validate: passed ({', '.join(datasets)}); report in {REPORT}")


if __name__ == "__main__":
    command_line("validate", main)
