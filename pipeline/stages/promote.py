"""Stage `promote`: each new model version becomes `challenger`; `champion` moves only when it wins by a margin."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from gpt.files import atomic_write_json, sha256_file
from pipeline.errors import DataError
from pipeline.params import Float, Section, load_params
from pipeline.registry import CHALLENGER, CHAMPION, key_metric, metric_label
from pipeline.stages import STAGES, TRAINERS, command_line
from pipeline.tracking import MLFLOW_SECTION, log_path, log_step_metrics, stage_run, tag_model_version

# The training stages' metrics files name the versions to decide on; evaluate's are no version
# source but change gpt-base's eval.* tags, so they are an input too.
INPUTS = (*(stage.metrics for stage in TRAINERS.values()), STAGES["evaluate"].metrics)
PARAMS = {"promote": Section(margins=Section(**{name: Float(low=0) for name in TRAINERS})), "mlflow": MLFLOW_SECTION}
PROMOTED, KEPT, ALREADY = "promoted", "kept", "already_champion"


def registered_version(metrics_file: Path) -> str:
    """The `registered_version` a training stage wrote to its metrics file."""
    if not metrics_file.is_file():
        raise DataError(f"{metrics_file}: missing; run the {metrics_file.stem} stage first")
    try:
        version = json.loads(metrics_file.read_text(encoding="utf-8"))["registered_version"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise DataError(f"{metrics_file}: no registered_version; rerun the {metrics_file.stem} stage") from None
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise DataError(f"{metrics_file}: registered_version must be a version number, got {version!r}")
    return str(version)


def _version(client: mlflow.MlflowClient, name: str, version: str) -> ModelVersion:
    try:
        return client.get_model_version(name, version)
    except MlflowException:
        raise DataError(f"{name} version {version} is not in the model registry at {client.tracking_uri}") from None


def _champion(client: mlflow.MlflowClient, name: str) -> ModelVersion | None:
    aliases = client.get_registered_model(name).aliases
    return client.get_model_version(name, aliases[CHAMPION]) if CHAMPION in aliases else None


def promote(client: mlflow.MlflowClient, name: str, version: str | int, margin: float) -> dict[str, Any]:
    """Make `version` of `name` the challenger and decide whether it becomes champion; return the decision.

    It wins when its key metric beats the champion's by more than `margin` (0.0: any improvement);
    the first version always wins. `challenger` stays on the newest version put up, even when it
    wins, so `@challenger` always names the latest candidate and `@champion` the one in use. The
    decision is tagged on the version as promotion.decision, promotion.compared_with, promotion.reason.
    """
    spec, version = TRAINERS[name].model, str(version)
    candidate = _version(client, name, version)
    tag, value = key_metric(name, candidate)
    champion = _champion(client, name)
    client.set_registered_model_alias(name, CHALLENGER, version)
    record: dict[str, Any] = {"model": name, "version": int(version), "metric": spec.metric, "value": value,
                              "higher_is_better": spec.higher_is_better, "margin": margin,
                              "champion_version": None, "champion_value": None}
    if champion is None:
        decision, reason = PROMOTED, "first version (no champion yet)"
    elif str(champion.version) == version:
        decision, reason = ALREADY, "already the champion"
        record.update(champion_version=int(version), champion_value=value)
    else:
        _, best = key_metric(name, champion)
        gain = value - best if spec.higher_is_better else best - value
        won = gain > margin
        decision = PROMOTED if won else KEPT
        versus = f"{metric_label(tag)} {value:.6g} vs {best:.6g} of version {champion.version}"
        if gain > 0:
            reason = f"{versus}: better by {gain:.6g}, {'more than' if won else 'not more than'} margin {margin:g}"
        elif gain < 0:
            reason = f"{versus}: worse by {-gain:.6g}"
        else:
            reason = f"{versus}: no better"
        record.update(champion_version=int(champion.version), champion_value=best)
    if decision == PROMOTED:
        client.set_registered_model_alias(name, CHAMPION, version)
    if decision != ALREADY:  # a rerun keeps the tags of the decision that made it champion
        compared = "none" if champion is None else f"version {champion.version}"
        tag_model_version(name, version, {"promotion.decision": decision, "promotion.compared_with": compared,
                                          "promotion.reason": reason}, client)
    return {**record, "decision": decision, "reason": reason,
            "champion": int(version) if decision != KEPT else int(champion.version)}


def describe(record: dict[str, Any]) -> str:
    """One line per decision, for the stage's output."""
    return (f"{record['model']} version {record['version']}: {record['decision']} "
            f"(champion: version {record['champion']}; {record['reason']})")


def main(params_path: Path) -> None:
    params = load_params(params_path, PARAMS)
    margins = params["promote"]["margins"]
    # Every input is read before any alias moves, so bad input changes nothing.
    versions = {name: registered_version(stage.metrics) for name, stage in TRAINERS.items()}
    hashes = {path.name: sha256_file(path) for path in INPUTS}
    with stage_run("promote", params["promote"], hashes, params["mlflow"]):
        client = mlflow.MlflowClient()
        for name, version in versions.items():  # fail on a missing version before deciding anything
            _version(client, name, version)
        records = [promote(client, name, versions[name], margins[name]) for name in TRAINERS]
        for record in records:
            print(describe(record))
        mlflow.log_params({f"decision.{r['model']}": f"{r['decision']} (version {r['version']})" for r in records})
        log_step_metrics({f"{r['model']}.promoted": r["decision"] == PROMOTED for r in records}
                         | {f"{r['model']}.{r['metric']}": r["value"] for r in records}
                         | {f"{r['model']}.champion_version": r["champion"] for r in records}, step=0)
        report = {r["model"]: {k: v for k, v in r.items() if k != "model"} for r in records}
        atomic_write_json(STAGES["promote"].metrics, report)
        log_path(STAGES["promote"].metrics)


if __name__ == "__main__":
    command_line("promote", main)
