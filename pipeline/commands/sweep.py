"""`llm-pipeline sweep`: a grid of params as DVC experiments, on DVC's queue or Prefect workers, then one table."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from pipeline.core.catalog import TRAINERS
from pipeline.core.errors import DataError, reporting_errors
from pipeline.orchestration import sweeps
from pipeline.registry.tracking import configure, model_names, project_tracking

NAME = re.compile(r"[A-Za-z][\w.-]{0,80}")  # DVC's experiment names are git refs: no spaces, no slashes


def main(argv: list[str] | None = None) -> None:
    """Queue every point of the grid (`dvc exp run --queue -n NAME -S ...`: DVC names them NAME-1, NAME-2, ...),
    run them with `dvc queue start -j JOBS` (or send them to Prefect workers with --deployment), wait, and print one
    table sorted by the key metric."""
    parser = argparse.ArgumentParser(prog="llm-pipeline sweep", description=main.__doc__)
    parser.add_argument("-n", "--name", required=True, help="the sweep's name; its experiments are NAME-<i>")
    parser.add_argument("-S", "--set-param", dest="sets", action="append", required=True, metavar="KEY=V1,V2,...",
                        help="a param and its values (as `dvc exp run -S`); several -S make a grid")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="experiments at once (default 1)")
    parser.add_argument("--deployment", nargs="?", const=sweeps.WORKER_DEPLOYMENT, metavar="FLOW/NAME",
                        help="run the points on the Prefect workers of a deployment's pool, each worker in its own "
                        f"clone and one point at a time, instead of DVC's queue here (default deployment: "
                        f"{sweeps.WORKER_DEPLOYMENT}); HEAD must be committed and pushed")
    parser.add_argument("--model", choices=TRAINERS, help="the model (by role) whose key metric sorts the table "
                        f"(default: the first training stage's whose params change, else {sweeps.DEFAULT_ROLE})")
    args = parser.parse_args(argv)
    with reporting_errors("sweep"):
        if not NAME.fullmatch(args.name):
            raise DataError(f"-n {args.name!r}: use letters, digits and ._- (starting with a letter)")
        if args.jobs < 1:
            raise DataError(f"-j {args.jobs}: at least 1")
        if args.deployment and args.jobs != 1:
            raise DataError("-j: on workers each runs one point at a time; start more workers instead")
        project = Path.cwd()
        points = sweeps.grid(args.name, args.sets)
        sweeps.check_grid(project, points)
        if args.deployment:
            failed = _on_workers(project, args.name, args.deployment, points)
            logs = {point: f"prefect flow-run logs {run_id}" for point, run_id in failed.items()}
        else:
            states = sweeps.run_grid(project, args.name, args.sets, points, args.jobs)
            logs = {point: f"dvc queue logs {point}" for point, state in states.items() if state != "Success"}
        tracking = project_tracking()
        print(sweeps.table(project, args.name, configure(tracking), model_names(tracking), args.model))
        if logs:
            first = next(iter(logs))
            raise DataError(f"{len(logs)} of {len(points)} experiments failed: {', '.join(logs)} "
                            f"(`{logs[first]}` shows why {first} failed)")


def _on_workers(project: Path, name: str, deployment: str, points: list[sweeps.Point]) -> dict[str, str]:
    """Send the points to the deployment's workers, wait, pull the experiments they pushed; {failed point: its
    flow run id}."""
    from pipeline.orchestration import sweep_workers  # loads Prefect

    commit = sweep_workers.pushed_commit(project)
    runs = sweep_workers.submit(deployment, points, commit)
    states = sweep_workers.wait(runs, f"sweep {name}")
    done = [point for point, state in states.items() if state == "COMPLETED"]
    sweep_workers.pull(project, done)
    return {point: str(run_id) for point, run_id in runs.items() if point not in done}


if __name__ == "__main__":
    main()
