"""Schemas and readers of the labelled tables and instruction records (the corpus is pipeline.data.corpus's).

Failures are dicts {file, row|record|line, column, check, value}: a table's `row` is 1-based among
its data rows (its line number in a headerless file without multi-line quotes, one more with a
header), a .jsonl file's `line` is 1-based, a .json list's `record` is the 0-based index.
"""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pandera.pandas as pa

from pipeline.core.errors import DataError

TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl"}
INSTRUCTION_KEYS = ("instruction", "input", "output")
WHERE_KEYS = ("row", "record", "line")

# ASCII control characters (NUL, ESC, DEL, ...) are not text: a binary file, or a field that went wrong.
# Tab, newline and carriage return are text (a quoted CSV field may hold them), and so are U+0080-U+009F:
# Windows-1252 quotes read as Latin-1, which the SMS table holds ('\x92' for an apostrophe).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SHOWN = 120  # characters of a failing value a failure shows

_is_string = pa.Check(lambda s: s.map(lambda v: isinstance(v, str)), name="is_string")
_non_blank = pa.Check(lambda s: s.map(lambda v: isinstance(v, str) and v.strip() != ""), name="non_empty")
_no_control = pa.Check(lambda s: s.map(lambda v: not (isinstance(v, str) and _CONTROL.search(v))),
                       name="no_control_characters")


INSTRUCTION_SCHEMA = pa.DataFrameSchema(
    {
        "instruction": pa.Column(None, [_is_string, _non_blank, _no_control]),
        "input": pa.Column(None, [_is_string, _no_control]),
        "output": pa.Column(None, [_is_string, _non_blank, _no_control]),
    },
    strict=False,
)


def _json_safe(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (int, float, bool)):
        return value
    text = str(value)
    control = _CONTROL.search(text)
    # A long text is shown from a little before its first control character, so the failure shows it.
    start = max(0, control.start() - 20) if control and control.start() >= _SHOWN else 0
    return ("…" if start else "") + text[start : start + _SHOWN]


def _schema_failures(schema: pa.DataFrameSchema, frame: pd.DataFrame, where: str) -> list[dict]:
    """Run the schema lazily; each pandera failure case as a dict located by the frame's file and `where` columns."""
    try:
        schema.validate(frame, lazy=True)
    except pa.errors.SchemaErrors as exc:
        return [{"file": None if pd.isna(case["index"]) else frame["file"].iloc[int(case["index"])],
                 where: None if pd.isna(case["index"]) else int(frame[where].iloc[int(case["index"])]),
                 "column": case["column"], "check": str(case["check"]), "value": _json_safe(case["failure_case"])}
                for case in exc.failure_cases.sort_values("index", na_position="first").to_dict("records")]
    return []


def describe(failure: dict) -> str:
    """One failure as a short phrase, e.g. `labels.csv row 3 column label: non_empty got None`."""
    where = " ".join(str(failure[k]) if k == "file" else f"{k} {failure[k]}"
                     for k in ("file", *WHERE_KEYS, "column") if failure.get(k) is not None)
    return f"{where}: {failure['check']} got {failure['value']!r}"


def _table_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(f"{path}: cannot tell the table format from the suffix {suffix or '(none)'}; use "
                        f"{', '.join(TABLE_SUFFIXES)} or set datasets.classification.format")
    return TABLE_SUFFIXES[suffix]


def _read_delimited(path: Path, sep: str, cfg: dict) -> pd.DataFrame:
    """A csv/tsv table as strings. "book" quoting is pandas' default, the way the book reads the SMS
    table (two messages containing `"` swallow the lines after them: 5,572 rows); "none" makes every
    line a row (5,574). Only empty fields become missing, so a message such as "NA" stays text."""
    quoting = csv.QUOTE_NONE if cfg["quoting"] == "none" else csv.QUOTE_MINIMAL
    columns = cfg["columns"]
    try:
        return pd.read_csv(path, sep=sep, header=None if columns else 0, names=columns, quoting=quoting,
                           dtype=str, keep_default_na=False, na_values=[""], encoding="utf-8")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        detail = " ".join(str(exc).replace("Error tokenizing data. C error:", "").split())
        raise DataError(f"{path}: {detail}") from None


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSON Lines file."""
    try:
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    try:
                        yield number, json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path} line {number}: invalid JSON: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 at byte offset {exc.start}") from None


def _read_jsonl_table(path: Path) -> pd.DataFrame:
    rows, lines = [], []
    for number, value in _json_lines(path):
        if not isinstance(value, dict):
            raise DataError(f"{path} line {number}: a record must be a JSON object, got {type(value).__name__}")
        rows.append(value)
        lines.append(number)
    frame = pd.DataFrame(rows, dtype=object)
    frame.index = pd.Index(lines)
    return frame


def read_table(path: Path, cfg: dict) -> pd.DataFrame:
    """One labelled table as columns label, text (values as read), file and row (see the module doc)."""
    fmt = _table_format(path, cfg["format"])
    if fmt == "jsonl":
        frame = _read_jsonl_table(path)
        rows = list(frame.index)
    else:
        frame = _read_delimited(path, "," if fmt == "csv" else "\t", cfg)
        rows = list(range(1, len(frame) + 1))
    for role in ("label_column", "text_column"):
        if cfg[role] not in frame.columns:
            have = ", ".join(map(str, frame.columns)) or "none"
            raise DataError(f"{path}: no column {cfg[role]!r} (datasets.classification.{role}); columns: {have}")
    labels = frame[cfg["label_column"]]
    return pd.DataFrame({
        # Integer labels (0, 1, 2) are names too; other non-strings are reported by the schema.
        "label": [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in labels],
        "text": list(frame[cfg["text_column"]]),
        "file": str(path),
        "row": rows,
    }, dtype=object)


def read_tables(files: list[Path], cfg: dict) -> pd.DataFrame:
    """Every table of the classification dataset, in order, as one frame (see read_table)."""
    return pd.concat([read_table(path, cfg) for path in files], ignore_index=True)


def table_failures(frame: pd.DataFrame, labels: list[str] | None) -> list[dict]:
    """Row-level failures: a missing, empty or non-text label or text, a control character in either (tab,
    newline and carriage return are text), or a label not in `labels` (if given)."""
    label_checks = [_is_string, _non_blank, _no_control, *([pa.Check.isin(labels)] if labels else [])]
    schema = pa.DataFrameSchema(
        {"label": pa.Column(None, label_checks), "text": pa.Column(None, [_is_string, _non_blank, _no_control])},
        strict=False,  # the provenance columns (file, row) ride along unchecked
    )
    clean = frame.map(lambda v: None if isinstance(v, float) and math.isnan(v) else v)
    return _schema_failures(schema, clean, "row")


def class_counts(frame: pd.DataFrame, labels: list[str] | None) -> dict[str, int]:
    """Rows per class in class-index order (`labels` as given, else the label values sorted). Fewer than
    two classes, or a given label without rows, is an error naming the files."""
    counts = frame["label"].value_counts()
    names = labels or sorted(counts.index)
    files = ", ".join(dict.fromkeys(frame["file"]))
    if len(names) < 2:
        raise DataError(f"{files}: {len(names)} class(es) ({', '.join(map(repr, names))}) in the label column; "
                        "a classifier needs 2 or more")
    empty = [name for name in names if not counts.get(name, 0)]
    if empty:
        raise DataError(f"{files}: no rows of class {empty[0]!r} (datasets.classification.labels)")
    return {name: int(counts[name]) for name in names}


def _instruction_records(path: Path) -> Iterator[tuple[str, int, Any]]:
    """(where key, number, record) of a .json list or a .jsonl file."""
    if path.suffix.lower() == ".jsonl":
        yield from (("line", number, value) for number, value in _json_lines(path))
        return
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 at byte offset {exc.start}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: top level must be a JSON list of records, got {type(records).__name__}")
    yield from (("record", index, value) for index, value in enumerate(records))


def read_instructions(files: list[Path], cfg: dict) -> tuple[list[dict], list[dict]]:
    """(records as {instruction, input, output}, failures) of every instruction file, read with the
    configured field names; a record without the input field has input ""; other fields are ignored.
    A file without records is an error (DataError), not a failure of a record."""
    fields = {key: cfg[f"{key}_field"] for key in INSTRUCTION_KEYS}
    rows, failures = [], []
    for path in files:
        entries = list(_instruction_records(path))
        if not entries:
            raise DataError(f"{path}: no records; an instruction file needs at least one")
        for where, number, record in entries:
            place = {"file": str(path), where: number}
            if not isinstance(record, dict):
                failures.append({**place, "column": None, "check": "is_object", "value": type(record).__name__})
                continue
            missing = [fields[k] for k in ("instruction", "output") if fields[k] not in record]
            failures += [{**place, "column": name, "check": "missing_field", "value": None} for name in missing]
            if not missing:
                rows.append({**place, **{k: record.get(fields[k], "") for k in INSTRUCTION_KEYS}})
    frame = pd.DataFrame(rows, columns=["file", "record", "line", *INSTRUCTION_KEYS], dtype=object)
    for where in ("record", "line"):
        located = frame[frame[where].notna()].reset_index(drop=True)
        failures += [{**f, "column": fields.get(f["column"], f["column"])}
                     for f in _schema_failures(INSTRUCTION_SCHEMA, located, where)]
    records = [{k: row[k] for k in INSTRUCTION_KEYS} for row in rows]
    return records, failures


def summarize(failures: list[dict]) -> str:
    """The first failure and how many more there are, in one line."""
    more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
    return f"{describe(failures[0])}{more}"


def require_valid(failures: list[dict]) -> None:
    """Raise DataError summarizing the failures, if any."""
    if failures:
        raise DataError(summarize(failures))
