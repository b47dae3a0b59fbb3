"""The registry and DVC's outputs never disagree: a lost registry is registered again from data/models without
retraining or duplicates, and a stage killed anywhere leaves, after a rerun, the registry an uninterrupted run does."""
from __future__ import annotations

import getpass
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import dvc.api
import pytest
import torch
from mlflow import MlflowClient

from conftest import BIN, NAMES, copy_repo, mlflow_server, run_stage, set_param, sh, stage_env
from gpt.checkpoint import save_model
from gpt.model import GPTConfig, GPTModel
from pipeline.core.catalog import CHAMPION, STAGES, TRAINERS
from pipeline.orchestration.sweeps import queue_states
from pipeline.registry.locks import is_lock
from pipeline.registry.tracking import stage_run
from pipeline.registry.versions import DIGEST_TAG, LEFTOVER_TAG, REGISTERED_FROM_TAG, register_trained

LLM_PIPELINE = str(BIN / "llm-pipeline")
# Tags whose values are wall times or speeds: two runs of the same params never agree on them.
TIMING = re.compile(r"(time|_per_s)")
RUN_ID = re.compile(r"\b[0-9a-f]{32}\b")


def registry_state(uri: str) -> dict:
    """What a reviewer sees: per model its aliases and description, per version its tags (timings left out)
    and its card with run ids blanked."""
    client = MlflowClient(uri)
    state = {}
    for model in client.search_registered_models():
        if is_lock(model):  # a kill -9 leaves a ticket until its lease ends: not what a reviewer sees
            continue
        versions = client.search_model_versions(f"name = '{model.name}'")
        state[model.name] = {
            "aliases": {alias: str(number) for alias, number in model.aliases.items()}, "description": model.description,
            "versions": {str(v.version): ({k: t for k, t in v.tags.items() if not TIMING.search(k)},
                                     RUN_ID.sub("<run>", v.description or "")) for v in versions}}
    return state


# -- a lost or replaced registry --------------------------------------------------------------------------

@pytest.fixture
def trained(small_pipeline, tmp_path: Path) -> tuple[Path, dict]:
    """A copy of the scratch DVC repo after a full `dvc repro` with small training params."""
    template, env, _ = small_pipeline
    return copy_repo(template, tmp_path), env


def cli(repo: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LLM_PIPELINE, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow(60)
def test_a_lost_sqlite_registry_is_registered_again_without_retraining(trained):
    repo, env = trained
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    # Read from a copy: this process keeps a connection open to a store it read, which would follow the
    # file when it moves.
    shutil.copy(repo / "mlflow.db", repo.parent / "before.db")
    before = registry_state(f"sqlite:///{repo.parent / 'before.db'}")
    assert {name: model["aliases"] for name, model in before.items()} == {
        name: {CHAMPION: "1", "challenger": "1"} for name in NAMES.values()}

    (repo / "mlflow.db").rename(repo.parent / "lost.db")  # out of the work tree: git stays clean
    assert "Data and pipelines are up to date" in sh(repo, env, str(BIN / "dvc"), "repro")  # DVC cannot tell
    review = cli(repo, env, "review")
    assert review.returncode == 0 and "`llm-pipeline register` registers the trained models" in review.stdout
    classify = cli(repo, env, "classify", "--model", "models:/gpt-spam-classifier@champion", "Win a prize now")
    assert classify.returncode == 1 and len(classify.stderr.strip().splitlines()) == 1
    assert "`llm-pipeline register`" in classify.stderr

    first = cli(repo, env, "register")
    assert first.returncode == 0, first.stderr
    for role, stage in TRAINERS.items():
        assert f"{NAMES[role]}: registered version 1 from {stage.model.folder} (the registry did not hold this output)" \
            in first.stdout
    after = registry_state(uri)
    for name, model in after.items():  # the same versions, aliases and metrics, now marked as registered later
        assert model["aliases"] == before[name]["aliases"] and set(model["versions"]) == {"1"}
        tags, old = dict(model["versions"]["1"][0]), dict(before[name]["versions"]["1"][0])
        assert tags.pop(REGISTERED_FROM_TAG) == "outputs" and old.pop(REGISTERED_FROM_TAG) == "training"
        assert {k: v for k, v in tags.items() if k != "run_group"} == {k: v for k, v in old.items() if k != "run_group"}
    assert "up to date" in sh(repo, env, str(BIN / "dvc"), "status")  # DVC recorded promote's rerun

    again = cli(repo, env, "register")
    assert again.returncode == 0 and "registered version" not in again.stdout
    assert "gpt-base version 1: already_champion" in again.stdout
    assert registry_state(uri) == after  # a second run registers nothing more
    classify = cli(repo, env, "classify", "--model", "models:/gpt-spam-classifier@champion", "Win a prize now")
    assert classify.returncode == 0, classify.stderr


@pytest.mark.slow(130)
def test_a_fresh_tracking_server_gets_the_outputs_once_from_two_clones_at_once(trained, tmp_path: Path):
    """Two clones of one project register on a new server at once: each model once. Meanwhile a second project
    with model names (and an experiment) of its own trains and registers on the same server; each project's
    `review` shows only its own models."""
    repo, env = trained
    other = copy_repo(repo, tmp_path / "other")  # a second machine that pulled the same outputs
    topics = copy_repo(repo, tmp_path / "topics")  # another project, trained (alike) under its own experiment
    own = {"base": "topics-base", "classifier": "topic-classifier", "instruct": "topics-instruct"}
    set_param(topics, "mlflow.experiment", "topics")
    for role, name in own.items():
        set_param(topics, f"mlflow.models.{role}", name)
    with mlflow_server(tmp_path / "server.db", tmp_path / "server.log") as url:
        served = {**env, "MLFLOW_TRACKING_URI": url}
        assert "no registered model of this project (gpt-base, " in cli(repo, served, "review").stdout
        training = subprocess.Popen([LLM_PIPELINE, "run"], cwd=topics, env=served, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
        both = [subprocess.Popen([LLM_PIPELINE, "register"], cwd=clone, env=served, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for clone in (repo, other)]
        outputs = [process.communicate(timeout=600) for process in both]
        assert [process.returncode for process in both] == [0, 0], outputs
        for name in NAMES.values():  # registered by one of them, found by the other
            assert sum(f"{name}: registered version 1" in out for out, _ in outputs) == 1, outputs
        state = registry_state(url)
        assert {name: (model["aliases"], set(model["versions"])) for name, model in state.items()} == {
            name: ({CHAMPION: "1", "challenger": "1"}, {"1"}) for name in NAMES.values()}
        digests = {name: model["versions"]["1"][0][DIGEST_TAG] for name, model in state.items()}
        local = registry_state(f"sqlite:///{repo / 'mlflow.db'}")
        assert digests == {name: model["versions"]["1"][0][DIGEST_TAG] for name, model in local.items()}
        base_tags = state["gpt-base"]["versions"]["1"][0]
        assert "eval.val_loss" in base_tags and base_tags[REGISTERED_FROM_TAG] == "outputs"

        trained_out = training.communicate(timeout=900)[0]
        assert training.returncode == 0, trained_out
        assert "now registered as" not in trained_out  # the other project's models are not its earlier names
        both_projects = registry_state(url)
        assert {name: both_projects[name] for name in state} == state  # the first project's models untouched
        assert set(both_projects) == {*NAMES.values(), *own.values()}
        assert both_projects["topic-classifier"]["aliases"] == {CHAMPION: "1", "challenger": "1"}
        assert both_projects["topic-classifier"]["versions"]["1"][0][REGISTERED_FROM_TAG] == "training"
        for clone, names in ((repo, NAMES), (topics, own)):
            rows = cli(clone, served, "review").stdout.splitlines()
            assert sorted(row.split()[:2] for row in rows[1:]) == sorted([name, "1"] for name in names.values())
        client = MlflowClient(url)
        experiments = {name: client.get_run(client.get_model_version(name, "1").run_id).info.experiment_id
                       for name in (NAMES["classifier"], own["classifier"])}
        assert experiments == {NAMES["classifier"]: client.get_experiment_by_name("llm-pipeline").experiment_id,
                               own["classifier"]: client.get_experiment_by_name("topics").experiment_id}
        classify = cli(topics, served, "classify", "--model", "models:/topic-classifier@champion", "Win a prize now")
        assert classify.returncode == 0 and classify.stdout.split("\t")[0] in ("ham", "spam"), classify.stderr


@pytest.mark.slow(40)
def test_a_renamed_model_is_registered_under_its_new_name_without_retraining(trained):
    """Renaming reruns promote alone, which registers the trained output under the new name and prints one
    line naming the old registered model and its versions; those stay as they were."""
    repo, env = trained
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    shutil.copy(repo / "mlflow.db", repo.parent / "before.db")
    before = registry_state(f"sqlite:///{repo.parent / 'before.db'}")
    set_param(repo, "mlflow.models.classifier", "topic-classifier")
    assert set(json.loads(sh(repo, env, str(BIN / "dvc"), "status", "--json"))) == {"promote"}
    out = sh(repo, env, LLM_PIPELINE, "run")
    notices = [line for line in out.splitlines() if "now registered as" in line]
    assert notices == ["the classifier model is now registered as topic-classifier (mlflow.models.classifier); "
                       "registered before as gpt-spam-classifier (version 1), left as it was"]
    assert "Running stage 'promote'" in out
    for stage in ("pretrain", "finetune_classifier", "finetune_instruct"):
        assert f"Running stage '{stage}'" not in out
    after = registry_state(uri)
    assert {name: after[name] for name in before} == before  # the old model, its versions and aliases untouched
    new = after["topic-classifier"]
    assert new["aliases"] == {CHAMPION: "1", "challenger": "1"}
    tags = new["versions"]["1"][0]
    assert tags[REGISTERED_FROM_TAG] == "outputs"
    assert tags[DIGEST_TAG] == before["gpt-spam-classifier"]["versions"]["1"][0][DIGEST_TAG]  # the same model
    review = cli(repo, env, "review").stdout.splitlines()
    assert sorted(row.split()[0] for row in review[1:-1]) == ["gpt-base", "gpt-instruct", "topic-classifier"]
    assert review[-1] == ("earlier names of this project's models, left as they were (--model NAME shows one): "
                          "gpt-spam-classifier (classifier, 1 version)")
    again = sh(repo, env, LLM_PIPELINE, "register")
    assert "now registered as" not in again and registry_state(uri) == after  # said once; nothing more registered


@pytest.mark.slow(90)
def test_a_rejected_version_is_never_made_champion_by_a_rerun_or_register(trained):
    """Under manual approval a retrained classifier waits for a person; once rejected, neither a rerun of the
    pipeline nor `llm-pipeline register` makes it champion, under either approval mode."""
    repo, env = trained
    name = NAMES["classifier"]
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    set_param(repo, "promote.approval", "manual")
    set_param(repo, "finetune_classifier.seed", 7)
    out = sh(repo, env, LLM_PIPELINE, "run")
    assert f"{name} version 2: awaiting_approval (champion: version 1; " in out
    assert client.get_registered_model(name).aliases == {CHAMPION: 1, "challenger": 2}
    rejected = cli(repo, env, "review", "reject", name, "2", "--reason", "seed 7 looks off")
    assert rejected.returncode == 0, rejected.stderr
    assert rejected.stdout == f"{name} version 2: rejected by {getpass.getuser()}; no automatic run will make it champion\n"
    set_param(repo, "promote.approval", "auto")
    for command in ("run", "register"):  # promote reruns: its params changed; then forced
        out = sh(repo, env, LLM_PIPELINE, command)
        assert f"{name} version 2: blocked (champion: version 1; rejected by {getpass.getuser()} at " in out, out
        assert client.get_registered_model(name).aliases == {CHAMPION: 1, "challenger": 2}


# -- experiments run elsewhere -----------------------------------------------------------------------------

def queue_finished(repo: Path, env: dict, timeout_s: float = 900) -> list[str]:
    """Wait until DVC's queue has nothing queued or running; the status of each of its experiments."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = list(queue_states(repo, env).values())
        if not {"Queued", "Running"} & set(states):
            return states
        time.sleep(3)
    raise AssertionError(f"DVC's queue did not finish in {timeout_s} s")


@pytest.mark.slow(150)
def test_queued_and_temp_experiments_register_in_the_projects_store(trained):
    """`dvc exp run --queue` and `--temp` run the stages in a temporary copy under .dvc/tmp/exps: their runs and
    versions still land in the project's own mlflow.db, beside what its workspace registered."""
    repo, env = trained
    sh(repo, env, "git", "add", "-A")
    sh(repo, env, "git", "commit", "-q", "-m", "the small pipeline's outputs")
    dvc = str(BIN / "dvc")
    sh(repo, env, dvc, "exp", "run", "--queue", "-S", "finetune_classifier.seed=1,2")
    temp = sh(repo, env, dvc, "exp", "run", "--temp", "-n", "temp-five", "-S", "finetune_classifier.seed=5")
    assert "Running stage 'finetune_classifier'" in temp and "Running stage 'pretrain'" not in temp
    assert "the registry did not hold this output" not in temp  # it found the workspace's versions
    sh(repo, env, dvc, "queue", "start", "-j", "1")
    assert queue_finished(repo, env) == ["Success", "Success"]
    assert not list((repo / ".dvc" / "tmp" / "exps").rglob("mlflow.db"))

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    versions = {int(v.version): v.tags for v in client.search_model_versions("name = 'gpt-spam-classifier'")}
    assert sorted(versions) == [1, 2, 3, 4]
    names = sorted(tags["dvc_exp"] for number, tags in versions.items() if number > 1)
    assert "temp-five" in names and len(set(names)) == 3
    shown = sh(repo, {**env, "COLUMNS": "5000"}, dvc, "exp", "show", "--no-pager")
    assert all(name in shown for name in names)
    assert [int(v.version) for v in client.search_model_versions("name = 'gpt-base'")] == [1]
    review = cli(repo, env, "review", "--model", "gpt-spam-classifier")
    assert sorted(row.split()[1] for row in review.stdout.splitlines()[1:]) == ["1", "2", "3", "4"], review.stdout


@pytest.mark.slow(200)
def test_a_sweep_queues_its_grid_runs_two_at_once_and_tabulates_what_dvc_and_the_registry_hold(trained):
    repo, env = trained
    sh(repo, env, "git", "add", "-A")
    sh(repo, env, "git", "commit", "-q", "-m", "the small pipeline's outputs")
    bad = cli(repo, env, "sweep", "-n", "bad", "-S", "finetune_classifier.seed=1,2", "-S", "finetune_classifier.lr=0")
    assert bad.returncode == 1 and bad.stderr.splitlines() == [
        "sweep: error: bad-1 (finetune_classifier.seed=1, finetune_classifier.lr=0): params.yaml: "
        "finetune_classifier.lr must be in (0, 1], got 0"], bad.stderr
    assert "bad-" not in sh(repo, env, str(BIN / "dvc"), "queue", "status")  # nothing was queued

    swept = cli(repo, env, "sweep", "-n", "seeds", "-S", "finetune_classifier.seed=1,2", "-S", "promote.noise_z=0",
                "-j", "2")  # two at once, on the embedded sqlite store
    assert swept.returncode == 0, swept.stderr
    header, *rows = [re.split(r"\s{2,}", line) for line in swept.stdout.strip().splitlines()]
    assert header == ["experiment", "state", "changed params", "gpt-spam-classifier val_accuracy", "version",
                      "decision"]
    table = {row[0]: row for row in rows}
    assert sorted(table) == ["seeds-1", "seeds-2"] and {row[1] for row in rows} == {"Success"}
    values = [float(row[3].split(" ± ")[0]) for row in rows]
    assert values == sorted(values, reverse=True)  # best first
    shown = {row["Experiment"]: row for row in dvc.api.exp_show(repo=str(repo))}
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    for name, row in table.items():
        assert float(row[3].split(" ± ")[0]) == round(shown[name]["val_accuracy"], 4)  # dvc exp show agrees
        assert f"finetune_classifier.seed={name[-1]}" in row[2] and "promote.noise_z=0" in row[2]
        version = client.get_model_version("gpt-spam-classifier", row[4])
        assert version.tags["dvc_exp"] == name and row[5].endswith(f"(version {row[4]})")
        assert row[5].split()[0] in ("promoted", "kept")
    assert cli(repo, env, "review", "--sweep", "seeds").stdout == swept.stdout


# -- killed anywhere -------------------------------------------------------------------------------------

CHAIN = ("pretrain", "evaluate", "finetune_classifier", "finetune_instruct", "promote")
KILLED = ("pretrain", "finetune_classifier", "finetune_instruct", "promote")


def _registered(db: Path) -> int | None:
    # What a stage has left in the registry so far: versions, and promote's decision tags (None: busy).
    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as connection:
            versions = connection.execute("SELECT count(*) FROM model_versions").fetchone()[0]
            decisions = connection.execute(
                "SELECT count(*) FROM model_version_tags WHERE key = 'promotion.decision'").fetchone()[0]
    except sqlite3.OperationalError as exc:  # the store's tables are not there yet, or it is being written
        return 0 if "no such table" in str(exc) else None
    return versions + decisions


@pytest.fixture(scope="module")
def baseline(small_pipeline, tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> dict:
    """An uninterrupted run of the training chain, stage by stage, on the small pipeline's tokens and a new
    store: a copy of the project before each stage that a test kills, the registry after it, its duration."""
    template = small_pipeline[0]
    root = tmp_path_factory.mktemp("chain")
    project = root / "project"
    for path in ("data/raw", "data/tokens"):
        shutil.copytree(template / path, project / path)
    shutil.copy(template / "params.yaml", project / "params.yaml")
    found: dict = {}
    for stage in CHAIN:
        if stage in KILLED:
            shutil.copytree(project, root / f"before-{stage}")
        start = time.monotonic()
        result = run_stage(project, stage, mirror, LLM_PIPELINE_RUN_GROUP="g")
        assert result.returncode == 0, result.stderr
        found[stage] = (root / f"before-{stage}", registry_state(f"sqlite:///{project / 'mlflow.db'}"),
                        time.monotonic() - start)
    return found


def run_killed(project: Path, stage: str, mirror: Path, seconds: float | None) -> str:
    """Run `stage` in project and SIGKILL it `seconds` after its start, or (None) as soon as it has written to
    the registry; say what happened (it may end first)."""
    proc = subprocess.Popen([sys.executable, "-m", STAGES[stage].module], cwd=project,
                            env=stage_env(mirror, LLM_PIPELINE_RUN_GROUP="g"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db, start = project / "mlflow.db", time.monotonic()
    while (written := _registered(db)) is None:
        time.sleep(0.02)
    while proc.poll() is None:
        now = _registered(db)
        if (time.monotonic() - start >= seconds) if seconds is not None else (now is not None and now > written):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    code = proc.wait()
    return f"killed after {time.monotonic() - start:.1f} s" if code == -signal.SIGKILL else f"ended ({code})"


@pytest.mark.slow(40)
@pytest.mark.parametrize("stage", KILLED)
def test_kill_9_anywhere_then_rerun_leaves_the_uninterrupted_registry(baseline, stage, mirror, tmp_path):
    """Killed at a random point, then killed again right after the rerun first writes to the registry (it
    writes nothing new when the first run got that far), then run to the end: the registry an uninterrupted
    run leaves."""
    before, expected, seconds = baseline[stage]
    seed = int(os.environ.get("KILL_SEED", time.time_ns() % 1000))
    point = random.Random(seed).uniform(0, seconds)
    project = tmp_path / "project"
    shutil.copytree(before, project)
    first = run_killed(project, stage, mirror, point)
    second = run_killed(project, stage, mirror, None)
    print(f"{stage} (KILL_SEED={seed}): at {point:.1f} of {seconds:.1f} s {first}; after registering {second}")
    result = run_stage(project, stage, mirror, LLM_PIPELINE_RUN_GROUP="g")
    assert result.returncode == 0, result.stderr
    state = registry_state(f"sqlite:///{project / 'mlflow.db'}")
    assert state == expected, f"{stage}: {first}, then {second} (KILL_SEED={seed})"
    assert not any(LEFTOVER_TAG in tags for model in state.values() for tags, _ in model["versions"].values())
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("llm-pipeline").experiment_id],
                              f"tags.stage = '{stage}' AND attributes.status = 'RUNNING'")
    assert runs == []  # the killed runs were ended (KILLED, tagged interrupted) by the next run


KILLED_AFTER_REGISTERING = """
import os, signal
from pipeline.core.catalog import STAGES
from pipeline.registry.tracking import stage_run
from pipeline.registry.versions import register_trained
with stage_run("pretrain", {"seed": 1}):
    register_trained(STAGES["pretrain"], None)
    os.kill(os.getpid(), signal.SIGKILL)  # before DVC could keep the stage's outputs
"""
# Another experiment's stage, at work: it registered its output and its run is still going.
REGISTERED_AND_AT_WORK = """
import sys, time
from pathlib import Path
from pipeline.core.catalog import STAGES
from pipeline.registry.tracking import stage_run
from pipeline.registry.versions import register_trained
with stage_run("pretrain", {"seed": 0}):
    register_trained(STAGES["pretrain"], None)
    Path(sys.argv[1]).write_text("registered")
    time.sleep(600)
"""


@pytest.mark.slow
def test_a_killed_runs_version_that_no_output_holds_is_tagged_leftover(store: MlflowClient, tmp_path: Path, bpe_dir):
    """When the rerun after a kill trains another model (training that does not repeat bit for bit), the
    killed run's version stays, tagged leftover, and its run is ended as KILLED; the version of another
    experiment's stage still at work is left alone."""
    folder = STAGES["pretrain"].model.folder
    shutil.copytree(bpe_dir, tmp_path / "data/raw/gpt2_bpe")

    def save(seed: int) -> None:
        torch.manual_seed(seed)
        save_model(GPTModel(GPTConfig(vocab_size=50257, context_length=8, emb_dim=8, n_heads=2, n_layers=1)), folder,
                   extra={"metrics": {"train_loss": 1.0 + seed}, "data": {"train.bin": "ab" * 32}})

    save(0)
    registered = tmp_path / "registered"
    at_work = subprocess.Popen([sys.executable, "-c", REGISTERED_AND_AT_WORK, str(registered)], cwd=tmp_path,
                               env=stage_env(None, LLM_PIPELINE_RUN_GROUP="exp-other"), stderr=subprocess.PIPE, text=True)
    while not registered.exists():
        assert at_work.poll() is None, at_work.stderr.read()
        time.sleep(0.1)
    save(1)
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_REGISTERING], cwd=tmp_path, env=stage_env(None),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    save(2)
    try:
        with stage_run("pretrain", {"seed": 2}):
            rerun = register_trained(STAGES["pretrain"], None)
        live = store.get_model_version("gpt-base", "1")
        assert store.get_run(live.run_id).info.status == "RUNNING" and LEFTOVER_TAG not in live.tags
    finally:
        at_work.kill()
        at_work.wait()
    first = store.get_model_version("gpt-base", "2")
    assert str(rerun.version) == "3" and first.tags[DIGEST_TAG] != rerun.tags[DIGEST_TAG]
    assert first.tags[LEFTOVER_TAG] == (f"registered by run {first.run_id}, which did not finish its stage (KILLED); "
                                        "version 3 holds the stage's output")
    run = store.get_run(first.run_id)
    assert run.info.status == "KILLED" and "ended without ending the run" in run.data.tags["interrupted"]
    assert LEFTOVER_TAG not in store.get_model_version("gpt-base", "3").tags
