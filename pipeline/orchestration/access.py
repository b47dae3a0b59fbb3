"""Who may do what on the team's servers: credentials kept outside the repository, MLflow's users and roles, and
Prefect's one shared auth string."""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.core.http import TIMEOUT_S, basic_auth, http_status

CREDENTIALS_ENV = "LLM_PIPELINE_CREDENTIALS_DIR"  # where the credential files live (default: below ~/.config)
DB_PASSWORD_ENV = "LLM_PIPELINE_DB_PASSWORD"
USER_PASSWORD_ENV = "LLM_PIPELINE_USER_PASSWORD"  # add-user: the new person's password, else one is generated
ADMIN = "admin"
SERVICE_ACCOUNT = "llm-pipeline"  # the stages and the worker: they create runs and versions and move aliases
PREFECT_USER = "llm-pipeline"
WORKSPACE = "default"  # MLflow's roles live in a workspace; without workspaces there is this one
# A role is a set of grants on every resource of a type ("*"), so a model created later is covered as it appears.
ROLES = {
    "service": {"experiment": "MANAGE", "registered_model": "MANAGE"},
    "reviewer": {"experiment": "READ", "registered_model": "EDIT"},
    "viewer": {"experiment": "READ", "registered_model": "READ"},
}
PEOPLE = ("reviewer", "viewer")  # the roles `services add-user` gives


class AccessError(OSError):
    """A server refused or could not be asked (an OSError, so commands report it in one line)."""


# -- credential files ---------------------------------------------------------------------------------------

def credentials_dir(project: Path) -> Path:
    """The folder of this project's credential files (mode 700): $LLM_PIPELINE_CREDENTIALS_DIR, else
    ~/.config/llm-pipeline/<project>-<hash of its path>; outside the repository, so never committed or copied
    with it."""
    if os.environ.get(CREDENTIALS_ENV):
        folder = Path(os.environ[CREDENTIALS_ENV])
    else:
        digest = hashlib.sha256(str(project).encode()).hexdigest()[:12]
        config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        folder = config / "llm-pipeline" / f"{project.name}-{digest}"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    return folder


def write_private(path: Path, text: str, keep_existing: bool = False) -> None:
    """Write text to path readable by its owner only, from the first byte: a mode-600 temporary file beside it,
    then one rename; with keep_existing, a path that exists (another process wrote it first) is left as it is."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o600)  # whatever the umask
            handle.write(text)
        if keep_existing:
            try:
                os.link(tmp, path)  # atomic, and fails if path exists
            except FileExistsError:
                pass
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def secret(project: Path, name: str, env: str | None = None) -> str:
    """The secret `name`: $env when set, else its file in credentials_dir, generated there the first time."""
    if env and os.environ.get(env):
        return os.environ[env]
    path = credentials_dir(project) / name
    if not path.is_file():
        # Two processes generating it at once must end with one secret, the first written, not one each.
        write_private(path, secrets.token_urlsafe(24), keep_existing=True)
    return path.read_text(encoding="utf-8").strip()


def prefect_auth_string(project: Path) -> str:
    """Prefect's shared `user:password` (server.api.auth_string on the server, api.auth_string on clients)."""
    return f"{PREFECT_USER}:{secret(project, 'prefect_password')}"


# -- MLflow's auth app, over its REST API ---------------------------------------------------------------------

class MlflowAdmin:
    """The MLflow server's auth app, as its admin."""

    def __init__(self, server: str, password: str):
        self.server = server.rstrip("/")
        self.authorization = basic_auth(ADMIN, password)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             query: dict[str, str] | None = None) -> dict[str, Any]:
        url = f"{self.server}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": self.authorization, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                text = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace").strip()
            exc.close()
            raise AccessError(f"MLflow server {self.server}: {method} {path} answered {exc.code} "
                              f"({detail[:200] or exc.reason})") from None
        except OSError as exc:
            raise AccessError(f"MLflow server {self.server} is unreachable ({getattr(exc, 'reason', exc)})") from None
        return json.loads(text) if text else {}

    def check(self) -> None:
        """That the server takes the admin's credentials; a refusal says which status it gave."""
        code = http_status(f"{self.server}/api/2.0/mlflow/users/get?username={ADMIN}", self.authorization)
        if code in (401, 403):
            raise AccessError(f"MLflow server {self.server} refused the admin's credentials (HTTP {code}): its auth "
                              "database has another admin password (`services down --purge` starts afresh)")
        if code != 200:
            raise AccessError(f"MLflow server {self.server}: the auth app answered HTTP {code}")

    def has_user(self, username: str) -> bool:
        return http_status(f"{self.server}/api/2.0/mlflow/users/get?username={urllib.parse.quote(username)}",
                      self.authorization) == 200

    def roles(self) -> dict[str, int]:
        """{role name: id}, creating the roles of ROLES that are missing."""
        found = {role["name"]: role["id"] for role in self.call(
            "GET", "/api/3.0/mlflow/roles/list", query={"workspace": WORKSPACE})["roles"]}
        for name, grants in ROLES.items():
            if name not in found:
                found[name] = self.call("POST", "/api/3.0/mlflow/roles/create", {
                    "workspace": WORKSPACE, "name": name})["role"]["id"]
                for resource_type, permission in grants.items():
                    self.call("POST", "/api/3.0/mlflow/roles/permissions/add", {
                        "role_id": found[name], "resource_type": resource_type, "resource_pattern": "*",
                        "permission": permission})
        return found

    def add_user(self, username: str, password: str, role: str) -> None:
        """Create the user (or set its password) with `role` as its only role of ROLES."""
        if self.has_user(username):
            self.call("PATCH", "/api/2.0/mlflow/users/update-password", {"username": username, "password": password})
        else:
            self.call("POST", "/api/2.0/mlflow/users/create", {"username": username, "password": password})
        ids = self.roles()
        held = {held["id"] for held in self.call("GET", "/api/3.0/mlflow/users/roles/list",
                                                 query={"username": username})["roles"]}
        for name, role_id in ids.items():
            if name != role and role_id in held:
                self.call("DELETE", "/api/3.0/mlflow/roles/unassign", {"username": username, "role_id": role_id})
        if ids[role] not in held:
            self.call("POST", "/api/3.0/mlflow/roles/assign", {"username": username, "role_id": ids[role]})
