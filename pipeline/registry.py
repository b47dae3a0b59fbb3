"""The aliases the pipeline keeps in its MLflow model registry, and the versions the training stages registered."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import DataError
from pipeline.stages import STAGES

# The promote stage owns these: champion serves, challenger is the newest version put up.
CHAMPION = "champion"
CHALLENGER = "challenger"


def champion_uri(stage: str) -> str:
    """The MLflow URI of the model version in use for the model that `stage` trains."""
    return f"models:/{STAGES[stage].model.name}@{CHAMPION}"


def registered_version(report: Path) -> str:
    """The `registered_version` a training stage wrote to its report."""
    if not report.is_file():
        raise DataError(f"{report}: missing; run the {report.stem} stage first")
    try:
        version = json.loads(report.read_text(encoding="utf-8"))["registered_version"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise DataError(f"{report}: no registered_version; rerun the {report.stem} stage") from None
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise DataError(f"{report}: registered_version must be a version number, got {version!r}")
    return str(version)
