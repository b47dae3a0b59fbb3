"""MLflow tracking for the stages: one child run per stage under a run-group parent, and models."""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import time
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Mapping, Sequence
from urllib.parse import urlsplit

import mlflow
import yaml
from mlflow.entities import Metric
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

import gpt
import pipeline
from pipeline.core.catalog import RUN_GROUP_ENV, TRAINERS
from pipeline.core.http import basic_auth, http_status
from pipeline.core.layout import project_root
from pipeline.core.params import ParamsError, Section, Spec, Str, load_params
from pipeline.core.processes import process_alive

EXPERIMENT = "llm-pipeline"
# A registered model's name goes into search filters and metric keys: letters, digits and ._- only.
MODEL_NAME = Str(pattern=r"[A-Za-z0-9][\w.-]{0,99}")
# The models' registered names, by role, are params so that projects sharing a server keep theirs apart.
MLFLOW_SECTION = Section(tracking_uri=Str(optional=True), experiment=Str(),
                         models=Section(**{role: MODEL_NAME for role in TRAINERS}))
# What a stage that logs to MLflow declares (its PARAMS, so dvc.yaml's params): where it logs. Not the model
# names, though a training stage reads its own (project_tracking): a name says where a model is registered,
# not what a stage makes, so renaming one reruns only promote, which registers the trained outputs under the
# new name without retraining (pipeline.registry.versions).
LOGGING_PARAMS: dict[str, Spec] = {f"mlflow.{key}": MLFLOW_SECTION.fields[key] for key in ("tracking_uri", "experiment")}
MODEL_ARTIFACT = "model"
PARAMS_DIGEST_TAG = "params_digest"
# `dvc exp run` names the experiment and its baseline commit in the environment of every stage.
EXP_NAME_ENV, EXP_BASELINE_ENV = "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"
EXPERIMENT_TAGS = ("dvc_exp", "dvc_exp_baseline", "dvc_exp_changed")
REACH_TIMEOUT_S = 5.0
# MLflow retries a failing server for minutes by default (7 tries); these keep a stage waiting about
# 30 s (backoff 2, 4, 8, 16 s) for a server that restarts, then failing in one line. The environment wins.
HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2"}
# A server keeps its own artifact root; only a local store gets <project>/mlartifacts.
_SERVER_SCHEMES = ("http", "https", "databricks", "databricks-uc")
# The parent run of a group carries this tag too, so a search never mistakes a stage run for it.
_PARENT_TAG = ("kind", "run_group")
_RUN_GROUP = re.compile(r"[\w.:@+-]{1,200}")  # also keeps the search filter free of quotes
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /]")  # MLflow keys allow only these
_CUT = "...[truncated]"
_MODEL_REQUIREMENTS = ("torch", "tiktoken", "safetensors", "numpy", "pandas")
# Where a stage run's process runs: kill -9 leaves its run RUNNING, so the next run of the stage on the
# same host ends it (see end_killed_runs).
HOST_TAG, PID_TAG, INTERRUPTED_TAG = "host", "pid", "interrupted"


class TrackingError(OSError):
    """The tracking store cannot be reached or used (an OSError, so stages report it in one line)."""


def tracking_uri(tracking: Mapping[str, Any] | None = None) -> str:
    """$MLFLOW_TRACKING_URI, else the `mlflow.tracking_uri` param, else the project's mlflow.db (sqlite), in the
    main workspace even when DVC runs a stage in an experiment's temporary copy."""
    return (os.environ.get("MLFLOW_TRACKING_URI") or (tracking or {}).get("tracking_uri")
            or f"sqlite:///{project_root() / 'mlflow.db'}")


def absent_store(uri: str) -> bool:
    """Whether `uri` is a sqlite store whose file does not exist: nothing was logged there yet, and a command
    that only reads should say so rather than create it."""
    return uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file()


def _check_reachable(uri: str) -> None:
    # MLflow itself retries an unreachable server for minutes; fail fast with one clear line, and tell a server
    # that refuses these credentials from one that is not there.
    if urlsplit(uri).scheme not in ("http", "https"):
        return
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    authorization = basic_auth(user, os.environ.get("MLFLOW_TRACKING_PASSWORD", "")) if user else None
    code = http_status(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1", authorization,
                       REACH_TIMEOUT_S)
    if code is None:
        raise TrackingError(f"MLflow tracking server {uri} is unreachable (refused, or no answer within {REACH_TIMEOUT_S:g} s)")
    if code == 401:
        who = f"the password of user {user}" if user else "requests without credentials"
        raise TrackingError(f"MLflow tracking server {uri} refused {who} (HTTP 401): set MLFLOW_TRACKING_USERNAME "
                            "and MLFLOW_TRACKING_PASSWORD")
    if code == 403:
        raise TrackingError(f"MLflow tracking server {uri} refused user {user} (HTTP 403): it may not read experiments")


def configure(tracking: Mapping[str, Any] | None = None) -> str:
    """Point MLflow at the project's store, creating the experiment if needed; return its id."""
    uri = tracking_uri(tracking)
    _check_reachable(uri)
    for name, value in HTTP_RETRIES.items():
        os.environ.setdefault(name, value)
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    # set_tracking_uri also exports $MLFLOW_TRACKING_URI, which would then override the
    # params of a later configure() in this process; MLflow keeps the URI in its own global.
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    name = experiment_name(tracking)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    local = urlsplit(uri).scheme not in _SERVER_SCHEMES
    artifacts = (project_root() / "mlartifacts").as_uri() if local else None
    try:
        return mlflow.MlflowClient().create_experiment(name, artifact_location=artifacts)
    except MlflowException as exc:
        # Another process created it since we looked (stages of two runs, or queued experiments, at once).
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return mlflow.get_experiment_by_name(name).experiment_id


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def git_state() -> tuple[str, str]:
    """(commit, dirty) of the work tree: ("unknown", "unknown") outside git or before a commit.

    Dirty means a tracked file differs from the commit, staged or not. An untracked file (a scratch
    note) is not part of what the commit names, and dvc.lock is not counted: `dvc repro` rewrites it
    after every stage, which would otherwise split one pipeline execution into two run groups.
    """
    commit = _git("rev-parse", "--verify", "HEAD")
    if not commit:
        return "unknown", "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude,glob)**/dvc.lock")
    return commit, "unknown" if status is None else str(bool(status)).lower()


def changed_params(baseline: str, params_path: Path = Path("params.yaml")) -> str:
    """`key=value` of every param whose value differs from the baseline commit's params.yaml, sorted and
    joined by "; " (cut to fit a tag); "" when git cannot show that file."""
    before = _git("show", f"{baseline}:{params_path.name}")
    if before is None:
        return ""
    old = flatten_params(yaml.safe_load(before) or {})
    new = flatten_params(yaml.safe_load(params_path.read_text(encoding="utf-8")) or {})
    changed = "; ".join(f"{key}={value if key in new else '(removed)'}"
                        for key, value, _ in differing_params(new, old))
    return changed if len(changed) <= MAX_TAG_VAL_LENGTH else (
        changed[: MAX_TAG_VAL_LENGTH - len(_CUT)] + _CUT)


def data_digests(tags: Mapping[str, str]) -> dict[str, str]:
    """{input name: sha256} of the `data.<name>.sha256` tags of a run or version, sorted by name."""
    return {tag.removeprefix("data.").removesuffix(".sha256"): value for tag, value in sorted(tags.items())
            if tag.startswith("data.") and tag.endswith(".sha256")}


def differing_params(mine: Mapping[str, str], theirs: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(param, mine, theirs) for each param whose values differ, sorted by name; "-" where absent."""
    return [(name, mine.get(name, "-"), theirs.get(name, "-")) for name in sorted({*mine, *theirs})
            if mine.get(name) != theirs.get(name)]


def experiment_tags() -> dict[str, str]:
    """Inside `dvc exp run` (which names the experiment and its baseline commit in the environment of
    every stage): the experiment's name, baseline and changed params; outside one, nothing."""
    name = os.environ.get(EXP_NAME_ENV)
    if not name:
        return {}
    baseline = os.environ.get(EXP_BASELINE_ENV, "")
    return {"dvc_exp": name, "dvc_exp_baseline": baseline[:8], "dvc_exp_changed": changed_params(baseline)}


def run_group(commit: str, dirty: str) -> str:
    """$LLM_PIPELINE_RUN_GROUP, else `exp-<name>` inside `dvc exp run`, else the commit (plus "-dirty"),
    so the stages of one experiment, or of the same code, group together under a name one can read."""
    experiment = os.environ.get(EXP_NAME_ENV)
    group = (os.environ.get(RUN_GROUP_ENV) or (f"exp-{experiment}" if experiment else None)
             or (f"{commit}-dirty" if dirty == "true" else commit))
    if not _RUN_GROUP.fullmatch(group):
        raise TrackingError(f"${RUN_GROUP_ENV}={group!r}: use up to 200 letters, digits and ._:@+-")
    return group


def _key(name: str) -> str:
    return _BAD_KEY_CHARS.sub("_", name)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params as {"a.b.c": text}: keys made MLflow-safe, long values cut to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = prefix + _key(str(key))
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            text = text[: MAX_PARAM_VAL_LENGTH - len(_CUT)] + _CUT
        flat[name] = text
    return flat


def params_digest(params: Mapping[str, Any]) -> str:
    """sha256 of the params as canonical JSON (sorted keys, no spaces): equal params, equal digest."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _lineage_tag(key: str) -> bool:
    # What a registered version copies from its run: where it came from, not how the run was named.
    return key in ("stage", "run_group", "git_commit", "git_dirty", PARAMS_DIGEST_TAG, *EXPERIMENT_TAGS) or (
        key.startswith("data.") and key.endswith((".sha256", ".size")))


def _group_parent(client: mlflow.MlflowClient, experiment_id: str, group: str, tags: dict[str, str]) -> str:
    key, value = _PARENT_TAG
    found = client.search_runs([experiment_id], f"tags.run_group = '{group}' AND tags.{key} = '{value}'",
                               max_results=1, order_by=["attributes.start_time ASC"])
    if found:
        return found[0].info.run_id
    return client.create_run(experiment_id, run_name=group, tags={**tags, key: value}).info.run_id


def end_killed_runs(client: mlflow.MlflowClient, experiment_id: str, stage: str) -> None:
    """End as KILLED, tagged `interrupted`, the runs of `stage` still RUNNING on this host whose process is
    gone (a stage killed with SIGKILL cannot end its own run)."""
    query = (f"tags.stage = '{stage}' AND attributes.status = 'RUNNING' "
             f"AND tags.{HOST_TAG} = '{socket.gethostname()}'")
    for run in client.search_runs([experiment_id], query):
        if not run_may_be_running(run):
            pid = run.data.tags[PID_TAG]
            client.set_tag(run.info.run_id, INTERRUPTED_TAG, f"process {pid} ended without ending the run")
            client.set_terminated(run.info.run_id, "KILLED")


def run_may_be_running(run: mlflow.entities.Run) -> bool:
    """Whether a RUNNING run's stage may still be at work: its process lives, or it runs on another host
    (or names no process), which this one cannot tell. Runs in any other status are not running."""
    if run.info.status != "RUNNING":
        return False
    pid = run.data.tags.get(PID_TAG, "")
    if run.data.tags.get(HOST_TAG) != socket.gethostname() or not pid.isdecimal():
        return True
    return process_alive(int(pid))


@contextmanager
def stage_run(stage: str, params: Mapping[str, Any], data_hashes: Mapping[str, str] | None = None,
              tracking: Mapping[str, Any] | None = None,
              data_sizes: Mapping[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """Run the block as the MLflow run of `stage`, a child of its run group's parent run.

    Logs the flattened `params` and tags the run with the stage, run group, git state,
    `params_digest` (see params_digest), `data.<name>.sha256` for each of `data_hashes` and `data.<name>.size`
    ("1045 rows") for each of `data_sizes`. `tracking` is the checked `mlflow` params section (None: the
    defaults). The parent's status follows the last stage that ended.
    """
    experiment_id = configure(tracking)
    commit, dirty = git_state()
    group = run_group(commit, dirty)
    client = mlflow.MlflowClient()
    common = {"run_group": group, "git_commit": commit, "git_dirty": dirty, **experiment_tags()}
    parent_id = _group_parent(client, experiment_id, group, common)
    end_killed_runs(client, experiment_id, stage)
    data_tags = {_key(f"data.{name}.sha256"): digest for name, digest in (data_hashes or {}).items()}
    data_tags.update({_key(f"data.{name}.size"): size for name, size in (data_sizes or {}).items()})
    status = "FAILED"
    try:
        with mlflow.start_run(experiment_id=experiment_id, run_name=stage, parent_run_id=parent_id,
                              tags={"stage": stage, **common, PARAMS_DIGEST_TAG: params_digest(params),
                                    HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), **data_tags}) as run:
            mlflow.log_params(flatten_params(params))
            yield run
        status = "FINISHED"
    finally:
        client.set_terminated(parent_id, status)


def log_step_metrics(metrics: Mapping[str, Any], step: int) -> None:
    """Log metrics of one step to the active run; values may be tensors or numpy scalars."""
    mlflow.log_metrics({_key(name): float(value) for name, value in metrics.items()}, step=step)


def log_history(history: Sequence[Mapping[str, Any]], step_key: str = "step") -> None:
    """Log a whole per-step history (a list of {step, metric: value, ...}) in batched calls."""
    run = mlflow.active_run()
    if run is None:
        raise TrackingError("log metrics inside stage_run(), so they belong to a stage's run")
    now = int(time.time() * 1000)
    entries = [Metric(_key(name), float(value), now, int(record[step_key]))
               for record in history for name, value in record.items() if name != step_key and value is not None]
    client = mlflow.MlflowClient()
    for start in range(0, len(entries), 1000):  # MLflow caps one batch at 1000 metrics
        client.log_batch(run.info.run_id, metrics=entries[start : start + 1000])


def log_path(path: str | os.PathLike, artifact_path: str | None = None) -> None:
    """Log a file, or a folder's files (under the folder's name by default), to the active run."""
    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path or path.name)
    elif path.is_file():
        mlflow.log_artifact(str(path), artifact_path)
    else:
        raise FileNotFoundError(f"{path}: no such file or folder to log")


def log_pyfunc(model_code: ModuleType, artifacts: Mapping[str, str | os.PathLike], registered_name: str | None,
               tags: Mapping[str, Any] | None, metrics: Mapping[str, Any] | None,
               signature: ModelSignature | None = None) -> ModelVersion | None:
    """Log a models-from-code file (SIGNATURE, INPUT_EXAMPLE, set_model) to the active run and register
    it as a new version of `registered_name` (None: log only), tagged with version_tags(tags, metrics). It sets no
    alias: the promote stage owns `champion` and `challenger`. `signature` replaces SIGNATURE when the
    outputs depend on the artifacts (a classifier's class columns)."""
    run = mlflow.active_run()
    if run is None:
        raise TrackingError("log a model inside stage_run(), so it belongs to a stage's run")
    for key, path in artifacts.items():
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: model artifact {key!r} not found")
    info = mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT,
        python_model=model_code.__file__,
        artifacts={key: str(Path(path).resolve()) for key, path in artifacts.items()},
        # Ship the code too, so a model loads where the project is not installed.
        code_paths=[str(Path(package.__file__).parent) for package in (gpt, pipeline)],
        signature=signature or model_code.SIGNATURE,
        input_example=model_code.INPUT_EXAMPLE,
        # Without the local part ("+cpu"): PyPI has no such build, pip could not install the pin.
        pip_requirements=[f"{name}=={version(name).split('+')[0]}" for name in _MODEL_REQUIREMENTS],
    )
    # MLflow only warns when the input example fails; never register a model that cannot predict.
    example, params = model_code.INPUT_EXAMPLE
    mlflow.pyfunc.load_model(info.model_uri).predict(example, params=params)
    if registered_name is None:
        return None
    # Created with all its tags in one request: a tracking server that goes away mid-stage leaves either
    # no version or a complete one, never one without its lineage.
    return mlflow.register_model(info.model_uri, registered_name, tags=version_tags(tags, metrics))


def version_tags(tags: Mapping[str, Any] | None = None, metrics: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The tags of a version registered from the active run: that run's lineage (stage, run group, git
    state, params digest, data hashes and sizes), `tags`, and `metric.<name>` for the numbers among `metrics`."""
    run = mlflow.active_run()
    if run is None:
        raise TrackingError("register a model version inside stage_run(), so it carries a stage's lineage")
    run_tags = mlflow.MlflowClient().get_run(run.info.run_id).data.tags
    chosen: dict[str, Any] = {key: value for key, value in run_tags.items() if _lineage_tag(key)}
    chosen.update(tags or {})
    chosen.update({f"metric.{key}": float(value) for key, value in (metrics or {}).items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)})
    return {_key(key): str(value) for key, value in chosen.items()}


def project_tracking(params_path: str | os.PathLike | None = "params.yaml") -> dict | None:
    """The params file's checked mlflow section, or None (the defaults) when there is no such file."""
    if params_path is None or not Path(params_path).is_file():
        return None
    tracking = load_params(params_path, {"mlflow": MLFLOW_SECTION})["mlflow"]
    model_names(tracking, Path(params_path).name)  # checked: one name per model
    return tracking


def experiment_name(tracking: Mapping[str, Any] | None) -> str:
    """The MLflow experiment the stages log to: the mlflow section's, else the default."""
    return (tracking or {}).get("experiment") or EXPERIMENT


def model_names(tracking: Mapping[str, Any] | None, origin: str = "params.yaml") -> dict[str, str]:
    """{role: registered name} of the mlflow section (None: the catalog's defaults); two models may not share
    a name."""
    names = (tracking or {}).get("models") or {role: trainer.model.default_name for role, trainer in TRAINERS.items()}
    roles: dict[str, str] = {}
    for role, name in names.items():
        if name in roles:
            raise ParamsError(f"{origin}: mlflow.models.{roles[name]} and mlflow.models.{role} are both {name!r}; "
                              "each model needs a name of its own")
        roles[name] = role
    return dict(names)


def use_project_store(params_path: str | os.PathLike | None = "params.yaml") -> str:
    """Point MLflow at the store the stages log to (see project_tracking), for commands that read
    models back; return the experiment id."""
    return configure(project_tracking(params_path))


def all_pages(search: Callable[..., Any], *args: Any, **kwargs: Any) -> list:
    """Every result of an MLflow search that returns pages (search_model_versions, search_registered_models)."""
    found, token = [], None
    while True:
        page = search(*args, page_token=token, **kwargs)
        found.extend(page)
        token = page.token
        if not token:
            return found


def versions_of(client: mlflow.MlflowClient, name: str) -> list[ModelVersion]:
    """Every version of registered model `name` (none if there is no such model), oldest first."""
    return sorted(all_pages(client.search_model_versions, f"name = '{name}'"), key=lambda v: int(v.version))


def tag_model_version(name: str, version: int | str, tags: Mapping[str, Any],
                      client: mlflow.MlflowClient | None = None) -> None:
    """Set tags on one registered model version (values stored as strings), through `client` if given."""
    client = client or mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), _key(key), str(value))
