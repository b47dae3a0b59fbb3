"""Schemas and readers for the raw datasets: SMS spam table, instruction records, text corpora.

Failures are reported as dicts {row|record, column, check, value}: spam `row` is 1-based in
the parsed table (equal to the line number unless a quoted message spans lines), instruction
`record` is the 0-based index into the JSON list.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pandera.pandas as pa

from pipeline.errors import DataError
from pipeline.params import Str

SPAM_LABELS = ("ham", "spam")
SPAM_PARSING = Str(choices=("book", "strict"))
INSTRUCTION_KEYS = ("instruction", "input", "output")

_is_string = pa.Check(lambda s: s.map(lambda v: isinstance(v, str)), name="is_string")
_non_blank = pa.Check(lambda s: s.map(lambda v: isinstance(v, str) and v.strip() != ""), name="non_empty")

SPAM_SCHEMA = pa.DataFrameSchema(
    {
        "label": pa.Column(str, pa.Check.isin(SPAM_LABELS)),
        "text": pa.Column(str, _non_blank),
    },
    strict=True,
    ordered=True,
)

INSTRUCTION_SCHEMA = pa.DataFrameSchema(
    {
        "instruction": pa.Column(object, [_is_string, _non_blank]),
        "input": pa.Column(object, _is_string),
        "output": pa.Column(object, [_is_string, _non_blank]),
    },
    strict=True,
    ordered=True,
)


def _json_safe(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value if isinstance(value, (int, float, bool)) else str(value)[:120]


def _schema_failures(schema: pa.DataFrameSchema, frame: pd.DataFrame, row_key: str, row_offset: int) -> list[dict]:
    """Run the schema lazily and turn pandera's failure cases into row-level dicts."""
    try:
        schema.validate(frame, lazy=True)
    except pa.errors.SchemaErrors as exc:
        cases = exc.failure_cases
        return [
            {
                row_key: None if pd.isna(case["index"]) else int(case["index"]) + row_offset,
                "column": case["column"],
                "check": str(case["check"]),
                "value": _json_safe(case["failure_case"]),
            }
            for case in cases.sort_values("index", na_position="first").to_dict("records")
        ]
    return []


def describe(failure: dict) -> str:
    """One failure as a short phrase, e.g. `row 3 label: isin(['ham', 'spam']) got 'hma'`."""
    where = " ".join(f"{k} {failure[k]}" for k in ("row", "record", "column") if failure.get(k) is not None)
    return f"{where}: {failure['check']} got {failure['value']!r}"


def read_spam(path: Path, parsing: str = "book") -> pd.DataFrame:
    """The SMS spam table (label, text) as read by validate and tokenize alike.

    "book" reads it the way the book does, pandas' read_csv(sep="\\t", header=None) with
    default quoting: two messages containing `"` swallow the lines after them, giving 5,572
    rows (4,825 ham / 747 spam) that the book's numbers depend on. "strict" turns quoting off
    (csv.QUOTE_NONE) and reads every one of the 5,574 lines. Only empty fields become missing,
    so a message such as "NA" stays text. Rows are not checked here: see `spam_failures`.
    """
    quoting = csv.QUOTE_NONE if parsing == "strict" else csv.QUOTE_MINIMAL
    try:
        return pd.read_csv(path, sep="\t", header=None, names=["label", "text"], quoting=quoting,
                           dtype=str, keep_default_na=False, na_values=[""], encoding="utf-8")
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        detail = " ".join(str(exc).replace("Error tokenizing data. C error:", "").split())
        raise DataError(f"{path.name}: {detail}") from None


def spam_failures(frame: pd.DataFrame) -> list[dict]:
    """Row-level failures of the spam table: unknown label, missing (no tab) or empty text."""
    return _schema_failures(SPAM_SCHEMA, frame, "row", 1)


def read_instructions(path: Path) -> list:
    """The instruction records as parsed JSON; the top level must be a list."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path.name}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path.name}: not valid UTF-8 at byte offset {exc.start}") from None
    if not isinstance(records, list):
        raise DataError(f"{path.name}: top level must be a JSON list of records, got {type(records).__name__}")
    return records


def instruction_failures(records: list) -> list[dict]:
    """Per-record failures: not an object, missing/extra keys, non-string or empty fields."""
    failures, clean = [], {}
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            failures.append({"record": index, "column": None, "check": "is_object", "value": type(record).__name__})
            continue
        keys = set(record)
        failures += [{"record": index, "column": k, "check": "missing_key", "value": None}
                     for k in INSTRUCTION_KEYS if k not in keys]
        failures += [{"record": index, "column": k, "check": "unexpected_key", "value": None}
                     for k in sorted(keys - set(INSTRUCTION_KEYS))]
        if keys == set(INSTRUCTION_KEYS):
            clean[index] = record
    frame = pd.DataFrame.from_dict(clean, orient="index", columns=list(INSTRUCTION_KEYS), dtype=object)
    failures += _schema_failures(INSTRUCTION_SCHEMA, frame, "record", 0)
    return sorted(failures, key=lambda f: f["record"])


def read_corpus(path: Path) -> str:
    """A text corpus decoded as strict UTF-8; an invalid byte is reported with its offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path.name}: not valid UTF-8 at byte offset {exc.start} ({exc.reason})") from None


def check_corpus_tokens(name: str, n_tokens: int, context_length: int) -> None:
    """A corpus must fill at least one training window plus its shifted target."""
    if n_tokens < context_length + 1:
        raise DataError(f"{name}: {n_tokens} tokens, fewer than pretrain.context_length + 1 = {context_length + 1}")


def summarize(name: str, failures: list[dict]) -> str:
    """The first failure of file `name` and how many more there are, in one line."""
    more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
    return f"{name} {describe(failures[0])}{more}"


def require_valid(name: str, failures: list[dict]) -> None:
    """Raise DataError summarizing the failures of file `name`, if any."""
    if failures:
        raise DataError(summarize(name, failures))
