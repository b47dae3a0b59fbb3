"""The aliases the pipeline keeps in its MLflow model registry."""
from __future__ import annotations

from pipeline.stages import STAGES

# The promote stage owns these: champion serves, challenger is the newest version put up.
CHAMPION = "champion"
CHALLENGER = "challenger"


def champion_uri(stage: str) -> str:
    """The MLflow URI of the model version in use for the model that `stage` trains."""
    return f"models:/{STAGES[stage].model.name}@{CHAMPION}"
