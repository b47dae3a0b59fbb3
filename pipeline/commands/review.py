"""Print the registered models as a table, or two versions side by side (`llm-pipeline review`); record a
person's decision (`llm-pipeline review approve|reject|rollback`)."""
from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException

from pipeline.core.catalog import TRAINERS, ModelSpec
from pipeline.core.errors import DataError, reporting_errors
from pipeline.core.tables import format_table
from pipeline.orchestration import sweeps
from pipeline.registry import decisions
from pipeline.registry.policy import key_tags, measure, metric_label
from pipeline.registry.tracking import (PARAMS_DIGEST_TAG, absent_store, all_pages, configure, data_digests,
                                        differing_params, experiment_name, model_names, project_tracking, tracking_uri)
from pipeline.registry.versions import ROLE_TAG, earlier_names, missing_model_hint, resolve_version

COLUMNS = ("model", "version", "aliases", "key metric", "other metrics", "promotion", "created (UTC)", "commit",
           "run group", "params", "data", "stage run")
SHORT = 8  # hex digits shown of commits and digests


def _number(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value
    if number.is_integer():
        return str(int(number))
    return f"{number:.0f}" if abs(number) >= 1000 else f"{number:.4g}"


def _aliases(model: RegisteredModel, version: ModelVersion) -> str:
    return ",".join(sorted(alias for alias, number in model.aliases.items()
                           if str(number) == str(version.version))) or "-"


def _created(version: ModelVersion) -> str:
    return datetime.fromtimestamp(version.creation_timestamp / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M")


def _commit(tags: dict[str, str]) -> str:
    return tags.get("git_commit", "-")[:SHORT] + ("+dirty" if tags.get("git_dirty") == "true" else "")


def model_spec(model: RegisteredModel, names: dict[str, str]) -> ModelSpec | None:
    """What the catalog says of a registered model: by its role tag, else by its name among `names` ({role:
    registered name}); None for a model that is not the pipeline's."""
    role = model.tags.get(ROLE_TAG) or {name: role for role, name in names.items()}.get(model.name)
    return TRAINERS[role].model if role in TRAINERS else None


def version_row(model: RegisteredModel, version: ModelVersion, spec: ModelSpec | None) -> tuple[str, ...]:
    """The table row of one version of `model` (`spec`: what the catalog says of it, if anything)."""
    tags = version.tags
    key, others = "-", []
    if spec is not None:
        keys = key_tags(spec)  # val first: it decides
        key = " ".join(f"{metric_label(tag)}={_number(tags[tag]) if tag in tags else '?'}" for tag in keys)
        others = [f"{metric_label(tag)}={_number(tags[tag])}" for tag in spec.others if tag in tags]
    data = [f"{name}={digest[:SHORT]}" for name, digest in data_digests(tags).items()]
    return (model.name, str(version.version), _aliases(model, version), key, " ".join(others) or "-",
            tags.get("promotion.decision", "-"), _created(version), _commit(tags),
            tags.get("run_group", "-"), tags.get(PARAMS_DIGEST_TAG, "-")[:SHORT], " ".join(data) or "-",
            version.run_id or "-")


def _marker(a: str, b: str) -> str:
    """The last column of a row of text: blank when both sides agree."""
    if a == b:
        return ""
    return "only B" if a == "-" else "only A" if b == "-" else "differs"


def _difference(a: str | None, b: str | None) -> str:
    """B - A of two tag values (blank when equal; computed from the values, not their rounded display),
    else the marker of text."""
    try:
        gain = float(b) - float(a)
    except (TypeError, ValueError):
        return _marker(a or "-", b or "-")
    return f"{gain:+.4g}" if gain else ""


def _key_rows(spec: ModelSpec, a: ModelVersion, b: ModelVersion) -> list[tuple[str, ...]]:
    """The key metric on each split, of both sides, with B - A and which side is better."""
    rows = []
    for tag, split in key_tags(spec).items():
        try:
            values = [measure(spec, v.tags, split, f"version {v.version}").value for v in (a, b)]
        except ValueError:  # not a number: the row says "?" rather than hiding the other side
            values = [None, None]
        verdict = "?"
        if None not in values:
            gain = values[1] - values[0]
            better = gain if spec.higher_is_better else -gain
            verdict = "equal" if not gain else f"{gain:+.4g}, {'B' if better > 0 else 'A'} better"
        direction = "higher" if spec.higher_is_better else "lower"
        rows.append((f"  {metric_label(tag)} (key, {direction} is better)",
                     *("?" if v is None else _number(str(v)) for v in values), verdict))
    return rows


def _metric_rows(spec: ModelSpec | None, a: ModelVersion, b: ModelVersion) -> list[tuple[str, ...]]:
    rows, in_key_row = [("metrics", "", "", "")], set()
    if spec is not None:
        rows += _key_rows(spec, a, b)
        in_key_row = set(key_tags(spec))
    tags = {tag for tag in {*a.tags, *b.tags} if tag.startswith(("metric.", "eval.")) and tag not in in_key_row}
    first = [tag for tag in (spec.others if spec else ()) if tag in tags]
    for tag in first + sorted(tags - set(first)):
        values = [version.tags.get(tag) for version in (a, b)]
        rows.append((f"  {metric_label(tag)}", *("-" if v is None else _number(v) for v in values),
                     _difference(*values)))
    return rows


def _hash_row(label: str, a: str, b: str) -> tuple[str, ...]:
    # Compared in full: two digests may share their first SHORT digits.
    return f"  {label}", a[:SHORT], b[:SHORT], _marker(a, b)


def _param_rows(client: mlflow.MlflowClient, a: ModelVersion, b: ModelVersion,
                show_all: bool) -> list[tuple[str, ...]]:
    params = [client.get_run(version.run_id).data.params if version.run_id else {} for version in (a, b)]
    names = sorted({*params[0], *params[1]})
    differing = [name for name, _, _ in differing_params(*params)]
    equal = len(names) - len(differing)
    rows = [(f"params ({equal} equal{'' if show_all else ', not shown; --all shows them'})", "", "", ""),
            _hash_row(PARAMS_DIGEST_TAG, *(version.tags.get(PARAMS_DIGEST_TAG, "-") for version in (a, b)))]
    for name in names if show_all else differing:
        cells = tuple(p.get(name, "-") for p in params)
        rows.append((f"  {name}", *cells, _marker(*cells)))
    return rows


def _data_rows(a: ModelVersion, b: ModelVersion) -> list[tuple[str, ...]]:
    rows = [("data (sha256)", "", "", "")]
    digests = [data_digests(version.tags) for version in (a, b)]
    for name in sorted({*digests[0], *digests[1]}):
        rows.append(_hash_row(name, *(side.get(name, "-") for side in digests)))
    return rows


def _decision_rows(model: RegisteredModel, a: ModelVersion, b: ModelVersion) -> list[tuple[str, ...]]:
    rows = [("decision", "", "", "")]
    for label, cell in (
            ("promotion.decision", lambda v: v.tags.get("promotion.decision", "-")),
            ("promotion.reason", lambda v: v.tags.get("promotion.reason", "-")),
            ("promotion.compared_with", lambda v: v.tags.get("promotion.compared_with", "-")),
            ("aliases", lambda v: _aliases(model, v)),
            ("git commit", lambda v: _commit(v.tags)),
            ("run group", lambda v: v.tags.get("run_group", "-")),
            ("experiment", lambda v: v.tags.get("dvc_exp", "-")),
            ("experiment's params", lambda v: v.tags.get("dvc_exp_changed", "-")),
            ("created (UTC)", _created),
            ("stage run", lambda v: v.run_id or "-")):
        cells = (cell(a), cell(b))
        rows.append((f"  {label}", *cells, _marker(*cells)))
    return rows


def _registered(client: mlflow.MlflowClient, name: str) -> RegisteredModel | None:
    try:
        return client.get_registered_model(name)
    except MlflowException:
        return None


def compare(client: mlflow.MlflowClient, name: str, ref_a: str, ref_b: str, names: dict[str, str],
            show_all: bool = False) -> str:
    """Versions `ref_a` and `ref_b` (numbers or aliases) of model `name` side by side: metrics, params
    of their stage runs (only those that differ unless `show_all`), data hashes and promotion decision.
    `names` ({role: registered name}) are the project's models."""
    model = _registered(client, name)
    if model is None:
        models = ", ".join(n for n in names.values() if _registered(client, n)) or "none"
        raise DataError(f"no registered model named {name} in {client.tracking_uri} (this project's: {models}); "
                        f"{missing_model_hint()}")
    versions = all_pages(client.search_model_versions, f"name = '{name}'")
    a, b = resolve_version(model, versions, ref_a), resolve_version(model, versions, ref_b)
    rows = (_metric_rows(model_spec(model, names), a, b) + _param_rows(client, a, b, show_all) + _data_rows(a, b)
            + _decision_rows(model, a, b))
    columns = ("", f"A (version {a.version})", f"B (version {b.version})", "B - A")
    return f"{name}: A = {ref_a}, B = {ref_b}\n{format_table(rows, columns)}"


def _earlier(client: mlflow.MlflowClient, names: dict[str, str], experiment: str) -> list[str]:
    """A line naming the registered models this project's models had as names before, if any."""
    earlier = [f"{old} ({role}, {len(numbers)} version{'' if len(numbers) == 1 else 's'})" for role, name in names.items()
               for old, numbers in earlier_names(client, role, name, experiment).items()]
    return [f"earlier names of this project's models, left as they were (--model NAME shows one): "
            f"{', '.join(earlier)}"] if earlier else []


def review(model: str | None = None, params_path: Path | None = Path("params.yaml"),
           versions: tuple[str, str] | None = None, show_all: bool = False) -> str:
    """The table of the project's registered models (those params_path's mlflow.models names; only `model` if
    given, which may be any registered model), or a message saying there are none; with `versions` (A, B),
    those two versions of `model` compared (see compare)."""
    tracking = project_tracking(params_path)
    names, uri = model_names(tracking), tracking_uri(tracking)
    if absent_store(uri):  # reading must not create one
        return f"no MLflow store at {uri}; {missing_model_hint()}"
    configure(tracking)
    client = mlflow.MlflowClient()
    if versions is not None:
        return compare(client, model, *versions, names=names, show_all=show_all)
    found = {name: _registered(client, name) for name in ([model] if model is not None else names.values())}
    models = [registered for registered in found.values() if registered is not None]
    if not models:
        what = f"named {model}" if model is not None else f"of this project ({', '.join(names.values())})"
        return f"no registered model {what} in {uri}; {missing_model_hint()}"
    rows, empty = [], [f"{name}: not registered" for name, registered in found.items() if registered is None]
    for registered in models:
        versions = all_pages(client.search_model_versions, f"name = '{registered.name}'")
        if not versions:
            empty.append(f"{registered.name}: no versions")
        spec = model_spec(registered, names)
        rows += [version_row(registered, v, spec) for v in sorted(versions, key=lambda v: int(v.version))]
    earlier = _earlier(client, names, experiment_name(tracking)) if model is None else []
    return "\n".join(([format_table(rows, COLUMNS)] if rows else []) + empty + earlier)


VERBS = {  # the decisions, each with its synopsis and what it does
    "approve": ("MODEL VERSION --reason TEXT",
                "make VERSION the champion (under `promote.approval: manual`, the only way it moves)"),
    "reject": ("MODEL VERSION --reason TEXT", "VERSION never becomes champion by an automatic run (promote, on any path)"),
    "rollback": ("MODEL [--to VERSION] --reason TEXT", "return the champion to the one before it (or VERSION); the "
                 "current one is then blocked like a rejected one"),
}


def decide(verb: str, argv: list[str]) -> None:
    """`llm-pipeline review VERB`: one decision, recorded with who, when and why on the version and its card."""
    parser = argparse.ArgumentParser(prog=f"llm-pipeline review {verb}", description=VERBS[verb][1])
    parser.add_argument("model", metavar="MODEL", help="the registered model's name")
    if verb == "rollback":
        parser.add_argument("--to", metavar="VERSION", help="the version to return to (default: the previous champion)")
    else:
        parser.add_argument("version", metavar="VERSION", help="the version number (or an alias, e.g. challenger)")
    parser.add_argument("--reason", default="", help="why, in a few words (required; recorded on the version)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="params file whose mlflow section locates the registry (default: params.yaml, if present)")
    args = parser.parse_args(argv)
    with reporting_errors(f"review {verb}"):
        tracking = project_tracking(args.params)
        uri = tracking_uri(tracking)
        if absent_store(uri):
            raise DataError(f"no MLflow store at {uri}; {missing_model_hint()}")
        configure(tracking)
        client = mlflow.MlflowClient()
        if verb == "rollback":
            record = decisions.rollback(client, args.model, args.reason, args.to)
        else:
            record = getattr(decisions, verb)(client, args.model, args.version, args.reason)
        print(decisions.describe(record))


def main(argv: list[str] | None = None) -> None:
    """Print the review table, or record a decision (VERBS); an expected error is one line on stderr and exit
    status 1."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in VERBS:
        decide(argv[0], argv[1:])
        return
    parser = argparse.ArgumentParser(prog="llm-pipeline review", description=__doc__,
                                     epilog="Decisions, recorded on the version with who, when and why: " + "; ".join(
                                         f"`llm-pipeline review {verb} {synopsis}`: {text}"
                                         for verb, (synopsis, text) in VERBS.items()))
    parser.add_argument("--model", metavar="NAME", help="only this registered model (default: the project's, "
                        "as params.yaml's mlflow.models names them)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="params file whose mlflow section locates the registry (default: params.yaml, if present)")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"),
                        help="show versions A and B of --model side by side (version numbers or aliases)")
    parser.add_argument("--all", action="store_true", help="with --compare: also the params both runs share")
    parser.add_argument("--sweep", metavar="NAME", help="the table of `llm-pipeline sweep -n NAME` again "
                        "(sorted by --model's key metric, default as sweep chooses)")
    args = parser.parse_args(argv)
    with reporting_errors("review"):
        # Checked here rather than by argparse, so bad input is one line like every other error.
        if args.compare and args.model is None:
            raise ValueError("--compare needs --model NAME")
        if args.all and not args.compare:
            raise ValueError("--all applies to --compare only")
        if args.sweep and args.compare:
            raise ValueError("--sweep and --compare are two different tables; give one")
        if args.sweep:
            tracking = project_tracking(args.params)
            print(sweeps.table(Path.cwd(), args.sweep, configure(tracking), model_names(tracking), args.model))
        else:
            print(review(args.model, args.params, tuple(args.compare) if args.compare else None, args.all))


if __name__ == "__main__":
    main()
