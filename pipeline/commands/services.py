"""`llm-pipeline services up|down|status|add-user`: PostgreSQL, MLflow and Prefect servers and a worker on 127.0.0.1."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.core.errors import reporting_errors
from pipeline.core.processes import signal_group
from pipeline.orchestration.access import PEOPLE, SERVICE_ACCOUNT, USER_PASSWORD_ENV
from pipeline.orchestration.services import (DATABASES, DEFAULT_PORTS, ENV_FILE, SERVERS, STATE_DIR, STATE_FILE,
                                             WORK_POOL, add_user, down, up, urls)


def _up(project: Path, args: argparse.Namespace) -> None:
    ports = {name: getattr(args, f"{name}_port") for name in DEFAULT_PORTS}
    state = up(project, ports, deploy=not args.no_deploy)
    print(f"postgres  127.0.0.1:{ports['postgres']}  databases {', '.join(DATABASES)} "
          f"(cluster {state['postgres']['data']})")
    for key, value in urls(ports).items():
        print(f"{key}={value}")
    print(f"worker    pool {WORK_POOL}, pid {state['pids']['worker']}; logs in {STATE_DIR / 'logs'}")
    print(f"clients:  source {ENV_FILE} (the URLs and the service account {SERVICE_ACCOUNT}'s credentials)")


def _down(project: Path, args: argparse.Namespace) -> None:
    print("services: stopped" if down(project, args.purge) else "services: nothing was up")


def _status(project: Path, args: argparse.Namespace) -> None:
    state_file = project / STATE_FILE
    if not state_file.is_file():
        print("services: down")
        return
    state = json.loads(state_file.read_text())
    for name in reversed(SERVERS):
        print(f"{name}: {'running' if signal_group(state['pids'][name], 0) else 'stopped'} (pid {state['pids'][name]})")


def _add_user(project: Path, args: argparse.Namespace) -> None:
    handed = add_user(project, args.name, args.role)
    where = f"its password is in {handed} (mode 600)" if handed else f"its password is ${USER_PASSWORD_ENV}"
    print(f"MLflow user {args.name}: role {args.role}; {where}")


def main(argv: list[str] | None = None) -> None:
    """`llm-pipeline services up|down|status|add-user`."""
    parser = argparse.ArgumentParser(prog="llm-pipeline services", description=__doc__)
    actions = parser.add_subparsers(dest="action", required=True)
    up_cmd = actions.add_parser("up", help="start them (MLflow and Prefect with authentication)")
    for name, port in DEFAULT_PORTS.items():
        up_cmd.add_argument(f"--{name}-port", type=int, default=port, help=f"(default: {port})")
    up_cmd.add_argument("--no-deploy", action="store_true", help="do not run `prefect deploy --all`")
    up_cmd.set_defaults(handler=_up)
    down_cmd = actions.add_parser("down", help="stop them")
    down_cmd.add_argument("--purge", action="store_true",
                          help="also delete the databases, artifacts, logs and credentials")
    down_cmd.set_defaults(handler=_down)
    actions.add_parser("status", help="which are running").set_defaults(handler=_status)
    user_cmd = actions.add_parser("add-user", help="let a person into the MLflow server", description=(
        "Create an MLflow user (or set its password) with a role: reviewer (EDIT on every registered model, "
        "including those created later: moves aliases, tags versions) or viewer (READ). The password is "
        f"${USER_PASSWORD_ENV} when set, else generated into a mode-600 file named here."))
    user_cmd.add_argument("name")
    user_cmd.add_argument("--role", choices=PEOPLE, required=True)
    user_cmd.set_defaults(handler=_add_user)
    args = parser.parse_args(argv)
    project = Path.cwd().resolve()
    with reporting_errors("services"):
        args.handler(project, args)


if __name__ == "__main__":
    main()
