"""`llm-pipeline sweep`: a grid of params as DVC experiments on DVC's queue, then one table of what each gave."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from pipeline.core.catalog import TRAINERS
from pipeline.core.errors import DataError, reporting_errors
from pipeline.orchestration import sweeps
from pipeline.registry.tracking import configure, project_tracking

NAME = re.compile(r"[A-Za-z][\w.-]{0,80}")  # DVC's experiment names are git refs: no spaces, no slashes


def main(argv: list[str] | None = None) -> None:
    """Queue every point of the grid (`dvc exp run --queue -n NAME -S ...`: DVC names them NAME-1, NAME-2, ...),
    run them with `dvc queue start -j JOBS`, wait, and print one table sorted by the key metric."""
    parser = argparse.ArgumentParser(prog="llm-pipeline sweep", description=main.__doc__)
    parser.add_argument("-n", "--name", required=True, help="the sweep's name; its experiments are NAME-<i>")
    parser.add_argument("-S", "--set-param", dest="sets", action="append", required=True, metavar="KEY=V1,V2,...",
                        help="a param and its values (as `dvc exp run -S`); several -S make a grid")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="experiments at once (default 1)")
    parser.add_argument("--model", choices=TRAINERS, help="the model whose key metric sorts the table "
                        f"(default: the first training stage's whose params change, else {sweeps.DEFAULT_MODEL})")
    args = parser.parse_args(argv)
    with reporting_errors("sweep"):
        if not NAME.fullmatch(args.name):
            raise DataError(f"-n {args.name!r}: use letters, digits and ._- (starting with a letter)")
        if args.jobs < 1:
            raise DataError(f"-j {args.jobs}: at least 1")
        project = Path.cwd()
        points = sweeps.grid(args.name, args.sets)
        sweeps.check_grid(project, points)
        states = sweeps.run_grid(project, args.name, args.sets, points, args.jobs)
        print(sweeps.table(project, args.name, configure(project_tracking()), args.model))
        failed = [name for name, state in states.items() if state != "Success"]
        if failed:
            raise DataError(f"{len(failed)} of {len(points)} experiments failed: {', '.join(failed)} "
                            f"(`dvc queue logs {failed[0]}` shows why)")


if __name__ == "__main__":
    main()
