"""The pipeline's MLflow model registry: its aliases, and each training stage's output registered once, by content."""
from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Any, Mapping

import mlflow
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException

from gpt.checkpoint import read_config
from gpt.errors import CheckpointError
from pipeline.core.catalog import EVALUATORS, TRAINERS, Stage
from pipeline.core.errors import DataError
from pipeline.core.layout import BPE_DIR
from pipeline.core.params import read_yaml
from pipeline.registry.locks import model_lock
from pipeline.registry.tracking import (all_pages, configure, experiment_name, log_pyfunc, model_names,
                                       run_may_be_running, stage_run, tag_model_version, versions_of)

# A version is the model in one training stage's output folder: this tag holds output_digest(folder),
# so the same output is never registered twice, whichever run or machine meets it first.
DIGEST_TAG = "model_sha256"
# How the version came to be: "training" (by the stage run that trained it) or "outputs" (registered later
# from the stage's DVC outputs by `llm-pipeline register` or promote, after the registry lost it).
REGISTERED_FROM_TAG = "registered_from"
# Set on a version whose run was interrupted before its stage finished, when a rerun registered another output.
LEFTOVER_TAG = "leftover"
EVAL_PREFIX = "eval."  # an evaluating stage's figures on its model's version, e.g. eval.val_loss
# Whether the C++ CPU kernels ran in the training ("on", "off", "unavailable (why)"): a fact of the run, in the
# stage's report, the run's params and the version's tags, never in the model folder (whose digest is the version).
KERNELS_FACT = "cpu_kernels_used"
REGISTER_COMMAND = "llm-pipeline register"
# A registered model's tags: the role it plays and the MLflow experiment of the project that registers it,
# which find a project's models under the names it gave them before (earlier_names).
ROLE_TAG, PROJECT_TAG = "llm_pipeline.role", "llm_pipeline.experiment"


def missing_model_hint() -> str:
    """What to say wherever a registered model is missing: the command that registers the outputs there are."""
    return (f"`{REGISTER_COMMAND}` registers the trained models in data/models without retraining "
            "(`dvc repro` trains them first if there are none)")


def output_digest(folder: Path) -> str:
    """sha256 of an output model folder's config.json without extra.metrics (which hold wall times): the
    weights' sha256, the architecture, a classifier's labels and the input hashes. Equal outputs, equal digest."""
    try:
        config = read_config(folder)
    except (CheckpointError, OSError):
        raise DataError(f"{folder}: missing or not a model folder; rerun the stage that writes it") from None
    extra = {key: value for key, value in config.get("extra", {}).items() if key != "metrics"}
    blob = json.dumps({**config, "extra": extra}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def report_digest(report: Path) -> str:
    """The `model_sha256` a training stage (or evaluate) wrote to its report."""
    if not report.is_file():
        raise DataError(f"{report}: missing; run the {report.stem} stage first")
    try:
        digest = json.loads(report.read_text(encoding="utf-8"))[DIGEST_TAG]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise DataError(f"{report}: no {DIGEST_TAG}; rerun the {report.stem} stage") from None
    if not isinstance(digest, str) or len(digest) != 64:
        raise DataError(f"{report}: {DIGEST_TAG} must be a sha256, got {digest!r}")
    return digest


def find_version(client: mlflow.MlflowClient, name: str, digest: str) -> ModelVersion | None:
    """The version of `name` holding the output with `digest`, or None (the oldest, should there be two)."""
    return next((v for v in versions_of(client, name) if v.tags.get(DIGEST_TAG) == digest), None)


def resolve_version(model: RegisteredModel, versions: list[ModelVersion], ref: str) -> ModelVersion:
    """The version of `model` among `versions` that `ref` names (a version number or an alias); a DataError
    naming the versions and aliases there are if none."""
    by_number = {str(version.version): version for version in versions}
    number = str(int(ref)) if ref.isascii() and ref.isdecimal() else model.aliases.get(ref)
    if number is not None and str(number) in by_number:
        return by_number[str(number)]
    known = ", ".join(sorted(by_number, key=int)) or "none"
    aliases = ", ".join(f"{alias}={n}" for alias, n in sorted(model.aliases.items())) or "none"
    what = f"version {ref}" if ref.isascii() and ref.isdecimal() else f"alias {ref}"
    raise DataError(f"{model.name} has no {what} (versions: {known}; aliases: {aliases})")


def evaluation_tags(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The tags an evaluating stage puts on its model's version: eval.<name> for each of its metrics."""
    return {f"{EVAL_PREFIX}{name}": value for name, value in metrics.items() if name != DIGEST_TAG}


def label_model(client: mlflow.MlflowClient, name: str, role: str, experiment: str) -> None:
    """Tag registered model `name` as the `role` model of the project that logs to `experiment` (where not yet)."""
    tags = client.get_registered_model(name).tags
    for key, value in ((ROLE_TAG, role), (PROJECT_TAG, experiment)):
        if tags.get(key) != value:
            client.set_registered_model_tag(name, key, value)


def earlier_names(client: mlflow.MlflowClient, role: str, name: str, experiment: str) -> dict[str, list[int]]:
    """{registered name: its version numbers} of the names other than `name` under which the project that logs
    to `experiment` registered its `role` model before (label_model's tags), by name."""
    found = all_pages(client.search_registered_models, filter_string=f"tags.`{ROLE_TAG}` = '{role}'")
    return {model.name: [int(v.version) for v in versions_of(client, model.name)]
            for model in sorted(found, key=lambda m: m.name)
            if model.name != name and model.tags.get(PROJECT_TAG) == experiment}


def _versions_text(numbers: list[int]) -> str:
    """Version numbers as people read them: "version 4", "versions 1-3, 5", "no versions"."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][-1] + 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    text = ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)
    return f"version {text}" if len(numbers) == 1 else f"versions {text}" if numbers else "no versions"


def rename_notice(earlier: Mapping[str, list[int]], role: str, name: str) -> str:
    """One line saying that the `role` model is now registered as `name`, and what stays under its old names."""
    old = "; ".join(f"{old} ({_versions_text(numbers)})" for old, numbers in earlier.items())
    return (f"the {role} model is now registered as {name} (mlflow.models.{role}); registered before as {old}, "
            "left as it was")


def _register(stage: Stage, name: str, experiment: str, digest: str, registered_from: str,
              facts: Mapping[str, str]) -> ModelVersion:
    # Inside the stage run that the version's lineage tags come from.
    spec, client = stage.model, mlflow.MlflowClient()
    extra = read_config(spec.folder).get("extra", {})
    flavour = importlib.import_module(spec.flavour)
    tags = {**facts, DIGEST_TAG: digest, REGISTERED_FROM_TAG: registered_from}
    if "base" in extra:
        tags["base"] = extra["base"]
    first = not versions_of(client, name)
    version = log_pyfunc(flavour, {flavour.ARTIFACT: spec.folder, "bpe": BPE_DIR}, name, tags,
                         extra.get("metrics"), signature=flavour.folder_signature(spec.folder))
    label_model(client, name, spec.role, experiment)
    earlier = earlier_names(client, spec.role, name, experiment) if first else {}
    if earlier:
        print(rename_notice(earlier, spec.role, name))
    return version


def _mark_leftovers(client: mlflow.MlflowClient, name: str, current: ModelVersion) -> None:
    # A version whose run never finished was registered by a stage killed (or failed) before DVC kept its
    # outputs. Unless a finished run produced the same output (the rerun that reused it), or an alias points
    # at it, it is a leftover.
    aliased = {str(number) for number in client.get_registered_model(name).aliases.values()}
    experiment = mlflow.active_run().info.experiment_id
    for version in versions_of(client, name):
        if version.version == current.version or str(version.version) in aliased or LEFTOVER_TAG in version.tags:
            continue
        try:
            run = client.get_run(version.run_id) if version.run_id else None
        except MlflowException:  # the run was deleted
            continue
        if run is None or run_may_be_running(run):  # another experiment's stage, at work now
            continue
        status = run.info.status
        finished = client.search_runs([experiment], f"tags.{DIGEST_TAG} = '{version.tags.get(DIGEST_TAG, '-')}' "
                                      "AND attributes.status = 'FINISHED'", max_results=1)
        if status != "FINISHED" and not finished:
            tag_model_version(name, version.version, {
                LEFTOVER_TAG: f"registered by run {version.run_id}, which did not finish its stage ({status}); "
                              f"version {current.version} holds the stage's output"}, client)


def register_trained(stage: Stage, tracking: Mapping[str, Any] | None,
                     facts: Mapping[str, str] | None = None) -> ModelVersion:
    """In `stage`'s run: its output folder as a version of its model (named by the mlflow section `tracking`),
    tagged with the run's `facts` (e.g. KERNELS_FACT), unless a version already holds that output (a rerun
    after the stage was killed, having registered, before DVC kept its outputs). The run is tagged with the
    output's digest too: the run that produced it."""
    client, digest = mlflow.MlflowClient(), output_digest(stage.model.folder)
    name = model_names(tracking)[stage.model.role]
    mlflow.set_tag(DIGEST_TAG, digest)
    with model_lock(client, name):
        version = find_version(client, name, digest)
        if version is None:
            version = _register(stage, name, experiment_name(tracking), digest, "training", facts or {})
            _mark_leftovers(client, name, version)
    return version


def ensure_registered(stage: Stage, params_path: Path, tracking: Mapping[str, Any] | None) -> tuple[ModelVersion, bool]:
    """The version holding `stage`'s current output, registered now from that output if the registry lacks it
    (in a run of its own, named and tagged as the stage, with the stage's params and the output's input
    hashes); and whether it was registered now. MLflow must point at the store (tracking.configure)."""
    client, digest = mlflow.MlflowClient(), output_digest(stage.model.folder)
    name = model_names(tracking)[stage.model.role]
    with model_lock(client, name):
        version = find_version(client, name, digest)
        if version is not None:
            # Models registered before they were labelled (or by an older release) get their labels here.
            label_model(client, name, stage.model.role, experiment_name(tracking))
            return version, False
        return _register_output(stage, name, digest, params_path, tracking), True


def _register_output(stage: Stage, name: str, digest: str, params_path: Path,
                     tracking: Mapping[str, Any] | None) -> ModelVersion:
    extra = read_config(stage.model.folder).get("extra", {})
    # The section as params.yaml has it (the stage checked it when it trained): DVC runs this only with the
    # training stage up to date, and `llm-pipeline register` checks that first.
    params = read_yaml(params_path).get(stage.name) or {}
    # The run's facts, as the stage reported them (check_outputs found the report describing this output).
    report = json.loads(stage.report.read_text(encoding="utf-8")) if stage.report.is_file() else {}
    facts = {KERNELS_FACT: report[KERNELS_FACT]} if KERNELS_FACT in report else {}
    with stage_run(stage.name, params, extra.get("data"), tracking, extra.get("sizes")):
        mlflow.set_tags({REGISTERED_FROM_TAG: "outputs", DIGEST_TAG: digest})
        return _register(stage, name, experiment_name(tracking), digest, "outputs", facts)


def check_outputs() -> dict[str, str]:
    """Check that every training stage's output folder holds the model its report describes, and that each
    evaluating stage's report is there; return {model role: the digest of the model its evaluator measured}."""
    for stage in TRAINERS.values():
        if report_digest(stage.report) != output_digest(stage.model.folder):
            raise DataError(f"{stage.model.folder} does not hold the model {stage.report} describes; "
                            f"rerun the {stage.name} stage (dvc repro {stage.name})")
    return {role: report_digest(stage.report) for role, stage in EVALUATORS.items()}


def register_outputs(evaluated: Mapping[str, str], params_path: Path,
                     tracking: Mapping[str, Any] | None) -> dict[str, tuple[ModelVersion, bool]]:
    """Every training stage's output in the registry ({model role: (version, registered now)}), each found by
    its content or registered now (ensure_registered); an evaluated model's version tagged with its evaluator's
    figures when `evaluated` (check_outputs' result, which must come first) names the digest of that output."""
    configure(tracking)
    versions = {role: ensure_registered(stage, params_path, tracking) for role, stage in TRAINERS.items()}
    for role, digest in evaluated.items():
        version = versions[role][0]
        if digest == version.tags.get(DIGEST_TAG):
            metrics = json.loads(EVALUATORS[role].report.read_text(encoding="utf-8"))
            tag_model_version(version.name, version.version, evaluation_tags(metrics))
    return versions
