"""Errors the gpt package raises for bad input or state (not for bugs); callers may report them in one line."""


class GPTError(Exception):
    """Base class of the package's expected errors."""


class CheckpointError(GPTError):
    """A checkpoint is missing, tampered with, or does not fit the model."""


class TrainingError(GPTError):
    """Training cannot go on (for example a non-finite loss)."""
