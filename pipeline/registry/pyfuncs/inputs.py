"""The request limits and input checks every served pyfunc runs on its batch before any work."""
from __future__ import annotations

import json
from typing import Sequence

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

# Sized so one request stays a few seconds of CPU work, not minutes; bigger batches go in several requests.
MAX_ROWS = 256
MAX_TEXT_CHARS = 10_000


class InvalidInput(MlflowException):
    """A bad request: the scoring server answers HTTP 400 whose body is this one message, with no stack trace."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)
        self.reason = message

    def serialize_as_json(self) -> str:
        # The scoring server prefixes `message` with the whole input batch (megabytes for an oversized
        # text) before serializing it, so the body is built from the reason alone.
        return json.dumps({"error_code": self.error_code, "message": self.reason})


def _one_row_per_item(frame: pd.DataFrame) -> pd.DataFrame:
    # MLflow turns a dict of lists, {"prompt": ["a", "b"]} (the `inputs` request form), into ONE row
    # holding the lists; the model wants a row per item.
    if len(frame) != 1 or not all(isinstance(value, list) for value in frame.iloc[0]):
        return frame
    if len({len(value) for value in frame.iloc[0]}) > 1:
        raise InvalidInput("the input columns hold lists of different lengths")
    return pd.DataFrame({column: frame.iloc[0][column] for column in frame.columns})


def check_texts(frame: pd.DataFrame, required: Sequence[str], optional: Sequence[str] = ()) -> pd.DataFrame:
    """The batch with a row per item, checked: raise InvalidInput naming the field or 1-based row unless it
    has at most MAX_ROWS rows, every `required` column holds non-blank strings and every `optional` column
    present holds strings or nulls, each at most MAX_TEXT_CHARS long."""
    frame = _one_row_per_item(frame)
    if len(frame) > MAX_ROWS:
        raise InvalidInput(f"{len(frame)} rows in one request; at most {MAX_ROWS}")
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise InvalidInput(f"missing input column {', '.join(map(repr, missing))}")
    for column in [*required, *(c for c in optional if c in frame.columns)]:
        for row, value in enumerate(frame[column], start=1):
            if value is None or isinstance(value, float) and pd.isna(value):
                if column in optional:
                    continue
                raise InvalidInput(f"row {row}: {column!r} is missing")
            if not isinstance(value, str):
                raise InvalidInput(f"row {row}: {column!r} must be a string, not {type(value).__name__}")
            if len(value) > MAX_TEXT_CHARS:
                raise InvalidInput(f"row {row}: {column!r} has {len(value)} characters; at most {MAX_TEXT_CHARS}")
            if column in required and not value.strip():
                raise InvalidInput(f"row {row}: {column!r} is empty")
    return frame
