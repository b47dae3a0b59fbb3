"""Errors the gpt package raises for bad input or state (not for bugs); callers may report them in one line."""


class GPTError(Exception):
    """Base class of the package's expected errors."""


class CheckpointError(GPTError):
    """A checkpoint is missing, tampered with, or does not fit the model."""


class TrainingError(GPTError):
    """Training cannot go on (for example a non-finite loss)."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (compilers' errors run to pages), at most `limit` chars."""
    return (str(exc).strip().splitlines() or [""])[0][:limit]
