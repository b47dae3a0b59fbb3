"""What a flow run did, where people look: a markdown artifact in Prefect's UI, and a notification when it fails."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import quote, urlsplit

from pipeline.core.catalog import STAGES

ARTIFACT_KEY = "pipeline-summary"  # Prefect keeps each flow run's summary under this key, the latest first
# The notification block a failed flow run calls: a Prefect block's "<block type>/<name>"; any notification block
# type works (Slack, Teams, a custom webhook). `llm-pipeline flow notify` saves the default one.
FAILURE_BLOCK_ENV = "LLM_PIPELINE_FAILURE_BLOCK"
FAILURE_BLOCK = "custom-webhook/llm-pipeline-failures"
WEBHOOK_ENV = "LLM_PIPELINE_FAILURE_WEBHOOK"  # the URL `flow notify` saves (a URL may hold a token: not an argument)


def _link(text: str, url: str | None) -> str:
    return f"[{text}]({url})" if url else text


def _figure(value: Any, se: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" + ("" if se is None else f" ± {se:.2g}")


def _models_table(decisions: Mapping[str, Mapping[str, Any]], ui: str | None) -> list[str]:
    """A row per model (its decision in a few words), then each decision's reason in full."""
    rows = ["| model | version | key metric | champion | champion's | decision |", "|---|---|---|---|---|---|"]
    reasons = [""]
    for record in decisions.values():
        name = record["model"]
        link = (lambda v: f"{ui}/#/models/{quote(name)}/versions/{v}") if ui else (lambda v: None)
        champion = record.get("champion")
        decision = record["decision"].replace("_", " ") + (
            f" ({record['recommendation']})" if record.get("recommendation") else "")
        rows.append(f"| {name} | {_link(str(record['version']), link(record['version']))} | "
                    f"{record['metric']} {_figure(record['value'], record.get('se'))} | "
                    f"{'-' if champion is None else _link(str(champion), link(champion))} | "
                    f"{_figure(record.get('champion_value'), record.get('champion_se'))} | {decision} |")
        reasons.append(f"- {name} version {record['version']}: {decision}; {record['reason']}")
    return rows + reasons


def _stage_runs(tracking: Mapping[str, Any] | None, group: str, ui: str | None) -> list[str]:
    """A line per MLflow run of this flow run's run group, with a link to it where a tracking server shows it."""
    import mlflow

    from pipeline.registry.tracking import configure

    experiment = configure(tracking)
    runs = mlflow.MlflowClient().search_runs([experiment], f"tags.run_group = '{group}'",
                                             order_by=["attributes.start_time ASC"])
    return [f"- {_link(run.info.run_name, f'{ui}/#/experiments/{experiment}/runs/{run.info.run_id}' if ui else None)}"
            f" ({run.info.status.lower()}, run `{run.info.run_id}`)" for run in runs]


def summary(project: Path, results: Mapping[str, str], group: str, failure: str | None = None) -> str:
    """The markdown of a flow run: each planned stage ran, was up to date, failed or was not reached; each
    model's key metric against its champion's with the decision (data/reports/promote.json); its MLflow runs."""
    # Imported here: MLflow loads with it, which commands that only list or serve flows should not wait for.
    from pipeline.registry.tracking import experiment_name, project_tracking, tracking_uri

    tracking = project_tracking(project / "params.yaml")
    uri = tracking_uri(tracking)
    ui = uri.rstrip("/") if urlsplit(uri).scheme in ("http", "https") else None
    lines = [f"## Pipeline run `{group}`: " + ("failed" if failure else "completed"), ""]
    if failure:
        lines += [f"**{failure}**", ""]
    lines += ["| stage | this run |", "|---|---|", *(f"| {stage} | {state} |" for stage, state in results.items()), ""]
    report = project / STAGES["promote"].report
    if report.is_file():
        fresh = results.get("promote") == "ran"
        lines += ["### Models", "", "Decisions of `promote` " + ("in this run" if fresh else
                  "from an earlier run (it did not run in this one)") + f", under experiment "
                  f"`{experiment_name(tracking)}` in `{uri}`:", ""]
        lines += _models_table(json.loads(report.read_text(encoding="utf-8")), ui)
        lines.append("")
    try:
        runs = _stage_runs(tracking, group, ui)
    except (OSError, ValueError) as exc:  # the store unreachable: the summary says so rather than failing the run
        runs = [f"(MLflow's runs could not be read: {exc})"]
    lines += ["### MLflow runs of this flow run", "", *(runs or ["none: no stage ran"])]
    return "\n".join(lines) + "\n"


def publish(markdown: str) -> None:
    """Attach the summary to the current flow run as a markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown, key=ARTIFACT_KEY, description="What this pipeline run did")


def notify_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect's on_failure / on_crashed hook: tell the notification block named by $LLM_PIPELINE_FAILURE_BLOCK
    (default FAILURE_BLOCK) that the flow run failed, and why; without such a block, say so in the log."""
    from prefect.blocks.core import Block
    from prefect.logging import get_logger

    slug, logger = os.environ.get(FAILURE_BLOCK_ENV, FAILURE_BLOCK), get_logger("llm-pipeline")
    try:
        block = Block.load(slug)
    except ValueError:
        logger.warning("no notification block %s: this failure notifies nobody (`llm-pipeline flow notify` saves "
                       "one)", slug)
        return
    try:
        block.notify(body=f"Flow run {flow_run.name} of {flow.name} ended {state.name}: {state.message}",
                     subject=f"llm-pipeline: {flow.name} run {flow_run.name} {state.name.lower()}")
    except Exception as exc:  # the receiver down or refusing: one line in the run's log, the failure stands
        logger.warning("notification block %s could not deliver: %s", slug, " ".join(str(exc).split()) or
                       type(exc).__name__)


def save_webhook_block() -> str:
    """Save the default notification block (a custom webhook posting {"subject", "body"} as JSON) with the URL in
    $LLM_PIPELINE_FAILURE_WEBHOOK, on the Prefect server the environment names; return the block's slug."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    url = os.environ.get(WEBHOOK_ENV, "")
    if urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"${WEBHOOK_ENV}: set it to the webhook's http(s) URL, got {url!r}")
    kind, name = FAILURE_BLOCK.split("/")
    CustomWebhookNotificationBlock(name=name, url=url, json_data={"subject": "{{subject}}", "body": "{{body}}"}).save(
        name, overwrite=True)
    return f"{kind}/{name}"
