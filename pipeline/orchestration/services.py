"""The team services (`llm-pipeline services`): PostgreSQL, MLflow and Prefect servers and a worker on 127.0.0.1."""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from gpt.files import atomic_write_json
from pipeline.core.http import basic_auth
from pipeline.core.processes import BIN, signal_group, stop_group, tool_env
from pipeline.orchestration.access import (ADMIN, DB_PASSWORD_ENV, PEOPLE, SERVICE_ACCOUNT, USER_PASSWORD_ENV,
                                           MlflowAdmin, credentials_dir, prefect_auth_string, secret,
                                           write_private)

STATE_DIR = Path(".services")  # in the project: logs, the artifact store, what is running (git-ignored)
STATE_FILE = STATE_DIR / "state.json"
ENV_FILE = STATE_DIR / "env"  # `source` it: the URLs and the service account's credentials (mode 600)
DB_USER = "llm_pipeline"
DATABASES = ("mlflow", "mlflow_auth", "prefect")  # runs and registry; MLflow's users and permissions; Prefect
WORK_POOL = "llm-pipeline"  # prefect.yaml's deployments name it
SWEEP_POOL = "llm-pipeline-sweeps"  # and its sweep deployment: workers of their own clones (`llm-pipeline flow worker`)
DEFAULT_PORTS = {"postgres": 5433, "mlflow": 5050, "prefect": 4200}
SERVERS = ("worker", "prefect", "mlflow")  # started last to first, stopped in this order
START_TIMEOUT_S = 180.0
# MLflow's server without job execution: it would start seven job-runner processes for its GenAI features'
# queue, which the pipeline does not use, each importing MLflow (about 5 s of CPU each on 2 cores).
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
STOP_GRACE_S = 20.0
AUTH_CACHE_S = 600
USER_NAME = re.compile(r"[A-Za-z][\w.@-]{0,63}")


class ServiceError(OSError):
    """A service cannot be started or stopped (an OSError, so it is reported in one line)."""


def _run(command: list[str], what: str, **kwargs: Any) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, **kwargs)
    if done.returncode:
        last = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}").splitlines()[-1]
        raise ServiceError(f"{what} failed: {last}")
    return done


# -- PostgreSQL (Debian's packages) ------------------------------------------------------------------

def postgres_bin() -> Path:
    """The folder of PostgreSQL's server programs (initdb, pg_ctl), the newest Debian installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                   key=lambda path: int(path.parts[-3]) if path.parts[-3].isdigit() else 0)
    if found:
        return found[-1].parent
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).parent
    raise ServiceError("PostgreSQL is not installed (Debian: apt-get install postgresql)")


def _as_postgres() -> list[str]:
    # PostgreSQL refuses to run as root; Debian's package makes a `postgres` user for it.
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def cluster_dir(project: Path) -> Path:
    """Where the database cluster lives: in the project's state folder, or, for root (whose home user
    postgres cannot enter), in /var/tmp under a name derived from the project's path."""
    if os.geteuid() != 0:
        return project / STATE_DIR / "postgres"
    digest = hashlib.sha256(str(project).encode()).hexdigest()[:12]
    return Path("/var/tmp") / f"llm-pipeline-{digest}" / "postgres"


def start_postgres(project: Path, port: int, password: str) -> dict[str, str]:
    """Create the cluster (first time) and databases, start PostgreSQL on 127.0.0.1:port; its facts."""
    bin_dir, data = postgres_bin(), cluster_dir(project)
    home = data.parent  # the log and the socket, writable by the server's user
    home.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(home, "postgres", "postgres")
    if not (data / "PG_VERSION").is_file():
        pwfile = home / "pwfile"
        write_private(pwfile, password)
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres", "postgres")
        try:
            _run([*_as_postgres(), str(bin_dir / "initdb"), "-D", str(data), "-U", DB_USER, f"--pwfile={pwfile}",
                  "--auth=scram-sha-256", "--encoding=UTF8", "--no-instructions"], "initdb")
        finally:
            pwfile.unlink()
    options = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={home}"
    _run([*_as_postgres(), str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(home / "postgres.log"),
          "-o", options, "-w", "-t", "60", "start"], f"PostgreSQL on 127.0.0.1:{port}")
    env = {**os.environ, "PGPASSWORD": password}
    for name in DATABASES:
        done = subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER, name],
                              capture_output=True, text=True, env=env)
        if done.returncode and "already exists" not in done.stderr:
            raise ServiceError(f"createdb {name} failed: {done.stderr.strip()}")
    return {"bin": str(bin_dir), "data": str(data), "log": str(home / "postgres.log")}


def stop_postgres(facts: dict[str, str]) -> None:
    """Stop the cluster (fast shutdown: sessions are closed, nothing is lost)."""
    subprocess.run([*_as_postgres(), str(Path(facts["bin"]) / "pg_ctl"), "-D", facts["data"], "-m", "fast", "-w",
                    "stop"], capture_output=True, text=True)


# -- servers --------------------------------------------------------------------------------------

def _answers(url: str, data: bytes | None = None, authorization: str | None = None) -> bytes | None:
    headers = {"Content-Type": "application/json", **({"Authorization": authorization} if authorization else {})}
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.read()
    except (OSError, urllib.error.HTTPError):
        return None


def _spawn(name: str, command: list[str], env: dict[str, str], project: Path) -> int:
    logs = project / STATE_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / f"{name}.log").open("a") as log:
        # Its own session: stopping the group stops what it started too (uvicorn under mlflow, flow runs
        # under the worker).
        process = subprocess.Popen(command, cwd=project, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return process.pid


def _wait(what: str, ready: Callable[[], bool], pid: int, project: Path, name: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if ready():
            return
        if not signal_group(pid, 0):
            log = (project / STATE_DIR / "logs" / f"{name}.log").read_text(errors="replace").strip().splitlines()
            raise ServiceError(f"{what} exited at start: {log[-1] if log else 'no output'} "
                               f"(log: {STATE_DIR / 'logs' / f'{name}.log'})")
        time.sleep(0.5)
    raise ServiceError(f"{what} did not answer within {START_TIMEOUT_S:.0f} s (log: {STATE_DIR / 'logs'})")


def urls(ports: dict[str, int]) -> dict[str, str]:
    """What clients set: MLFLOW_TRACKING_URI and PREFECT_API_URL."""
    return {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['mlflow']}",
            "PREFECT_API_URL": f"http://127.0.0.1:{ports['prefect']}/api"}


def _prefect_env(project: Path, api_url: str) -> dict[str, str]:
    return {**tool_env(), "PREFECT_API_URL": api_url, "PREFECT_HOME": str(project / STATE_DIR / "prefect"),
            "PREFECT_API_AUTH_STRING": prefect_auth_string(project),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def client_env(project: Path, ports: dict[str, int]) -> dict[str, str]:
    """What the pipeline's clients set (`.services/env`): the servers' URLs and the service account's credentials."""
    return {**urls(ports), "MLFLOW_TRACKING_USERNAME": SERVICE_ACCOUNT,
            "MLFLOW_TRACKING_PASSWORD": secret(project, "service_password"),
            "PREFECT_API_AUTH_STRING": prefect_auth_string(project)}


def _auth_config(project: Path, database: str) -> Path:
    """MLflow's auth app config (mode 600): its users and permissions in the team's PostgreSQL, READ by default.
    The admin's password reaches the server through its environment, not this file."""
    # The credential cache: without it every request pays a PBKDF2 hash check (about 0.25 s here; registering
    # three models made 955 requests). The server runs one worker, which drops a user's entry when the user's
    # password changes or the user is deleted through the API, so the cache is never stale for our changes.
    path = credentials_dir(project) / "mlflow_auth.ini"
    write_private(path, "[mlflow]\ndefault_permission = READ\n"
                  f"database_uri = postgresql+psycopg2://{DB_USER}@{database}/mlflow_auth\n"
                  f"admin_username = {ADMIN}\n"
                  "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                  f"auth_cache_ttl_seconds = {AUTH_CACHE_S}\n")
    return path


def up(project: Path, ports: dict[str, int], deploy: bool = True) -> dict[str, Any]:
    """Start PostgreSQL, the MLflow server (backed by it, serving artifacts itself), the Prefect server
    (backed by it), the process work pool with its worker, and deploy prefect.yaml; on any failure,
    stop what was started. Return the state written to .services/state.json."""
    state_file = project / STATE_FILE
    if state_file.is_file():
        before = json.loads(state_file.read_text())
        running = [name for name, pid in before["pids"].items() if signal_group(pid, 0)]
        if running:
            raise ServiceError(f"services are already up ({', '.join(running)}); `llm-pipeline services down` first")
        _stop(before)  # left by a reboot or a killed session: PostgreSQL may still run
        state_file.unlink()
    password = secret(project, "db_password", DB_PASSWORD_ENV)
    admin_password = secret(project, "mlflow_admin_password")
    state: dict[str, Any] = {"ports": ports, "pids": {}}
    clients = client_env(project, ports)
    try:
        state["postgres"] = start_postgres(project, ports["postgres"], password)
        database = f"127.0.0.1:{ports['postgres']}"
        # The backend URI carries no password: libpq reads $PGPASSWORD, which no `ps` shows.
        # Secrets in the environment, never on a command line, where `ps` shows them to everyone.
        mlflow_env = {**tool_env(), **MLFLOW_SERVER_ENV, "PGPASSWORD": password,
                      "MLFLOW_BACKEND_STORE_URI": f"postgresql+psycopg2://{DB_USER}@{database}/mlflow",
                      "MLFLOW_AUTH_CONFIG_PATH": str(_auth_config(project, database)),
                      "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
                      "MLFLOW_FLASK_SERVER_SECRET_KEY": secret(project, "mlflow_flask_secret_key")}
        state["pids"]["mlflow"] = _spawn("mlflow", [
            str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port",
            str(ports["mlflow"]), "--workers", "1", "--serve-artifacts", "--artifacts-destination",
            str(project / STATE_DIR / "mlartifacts")], mlflow_env, project)
        prefect_env = _prefect_env(project, clients["PREFECT_API_URL"])
        server_env = {**prefect_env, "PREFECT_API_DATABASE_CONNECTION_URL":
                      f"postgresql+asyncpg://{DB_USER}:{password}@{database}/prefect",
                      "PREFECT_SERVER_API_AUTH_STRING": prefect_env["PREFECT_API_AUTH_STRING"]}
        server_env.pop("PREFECT_API_URL")
        server_env.pop("PREFECT_API_AUTH_STRING")
        state["pids"]["prefect"] = _spawn("prefect", [
            str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(ports["prefect"])],
            server_env, project)
        _wait("MLflow server", lambda: _answers(f"{clients['MLFLOW_TRACKING_URI']}/health") is not None,
              state["pids"]["mlflow"], project, "mlflow")
        admin = MlflowAdmin(clients["MLFLOW_TRACKING_URI"], admin_password)
        admin.check()  # reachable is not enough: it must take the admin's credentials
        admin.add_user(SERVICE_ACCOUNT, clients["MLFLOW_TRACKING_PASSWORD"], "service")
        prefect_auth = basic_auth(*prefect_env["PREFECT_API_AUTH_STRING"].split(":", 1))
        _wait("Prefect server", lambda: _answers(f"{clients['PREFECT_API_URL']}/health", None, prefect_auth)
              is not None, state["pids"]["prefect"], project, "prefect")
        for pool in (WORK_POOL, SWEEP_POOL):
            _run([str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process", "--overwrite"],
                 f"creating work pool {pool}", env=prefect_env, cwd=project)
        if deploy:
            _run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], "prefect deploy --all",
                 env=prefect_env, cwd=project)
        # The worker's flow runs log to the MLflow server as the service account; they inherit this environment.
        worker_env = {**prefect_env, **clients}
        state["pids"]["worker"] = _spawn("worker", [
            str(BIN / "prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process"], worker_env, project)
        workers = f"{clients['PREFECT_API_URL']}/work_pools/{WORK_POOL}/workers/filter"
        _wait("Prefect worker", lambda: bool(json.loads(_answers(workers, b"{}", prefect_auth) or b"[]")),
              state["pids"]["worker"], project, "worker")
    except BaseException:
        _stop(state)
        raise
    atomic_write_json(state_file, state)
    write_private(project / ENV_FILE, "".join(f"export {key}={shlex.quote(value)}\n" for key, value in clients.items()))
    return state


def _stop(state: dict[str, Any]) -> None:
    for name in SERVERS:
        if name in state["pids"]:
            stop_group(state["pids"][name], STOP_GRACE_S)
    if "postgres" in state:
        stop_postgres(state["postgres"])


def down(project: Path, purge: bool = False) -> bool:
    """Stop everything `up` started; whether anything was up. The databases and artifacts stay for the
    next `up`, unless `purge`, which deletes them and the state folder."""
    state_file = project / STATE_FILE
    was_up = state_file.is_file()
    if was_up:
        _stop(json.loads(state_file.read_text()))
        state_file.unlink()
    if purge:
        shutil.rmtree(cluster_dir(project).parent, ignore_errors=True)  # its log and socket folder too
        shutil.rmtree(project / STATE_DIR, ignore_errors=True)
        shutil.rmtree(credentials_dir(project), ignore_errors=True)
    return was_up


def add_user(project: Path, username: str, role: str) -> Path | None:
    """Give person `username` the MLflow role `role` (reviewer or viewer) on the running server, creating the user
    or setting its password: $LLM_PIPELINE_USER_PASSWORD, else one generated into a mode-600 file, whose path is
    returned for handing over."""
    if not USER_NAME.fullmatch(username) or username in (ADMIN, SERVICE_ACCOUNT):
        raise ServiceError(f"user name {username!r}: letters, digits and ._@- (starting with a letter), "
                           f"not {ADMIN} or {SERVICE_ACCOUNT}")
    if role not in PEOPLE:
        raise ServiceError(f"--role {role}: one of {', '.join(PEOPLE)}")
    state_file = project / STATE_FILE
    if not state_file.is_file():
        raise ServiceError("services are not up: `llm-pipeline services up` first")
    admin = MlflowAdmin(urls(json.loads(state_file.read_text())["ports"])["MLFLOW_TRACKING_URI"],
                        secret(project, "mlflow_admin_password"))
    admin.check()
    handed = None
    password = os.environ.get(USER_PASSWORD_ENV)
    if not password:
        password = secrets.token_urlsafe(18)
        (credentials_dir(project) / "users").mkdir(mode=0o700, exist_ok=True)
        handed = credentials_dir(project) / "users" / username
        write_private(handed, password + "\n")
    admin.add_user(username, password, role)
    return handed
