"""People's decisions on the registry (approve, reject, roll back) and manual approval, on the embedded store
and on a real `mlflow server`: who, when and why on the version and its card, aliases moved only as decided."""
from __future__ import annotations

import getpass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import mlflow_server
from pipeline.commands import review
from pipeline.core.catalog import CHALLENGER, CHAMPION, TRAINERS
from pipeline.registry.cards import HISTORY_HEADING, decision_history
from pipeline.registry.decisions import STATUS_TAG
from pipeline.registry.tracking import stage_run, version_tags
from pipeline.stages import promote

NAME = TRAINERS["classifier"].model.default_name


def register(accuracy: float) -> str:
    """A new classifier version from a stage run, with its key metric (no model files: decisions read tags)."""
    with stage_run("finetune_classifier", {"lr": accuracy}) as run:
        client = MlflowClient()
        if not client.search_registered_models(f"name = '{NAME}'"):
            client.create_registered_model(NAME)
        return str(client.create_model_version(NAME, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id,
                                               tags=version_tags(None, {"val_accuracy": accuracy})).version)


def rules(approval: str) -> dict:
    return {"decide_on": "val", "noise_z": 0.0, "approval": approval, "margins": {role: 0.0 for role in TRAINERS}}


def aliases(client: MlflowClient) -> dict[str, str]:
    return {alias: str(number) for alias, number in client.get_registered_model(NAME).aliases.items()}


def decide(capsys, *argv: str) -> str:
    """`llm-pipeline review VERB ...` in this process; its one line of output."""
    capsys.readouterr()  # what came before (MLflow prints a link when a run on a server ends)
    review.main(list(argv))
    return capsys.readouterr().out.strip()


def refused(capsys, *argv: str) -> str:
    """The one error line of a refused decision (exit status 1)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        review.main(list(argv))
    assert exit_.value.code == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(params=["embedded", "server"])
def registry(request, store: MlflowClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A client on the embedded sqlite store, or on a real `mlflow server` over it (what `review` reaches too)."""
    if request.param == "embedded":
        yield store
        return
    with mlflow_server(tmp_path / "server.db", tmp_path / "server.log") as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        yield MlflowClient(url)


@pytest.mark.slow(30)
def test_manual_approval_then_reject_and_rollback_are_recorded_and_move_aliases_only_as_decided(
        registry: MlflowClient, capsys):
    me = getpass.getuser()  # no server user here: the OS user decides
    first = register(0.80)
    record = promote.promote(registry, "classifier", NAME, first, rules("manual"))
    assert (record["decision"], record["champion"]) == ("awaiting_approval", None)
    assert aliases(registry) == {CHALLENGER: first}  # no champion until a person approves
    tags = registry.get_model_version(NAME, first).tags
    assert (tags["promotion.decision"], tags["promotion.recommendation"]) == ("awaiting_approval", "recommended")
    assert "### Decision: awaiting approval (recommended)" in registry.get_model_version(NAME, first).description

    assert decide(capsys, "approve", NAME, first, "--reason", "first  look, fine") == (
        f"{NAME}: champion is now version 1, approved by {me}")
    assert aliases(registry) == {CHALLENGER: first, CHAMPION: first}
    version = registry.get_model_version(NAME, first)
    [entry] = decision_history(version.tags)
    assert (entry["decision"], entry["by"], entry["reason"]) == ("approved", me, "first look, fine")
    assert entry["at"].endswith(" UTC") and version.tags[STATUS_TAG] == "approved"
    assert version.description.count(HISTORY_HEADING) == 1
    assert f"| {entry['at']} | {me} | approved | first look, fine |" in version.description

    worse, better = register(0.70), register(0.90)
    for candidate, recommendation in ((worse, "not recommended"), (better, "recommended")):
        assert promote.promote(registry, "classifier", NAME, candidate, rules("manual"))["decision"] == "awaiting_approval"
        assert registry.get_model_version(NAME, candidate).tags["promotion.recommendation"] == recommendation
    assert aliases(registry) == {CHALLENGER: better, CHAMPION: first}  # manual: the champion waits
    decide(capsys, "approve", NAME, better, "--reason", "better on val")
    assert aliases(registry)[CHAMPION] == better

    # A rejected version never becomes champion by an automatic run, however good, whatever the approval mode.
    best = register(0.99)
    assert decide(capsys, "reject", NAME, best, "--reason", "leaks test data") == (
        f"{NAME} version 4: rejected by {me}; no automatic run will make it champion")
    for approval in ("auto", "manual"):
        record = promote.promote(registry, "classifier", NAME, best, rules(approval))
        assert record["decision"] == "blocked" and record["reason"].startswith(f"rejected by {me} at ")
    assert aliases(registry) == {CHALLENGER: better, CHAMPION: better}
    assert refused(capsys, "reject", NAME, better, "--reason", "no") == (
        f"review reject: error: {NAME} version 3 is the champion: roll it back first (llm-pipeline review rollback "
        f"{NAME} --reason ...), then reject it")

    # Rollback returns to the champion before; the version rolled back from is blocked like a rejected one.
    assert decide(capsys, "rollback", NAME, "--reason", "complaints") == (
        f"{NAME}: champion is now version 1 (was version 3), rolled back by {me}")
    assert aliases(registry)[CHAMPION] == first
    rolled, restored = (registry.get_model_version(NAME, v) for v in (better, first))
    assert rolled.tags[STATUS_TAG] == "rolled back" and decision_history(rolled.tags)[-1]["champion_after"] == "1"
    assert decision_history(restored.tags)[-1] | {"at": ""} == {
        "decision": "restored", "by": me, "at": "", "reason": "complaints", "champion_before": "3"}
    assert "| restored (champion was version 3) | complaints |" in restored.description
    assert promote.promote(registry, "classifier", NAME, better, rules("auto"))["decision"] == "blocked"
    assert aliases(registry)[CHAMPION] == first

    before = {v.version: (v.tags, v.description) for v in registry.search_model_versions(f"name = '{NAME}'")}
    for argv, message in [
            (("rollback", NAME, "--reason", "again"),
             f"{NAME} has no earlier champion to return to (champions so far: 1); --to VERSION names one"),
            (("rollback", NAME, "--to", best, "--reason", "x"), f"{NAME} version 4 was rejected by {me} at "),
            (("approve", NAME, "9", "--reason", "x"),
             f"{NAME} has no version 9 (versions: 1, 2, 3, 4; aliases: challenger=3, champion=1)"),
            (("approve", NAME, worse, "--reason", "  "), "--reason: say why, in a few words (an empty reason is refused)"),
            (("approve", NAME, worse), "--reason: say why, in a few words (an empty reason is refused)"),
            (("reject", "gpt-nope", "1", "--reason", "x"), "no registered model named gpt-nope in ")]:
        line = refused(capsys, *argv)
        verb = argv[0]
        assert line.startswith(f"review {verb}: error: {message}"), line
    after = {v.version: (v.tags, v.description) for v in registry.search_model_versions(f"name = '{NAME}'")}
    assert after == before and aliases(registry) == {CHALLENGER: better, CHAMPION: first}  # nothing changed

    # A person may bring a rejected version back: approval is recorded like any decision.
    decide(capsys, "approve", NAME, best, "--reason", "the leak was a false alarm")
    assert aliases(registry)[CHAMPION] == best
    assert [e["decision"] for e in decision_history(registry.get_model_version(NAME, best).tags)] == [
        "rejected", "approved"]
    assert promote.promote(registry, "classifier", NAME, best, rules("auto"))["decision"] == "already_champion"
    card = registry.get_model_version(NAME, best).description
    assert card.count(HISTORY_HEADING) == 1 and "leaks test data" in card and "the leak was a false alarm" in card
    assert registry.get_registered_model(NAME).tags["llm_pipeline.champions"] == "1,4"  # 3 left it by the rollback
