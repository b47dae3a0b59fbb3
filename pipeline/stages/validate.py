"""Stage `validate`: check every dataset's files against their schemas; write data/reports/validate.json."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

from gpt.files import atomic_write_json, sha256_file
from gpt.tokenizer import load_tokenizer
from pipeline.core.catalog import STAGES, command_line
from pipeline.core.errors import DataError
from pipeline.core.layout import BPE_DIR
from pipeline.core.params import CONTEXT_LENGTH, DOWNLOAD_SOURCES, Int, Section, load_params
from pipeline.data import sources
from pipeline.data.contracts import class_counts, read_instructions, read_tables, summarize, table_failures
from pipeline.data.corpus import check_corpus, describe_failure

REPORT = STAGES["validate"].report
PARAMS = {
    "validate": Section(max_failures_reported=Int(low=0)),
    sources.SECTION: sources.PARAMS,
    "download.sources": DOWNLOAD_SOURCES,
    "pretrain.context_length": CONTEXT_LENGTH,
}


def length_stats(lengths: pd.Series) -> dict:
    """min/max/mean of a series of lengths (zeros when empty)."""
    if lengths.empty:
        return {"min": 0, "max": 0, "mean": 0.0}
    return {"min": int(lengths.min()), "max": int(lengths.max()), "mean": round(float(lengths.mean()), 2)}


def _texts(values: pd.Series) -> pd.Series:
    return values[values.map(lambda v: isinstance(v, str))]


def check_classification(files: list[Path], reading: dict, keep: int) -> tuple[dict, list[dict], str]:
    """Summary (rows, classes, text lengths, repeated texts), failures, and their one-line summary."""
    frame = read_tables(files, reading)
    failures = table_failures(frame, reading["labels"])
    summary = {"rows_checked": len(frame), "rows_failed": len({(f["file"], f["row"]) for f in failures}),
               "text_chars": length_stats(_texts(frame["text"]).str.len()),
               "duplicate_texts": int(_texts(frame["text"]).duplicated().sum())}
    if not failures:
        summary["classes"] = class_counts(frame, reading["labels"])
    return summary, failures[:keep], summarize(failures) if failures else ""


def check_instructions(files: list[Path], reading: dict, keep: int) -> tuple[dict, list[dict], str]:
    """Summary (records, field lengths, empty inputs), failures, and their one-line summary."""
    records, failures = read_instructions(files, reading)
    fields = pd.DataFrame(records, columns=["instruction", "input", "output"], dtype=object)
    summary = {"rows_checked": len(records) + len({(f["file"], f.get("record"), f.get("line")) for f in failures
                                                   if f["check"] in ("is_object", "missing_field")}),
               "rows_failed": len({(f["file"], f.get("record"), f.get("line")) for f in failures}),
               "text_chars": {k: length_stats(_texts(fields[k]).str.len()) for k in fields},
               "empty_input": int(fields["input"].eq("").sum())}
    return summary, failures[:keep], summarize(failures) if failures else ""


def main(params_path: Path) -> None:
    """Validate every dataset, write the report (also on failure), then fail if any check failed."""
    params = load_params(params_path, PARAMS)
    data, downloads = params[sources.SECTION], params["download.sources"]
    sources.require_tracked("validate", sources.local_deps(data, downloads))
    keep = params["validate"]["max_failures_reported"]
    min_tokens = params["pretrain.context_length"] + 1

    def corpus(files: list[Path]) -> tuple[dict, list[dict], str]:
        summary, failures = check_corpus(files, data["corpus"]["text_field"], load_tokenizer(BPE_DIR), min_tokens, keep)
        more = f" (+{summary['failures_total'] - 1} more)" if summary.get("failures_total", 0) > 1 else ""
        return summary, failures, describe_failure(failures[0]) + more if failures else ""

    checks: dict[str, Callable[[list[Path]], tuple[dict, list[dict], str]]] = {
        "corpus": corpus,
        "classification": lambda files: check_classification(files, data["classification"], keep),
        "instructions": lambda files: check_instructions(files, data["instructions"], keep),
    }
    report, inputs, problems = {}, {}, []
    for name, check in checks.items():
        try:
            files = sources.resolve(name, data[name]["sources"], downloads)
            inputs.update({str(path): sha256_file(path) for path in files})
            summary, failures, problem = check(files)
        except DataError as exc:
            report[name] = {"error": str(exc)}
            problems.append(str(exc))
            continue
        report[name] = {"files": len(files), **summary, "failures": failures}
        if problem:
            problems.append(problem)
    status = "failed" if problems else "passed"
    atomic_write_json(REPORT, {"status": status, "inputs": inputs, "datasets": report})
    if problems:
        shown = "; ".join(problems[:3])
        raise DataError(f"{len(problems)} dataset(s) failed: {shown}; see {REPORT}")
    print(f"validate: passed ({', '.join(report)}); report in {REPORT}")


if __name__ == "__main__":
    command_line("validate", main)
