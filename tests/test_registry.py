"""Registry promotion and review against a real sqlite MLflow store: challenger, champion, margins, the table."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from conftest import REPO, run_stage, set_param, stage_env
from pipeline.commands import review
from pipeline.registry import CHALLENGER, CHAMPION
from pipeline.stages import STAGES, TRAINERS, promote
from pipeline.stages.promote import INPUTS, PROMOTED
from pipeline.tracking import params_digest, stage_run, tag_new_version

TRAIN_PARAMS = {"lr": 0.1, "epochs": 2}
HASHES = {"train.bin": "ab" * 32}


def register(name: str, metrics: dict[str, float], tags: dict | None = None, params: dict = TRAIN_PARAMS,
             hashes: dict = HASHES) -> str:
    """A new version of `name` from a stage run, tagged by the real tag_new_version (no model files:
    the promotion logic reads only tags and aliases)."""
    with stage_run("train", params, hashes) as run:
        client = MlflowClient()
        if not client.search_registered_models(f"name = '{name}'"):
            client.create_registered_model(name)
        created = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
        return str(tag_new_version(name, created.version, tags, metrics).version)


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def test_first_wins_worse_kept_margin_respected_better_promoted(store: MlflowClient):
    name = "gpt-spam-classifier"
    first = register(name, {"test_accuracy": 0.80})
    decision = promote.promote(store, name, first, margin=0.05)
    assert decision["decision"] == PROMOTED and decision["reason"].startswith("first version")
    assert aliases(store, name) == {CHAMPION: first, CHALLENGER: first}
    tags = store.get_model_version(name, first).tags
    assert (tags["promotion.decision"], tags["promotion.compared_with"]) == ("promoted", "none")

    worse = register(name, {"test_accuracy": 0.70})
    decision = promote.promote(store, name, worse, margin=0.05)
    assert (decision["decision"], decision["champion"], decision["champion_value"]) == ("kept", 1, 0.80)
    assert aliases(store, name) == {CHAMPION: first, CHALLENGER: worse}
    tags = store.get_model_version(name, worse).tags
    assert tags["promotion.decision"] == "kept" and tags["promotion.compared_with"] == "version 1"
    assert tags["promotion.reason"] == "test_accuracy 0.7 vs 0.8 of version 1: worse by 0.1"

    within = register(name, {"test_accuracy": 0.83})  # better, but by less than the margin
    assert promote.promote(store, name, within, margin=0.05)["decision"] == "kept"
    assert aliases(store, name) == {CHAMPION: first, CHALLENGER: within}
    assert "not more than margin 0.05" in store.get_model_version(name, within).tags["promotion.reason"]

    better = register(name, {"test_accuracy": 0.90})
    decision = promote.promote(store, name, better, margin=0.05)
    assert (decision["decision"], decision["champion"]) == ("promoted", 4)
    assert aliases(store, name) == {CHAMPION: better, CHALLENGER: better}
    assert "more than margin 0.05" in store.get_model_version(name, better).tags["promotion.reason"]

    rerun = promote.promote(store, name, better, margin=0.05)
    assert rerun["decision"] == "already_champion" and aliases(store, name)[CHAMPION] == better
    assert store.get_model_version(name, better).tags["promotion.decision"] == "promoted"  # the real decision stays


def test_val_loss_is_lower_is_better_and_prefers_the_evaluate_stage(store: MlflowClient):
    name = "gpt-base"
    first = register(name, {"val_loss": 5.0}, {"eval.val_loss": 4.0})
    promote.promote(store, name, first, margin=0.0)
    # pretrain's own val loss looks better, but evaluate's (whole split) decides: 4.1 > 4.0, kept.
    second = register(name, {"val_loss": 3.0}, {"eval.val_loss": 4.1})
    assert promote.promote(store, name, second, margin=0.0)["decision"] == "kept"
    third = register(name, {"val_loss": 3.9})  # not evaluated: pretrain's val loss stands in
    decision = promote.promote(store, name, third, margin=0.0)
    assert decision["decision"] == PROMOTED and decision["champion_value"] == 4.0
    assert aliases(store, name) == {CHAMPION: third, CHALLENGER: third}

    missing = register(name, {"steps": 5.0})
    with pytest.raises(ValueError, match=r"^gpt-base version 4: no eval.val_loss or metric.val_loss tag"):
        promote.promote(store, name, missing, margin=0.0)
    assert aliases(store, name)[CHALLENGER] == third  # nothing moved


def write_stage_metrics(versions: dict[str, str]) -> None:
    for name, stage in TRAINERS.items():
        stage.metrics.parent.mkdir(parents=True, exist_ok=True)
        stage.metrics.write_text(json.dumps({"registered_version": int(versions[name])}))
    Path(INPUTS[-1]).write_text(json.dumps({"registered_version": int(versions["gpt-base"])}))


def test_stage_logs_its_decisions_and_review_shows_them(store: MlflowClient, tmp_path: Path, capsys):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    metrics = {"gpt-base": {"val_loss": 5.5}, "gpt-spam-classifier": {"test_accuracy": 0.9, "test_macro_f1": 0.88},
               "gpt-instruct": {"rouge_l_f1": 0.25, "token_f1": 0.3}}
    write_stage_metrics({name: register(name, values) for name, values in metrics.items()})
    promote.main(Path("params.yaml"))
    first = capsys.readouterr().out.splitlines()
    assert first == [f"{name} version 1: promoted (champion: version 1; first version (no champion yet))"
                     for name in TRAINERS]

    worse = register("gpt-instruct", {"rouge_l_f1": 0.20})
    write_stage_metrics({"gpt-base": "1", "gpt-spam-classifier": "1", "gpt-instruct": worse})
    promote.main(Path("params.yaml"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "gpt-base version 1: already_champion (champion: version 1; already the champion)"
    assert lines[2] == "gpt-instruct version 2: kept (champion: version 1; rouge_l_f1 0.2 vs 0.25 of version 1: worse by 0.05)"
    report = json.loads(Path("data/metrics/promote.json").read_text())
    assert report["gpt-instruct"] | {"reason": ""} == {
        "version": 2, "metric": "rouge_l_f1", "value": 0.2, "higher_is_better": True, "margin": 0.0,
        "champion_version": 1, "champion_value": 0.25, "decision": "kept", "reason": "", "champion": 1}

    runs = store.search_runs([store.get_experiment_by_name("llm-pipeline").experiment_id], "tags.stage = 'promote'")
    run = max(runs, key=lambda r: r.info.start_time)
    assert run.data.tags["run_group"] == "g1" and "mlflow.parentRunId" in run.data.tags
    assert run.data.params["decision.gpt-instruct"] == "kept (version 2)"
    assert run.data.params["margins.gpt-base"] == "0.0"
    assert run.data.metrics["gpt-instruct.promoted"] == 0.0 and run.data.metrics["gpt-instruct.champion_version"] == 1
    assert {f"data.{path.name}.sha256" for path in INPUTS} <= run.data.tags.keys()
    assert [a.path for a in store.list_artifacts(run.info.run_id)] == ["promote.json"]

    review.main([])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["model", "version", "aliases", "key"]
    rows = {(line.split()[0], line.split()[1]): line for line in table[1:]}
    assert set(rows) == {("gpt-base", "1"), ("gpt-instruct", "1"), ("gpt-instruct", "2"),
                         ("gpt-spam-classifier", "1")}
    digest = params_digest(TRAIN_PARAMS)[:8]
    for (name, version), line in rows.items():
        assert f" {digest} " in line and " train.bin=abababab " in line and " g1 " in line
    assert " challenger,champion " in rows["gpt-spam-classifier", "1"]
    assert "test_accuracy=0.9 " in rows["gpt-spam-classifier", "1"] and " test_macro_f1=0.88 " in rows["gpt-spam-classifier", "1"]
    assert " champion " in rows["gpt-instruct", "1"] and " challenger " in rows["gpt-instruct", "2"]
    assert "rouge_l_f1=0.2 " in rows["gpt-instruct", "2"] and " kept " in rows["gpt-instruct", "2"]
    assert "val_loss=5.5 " in rows["gpt-base", "1"]

    review.main(["--model", "gpt-instruct"])
    assert {line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]} == {"gpt-instruct"}
    store.create_registered_model("gpt-empty")
    review.main(["--model", "gpt-empty"])
    assert capsys.readouterr().out == "gpt-empty: no versions\n"
    review.main(["--model", "nope"])
    assert capsys.readouterr().out.startswith("no registered model named nope in sqlite:///")


def test_review_of_an_empty_or_absent_store_says_so(tmp_path: Path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    env = stage_env(None)
    env.pop("MLFLOW_TRACKING_URI", None)
    absent = subprocess.run([sys.executable, "-m", "pipeline.commands.review"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert absent.returncode == 0, absent.stderr
    assert absent.stdout.startswith("no MLflow store at sqlite:///") and "run the pipeline first" in absent.stdout
    assert not (tmp_path / "mlflow.db").exists()  # reading created no store
    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()  # creates an empty store
    empty = subprocess.run([sys.executable, "-m", "pipeline.commands.review"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.startswith("no registered models in sqlite:///")


def cells(text: str) -> dict[str, list[str]]:
    """The rows of a --compare table by their first cell; cells are two or more spaces apart."""
    return {row[0]: row[1:] for row in (re.split(r"\s{2,}", line.strip()) for line in text.splitlines()[2:])}


def test_review_compares_two_versions_side_by_side(store: MlflowClient, tmp_path: Path, monkeypatch, capsys):
    name = "gpt-spam-classifier"
    with monkeypatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'absent.db'}")
        absent = review.review(name, versions=("1", "2"))
    assert absent.startswith("no MLflow store at sqlite:///") and "run the pipeline first" in absent
    first = register(name, {"test_accuracy": 0.80, "test_macro_f1": 0.75, "val_accuracy": 0.7})
    promote.promote(store, name, first, margin=0.0)
    second = register(name, {"test_accuracy": 0.90, "val_accuracy": 0.7}, params={"lr": 0.2, "epochs": 2},
                      hashes={"train.bin": "cd" * 32, "classes.json": "ef" * 32})
    promote.promote(store, name, second, margin=0.0)

    review.main(["--model", name, "--compare", "1", "champion"])
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"{name}: A = 1, B = champion"
    assert out.splitlines()[1].split() == ["A", "(version", "1)", "B", "(version", "2)", "B", "-", "A"]
    rows = cells(out)
    assert rows["test_accuracy (key, higher is better)"] == ["0.8", "0.9", "+0.1, B better"]
    assert rows["test_macro_f1"] == ["0.75", "-", "only A"]
    assert rows["val_accuracy"] == ["0.7", "0.7"]  # equal: no difference shown
    assert list(rows).index("test_macro_f1") < list(rows).index("val_accuracy")  # the model's own order
    assert rows["params (1 equal, not shown; --all shows them)"] == []
    assert rows["lr"] == ["0.1", "0.2", "differs"] and "epochs" not in rows
    assert rows["params_digest"] == [params_digest(TRAIN_PARAMS)[:8], params_digest({"lr": 0.2, "epochs": 2})[:8],
                                     "differs"]
    assert rows["train.bin"] == ["abababab", "cdcdcdcd", "differs"] and rows["classes.json"] == ["-", "efefefef", "only B"]
    assert rows["promotion.decision"] == ["promoted", "promoted"]
    assert rows["promotion.compared_with"] == ["none", "version 1", "differs"]
    assert rows["promotion.reason"][1] == "test_accuracy 0.9 vs 0.8 of version 1: better by 0.1, more than margin 0"
    assert rows["aliases"] == ["-", "challenger,champion", "only B"] and rows["run group"] == ["g1", "g1"]

    review.main(["--model", name, "--compare", "challenger", "1", "--all"])
    rows = cells(capsys.readouterr().out)
    assert rows["test_accuracy (key, higher is better)"] == ["0.9", "0.8", "-0.1, A better"]
    assert rows["params (1 equal)"] == [] and rows["epochs"] == ["2", "2"] and rows["lr"] == ["0.2", "0.1", "differs"]


def test_lower_is_better_and_the_tag_each_key_metric_came_from(store: MlflowClient, capsys):
    register("gpt-base", {"val_loss": 5.0}, {"eval.val_loss": 4.0})
    register("gpt-base", {"val_loss": 3.5})  # not evaluated: pretrain's own val loss stands in
    review.main(["--model", "gpt-base", "--compare", "1", "2"])
    rows = cells(capsys.readouterr().out)
    assert rows["val_loss (key, lower is better)"] == ["4 (eval.val_loss)", "3.5 (val_loss)", "-0.5, B better"]
    # Each tag that held the key on one side only stays a row, so the other side's value shows.
    assert rows["val_loss"] == ["5", "3.5", "-1.5"] and rows["eval.val_loss"] == ["4", "-", "only A"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "gpt-base", "--compare", "9", "1"],
     "gpt-base has no version 9 (versions: 1, 2; aliases: challenger=2, champion=1)"),
    (["--model", "gpt-base", "--compare", "1", "best"],
     "gpt-base has no alias best (versions: 1, 2; aliases: challenger=2, champion=1)"),
    (["--model", "gpt-nope", "--compare", "1", "2"], "no registered model named gpt-nope in sqlite:///{db} (models: gpt-base)"),
    (["--compare", "1", "2"], "--compare needs --model NAME"),
    (["--model", "gpt-base", "--all"], "--all applies to --compare only"),
])
def test_compare_of_what_is_not_there_is_one_line(store: MlflowClient, tmp_path: Path, capsys, argv, message):
    for loss in (4.0, 5.0):
        promote.promote(store, "gpt-base", register("gpt-base", {"val_loss": loss}), margin=0.0)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        review.main(argv)
    assert exit_.value.code == 1
    assert capsys.readouterr().err.splitlines() == [f"review: error: {message.format(db=tmp_path.resolve() / 'mlflow.db')}"]


@pytest.mark.parametrize(("value", "message"), [
    (-0.5, "params.yaml: promote.margins.gpt-base must be >= 0, got -0.5"),
    ({"gpt-base": 0.0, "gpt-spam-classifier": 0.0, "gpt-instruct": 0.0, "gpt-other": 0.1},
     "params.yaml: unknown key promote.margins.gpt-other (allowed: gpt-base, gpt-spam-classifier, gpt-instruct)"),
])
def test_bad_margin_is_one_line_naming_the_key(project: Path, value, message: str):
    set_param(project, "promote.margins" if isinstance(value, dict) else "promote.margins.gpt-base", value)
    result = run_stage(project, "promote")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"promote: error: {message}"]


def test_missing_stage_metrics_is_one_line(project: Path):
    result = run_stage(project, "promote")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "promote: error: data/metrics/pretrain.json: missing; run the pretrain stage first"]
    assert not (project / "mlflow.db").exists()


def test_the_declaration_matches_params_and_dvc_yaml():
    """Registered names and key metrics live in pipeline.stages alone; promote's margins and inputs follow it."""
    assert {name: stage.name for name, stage in TRAINERS.items()} == {
        "gpt-base": "pretrain", "gpt-spam-classifier": "finetune_classifier", "gpt-instruct": "finetune_instruct"}
    assert STAGES["evaluate"].metrics in INPUTS
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert list(params["promote"]["margins"]) == list(TRAINERS)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(STAGES)
    assert {str(path) for path in INPUTS} <= set(stages["promote"]["deps"])
