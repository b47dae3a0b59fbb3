"""`llm-pipeline services up|down|status`: PostgreSQL, MLflow and Prefect servers and a worker on 127.0.0.1."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.core.errors import reporting_errors
from pipeline.core.processes import signal_group
from pipeline.orchestration.services import (DATABASES, DEFAULT_PORTS, ENV_FILE, SERVERS, STATE_DIR, STATE_FILE,
                                             WORK_POOL, down, up, urls)


def main(argv: list[str] | None = None) -> None:
    """`llm-pipeline services up|down|status`."""
    parser = argparse.ArgumentParser(prog="llm-pipeline services", description=__doc__)
    parser.add_argument("action", choices=("up", "down", "status"))
    for name, port in DEFAULT_PORTS.items():
        parser.add_argument(f"--{name}-port", type=int, default=port, help=f"(default: {port})")
    parser.add_argument("--no-deploy", action="store_true", help="up: do not run `prefect deploy --all`")
    parser.add_argument("--purge", action="store_true", help="down: also delete the databases, artifacts and logs")
    args = parser.parse_args(argv)
    project = Path.cwd().resolve()
    with reporting_errors("services"):
        if args.action == "up":
            ports = {name: getattr(args, f"{name}_port") for name in DEFAULT_PORTS}
            state = up(project, ports, deploy=not args.no_deploy)
            print(f"postgres  127.0.0.1:{ports['postgres']}  databases {', '.join(DATABASES)} "
                  f"(cluster {state['postgres']['data']})")
            for key, value in urls(ports).items():
                print(f"{key}={value}")
            print(f"worker    pool {WORK_POOL}, pid {state['pids']['worker']}; logs in {STATE_DIR / 'logs'}")
            print(f"clients:  source {ENV_FILE}")
        elif args.action == "down":
            print("services: stopped" if down(project, args.purge) else "services: nothing was up")
        else:
            state_file = project / STATE_FILE
            if not state_file.is_file():
                print("services: down")
                return
            state = json.loads(state_file.read_text())
            for name in reversed(SERVERS):
                print(f"{name}: {'running' if signal_group(state['pids'][name], 0) else 'stopped'} (pid {state['pids'][name]})")


if __name__ == "__main__":
    main()
