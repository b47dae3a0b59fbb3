"""Expected errors and how every command and stage reports them: one line, exit status 1, no traceback."""
from __future__ import annotations

import os
import re
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


# What MLflow's auth app requires of a user for the requests the pipeline makes (its permissions: READ < EDIT <
# MANAGE), for the one line that explains a 403.
_REFUSED = re.compile(r"endpoint /api/\d\.0/mlflow/(\S+) failed with error code 403")
NEEDED_PERMISSION = {
    "registered-models/alias": "EDIT on the registered model (moving an alias)",
    "model-versions/create": "EDIT on the registered model (registering a version)",
    "model-versions/set-tag": "EDIT on the registered model (tagging a version)",
    "model-versions/delete": "MANAGE on the registered model (deleting a version)",
    "registered-models/delete": "MANAGE on the registered model (deleting it)",
    "runs/create": "EDIT on the experiment (starting a run)",
}


def refusal(message: str) -> str | None:
    """The one line for an MLflow error that is the tracking server refusing this user (HTTP 403): who, what
    was refused, and the permission it needs; None for any other error."""
    found = _REFUSED.search(message)
    if found is None:
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME", "(no user)")
    server = " ".join(filter(None, ["MLflow tracking server", os.environ.get("MLFLOW_TRACKING_URI")]))
    needs = NEEDED_PERMISSION.get(found.group(1), "a permission this user lacks")
    return (f"{server} refused user {user} (HTTP 403) on {found.group(1)}: it needs {needs}; the team's admin "
            "grants roles (`llm-pipeline services add-user`)")


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
        message = refusal(str(exc)) or " ".join(str(exc).split()) or type(exc).__name__
        # One write of the whole line: print() writes the newline apart, so two processes failing at once
        # (ranks under torchrun) could join their lines into one.
        sys.stderr.write(f"{prog}: error: {message}\n")
        sys.stderr.flush()
        sys.exit(getattr(exc, "exit_status", 1))
