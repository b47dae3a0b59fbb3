"""Sweeps: a grid of params queued as DVC experiments, run by DVC's queue, and one table of what each gave.

DVC expands the grid and names its points `NAME-1`, `NAME-2`, ... in the order of `dvc.utils.hydra`'s
sweeps; this module expands it the same way (with DVC's own function) to check every point before any is
queued. The table's metric is read from `dvc exp show` (the experiment's metrics file), its standard error,
version and decision from the project's MLflow registry, where each experiment's stage runs are tagged with
its name.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from tqdm import tqdm

from pipeline.core.catalog import EVALUATORS, STAGES, TRAINERS
from pipeline.core.errors import DataError
from pipeline.core.params import read_yaml
from pipeline.core.processes import tool_env
from pipeline.core.tables import format_table
from pipeline.registry.policy import SE_SUFFIX, metric_label

PARAMS_FILE = "params.yaml"
POLL_S = 3.0
DONE_STATES = ("Success", "Failed")
WORKER_DEPLOYMENT = "sweep-point/sweep"  # prefect.yaml's deployment of pipeline.orchestration.sweep_workers
DEFAULT_ROLE = "base"  # when the grid names no training stage's section: every model starts from it


@dataclass(frozen=True)
class Point:
    """One experiment of the grid: its name and the `key=value` overrides DVC applies to params.yaml."""

    name: str
    overrides: tuple[str, ...]


def grid(name: str, sets: Sequence[str]) -> list[Point]:
    """The grid's points, named and ordered as `dvc exp run --queue -n NAME -S ...` names them."""
    from dvc.utils.hydra import get_hydra_sweeps  # DVC's own expansion; imported here, as it loads Hydra

    for setting in sets:
        key, equals, values = setting.partition("=")
        if not equals or not key or not values.strip():
            raise DataError(f"-S {setting!r}: expected KEY=VALUE[,VALUE...] with at least one value")
    try:
        sweeps = get_hydra_sweeps({PARAMS_FILE: list(sets)})
    except Exception as exc:  # Hydra's parse errors carry several lines; the first says what is wrong
        raise DataError(f"-S {' -S '.join(sets)}: {str(exc).splitlines()[0]}") from None
    return [Point(f"{name}-{number}", tuple(sweep[PARAMS_FILE])) for number, sweep in enumerate(sweeps, start=1)]


def _has_key(params: Mapping[str, Any], dotted: str) -> bool:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def check_grid(project: Path, points: Sequence[Point]) -> None:
    """Every point's params as every stage checks them, on a copy of params.yaml: a key params.yaml lacks,
    a value of the wrong type or out of range is one DataError naming the point and the param."""
    from dvc.utils.hydra import apply_overrides

    from pipeline.orchestration.flows import check_params  # here: the flows load Prefect

    params = read_yaml(project / PARAMS_FILE)
    for point in points:
        for override in point.overrides:
            key = override.partition("=")[0]
            if not _has_key(params, key):
                raise DataError(f"-S {key}: {PARAMS_FILE} has no such param (a sweep changes existing params)")
    with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
        draft = Path(tmp) / PARAMS_FILE
        for point in points:
            shutil.copy(project / PARAMS_FILE, draft)
            apply_overrides(draft, list(point.overrides))
            try:
                check_params(draft, list(STAGES))
            except (ValueError, TypeError) as exc:
                raise DataError(f"{point.name} ({', '.join(point.overrides)}): {exc}") from None


def key_model(keys: Sequence[str]) -> str:
    """The role of the model a sweep is judged by: that of the first training stage (in pipeline order) whose
    section a changed key is in, else the base model, which every other model starts from."""
    sections = {key.split(".")[0] for key in keys}
    return next((role for role, trainer in TRAINERS.items() if trainer.name in sections), DEFAULT_ROLE)


def role_of(model: str, names: Mapping[str, str]) -> str:
    """The role of `model`, given as a role or as one of `names` ({role: registered name})."""
    roles = {name: role for role, name in names.items()}
    if model not in names and model not in roles:
        raise DataError(f"--model {model}: not a model of this project (roles: {', '.join(names)}; "
                        f"names: {', '.join(roles)})")
    return model if model in names else roles[model]


def dvc_output(project: Path, env: Mapping[str, str], *args: str) -> str:
    """The stdout of `dvc ARGS` in project; a DataError with its last error line when it fails."""
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=dict(env), capture_output=True,
                            text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise DataError(f"dvc {' '.join(args[:3])}: {lines[-1] if lines else 'failed'}")
    return result.stdout


def queue_states(project: Path, env: Mapping[str, str]) -> dict[str, str]:
    """{experiment name: Queued, Running, Success or Failed} from `dvc queue status`."""
    # A table (task, name, created, status), a blank line, then the workers' status.
    table = dvc_output(project, env, "queue", "status").split("\n\n")[0].splitlines()[1:]
    return {row.split()[1]: row.split()[-1] for row in table if len(row.split()) >= 3}


def run_grid(project: Path, name: str, sets: Sequence[str], points: Sequence[Point], jobs: int) -> dict[str, str]:
    """Queue the grid, start `jobs` queue workers with cores / jobs threads each, wait until every point
    ran; {point name: Success or Failed}."""
    env = tool_env()
    # Queue workers take their environment from `dvc queue start`, not from `dvc exp run --queue`.
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    dvc_output(project, env, "exp", "run", "--queue", "-n", name, *(arg for s in sets for arg in ("-S", s)))
    dvc_output(project, env, "queue", "start", "-j", str(jobs))
    names = [point.name for point in points]
    with tqdm(total=len(names), desc=f"sweep {name}", unit="experiment") as bar:
        while True:
            states = queue_states(project, env)
            done = {n: states[n] for n in names if states.get(n) in DONE_STATES}
            bar.update(len(done) - bar.n)
            if len(done) == len(names):
                return done
            lost = [n for n in names if n not in states]
            if lost:  # removed from the queue (`dvc queue remove`, a cleared queue): nothing will run them
                raise DataError(f"{', '.join(lost)}: no longer in DVC's queue (dvc queue status)")
            time.sleep(POLL_S)


def _metric_column(role: str) -> tuple[str, str]:
    """(metrics file, key) of the `role` model's key metric on the validation split, as `dvc exp show` has it."""
    spec = TRAINERS[role].model
    prefix, key = spec.val_tag.split(".", 1)
    stage = EVALUATORS[role] if prefix == "eval" else TRAINERS[role]
    return str(stage.metrics), key


def _swept(rows: Sequence[Mapping[str, Any]], name: str) -> dict[str, Mapping[str, Any]]:
    """The `dvc exp show` rows of sweep `name`'s experiments (`NAME-<i>`), by name, in grid order."""
    found = {row["Experiment"]: row for row in rows
             if re.fullmatch(rf"{re.escape(name)}-\d+", row.get("Experiment") or "")}
    return dict(sorted(found.items(), key=lambda item: int(item[0].rsplit("-", 1)[1])))


def _runs_by_experiment(experiment_id: str, name: str) -> dict[str, list]:
    """The finished MLflow runs of sweep `name`'s experiments (MLflow must point at the project's store), by
    experiment: every stage run of `dvc exp run` carries the experiment's name (dvc_exp)."""
    import mlflow

    runs: dict[str, list] = {}
    for run in mlflow.MlflowClient().search_runs(
            [experiment_id], f"tags.dvc_exp LIKE '{name}-%' AND attributes.status = 'FINISHED'"):
        runs.setdefault(run.data.tags["dvc_exp"], []).append(run)
    return runs


def _facts(runs: Sequence, role: str, name: str) -> dict[str, Any]:
    """An experiment's version of the `role` model, registered as `name` (found by its training run's digest),
    its key metric's standard error and the decision of its promote stage."""
    import mlflow

    from pipeline.registry.versions import DIGEST_TAG, find_version

    trained = next((r for r in runs if r.data.tags.get("stage") == TRAINERS[role].name), None)
    promoted = next((r for r in runs if r.data.tags.get("stage") == "promote"), None)
    version = find_version(mlflow.MlflowClient(), name, trained.data.tags[DIGEST_TAG]) if trained else None
    se = version.tags.get(f"{TRAINERS[role].model.val_tag}{SE_SUFFIX}") if version else None
    return {"version": version.version if version else None, "se": None if se is None else float(se),
            "decision": promoted.data.params.get(f"decision.{role}") if promoted else None}


def table(project: Path, name: str, experiment_id: str, names: Mapping[str, str], model: str | None = None) -> str:
    """Sweep `name` as one table, best first by the key metric of `model` (a role or one of `names`, {role:
    registered name}; default: key_model of the params its experiments changed): experiment, state, changed
    params, metric ± standard error (metric from `dvc exp show`, the rest from the registry), the registered
    version and the decision of its promote stage."""
    import dvc.api

    found = _swept(dvc.api.exp_show(repo=str(project)), name)
    if not found:
        raise DataError(f"no experiments named {name}-<n> in `dvc exp show` here")
    runs = _runs_by_experiment(experiment_id, name)
    changed = {experiment: next((r.data.tags.get("dvc_exp_changed", "") for r in runs.get(experiment, [])), "")
               for experiment in found}
    if model is None:
        role = key_model([part.partition("=")[0] for text in changed.values() for part in text.split("; ") if text])
    else:
        role = role_of(model, names)
    spec = TRAINERS[role].model
    path, key = _metric_column(role)
    rows = []
    for experiment, row in found.items():
        value = row.get(f"{path}:{key}", row.get(key))
        value = None if value is None else float(value)
        fact = _facts(runs.get(experiment, []), role, names[role])
        metric = "-" if value is None else f"{value:.4f}" + ("" if fact["se"] is None else f" ± {fact['se']:.4f}")
        rows.append(((value is None, -(value or 0.0) if spec.higher_is_better else (value or 0.0)), (
            # A pulled experiment has no queue state: it is a commit, which DVC makes only of a success.
            experiment, row.get("State") or "Success", changed[experiment] or "-", metric, str(fact["version"] or "-"),
            fact["decision"] or "-")))
    rows.sort(key=lambda row: row[0])
    columns = ("experiment", "state", "changed params", f"{names[role]} {metric_label(spec.val_tag)}", "version",
               "decision")
    return format_table([cells for _, cells in rows], columns)
