"""How the pipeline reads its MLflow model registry: the aliases it keeps and each version's key metric."""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.errors import DataError
from pipeline.stages import STAGES, TRAINERS

if TYPE_CHECKING:  # commands import this module for the alias names without waiting for MLflow
    from mlflow.entities.model_registry import ModelVersion

# The promote stage owns these: champion serves, challenger is the newest version put up.
CHAMPION = "champion"
CHALLENGER = "challenger"


def champion_uri(stage: str) -> str:
    """The MLflow URI of the model version in use for the model that `stage` trains."""
    return f"models:/{STAGES[stage].model.name}@{CHAMPION}"


def metric_label(tag: str) -> str:
    """A metric tag as shown: metric.<name> is the training stage's own; other prefixes (eval.) say who measured it."""
    return tag.removeprefix("metric.")


def key_metric(name: str, version: ModelVersion) -> tuple[str, float]:
    """(tag, value) of registered model `name`'s key metric on a version, from the first of its tags present."""
    model = TRAINERS[name].model
    for tag in model.tags:
        if tag in version.tags:
            try:
                return tag, float(version.tags[tag])
            except ValueError:
                raise DataError(f"{name} version {version.version}: tag {tag} is not a number: "
                                f"{version.tags[tag]!r}") from None
    raise DataError(f"{name} version {version.version}: no {' or '.join(model.tags)} tag to compare on")
