"""People's decisions on registered versions (approve, reject, roll back), each recorded with who, when and why."""
from __future__ import annotations

import getpass
import json
import os
import time
from typing import Any, Mapping
from urllib.parse import urlsplit

import mlflow
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException

from pipeline.core.catalog import CHAMPION
from pipeline.core.errors import DataError
from pipeline.registry.cards import HISTORY_PREFIX, decision_history, with_history
from pipeline.registry.locks import model_lock
from pipeline.registry.tracking import tag_model_version, versions_of
from pipeline.registry.versions import resolve_version

APPROVED, REJECTED, ROLLED_BACK, RESTORED = "approved", "rejected", "rolled back", "restored"
STATUS_TAG = "review.status"  # a version's standing after the latest decision about it (APPROVED, REJECTED, ...)
# No automatic run (promote on any path) makes a version with one of these statuses champion: only `approve`.
BLOCKED = (REJECTED, ROLLED_BACK)
# On the registered model: the versions `champion` named, oldest first. Promotion and approval push; a rollback
# without --to pops, so repeated rollbacks walk back through earlier champions.
CHAMPIONS_TAG = "llm_pipeline.champions"
KEPT_CHAMPIONS = 100  # the list's length at most (a tag's value is limited)


def decider() -> str:
    """Who decides: the user a tracking server authenticates (MLFLOW_TRACKING_USERNAME), else the OS user."""
    served = urlsplit(mlflow.get_tracking_uri()).scheme in ("http", "https")
    return (os.environ.get("MLFLOW_TRACKING_USERNAME") if served else None) or getpass.getuser()


def champions(model: RegisteredModel) -> list[str]:
    """The versions `champion` has named, oldest first (only the current one for a model older than the list)."""
    recorded = [number for number in model.tags.get(CHAMPIONS_TAG, "").split(",") if number]
    current = model.aliases.get(CHAMPION)
    if current is not None and (not recorded or recorded[-1] != str(current)):
        recorded.append(str(current))
    return recorded


def move_champion(client: mlflow.MlflowClient, model: RegisteredModel, version: str,
                  history: list[str] | None = None) -> None:
    """Point `champion` at `version`, recording it on the champions list (`history`: the list to keep instead
    of the current one plus `version`). The list is written first: killed in between, the alias still names
    the version the list's previous entry holds, and a rerun writes both again."""
    numbers = history if history is not None else [*champions(model), version]
    client.set_registered_model_tag(model.name, CHAMPIONS_TAG, ",".join(numbers[-KEPT_CHAMPIONS:]))
    client.set_registered_model_alias(model.name, CHAMPION, version)


def blocked_reason(version: ModelVersion) -> str | None:
    """Why no automatic run may make `version` champion (a person rejected it, or rolled it back), or None."""
    if version.tags.get(STATUS_TAG) not in BLOCKED:
        return None
    last = decision_history(version.tags)[-1]
    return f"{last['decision']} by {last['by']} at {last['at']}: {last['reason']}"


def _record(client: mlflow.MlflowClient, version: ModelVersion, decision: str, reason: str, who: str,
            **facts: Any) -> None:
    """Add a decision to the version's tags (decision.<n>, JSON) and card, and set its status."""
    entry = {"decision": decision, "by": who, "at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
             "reason": reason, **facts}
    key, value = f"{HISTORY_PREFIX}{len(decision_history(version.tags)) + 1}", json.dumps(entry, sort_keys=True)
    tag_model_version(version.name, version.version, {key: value, STATUS_TAG: decision}, client)
    client.update_model_version(version.name, str(version.version), description=with_history(
        version.description or "", decision_history({**version.tags, key: value})))


def _model(client: mlflow.MlflowClient, name: str) -> RegisteredModel:
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise DataError(f"no registered model named {name} in {client.tracking_uri}") from None


def _reason(reason: str) -> str:
    if not reason.strip():
        raise DataError("--reason: say why, in a few words (an empty reason is refused)")
    return " ".join(reason.split())


def approve(client: mlflow.MlflowClient, name: str, number: str, reason: str) -> dict[str, Any]:
    """Make version `number` of `name` the champion, by a person's decision (a version a person rejected or
    rolled back included: approval is how it comes back); recorded on the version."""
    reason, who = _reason(reason), decider()
    with model_lock(client, name):
        model = _model(client, name)
        version = resolve_version(model, versions_of(client, name), number)
        before = model.aliases.get(CHAMPION)
        if before is not None and str(before) == str(version.version):
            raise DataError(f"{name} version {number} is already the champion")
        _record(client, version, APPROVED, reason, who, champion_before=None if before is None else str(before))
        move_champion(client, model, str(version.version))
    return {"model": name, "version": str(version.version), "decision": APPROVED, "by": who,
            "champion_before": before}


def reject(client: mlflow.MlflowClient, name: str, number: str, reason: str) -> dict[str, Any]:
    """Mark version `number` of `name` as never to become champion by an automatic run; aliases stay."""
    reason, who = _reason(reason), decider()
    with model_lock(client, name):
        model = _model(client, name)
        version = resolve_version(model, versions_of(client, name), number)
        if str(model.aliases.get(CHAMPION)) == str(version.version):
            raise DataError(f"{name} version {number} is the champion: roll it back first "
                            f"(llm-pipeline review rollback {name} --reason ...), then reject it")
        _record(client, version, REJECTED, reason, who)
    return {"model": name, "version": str(version.version), "decision": REJECTED, "by": who}


def rollback(client: mlflow.MlflowClient, name: str, reason: str, to: str | None = None) -> dict[str, Any]:
    """Return `champion` to version `to`, else to the champion before the current one (skipping versions since
    rejected or deleted); the version rolled back from is never made champion again by an automatic run."""
    reason, who = _reason(reason), decider()
    with model_lock(client, name):
        model = _model(client, name)
        current = model.aliases.get(CHAMPION)
        if current is None:
            raise DataError(f"{name} has no champion to roll back")
        current, history = str(current), champions(model)
        versions = versions_of(client, name)  # read once: the lock keeps them as they are
        existing = {str(v.version): v for v in versions}
        if to is not None:
            target = resolve_version(model, versions, to)
            if str(target.version) == current:
                raise DataError(f"{name} version {to} is already the champion")
            if blocked_reason(target):
                raise DataError(f"{name} version {to} was {blocked_reason(target)}; approve it instead "
                                "(llm-pipeline review approve), which records why it comes back")
            kept = [*history, str(target.version)]
        else:
            earlier = history[:len(history) - 1 - history[::-1].index(current)] if current in history else history
            while earlier and (earlier[-1] == current or earlier[-1] not in existing
                               or blocked_reason(existing[earlier[-1]])):
                earlier.pop()
            if not earlier:
                raise DataError(f"{name} has no earlier champion to return to (champions so far: "
                                f"{', '.join(history)}); --to VERSION names one")
            target, kept = existing[earlier[-1]], earlier
        _record(client, existing[current], ROLLED_BACK, reason, who, champion_after=str(target.version))
        _record(client, target, RESTORED, reason, who, champion_before=current)
        move_champion(client, model, str(target.version), kept)
    return {"model": name, "version": str(target.version), "decision": ROLLED_BACK, "by": who,
            "champion_before": current}


def describe(record: Mapping[str, Any]) -> str:
    """One line saying what a decision did."""
    if record["decision"] == REJECTED:
        return (f"{record['model']} version {record['version']}: rejected by {record['by']}; no automatic run "
                "will make it champion")
    before = record.get("champion_before")
    was = f" (was version {before})" if before is not None else ""
    return f"{record['model']}: champion is now version {record['version']}{was}, {record['decision']} by {record['by']}"
