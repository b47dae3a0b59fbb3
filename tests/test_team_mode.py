"""Team mode on real services: PostgreSQL-backed MLflow and Prefect servers, a process worker running the
prefect.yaml deployment, and a DVC remote shared by two clones; everything on 127.0.0.1."""
from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dvc.api
import pytest
from mlflow import MlflowClient

from conftest import BIN, SMALL_TRAINING, answers, free_port, make_dvc_repo, set_param, sh, stop, wait_until
from pipeline.core.http import basic_auth, http_status
from pipeline.orchestration.services import STATE_DIR, STATE_FILE, SWEEP_POOL
from pipeline.registry.cards import decision_history
from test_serving import invoke

DVC, LLM_PIPELINE, PREFECT = str(BIN / "dvc"), str(BIN / "llm-pipeline"), str(BIN / "prefect")
MODELS = ("gpt-base", "gpt-instruct", "gpt-spam-classifier")


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def team(tmp_path: Path, mirror: Path, monkeypatch: pytest.MonkeyPatch):
    """Clone A of a small pipeline with a local DVC remote and a bare git repository as origin, its services up;
    yields (repo, env, ports) with env pointing clients at the servers; brings everything down (and deletes it)
    after."""
    (tmp_path / "a").mkdir()
    repo, env = make_dvc_repo(tmp_path / "a", mirror)
    for key, value in SMALL_TRAINING.items():
        set_param(repo, key, value)
    sh(repo, env, DVC, "remote", "add", "-d", "shared", str(tmp_path / "remote"))
    sh(repo, env, "git", "add", "-A")
    sh(repo, env, "git", "commit", "-q", "-m", "small pipeline, shared remote")
    sh(tmp_path, env, "git", "init", "-q", "--bare", str(tmp_path / "origin.git"))
    sh(repo, env, "git", "remote", "add", "origin", str(tmp_path / "origin.git"))
    sh(repo, env, "git", "push", "-q", "-u", "origin", "HEAD")
    ports = {"postgres": free_port(), "mlflow": free_port(), "prefect": free_port()}
    env.update(LLM_PIPELINE_DB_PASSWORD=secrets.token_urlsafe(16), PREFECT_HOME=str(tmp_path / "prefect-client"),
               LLM_PIPELINE_CREDENTIALS_DIR=str(tmp_path / "credentials"))
    flags = [arg for name, port in ports.items() for arg in (f"--{name}-port", str(port))]
    try:
        up = sh(repo, env, LLM_PIPELINE, "services", "up", *flags)
        assert f"MLFLOW_TRACKING_URI=http://127.0.0.1:{ports['mlflow']}" in up
        env.update(client_env(repo))  # as a team member's shell does: source .services/env
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # this process's MLflow clients
            monkeypatch.setenv(name, env[name])
        yield repo, env, ports
    finally:
        down = subprocess.run([LLM_PIPELINE, "services", "down", "--purge"], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert not [name for name, port in ports.items() if listening(port)]  # nothing is left listening
    assert not (repo / STATE_DIR).exists() and not (tmp_path / "credentials").exists()


def client_env(repo: Path) -> dict[str, str]:
    """The variables `.services/env` exports."""
    lines = (repo / STATE_DIR / "env").read_text().splitlines()
    return dict(shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in lines)


def prefect_api(env: dict, path: str, body: dict | None = None) -> dict | list:
    """GET (or POST body to) the Prefect server's API as the service account."""
    request = urllib.request.Request(f"{env['PREFECT_API_URL']}{path}", data=None if body is None else json.dumps(
        body).encode(), headers={"Content-Type": "application/json",
                                 "Authorization": basic_auth(*env["PREFECT_API_AUTH_STRING"].split(":", 1))})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def flow_run(env: dict, run_id: str) -> dict:
    return prefect_api(env, f"/flow_runs/{run_id}")


def trigger(repo: Path, env: dict) -> str:
    """Start a run of the nightly deployment now; its flow run id."""
    out = sh(repo, env, PREFECT, "deployment", "run", "pipeline/nightly")
    return re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)


def wait_done(env: dict, run_ids: list[str], timeout_s: float = 600) -> list[dict]:
    # A guard against a run that never ends, not a speed check: the tests share the cores with other workers.
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = [flow_run(env, run_id) for run_id in run_ids]
        if all(run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for run in runs):
            return runs
        time.sleep(2)
    raise AssertionError(f"flow runs not done in {timeout_s} s: {[flow_run(env, r)['state_name'] for r in run_ids]}")


@pytest.mark.slow(560)
def test_a_worker_runs_the_deployment_a_clone_pulls_it_and_a_lost_server_fails_in_one_line(team, tmp_path: Path):
    """One set of services (up to a minute to start on 2 cores) for the team's whole story: the worker's
    runs, a second clone served from the remote, then the tracking server lost while a stage trains."""
    repo, env, ports = team
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])

    # From clone A: the worker runs the whole pipeline; the models land on the server.
    first = wait_done(env, [trigger(repo, env)])[0]
    assert first["state_type"] == "COMPLETED", first["state"]
    for name in MODELS:
        assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    # The server stores artifacts itself: clients upload and download through it.
    assert client.get_experiment_by_name("llm-pipeline").artifact_location.startswith("mlflow-artifacts:")
    assert any((repo / STATE_DIR / "mlartifacts").rglob("model.safetensors"))

    people = only_who_belongs(repo, env, ports, tmp_path)

    # Two runs at once: the deployment's concurrency limit makes the second wait for the first.
    runs = wait_done(env, [trigger(repo, env), trigger(repo, env)])
    assert [run["state_type"] for run in runs] == ["COMPLETED", "COMPLETED"]
    runs.sort(key=lambda run: run["start_time"])
    assert runs[1]["start_time"] >= runs[0]["end_time"], runs
    assert len(client.search_model_versions("name = 'gpt-base'")) == 1  # nothing new: DVC found it up to date
    assert "up to date" in sh(repo, env, DVC, "status")

    # Shared through the DVC remote: clone B restores every output and runs the models without retraining.
    sh(repo, env, DVC, "push")
    sh(repo, env, "git", "add", "-A")
    sh(repo, env, "git", "commit", "-q", "-m", "the worker's run")
    sh(repo, env, "git", "push", "-q")
    clone = tmp_path / "b"
    sh(tmp_path, env, "git", "clone", "-q", str(tmp_path / "origin.git"), str(clone))
    sh(clone, env, DVC, "pull")
    assert "Data and pipelines are up to date." in sh(clone, env, DVC, "status")
    assert sh(clone, env, LLM_PIPELINE, "review") == sh(repo, env, LLM_PIPELINE, "review")
    served, local = (subprocess.run([LLM_PIPELINE, "classify", *model, "Win a free prize now"], cwd=clone, env=env,
                                    capture_output=True, text=True, timeout=300).stdout
                     for model in (["--model", "models:/gpt-spam-classifier@champion"], []))
    assert served == local and re.fullmatch(r"(ham|spam)\tham=[\d.]+ spam=[\d.]+\tWin a free prize now\n", local)
    for command in (["generate", "--model", "models:/gpt-base@champion", "--max-new-tokens", "3", "Hello"],
                    ["chat", "--model", "models:/gpt-instruct@champion", "--max-new-tokens", "3", "Say hi."]):
        sh(clone, env, LLM_PIPELINE, *command)
    port, log = free_port(), tmp_path / "serve.log"
    with log.open("w") as out:  # `serve` loads the champion through the tracking server
        server = subprocess.Popen([LLM_PIPELINE, "serve", "--port", str(port)], cwd=clone, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until("llm-pipeline serve", lambda: answers(f"http://127.0.0.1:{port}/ping"), server, log)
        predictions = invoke(f"http://127.0.0.1:{port}", {"inputs": {"text": ["Win a free prize now"]}})
    finally:
        stop(server)
    assert predictions[0]["label"] == local.split("\t")[0]

    sweep_on_two_workers(repo, clone, env, tmp_path)
    people_decide(repo, *people)

    # The tracking server lost mid-stage: one line, and no version half made (classifier versions 1 to 3 are the
    # worker's run's and the sweep's).
    set_param(repo, "finetune_classifier.epochs", 4)  # long enough to stop the server while it trains
    set_param(repo, "finetune_classifier.batch_size", 8)
    quick = {**env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}
    stage = subprocess.Popen([sys.executable, "-m", "pipeline.stages.finetune_classifier"], cwd=repo, env=quick,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = ""
    while "finetune_classifier:" not in err:  # the progress bar: training has started
        err += stage.stderr.read(1)
        assert stage.poll() is None, err
    os.killpg(json.loads((repo / STATE_FILE).read_text())["pids"]["mlflow"], signal.SIGKILL)
    _, rest = stage.communicate(timeout=240)
    lines = [line for line in (err + rest).replace("\r", "\n").splitlines() if "error" in line.lower()]
    assert stage.returncode == 1 and "Traceback" not in err + rest
    assert lines[-1].startswith("finetune_classifier: error: "), lines

    # The server back (same database and artifacts): no version was half made, and a rerun completes.
    sh(repo, env, LLM_PIPELINE, "services", "down")
    flags = [arg for name, port in ports.items() for arg in (f"--{name}-port", str(port))]
    sh(repo, env, LLM_PIPELINE, "services", "up", "--no-deploy", *flags)
    assert sorted(int(v.version) for v in client.search_model_versions("name = 'gpt-spam-classifier'")) == [1, 2, 3]
    sh(repo, env, sys.executable, "-m", "pipeline.stages.finetune_classifier")
    versions = client.search_model_versions("name = 'gpt-spam-classifier'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4]
    assert all(v.tags.get("stage") == "finetune_classifier" and "data.train.csv.sha256" in v.tags for v in versions)


def sweep_on_two_workers(repo: Path, clone_b: Path, env: dict, tmp_path: Path) -> None:
    """A sweep from clone A run by two workers of the sweep pool, in clones B and C: each runs a point, pushes it to
    origin and the DVC remote, and reports to the MLflow server; A pulls both and tabulates them."""
    sweep = [LLM_PIPELINE, "sweep", "-n", "seeds", "-S", "finetune_classifier.seed=1,2", "-S", "promote.noise_z=0",
             "--deployment"]

    def refused() -> str:
        done = subprocess.run(sweep, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
        return done.stderr.strip()

    set_param(repo, "promote.noise_z", 1)
    assert refused() == ("sweep: error: uncommitted changes: the workers run the sweep on HEAD; commit (and push) "
                         "them first")
    sh(repo, env, "git", "checkout", "params.yaml")
    assert refused() == (f"sweep: error: no worker polls work pool {SWEEP_POOL}: start one in each worker's clone "
                         "with `llm-pipeline flow worker`")
    clone_c = tmp_path / "c"
    sh(tmp_path, env, "git", "clone", "-q", str(tmp_path / "origin.git"), str(clone_c))
    workers = {}
    for clone in (clone_b, clone_c):
        with (tmp_path / f"worker-{clone.name}.log").open("w") as log:
            workers[clone] = subprocess.Popen([LLM_PIPELINE, "flow", "worker", "--name", f"worker-{clone.name}"],
                                              cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True)
    try:
        def both_online() -> bool:
            workers_of_pool = prefect_api(env, f"/work_pools/{SWEEP_POOL}/workers/filter", {})
            return [worker["status"] for worker in workers_of_pool] == ["ONLINE", "ONLINE"]

        wait_until("two sweep workers", both_online, workers[clone_c], tmp_path / "worker-c.log")
        swept = subprocess.run(sweep, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    finally:
        for worker in workers.values():
            stop(worker)
    assert swept.returncode == 0, swept.stderr + "".join(
        (tmp_path / f"worker-{clone.name}.log").read_text()[-3000:] for clone in workers)
    _, *rows = [re.split(r"\s{2,}", line) for line in swept.stdout.strip().splitlines()]
    table = {row[0]: row for row in rows}
    assert sorted(table) == ["seeds-1", "seeds-2"] and {row[1] for row in rows} == {"Success"}, swept.stdout

    # Each worker ran a point in its own clone: the experiment's ref is there, and on origin.
    ran = {clone.name: sh(clone, env, "git", "for-each-ref", "--format=%(refname:lstrip=-1)", "refs/exps").split()
           for clone in workers}
    assert sorted(ran["b"] + ran["c"]) == ["seeds-1", "seeds-2"] and ran["b"] and ran["c"], ran
    on_origin = sh(repo, env, "git", "ls-remote", "origin", "refs/exps/*").split()[1::2]
    assert sorted(ref.rsplit("/", 1)[1] for ref in on_origin) == ["seeds-1", "seeds-2"]

    # Every point reached the server: its stage runs, a version tagged with its name, its decision; and the table
    # agrees with `dvc exp show` in clone A, which pulled both.
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    shown = {row["Experiment"]: row for row in dvc.api.exp_show(repo=str(repo))}
    for name, row in table.items():
        runs = client.search_runs([client.get_experiment_by_name("llm-pipeline").experiment_id],
                                  f"tags.dvc_exp = '{name}' AND attributes.status = 'FINISHED'")
        assert {"finetune_classifier", "promote"} <= {run.data.tags.get("stage") for run in runs}, name
        version = client.get_model_version("gpt-spam-classifier", row[4])
        assert version.tags["dvc_exp"] == name and row[5].endswith(f"(version {row[4]})")
        assert float(row[3].split(" ± ")[0]) == round(shown[name]["val_accuracy"], 4)
    review = subprocess.run([LLM_PIPELINE, "review", "--sweep", "seeds"], cwd=repo, env=env, capture_output=True,
                            text=True, timeout=120)
    assert review.stdout == swept.stdout, review.stderr


def only_who_belongs(repo: Path, env: dict, ports: dict, tmp_path: Path) -> tuple[dict, dict]:
    """Both servers refuse anyone without the right credentials; people get roles; secrets stay private.
    Returns the environments of a reviewer (alice) and a viewer (bob)."""
    mlflow_url, prefect_url = env["MLFLOW_TRACKING_URI"], env["PREFECT_API_URL"]

    def mlflow_status(user: str | None, password: str = "") -> int | None:
        return http_status(f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1",
                           basic_auth(user, password) if user else None)

    def prefect_status(auth_string: str | None) -> int | None:
        return http_status(f"{prefect_url}/flows/filter", basic_auth(*auth_string.split(":", 1)) if auth_string
                           else None, json_body=b"{}")

    assert mlflow_status(None) == 401 and mlflow_status("llm-pipeline", "wrong") == 401
    assert mlflow_status("admin", "password1234") == 401  # MLflow's once-documented default admin password
    assert mlflow_status(env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == 200
    assert prefect_status(None) == 401 and prefect_status("llm-pipeline:wrong") == 401
    assert prefect_status(env["PREFECT_API_AUTH_STRING"]) == 200

    # A client without credentials, or with wrong ones: one line naming the server and what to set.
    anonymous = {k: v for k, v in env.items() if not k.startswith("MLFLOW_TRACKING_USER")}
    anonymous.pop("MLFLOW_TRACKING_PASSWORD")
    for who, client, said in (
            ("nobody", anonymous, "requests without credentials"),
            ("wrong", {**env, "MLFLOW_TRACKING_PASSWORD": "wrong"}, "the password of user llm-pipeline")):
        refused = subprocess.run([LLM_PIPELINE, "review"], cwd=repo, env=client, capture_output=True, text=True,
                                 timeout=120)
        assert refused.returncode == 1 and refused.stderr.splitlines() == [
            f"review: error: MLflow tracking server {mlflow_url} refused {said} (HTTP 401): set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"], (who, refused.stderr)

    # People: a reviewer (password generated into a mode-600 file) and a viewer (password from the environment).
    added = sh(repo, env, LLM_PIPELINE, "services", "add-user", "alice", "--role", "reviewer")
    alice_file = tmp_path / "credentials" / "users" / "alice"
    assert f"its password is in {alice_file} (mode 600)" in added
    bob_password = secrets.token_urlsafe(12)
    sh(repo, {**env, "LLM_PIPELINE_USER_PASSWORD": bob_password}, LLM_PIPELINE, "services", "add-user", "bob",
       "--role", "viewer")
    alice = {**env, "MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": alice_file.read_text().strip()}
    registry = MlflowClient(mlflow_url)
    before = registry.get_registered_model("gpt-base").aliases
    bob = {**env, "MLFLOW_TRACKING_USERNAME": "bob", "MLFLOW_TRACKING_PASSWORD": bob_password}
    for action in ("client.set_registered_model_alias('gpt-base', 'reviewed', '1')",
                   "client.delete_model_version('gpt-base', '1')"):
        viewer = subprocess.run([sys.executable, "-c", f"from mlflow import MlflowClient\nclient = MlflowClient()\n"
                                 f"{action}"], env=bob, capture_output=True, text=True, timeout=120)
        assert viewer.returncode == 1 and "error code 403" in viewer.stderr, viewer.stderr
    # Through the pipeline: one line naming the permission the viewer lacks.
    stage = subprocess.run([sys.executable, "-m", "pipeline.stages.promote"], cwd=repo, env=bob, capture_output=True,
                           text=True, timeout=300)
    assert stage.returncode == 1 and "Traceback" not in stage.stderr, stage.stderr
    assert stage.stderr.strip().splitlines()[-1] == (
        f"promote: error: MLflow tracking server {mlflow_url} refused user bob (HTTP 403) on model-versions/create: it "
        "needs EDIT on the registered model (registering a version); the team's admin grants roles "
        "(`llm-pipeline services add-user`)")  # the ticket of the model's lock, before any decision
    assert registry.get_registered_model("gpt-base").aliases == before  # nothing changed
    assert [version.version for version in registry.search_model_versions("name = 'gpt-base'")] == ["1"]
    sh(repo, alice, sys.executable, "-c", "from mlflow import MlflowClient\n"
       "MlflowClient().set_registered_model_alias('gpt-base', 'reviewed', '1')")
    assert registry.get_registered_model("gpt-base").aliases == {**before, "reviewed": "1"}
    registry.delete_registered_model_alias("gpt-base", "reviewed")

    # Credential files: owner only, from the first byte; no secret on a command line `ps` shows.
    private = [tmp_path / "credentials", *(tmp_path / "credentials").rglob("*"), repo / STATE_DIR / "env"]
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in private} == {
        path.name: "0o700" if path.is_dir() else "0o600" for path in private}
    secret_values = [path.read_text().strip() for path in private if path.is_file() and "=" not in path.read_text()]
    secret_values += [env["LLM_PIPELINE_DB_PASSWORD"], bob_password, env["PREFECT_API_AUTH_STRING"]]
    commands = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
    assert "mlflow server --app-name basic-auth" in commands
    assert not [value for value in secret_values if value in commands]
    return alice, bob


def people_decide(repo: Path, alice: dict, bob: dict) -> None:
    """Over HTTP, as people: a viewer's approve, reject and rollback are refused (403, one line, nothing changed);
    a reviewer's are recorded under her name."""
    model = "gpt-spam-classifier"
    registry = MlflowClient(alice["MLFLOW_TRACKING_URI"])
    champion = str(registry.get_registered_model(model).aliases["champion"])
    other = max((v for v in registry.search_model_versions(f"name = '{model}'") if str(v.version) != champion),
                key=lambda v: int(v.version)).version

    def review(who: dict, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([LLM_PIPELINE, "review", *argv], cwd=repo, env=who, capture_output=True, text=True,
                              timeout=120)

    before = {v.version: v.tags for v in registry.search_model_versions(f"name = '{model}'")}
    for argv in (("approve", model, other), ("reject", model, other), ("rollback", model)):
        refused = review(bob, *argv, "--reason", "I only read")
        assert refused.returncode == 1 and refused.stderr.splitlines() == [
            f"review {argv[0]}: error: MLflow tracking server {bob['MLFLOW_TRACKING_URI']} refused user bob (HTTP 403) "
            "on model-versions/create: it needs EDIT on the registered model (registering a version); the team's "
            "admin grants roles (`llm-pipeline services add-user`)"], refused.stderr
    assert {v.version: v.tags for v in registry.search_model_versions(f"name = '{model}'")} == before
    assert str(registry.get_registered_model(model).aliases["champion"]) == champion

    approved = review(alice, "approve", model, other, "--reason", "read the samples")
    assert approved.returncode == 0 and approved.stdout == (
        f"{model}: champion is now version {other} (was version {champion}), approved by alice\n"), approved.stderr
    rolled = review(alice, "rollback", model, "--reason", "users preferred the old one")
    assert rolled.returncode == 0 and rolled.stdout.endswith("rolled back by alice\n"), rolled.stderr
    assert str(registry.get_registered_model(model).aliases["champion"]) == champion
    rejected = review(alice, "reject", model, other, "--reason", "not again")
    assert rejected.returncode == 0 and "rejected by alice" in rejected.stdout, rejected.stderr
    history = decision_history(registry.get_model_version(model, other).tags)
    assert [(entry["decision"], entry["by"]) for entry in history] == [
        ("approved", "alice"), ("rolled back", "alice"), ("rejected", "alice")]
    assert "| alice | rolled back (champion now version " in registry.get_model_version(model, other).description



def test_processes_generating_one_secret_at_once_all_get_the_first_written(tmp_path: Path):
    """Four processes asking for a credential that does not exist yet: one is written, mode 600, and all four
    read that one (a later rename must not replace the secret another process already handed out)."""
    code = ("import sys, time; from pathlib import Path; from pipeline.orchestration.access import secret\n"
            "time.sleep(max(0.0, float(sys.argv[1]) - time.time()))\n"
            "print(secret(Path(sys.argv[2]), 'service_password'))")
    env = {**os.environ, "LLM_PIPELINE_CREDENTIALS_DIR": str(tmp_path / "credentials")}
    start = str(time.time() + 3)  # all four past their imports, then at once
    procs = [subprocess.Popen([sys.executable, "-c", code, start, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(4)]
    seen = {proc.communicate(timeout=120)[0].strip() for proc in procs}
    written = tmp_path / "credentials" / "service_password"
    assert seen == {written.read_text().strip()} and oct(written.stat().st_mode & 0o777) == "0o600"
    assert [path.name for path in (tmp_path / "credentials").iterdir()] == ["service_password"]  # no leftovers
