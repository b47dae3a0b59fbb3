"""Expected errors and how every command and stage reports them: one line, exit status 1, no traceback."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from gpt.errors import GPTError


class DataError(ValueError):
    """An input file breaks its schema or cannot be used (names the file and row)."""


# ValueError covers ParamsError, DataError and the value checks of gpt/; OSError covers I/O, downloads
# (pipeline.data.fetch.FetchError) and the tracking server; GPTError the gpt package's own (tokenizer,
# checkpoints, training). Anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (GPTError, ValueError, OSError)
# The exit status of an error whose exception says `exit_status = TEMPORARY_FAILURE` (sysexits' EX_TEMPFAIL):
# a network failure, which a later try may not meet. The flows retry a stage only for it.
TEMPORARY_FAILURE = 75


@contextmanager
def reporting_errors(prog: str, *also: type[BaseException]) -> Iterator[None]:
    """Turn an expected error from the block (EXPECTED_ERRORS, MLflow's, or `also`) into one line
    `<prog>: error: <message>` on stderr and exit status 1 (or the exception's `exit_status`), without a
    traceback; anything else is a bug and keeps its traceback."""
    try:
        yield
    except Exception as exc:
        # MLflow is checked without importing it: commands that never loaded it cannot raise its errors.
        mlflow_errors = sys.modules.get("mlflow.exceptions")
        if not (isinstance(exc, (*EXPECTED_ERRORS, *also))
                or (mlflow_errors is not None and isinstance(exc, mlflow_errors.MlflowException))):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        # One write of the whole line: print() writes the newline apart, so two processes failing at once
        # (ranks under torchrun) could join their lines into one.
        sys.stderr.write(f"{prog}: error: {message}\n")
        sys.stderr.flush()
        sys.exit(getattr(exc, "exit_status", 1))
