"""Stage `promote`: each new version becomes `challenger`; `champion` moves only under the promotion policy."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from gpt.files import atomic_write_json, sha256_file
from pipeline.core.catalog import CHALLENGER, CHAMPION, EVALUATORS, STAGES, TRAINERS, ModelSpec, command_line
from pipeline.core.errors import DataError
from pipeline.core.params import load_params
from pipeline.registry import policy
from pipeline.registry.cards import write_card
from pipeline.registry.decisions import blocked_reason, move_champion
from pipeline.registry.locks import model_lock
from pipeline.registry.tracking import (MLFLOW_SECTION, log_path, log_step_metrics, model_names, stage_run,
                                       tag_model_version)
from pipeline.registry.versions import check_outputs, register_outputs

STAGE = STAGES["promote"]
# The training stages' reports name the versions to decide on; the evaluating stages' are no version source
# but change their model's eval.* tags, so they are an input too.
INPUTS = (*(stage.report for stage in TRAINERS.values()), *(stage.report for stage in EVALUATORS.values()))
PARAMS = {"promote": policy.PARAMS, "mlflow": MLFLOW_SECTION}
PROMOTED, KEPT, ALREADY = "promoted", "kept", "already_champion"
AWAITING = "awaiting_approval"  # approval: manual; the verdict is a recommendation until a person approves
BLOCKED = "blocked"  # a person rejected the version, or rolled it back: only a person's approval makes it champion
DECISION_TIME_TAG = "promotion.decision_time"  # seconds since the epoch: decisions in the order they were taken


def samples(spec: ModelSpec) -> list[tuple[str, str]]:
    """Up to three (prompt, output) pairs of a generator's local sample file; none for other models."""
    if spec.samples is None:
        return []
    path, prompt_fields, output_field = spec.samples.path, spec.samples.prompt_fields, spec.samples.output_field
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
        return [(" / ".join(r[f] for f in prompt_fields if r[f]), r[output_field]) for r in records[:3]]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{path}: missing or not a list of samples with {', '.join(prompt_fields)} and "
                        f"{output_field}; rerun the stage that writes it") from None


def _version(client: mlflow.MlflowClient, name: str, version: str) -> ModelVersion:
    try:
        return client.get_model_version(name, version)
    except MlflowException:
        raise DataError(f"{name} version {version} is not in the model registry at {client.tracking_uri}") from None


def _champion(client: mlflow.MlflowClient, aliases: Mapping[str, Any], name: str) -> ModelVersion | None:
    return client.get_model_version(name, aliases[CHAMPION]) if CHAMPION in aliases else None


def promote(client: mlflow.MlflowClient, role: str, name: str, version: str | int, rules: Mapping[str, Any],
            sample_outputs: list[tuple[str, str]] = ()) -> dict[str, Any]:
    """Make `version` of `name` (the `role` model) the challenger and decide under the policy `rules` (the
    promote params) whether it becomes champion; write its model card; return the decision.

    The first version always wins. `challenger` stays on the newest version put up, even when it wins,
    so `@challenger` names the latest candidate and `@champion` the one in use. The decision is tagged
    on the version as promotion.decision, promotion.compared_with, promotion.reason. With `approval: manual`
    the verdict is tagged as promotion.recommendation and the decision is AWAITING: `champion` moves only on
    a person's approval. A version a person rejected or rolled back is BLOCKED, on every path to here.
    """
    with model_lock(client, name):  # the champion read here is the champion until the aliases move
        return _decide(client, TRAINERS[role].model, name, str(version), rules, sample_outputs)


def _decide(client: mlflow.MlflowClient, spec: ModelSpec, name: str, version: str, rules: Mapping[str, Any],
            sample_outputs: list[tuple[str, str]]) -> dict[str, Any]:
    candidate = _version(client, name, version)
    registered = client.get_registered_model(name)
    champion = _champion(client, registered.aliases, name)
    split = rules["decide_on"]
    mine = policy.measure(spec, candidate.tags, split, f"{name} version {version}")
    reported = policy.measure(spec, candidate.tags, "test", f"{name} version {version}")
    if mine.value is None and champion is not None and str(champion.version) != version:
        raise DataError(f"{name}: version {version} has no {mine.tag} tag to decide on")
    record: dict[str, Any] = {
        "role": spec.role, "model": name, "version": int(version), "decide_on": split,
        "metric": policy.metric_label(mine.tag), "value": mine.value, "se": mine.se,
        "test_metric": policy.metric_label(reported.tag), "test_value": reported.value,
        "higher_is_better": spec.higher_is_better, "champion_version": None, "champion_value": None,
        "champion_se": None}
    held = None if champion is None else int(champion.version)
    blocked = blocked_reason(candidate)
    if blocked is not None and held != int(version):  # a person's decision stands over the policy's
        theirs = policy.measure(spec, champion.tags, split, f"{name} version {held}") if champion else None
        return {**record, "champion_version": held, "champion_value": theirs and theirs.value,
                "champion_se": theirs and theirs.se, "decision": BLOCKED, "recommendation": None, "champion": held,
                "reason": f"{blocked}; only `llm-pipeline review approve` makes it champion"}
    verdict = None
    if champion is None:
        decision, reason = PROMOTED, "first version (no champion yet)"
    elif str(champion.version) == version:
        decision, reason = ALREADY, "already the champion"
        record.update(champion_version=int(version), champion_value=mine.value, champion_se=mine.se)
    else:
        theirs = policy.measure(spec, champion.tags, split, f"{name} version {champion.version}")
        verdict = policy.judge(spec, mine, theirs, rules["margins"][spec.role], rules["noise_z"], str(champion.version))
        decision, reason = (PROMOTED if verdict.won else KEPT), verdict.reason
        record.update(champion_version=int(champion.version), champion_value=theirs.value, champion_se=theirs.se,
                      gain=verdict.gain, needed=verdict.needed)
    tags = {"promotion.decision": decision}
    if rules["approval"] == "manual" and decision in (PROMOTED, KEPT):
        tags = {"promotion.decision": AWAITING, "promotion.recommendation":
                "recommended" if decision == PROMOTED else "not recommended"}
    # Tags and card first, aliases last: killed in between, a rerun meets the same champion, takes the same
    # decision and writes the same tags, so no version ends up champion without the decision that made it.
    if decision != ALREADY:  # a rerun keeps the tags and card of the decision that made it champion
        compared = "none" if champion is None else f"version {champion.version}"
        tag_model_version(name, version, {**tags, "promotion.compared_with": compared, "promotion.reason": reason,
                                          DECISION_TIME_TAG: f"{time.time():.3f}"}, client)
        write_card(client, spec, candidate, champion, decision, verdict, rules, sample_outputs,
                   tags.get("promotion.recommendation"))
    if registered.description != spec.summary:
        client.update_registered_model(name, description=spec.summary)
    client.set_registered_model_alias(name, CHALLENGER, version)
    decision = tags["promotion.decision"]
    if decision == PROMOTED:
        move_champion(client, registered, version)
    return {**record, "decision": decision, "recommendation": tags.get("promotion.recommendation"), "reason": reason,
            "champion": int(version) if decision in (PROMOTED, ALREADY) else held}


def describe(record: dict[str, Any]) -> str:
    """One line per decision, for the stage's output."""
    champion = "none" if record["champion"] is None else f"version {record['champion']}"
    return f"{record['model']} version {record['version']}: {record['decision']} (champion: {champion}; {record['reason']})"


def main(params_path: Path) -> None:
    params = load_params(params_path, PARAMS)
    rules, names = params["promote"], model_names(params["mlflow"], params_path.name)
    evaluated = check_outputs()  # every input is read before anything is registered or an alias moves
    outputs = {role: samples(stage.model) for role, stage in TRAINERS.items()}
    hashes = {path.name: sha256_file(path) for path in INPUTS}
    # Every training stage's output in the registry before any alias moves: found by content, or registered
    # now from data/models when the registry lacks it (emptied, replaced, or another machine's after dvc pull).
    versions = register_outputs(evaluated, params_path, params["mlflow"])
    for role, (version, registered) in versions.items():
        if registered:
            print(f"{names[role]}: registered version {version.version} from {TRAINERS[role].model.folder} "
                  "(the registry did not hold this output)")
    with stage_run("promote", rules, hashes, params["mlflow"]):
        client = mlflow.MlflowClient()
        records = [promote(client, role, names[role], versions[role][0].version, rules, outputs[role])
                   for role in TRAINERS]
        for record in records:
            print(describe(record))
        # Keyed by role, so a renamed model's figures stay comparable across runs; the names are params too.
        mlflow.log_params({f"decision.{r['role']}": f"{r['decision']} (version {r['version']})" for r in records}
                          | {f"models.{r['role']}": r["model"] for r in records})
        log_step_metrics({f"{r['role']}.promoted": r["decision"] == PROMOTED for r in records}
                         | {f"{r['role']}.{r['metric']}": r["value"] for r in records}
                         | {f"{r['role']}.champion_version": r["champion"] for r in records if r["champion"]}, step=0)
        atomic_write_json(STAGE.report, {r["role"]: {k: v for k, v in r.items() if k != "role"} for r in records})
        log_path(STAGE.report)


if __name__ == "__main__":
    command_line("promote", main)
