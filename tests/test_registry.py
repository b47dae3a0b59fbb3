"""Registry promotion and review against a real sqlite MLflow store: challenger, champion, margins, the table."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from conftest import NAMES, REPO, ROLES, mlflow_server, run_stage, set_param, stage_env
from gpt.checkpoint import FORMAT
from pipeline.commands import review
from pipeline.core.catalog import CHALLENGER, CHAMPION, STAGES, TRAINERS
from pipeline.registry.tracking import log_path, params_digest, stage_run, version_tags
from pipeline.registry.versions import DIGEST_TAG, missing_model_hint, output_digest
from pipeline.stages import promote
from pipeline.stages.promote import INPUTS, PROMOTED

TRAIN_PARAMS = {"lr": 0.1, "epochs": 2}
HASHES = {"train.bin": "ab" * 32}


def register(name: str, metrics: dict[str, float], tags: dict | None = None, params: dict = TRAIN_PARAMS,
             hashes: dict = HASHES) -> str:
    """A new version of `name` from a stage run, tagged by the real version_tags (no model files:
    the promotion logic reads only tags and aliases)."""
    with stage_run("train", params, hashes) as run:
        client = MlflowClient()
        if not client.search_registered_models(f"name = '{name}'"):
            client.create_registered_model(name)
        return str(client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id,
                                               tags=version_tags(tags, metrics)).version)


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def rules(margin: float = 0.0, noise_z: float = 0.0, decide_on: str = "val") -> dict:
    """The promote params: the policy."""
    return {"decide_on": decide_on, "noise_z": noise_z, "approval": "auto", "margins": {role: margin for role in TRAINERS}}


def test_first_wins_worse_kept_margin_respected_better_promoted(store: MlflowClient):
    name = "gpt-spam-classifier"
    first = register(name, {"val_accuracy": 0.80, "test_accuracy": 0.5})
    decision = promote.promote(store, ROLES[name], name, first, rules(margin=0.05))
    assert decision["decision"] == PROMOTED and decision["reason"].startswith("first version")
    assert aliases(store, name) == {CHAMPION: first, CHALLENGER: first}
    tags = store.get_model_version(name, first).tags
    assert (tags["promotion.decision"], tags["promotion.compared_with"]) == ("promoted", "none")

    worse = register(name, {"val_accuracy": 0.70, "test_accuracy": 0.99})  # its test score never decides
    decision = promote.promote(store, ROLES[name], name, worse, rules(margin=0.05))
    assert (decision["decision"], decision["champion"], decision["champion_value"]) == ("kept", 1, 0.80)
    assert aliases(store, name) == {CHAMPION: first, CHALLENGER: worse}
    tags = store.get_model_version(name, worse).tags
    assert tags["promotion.decision"] == "kept" and tags["promotion.compared_with"] == "version 1"
    assert tags["promotion.reason"] == "val_accuracy 0.7 vs 0.8 of version 1: worse by 0.1"

    within = register(name, {"val_accuracy": 0.83})  # better, but by less than the margin
    assert promote.promote(store, ROLES[name], name, within, rules(margin=0.05))["decision"] == "kept"
    assert aliases(store, name) == {CHAMPION: first, CHALLENGER: within}
    assert "not more than the margin 0.05" in store.get_model_version(name, within).tags["promotion.reason"]

    better = register(name, {"val_accuracy": 0.90})
    decision = promote.promote(store, ROLES[name], name, better, rules(margin=0.05))
    assert (decision["decision"], decision["champion"]) == ("promoted", 4)
    assert aliases(store, name) == {CHAMPION: better, CHALLENGER: better}
    assert "more than the margin 0.05" in store.get_model_version(name, better).tags["promotion.reason"]

    rerun = promote.promote(store, ROLES[name], name, better, rules(margin=0.05))
    assert rerun["decision"] == "already_champion" and aliases(store, name)[CHAMPION] == better
    assert store.get_model_version(name, better).tags["promotion.decision"] == "promoted"  # the real decision stays


def test_a_gain_within_the_noise_keeps_the_champion(store: MlflowClient):
    """The gain must exceed noise_z standard errors of the difference, sqrt(se_new² + se_champion²)."""
    name = "gpt-spam-classifier"
    promote.promote(store, ROLES[name], name, register(name, {"val_accuracy": 0.90, "val_accuracy_se": 0.03}), rules(noise_z=1.0))
    # +0.04 against a noise of sqrt(0.03² + 0.03²) = 0.0424: kept, however lucky it looks on test.
    lucky = register(name, {"val_accuracy": 0.94, "val_accuracy_se": 0.03, "test_accuracy": 1.0})
    decision = promote.promote(store, ROLES[name], name, lucky, rules(noise_z=1.0))
    assert decision["decision"] == "kept" and decision["needed"] == pytest.approx(0.03 * 2 ** 0.5)
    assert store.get_model_version(name, lucky).tags["promotion.reason"] == (
        "val_accuracy 0.94 ± 0.03 vs 0.9 ± 0.03 of version 1: better by 0.04, not more than the noise 0.04243 "
        "(1 × the difference's standard error)")
    # The same gain measured more precisely (a larger split): sqrt(0.015² + 0.03²) = 0.0335 < 0.04, promoted.
    sharper = register(name, {"val_accuracy": 0.94, "val_accuracy_se": 0.015})
    assert promote.promote(store, ROLES[name], name, sharper, rules(noise_z=1.0))["decision"] == PROMOTED
    assert promote.promote(store, ROLES[name], name, sharper, rules(noise_z=2.0))["decision"] == "already_champion"
    # Beyond the noise (0.015) but within a larger margin: the margin is the bar.
    steady = register(name, {"val_accuracy": 0.98, "val_accuracy_se": 0.001})
    decision = promote.promote(store, ROLES[name], name, steady, rules(margin=0.05, noise_z=1.0))
    assert decision["decision"] == "kept" and decision["needed"] == 0.05
    assert "not more than the margin 0.05" in decision["reason"]


def test_decide_on_test_is_a_choice_and_a_champion_without_the_metric_is_replaced(store: MlflowClient):
    name = "gpt-instruct"
    old = register(name, {"rouge_l_f1": 0.30})  # registered before val ROUGE-L was measured
    promote.promote(store, ROLES[name], name, old, rules())
    new = register(name, {"val_rouge_l_f1": 0.20, "val_rouge_l_f1_se": 0.02, "rouge_l_f1": 0.25})
    decision = promote.promote(store, ROLES[name], name, new, rules(noise_z=1.0))
    assert decision["decision"] == PROMOTED
    assert decision["reason"] == "champion version 1 has no val_rouge_l_f1 (registered before it was measured)"
    # On test (the other choice), with no standard error on one side: it borrows the other's.
    third = register(name, {"val_rouge_l_f1": 0.10, "rouge_l_f1": 0.31, "rouge_l_f1_se": 0.02})
    decision = promote.promote(store, ROLES[name], name, third, rules(noise_z=1.0, decide_on="test"))
    assert (decision["decision"], decision["metric"]) == ("promoted", "rouge_l_f1")
    assert decision["needed"] == pytest.approx(0.02 * 2 ** 0.5)


def test_val_loss_is_lower_is_better_and_comes_from_the_evaluate_stage(store: MlflowClient):
    name = "gpt-base"
    first = register(name, {"val_loss": 5.0}, {"eval.val_loss": 4.0})
    promote.promote(store, ROLES[name], name, first, rules())
    # pretrain's own val loss looks better, but evaluate's (whole split) decides: 4.1 > 4.0, kept.
    second = register(name, {"val_loss": 3.0}, {"eval.val_loss": 4.1})
    assert promote.promote(store, ROLES[name], name, second, rules())["decision"] == "kept"
    third = register(name, {"val_loss": 3.0}, {"eval.val_loss": 3.9})
    decision = promote.promote(store, ROLES[name], name, third, rules())
    assert decision["decision"] == PROMOTED and decision["champion_value"] == 4.0
    assert aliases(store, name) == {CHAMPION: third, CHALLENGER: third}

    missing = register(name, {"val_loss": 1.0})  # not evaluated
    with pytest.raises(ValueError, match=r"^gpt-base: version 4 has no eval.val_loss tag to decide on"):
        promote.promote(store, ROLES[name], name, missing, rules())
    assert aliases(store, name)[CHALLENGER] == third  # nothing moved


def write_stage_reports(versions: dict[str, str], samples: bool = True) -> None:
    """What the training stages leave for promote: each model's output folder (a config.json standing for the
    version's model), its report naming the folder's digest, and the version (of the model by its default
    name: `versions` maps names to version numbers) tagged with that digest."""
    client = MlflowClient()
    for role, stage in TRAINERS.items():
        name = NAMES[role]
        folder = stage.model.folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"format": FORMAT, "weights_sha256": f"{name} {versions[name]}"}))
        digest = output_digest(folder)
        client.set_model_version_tag(name, versions[name], DIGEST_TAG, digest)
        stage.report.parent.mkdir(parents=True, exist_ok=True)
        stage.report.write_text(json.dumps({DIGEST_TAG: digest}))
    Path(INPUTS[-1]).write_text(json.dumps({DIGEST_TAG: output_digest(TRAINERS["base"].model.folder)}))
    if samples:
        for path, records in (
                ("data/samples/evaluate.json", [{"prompt": f"p{i}", "greedy": f"g{i}", "sampled": "s"} for i in range(4)]),
                ("data/samples/instruct_responses.json",
                 [{"instruction": f"do {i}", "input": "x" if i else "", "response": f"done {i}"} for i in range(4)])):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(records))


def test_stage_logs_its_decisions_and_review_shows_them(store: MlflowClient, tmp_path: Path, capsys):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    metrics = {"gpt-base": {"val_loss": 5.5}, "gpt-spam-classifier": {"val_accuracy": 0.9, "test_accuracy": 0.9,
                                                                       "test_macro_f1": 0.88},
               "gpt-instruct": {"val_rouge_l_f1": 0.25, "rouge_l_f1": 0.25, "token_f1": 0.3}}
    tags = {"gpt-base": {"eval.val_loss": 5.5}}
    write_stage_reports({name: register(name, values, tags.get(name)) for name, values in metrics.items()})
    promote.main(Path("params.yaml"))
    first = capsys.readouterr().out.splitlines()
    assert first == [f"{name} version 1: promoted (champion: version 1; first version (no champion yet))"
                     for name in NAMES.values()]

    worse = register("gpt-instruct", {"val_rouge_l_f1": 0.20, "rouge_l_f1": 0.3})
    write_stage_reports({"gpt-base": "1", "gpt-spam-classifier": "1", "gpt-instruct": worse})
    promote.main(Path("params.yaml"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "gpt-base version 1: already_champion (champion: version 1; already the champion)"
    assert lines[2] == ("gpt-instruct version 2: kept (champion: version 1; "
                        "val_rouge_l_f1 0.2 vs 0.25 of version 1: worse by 0.05)")
    report = json.loads(STAGES["promote"].report.read_text())
    assert report["instruct"] | {"reason": ""} == {
        "model": "gpt-instruct", "version": 2, "decide_on": "val", "metric": "val_rouge_l_f1", "value": 0.2, "se": None,
        "test_metric": "rouge_l_f1", "test_value": 0.3, "higher_is_better": True, "champion_version": 1,
        "champion_value": 0.25, "champion_se": None, "gain": pytest.approx(-0.05), "needed": 0.0, "decision": "kept",
        "recommendation": None, "reason": "", "champion": 1}
    assert not Path("data/metrics/promote.json").exists()  # decisions are a report, not metrics

    runs = store.search_runs([store.get_experiment_by_name("llm-pipeline").experiment_id], "tags.stage = 'promote'")
    run = max(runs, key=lambda r: r.info.start_time)
    assert run.data.tags["run_group"] == "g1" and "mlflow.parentRunId" in run.data.tags
    assert run.data.params["decision.instruct"] == "kept (version 2)"
    assert run.data.params["models.instruct"] == "gpt-instruct"
    assert run.data.params["margins.base"] == "0.0" and run.data.params["decide_on"] == "val"
    assert run.data.metrics["instruct.promoted"] == 0.0 and run.data.metrics["instruct.champion_version"] == 1
    assert {f"data.{path.name}.sha256" for path in INPUTS} <= run.data.tags.keys()
    assert [a.path for a in store.list_artifacts(run.info.run_id)] == ["promote.json"]
    for role, stage in TRAINERS.items():  # each registered model says what it is
        assert store.get_registered_model(NAMES[role]).description == stage.model.summary

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
    assert " val_accuracy=0.9 test_accuracy=0.9 " in rows["gpt-spam-classifier", "1"]
    assert " test_macro_f1=0.88 " in rows["gpt-spam-classifier", "1"]
    assert " champion " in rows["gpt-instruct", "1"] and " challenger " in rows["gpt-instruct", "2"]
    assert "val_rouge_l_f1=0.2 rouge_l_f1=0.3 " in rows["gpt-instruct", "2"] and " kept " in rows["gpt-instruct", "2"]
    assert " eval.val_loss=5.5 " in rows["gpt-base", "1"]

    review.main(["--model", "gpt-instruct"])
    assert {line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]} == {"gpt-instruct"}
    store.create_registered_model("gpt-empty")
    review.main(["--model", "gpt-empty"])
    assert capsys.readouterr().out == "gpt-empty: no versions\n"
    review.main(["--model", "nope"])
    assert capsys.readouterr().out.startswith("no registered model named nope in sqlite:///")


def test_model_card_puts_a_version_beside_the_champion(store: MlflowClient, tmp_path: Path):
    """The card: decision, key metric with the champion's and the difference, data sizes and hashes, the
    params that differ, samples of a generator, and the plots of its run."""
    name = "gpt-instruct"
    first = register(name, {"val_rouge_l_f1": 0.20, "val_rouge_l_f1_se": 0.01, "rouge_l_f1": 0.21})
    promote.promote(store, ROLES[name], name, first, rules(noise_z=1.0), [("p", "q")])
    plot = tmp_path / "instruct_loss.png"
    plot.write_bytes(b"\x89PNG not really")
    with stage_run("finetune_instruct", {"lr": 0.2, "epochs": 2, "seed": 1}, {"train.bin": "cd" * 32},
                   data_sizes={"train.bin": "100 tokens"}) as run:
        log_path(plot)
        second = str(store.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id, tags=version_tags(
            None, {"val_rouge_l_f1": 0.25, "val_rouge_l_f1_se": 0.01, "rouge_l_f1": 0.23, "token_f1": 0.4})).version)
    samples = [("Rewrite: it is cold / x", "It is chilly."), ("b", ""), ("c", "d"), ("e", "never shown")]
    promote.promote(store, ROLES[name], name, second, rules(noise_z=1.0), samples)
    card = store.get_model_version(name, second).description
    assert card.startswith(f"**gpt-instruct, version {second}.** {TRAINERS['instruct'].model.summary}")
    assert "### Decision: promoted, now the champion" in card
    assert "val_rouge_l_f1 0.25 ± 0.01 vs 0.2 ± 0.01 of version 1: better by 0.05, more than the noise 0.01414" in card
    assert "| **val_rouge_l_f1** (decides) | 0.25 ± 0.01 | 0.2 ± 0.01 | +0.05 |" in card
    assert "| **rouge_l_f1** (reported) | 0.23 | 0.21 | +0.02 |" in card
    assert "| token_f1 | 0.4 | - | - |" in card
    assert "| train.bin | 100 tokens | `cdcdcdcdcdcd` | `abababababab` |" in card  # the champion saw other data
    assert "| lr | 0.2 | 0.1 |" in card and "| seed | 1 | - |" in card and "| epochs |" not in card  # equal
    assert card.count("**Prompt:**") == 3 and "> It is chilly." in card and "> (empty)" in card
    assert "never shown" not in card
    assert f"[source run](#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}): `instruct_loss.png`" in card
    assert f"![instruct_loss.png](get-artifact?path=instruct_loss.png&run_uuid={run.info.run_id})" in card
    # The first version's card says there was nothing to compare with; a rerun leaves cards as they are.
    first_card = store.get_model_version(name, first).description
    assert "No champion to compare with." in first_card and "| **val_rouge_l_f1** (decides) | 0.2 ± 0.01 | - | - |" in first_card
    promote.promote(store, ROLES[name], name, second, rules(), [])
    assert store.get_model_version(name, second).description == card


@pytest.mark.slow(25)
def test_the_cards_plots_load_from_the_tracking_servers_ui(store: MlflowClient, tmp_path: Path):
    """A real `mlflow server` on the store answers the card's image links with the plot's bytes."""
    plot = tmp_path / "classifier_confusion.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\n a confusion matrix")
    with stage_run("finetune_classifier", TRAIN_PARAMS, HASHES) as run:
        log_path(plot)
        store.create_registered_model("gpt-spam-classifier")
        version = str(store.create_model_version("gpt-spam-classifier", f"runs:/{run.info.run_id}/model",
                                                 run_id=run.info.run_id, tags=version_tags(None, {"val_accuracy": 0.9})).version)
    promote.promote(store, "classifier", "gpt-spam-classifier", version, rules())
    links = re.findall(r"!\[[^]]*\]\((get-artifact\?[^)]+)\)", store.get_model_version("gpt-spam-classifier", version).description)
    assert len(links) == 1
    with mlflow_server(tmp_path / "mlflow.db", tmp_path / "server.log") as url:
        with urllib.request.urlopen(f"{url}/{links[0]}", timeout=30) as response:
            assert response.read() == plot.read_bytes()


@pytest.mark.slow
def test_review_of_an_empty_or_absent_store_says_so(tmp_path: Path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    env = stage_env(None)
    env.pop("MLFLOW_TRACKING_URI", None)
    absent = subprocess.run([sys.executable, "-m", "pipeline.commands.review"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert absent.returncode == 0, absent.stderr
    assert absent.stdout.startswith("no MLflow store at sqlite:///") and "`llm-pipeline register`" in absent.stdout
    assert not (tmp_path / "mlflow.db").exists()  # reading created no store
    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()  # creates an empty store
    empty = subprocess.run([sys.executable, "-m", "pipeline.commands.review"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.startswith("no registered model of this project (gpt-base, gpt-spam-classifier, "
                                   "gpt-instruct) in sqlite:///")


def cells(text: str) -> dict[str, list[str]]:
    """The rows of a --compare table by their first cell; cells are two or more spaces apart."""
    return {row[0]: row[1:] for row in (re.split(r"\s{2,}", line.strip()) for line in text.splitlines()[2:])}


def test_review_compares_two_versions_side_by_side(store: MlflowClient, tmp_path: Path, monkeypatch, capsys):
    name = "gpt-spam-classifier"
    with monkeypatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'absent.db'}")
        absent = review.review(name, versions=("1", "2"))
    assert absent.startswith("no MLflow store at sqlite:///") and "`llm-pipeline register`" in absent
    first = register(name, {"test_accuracy": 0.80, "test_macro_f1": 0.75, "val_accuracy": 0.7, "train_accuracy": 0.9})
    promote.promote(store, ROLES[name], name, first, rules())
    second = register(name, {"test_accuracy": 0.90, "val_accuracy": 0.75, "train_accuracy": 0.9},
                      params={"lr": 0.2, "epochs": 2}, hashes={"train.bin": "cd" * 32, "classes.json": "ef" * 32})
    promote.promote(store, ROLES[name], name, second, rules())

    review.main(["--model", name, "--compare", "1", "champion"])
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"{name}: A = 1, B = champion"
    assert out.splitlines()[1].split() == ["A", "(version", "1)", "B", "(version", "2)", "B", "-", "A"]
    rows = cells(out)
    assert rows["val_accuracy (key, higher is better)"] == ["0.7", "0.75", "+0.05, B better"]
    assert rows["test_accuracy (key, higher is better)"] == ["0.8", "0.9", "+0.1, B better"]
    assert rows["test_macro_f1"] == ["0.75", "-", "only A"]
    assert rows["train_accuracy"] == ["0.9", "0.9"]  # equal: no difference shown
    assert list(rows).index("test_macro_f1") < list(rows).index("train_accuracy")  # the model's own order
    assert rows["params (1 equal, not shown; --all shows them)"] == []
    assert rows["lr"] == ["0.1", "0.2", "differs"] and "epochs" not in rows
    assert rows["params_digest"] == [params_digest(TRAIN_PARAMS)[:8], params_digest({"lr": 0.2, "epochs": 2})[:8],
                                     "differs"]
    assert rows["train.bin"] == ["abababab", "cdcdcdcd", "differs"] and rows["classes.json"] == ["-", "efefefef", "only B"]
    assert rows["promotion.decision"] == ["promoted", "promoted"]
    assert rows["promotion.compared_with"] == ["none", "version 1", "differs"]
    assert rows["promotion.reason"][1] == "val_accuracy 0.75 vs 0.7 of version 1: better by 0.05, more than the margin 0"
    assert rows["aliases"] == ["-", "challenger,champion", "only B"] and rows["run group"] == ["g1", "g1"]

    review.main(["--model", name, "--compare", "challenger", "1", "--all"])
    rows = cells(capsys.readouterr().out)
    assert rows["test_accuracy (key, higher is better)"] == ["0.9", "0.8", "-0.1, A better"]
    assert rows["params (1 equal)"] == [] and rows["epochs"] == ["2", "2"] and rows["lr"] == ["0.2", "0.1", "differs"]


def test_lower_is_better_and_a_missing_key_metric_shows_as_unknown(store: MlflowClient, capsys):
    register("gpt-base", {"val_loss": 5.0}, {"eval.val_loss": 4.0})
    register("gpt-base", {"val_loss": 3.5})  # not evaluated: no key metric
    review.main(["--model", "gpt-base", "--compare", "1", "2"])
    rows = cells(capsys.readouterr().out)
    assert rows["eval.val_loss (key, lower is better)"] == ["4", "?", "?"]
    assert rows["val_loss"] == ["5", "3.5", "-1.5"]
    register("gpt-base", {"val_loss": 3.0}, {"eval.val_loss": 3.9})
    review.main(["--model", "gpt-base", "--compare", "1", "3"])
    assert cells(capsys.readouterr().out)["eval.val_loss (key, lower is better)"] == ["4", "3.9", "-0.1, B better"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "gpt-base", "--compare", "9", "1"],
     "gpt-base has no version 9 (versions: 1, 2; aliases: challenger=2, champion=1)"),
    (["--model", "gpt-base", "--compare", "1", "best"],
     "gpt-base has no alias best (versions: 1, 2; aliases: challenger=2, champion=1)"),
    (["--model", "gpt-nope", "--compare", "1", "2"],
     "no registered model named gpt-nope in sqlite:///{db} (this project's: gpt-base); " + missing_model_hint()),
    (["--compare", "1", "2"], "--compare needs --model NAME"),
    (["--model", "gpt-base", "--all"], "--all applies to --compare only"),
])
def test_compare_of_what_is_not_there_is_one_line(store: MlflowClient, tmp_path: Path, capsys, argv, message):
    for loss in (4.0, 5.0):
        promote.promote(store, "base", "gpt-base", register("gpt-base", {}, {"eval.val_loss": loss}), rules())
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        review.main(argv)
    assert exit_.value.code == 1
    assert capsys.readouterr().err.splitlines() == [f"review: error: {message.format(db=tmp_path.resolve() / 'mlflow.db')}"]


@pytest.mark.parametrize(("key", "value", "message"), [
    ("promote.margins.base", -0.5, "params.yaml: promote.margins.base must be >= 0, got -0.5"),
    ("promote.margins", {"base": 0.0, "classifier": 0.0, "instruct": 0.0, "gpt-spam-classifier": 0.1},
     "params.yaml: unknown key promote.margins.gpt-spam-classifier (allowed: base, classifier, instruct)"),
    ("mlflow.models.instruct", "gpt-base",
     "params.yaml: mlflow.models.base and mlflow.models.instruct are both 'gpt-base'; each model needs a name of its own"),
    ("mlflow.models.classifier", "topic classifier",
     r"params.yaml: mlflow.models.classifier must be a string matching [A-Za-z0-9][\w.-]{0,99}, got 'topic classifier'"),
])
def test_bad_margin_or_model_name_is_one_line_naming_the_key(project: Path, key: str, value, message: str):
    set_param(project, key, value)
    result = run_stage(project, "promote")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"promote: error: {message}"]


def test_missing_stage_report_is_one_line(project: Path):
    result = run_stage(project, "promote")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "promote: error: data/reports/pretrain.json: missing; run the pretrain stage first"]
    assert not (project / "mlflow.db").exists()


def test_the_declaration_matches_params_and_dvc_yaml():
    """Model roles and key metrics live in pipeline.core.catalog alone; promote's margins, the registered names
    (whose defaults params.yaml repeats) and promote's inputs follow it."""
    assert {role: stage.name for role, stage in TRAINERS.items()} == {
        "base": "pretrain", "classifier": "finetune_classifier", "instruct": "finetune_instruct"}
    assert STAGES["evaluate"].report in INPUTS
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert list(params["promote"]["margins"]) == list(TRAINERS)
    assert params["mlflow"]["models"] == NAMES == {
        "base": "gpt-base", "classifier": "gpt-spam-classifier", "instruct": "gpt-instruct"}
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(STAGES)
    assert {str(path) for path in INPUTS} <= set(stages["promote"]["deps"])
