"""Print the registered models as a table: versions, aliases, key metrics and lineage (`llm-pipeline review`)."""
from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException

from pipeline.errors import reporting_errors
from pipeline.registry import key_metric, metric_label
from pipeline.stages import TRAINERS
from pipeline.tracking import PARAMS_DIGEST_TAG, configure, project_tracking, tracking_uri

COLUMNS = ("model", "version", "aliases", "key metric", "other metrics", "promotion", "created (UTC)", "commit",
           "run group", "params", "data", "stage run")
SHORT = 8  # hex digits shown of commits and digests


def _number(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value
    if number.is_integer():
        return str(int(number))
    return f"{number:.0f}" if abs(number) >= 1000 else f"{number:.4g}"


def _pages(search, *args, **kwargs) -> list:
    found, token = [], None
    while True:
        page = search(*args, page_token=token, **kwargs)
        found.extend(page)
        token = page.token
        if not token:
            return found


def version_row(model: RegisteredModel, version: ModelVersion) -> tuple[str, ...]:
    """The table row of one version."""
    tags = version.tags
    aliases = sorted(alias for alias, number in model.aliases.items() if str(number) == str(version.version))
    trainer = TRAINERS.get(model.name)
    spec = trainer.model if trainer else None
    key, others = "-", []
    if spec is not None:
        try:
            tag, value = key_metric(model.name, version)
            key = f"{metric_label(tag)}={_number(str(value))}"
        except ValueError:
            key = f"{spec.metric}=?"
        others = [f"{metric_label(tag)}={_number(tags[tag])}" for tag in spec.others if tag in tags]
    data = [f"{tag.removeprefix('data.').removesuffix('.sha256')}={value[:SHORT]}"
            for tag, value in sorted(tags.items()) if tag.startswith("data.") and tag.endswith(".sha256")]
    created = datetime.fromtimestamp(version.creation_timestamp / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M")
    dirty = "+dirty" if tags.get("git_dirty") == "true" else ""
    return (model.name, str(version.version), ",".join(aliases) or "-", key, " ".join(others) or "-",
            tags.get("promotion.decision", "-"), created, tags.get("git_commit", "-")[:SHORT] + dirty,
            tags.get("run_group", "-"), tags.get(PARAMS_DIGEST_TAG, "-")[:SHORT], " ".join(data) or "-",
            version.run_id or "-")


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns under COLUMNS, two spaces apart."""
    widths = [max(len(row[i]) for row in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [COLUMNS, *rows])


def review(model: str | None = None, params_path: Path | None = Path("params.yaml")) -> str:
    """The table of the registered models (only `model` if given), or a message saying there are none."""
    tracking = project_tracking(params_path)
    uri = tracking_uri(tracking)
    # Reading must not create a store: an absent sqlite file means nothing was logged yet.
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return f"no MLflow store at {uri}; run the pipeline first (dvc repro)"
    configure(tracking)
    client = mlflow.MlflowClient()
    if model is not None:
        try:
            models = [client.get_registered_model(model)]
        except MlflowException:
            return f"no registered model named {model} in {uri}"
    else:
        models = sorted(_pages(client.search_registered_models), key=lambda m: m.name)
        if not models:
            return f"no registered models in {uri}"
    rows, empty = [], []
    for registered in models:
        versions = _pages(client.search_model_versions, f"name = '{registered.name}'")
        if not versions:
            empty.append(f"{registered.name}: no versions")
        rows += [version_row(registered, v) for v in sorted(versions, key=lambda v: int(v.version))]
    return "\n".join(([format_table(rows)] if rows else []) + empty)


def main(argv: list[str] | None = None) -> None:
    """Print the review table; an expected error is one line on stderr and exit status 1."""
    parser = argparse.ArgumentParser(prog="llm-pipeline review", description=__doc__)
    parser.add_argument("--model", metavar="NAME", help="only this registered model (default: all)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="params file whose mlflow section locates the registry (default: params.yaml, if present)")
    args = parser.parse_args(argv)
    with reporting_errors("review"):
        print(review(args.model, args.params))


if __name__ == "__main__":
    main()
