"""The validate stage: real data passes with the book's counts; each kind of bad row fails clearly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_stage, set_param
from pipeline.core.params import load_params
from pipeline.data.contracts import read_table, table_failures
from pipeline.stages import validate


def report(project: Path) -> dict:
    return json.loads((project / "data" / "reports" / "validate.json").read_text())


def test_read_spam_book_and_strict(mirror: Path, project: Path):
    reading = load_params(project / "params.yaml", validate.PARAMS)["datasets"]["classification"]
    book = read_table(mirror / "SMSSpamCollection", reading)
    strict = read_table(mirror / "SMSSpamCollection", {**reading, "quoting": "none"})
    assert len(book) == 5572 and book["label"].value_counts().to_dict() == {"ham": 4825, "spam": 747}
    assert len(strict) == 5574 and strict["label"].value_counts().to_dict() == {"ham": 4827, "spam": 747}
    assert table_failures(book, ["ham", "spam"]) == [] and table_failures(strict, ["ham", "spam"]) == []


def test_real_data_passes(raw_project: Path):
    result = run_stage(raw_project, "validate")
    assert result.returncode == 0, result.stderr
    rep = report(raw_project)
    assert rep["status"] == "passed"
    spam = rep["datasets"]["classification"]
    assert (spam["rows_checked"], spam["rows_failed"]) == (5572, 0)
    assert spam["classes"] == {"ham": 4825, "spam": 747}
    assert spam["duplicate_texts"] == 403
    assert rep["datasets"]["instructions"]["rows_checked"] == 1100
    corpus = rep["datasets"]["corpus"]
    assert (corpus["files"], corpus["documents"], corpus["bytes"]) == (1, 1, 1115394)
    assert rep["inputs"]["data/raw/SMSSpamCollection"] == "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"


def test_strict_spam_parsing_reads_every_line(raw_project: Path):
    set_param(raw_project, "datasets.classification.quoting", "none")
    assert run_stage(raw_project, "validate").returncode == 0
    spam = report(raw_project)["datasets"]["classification"]
    assert spam["rows_checked"] == 5574 and spam["classes"] == {"ham": 4827, "spam": 747}


def _edit_lines(path: Path, edits: dict[int, str]) -> None:
    """Replace 1-based lines of a text file."""
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, text in edits.items():
        lines[number - 1] = text
    path.write_text("\n".join(lines), encoding="utf-8")


def test_bad_spam_rows_are_reported_by_row_and_block_tokenize(raw_project: Path):
    _edit_lines(raw_project / "data/raw/SMSSpamCollection", {3: "hma\tFree entry", 5: "ham\t", 7: "spam no tab here"})
    result = run_stage(raw_project, "validate")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("validate: error: 1 dataset(s) failed: data/raw/SMSSpamCollection row 3 column "
                                    "label: isin(['ham', 'spam']) got 'hma' (+3 more)")
    rep = report(raw_project)
    assert rep["status"] == "failed" and rep["datasets"]["classification"]["rows_failed"] == 3
    failures = [(f["row"], f["column"], f["check"]) for f in rep["datasets"]["classification"]["failures"]]
    # A line without a tab is all label and no text: two failures on row 7.
    assert failures == [(3, "label", "isin(['ham', 'spam'])"), (5, "text", "not_nullable"),
                        (7, "label", "isin(['ham', 'spam'])"), (7, "text", "not_nullable")]

    refused = run_stage(raw_project, "tokenize")
    assert refused.returncode == 1
    assert refused.stderr == ("tokenize: error: data/reports/validate.json says status 'failed'; "
                              "fix the data and rerun validate\n")
    assert not (raw_project / "data" / "tokens").exists()


def _instruction_missing_key(raw: Path) -> None:
    records = json.loads((raw / "instruction-data.json").read_text())
    del records[42]["output"]
    (raw / "instruction-data.json").write_text(json.dumps(records))


def _instruction_not_a_list(raw: Path) -> None:
    (raw / "instruction-data.json").write_text(json.dumps({"data": []}))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_instruction_missing_key, "data/raw/instruction-data.json record 42 column output: missing_field got None"),
        (_instruction_not_a_list, "data/raw/instruction-data.json: top level must be a JSON list of records, got dict"),
    ],
)
def test_bad_input_fails_with_one_line(raw_project: Path, damage, message: str):
    damage(raw_project / "data" / "raw")
    result = run_stage(raw_project, "validate")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("validate: error: 1 dataset(s) failed: ")
    assert message in lines[0]
    assert report(raw_project)["status"] == "failed"
    assert [p.name for p in (raw_project / "data" / "reports").iterdir()] == ["validate.json"]
    assert not (raw_project / "data" / "metrics").exists()


def test_missing_raw_file(project: Path):
    result = run_stage(project, "validate")
    assert result.returncode == 1
    assert "data/raw/SMSSpamCollection: missing; run the download stage first" in result.stderr
