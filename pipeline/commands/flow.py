"""`llm-pipeline flow run|serve|worker|list|notify`: the Prefect flows of pipeline.orchestration.flows from the command line."""
from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from pipeline.commands.repro import LOCK_WAIT_HELP
from pipeline.core.errors import reporting_errors
from pipeline.orchestration.dvc_repo import RepositoryBusy
from pipeline.orchestration.services import SWEEP_POOL
from pipeline.orchestration.flows import (DEFAULT_CRON, DEFAULT_DEPLOYMENT, DEFAULT_SERVE_LOCK_WAIT_S, PIPELINE_FLOW,
                                          FlowError, dvc_stages, pipeline_flow, plan, project_dir, serve, stage_flow)

PROG = "llm-pipeline flow"


def _override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, yaml.safe_load(value)


def _cmd_run(args: argparse.Namespace) -> None:
    project = project_dir(args.project)
    if args.stage != "all":
        plan(dvc_stages(project), [args.stage])  # an unknown stage fails here, before Prefect starts
    chosen = pipeline_flow if args.stage == "all" else stage_flow(args.stage)
    results = chosen(preset=args.preset, overrides=dict(args.overrides), project=str(project),
                     lock_wait_s=args.lock_wait)
    for stage, outcome in results.items():
        print(f"{stage}: {outcome}")


def _cmd_serve(args: argparse.Namespace) -> None:
    serve(args.cron, args.name, args.lock_wait)


def _cmd_worker(args: argparse.Namespace) -> None:
    from pipeline.orchestration.sweep_workers import run_worker

    sys.exit(run_worker(args.project, args.pool, args.name))


def _cmd_notify(args: argparse.Namespace) -> None:
    from prefect.settings import PREFECT_API_URL  # after flows, which points Prefect at the project's home

    from pipeline.orchestration import run_summary

    if PREFECT_API_URL.value() is None:
        raise FlowError("notify saves a block on the team's Prefect server: set PREFECT_API_URL")
    slug = run_summary.save_webhook_block()
    print(f"saved notification block {slug}: a failed or crashed flow run posts its subject and reason there")


def _cmd_list(args: argparse.Namespace) -> None:
    stages = dvc_stages(project_dir(args.project))
    print(f"{PIPELINE_FLOW}: {' '.join(plan(stages))}")
    for name in stages:
        print(f"stage-{name}: {' '.join(plan(stages, [name]))}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Run dvc.yaml's stages as Prefect flows, "
                                     "one task per stage (`dvc repro --single-item`), or serve them on a schedule.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a flow now, in this process", description=(
        "Run one stage's flow (its upstream stages, then it) or the whole pipeline ('all'). "
        "--preset and --set are written into params.yaml first, as `dvc exp run -S` does. "
        "Without PREFECT_API_URL a temporary local Prefect server is started."))
    run.add_argument("stage", nargs="?", default="all", help="a dvc.yaml stage, or all (default)")
    run.add_argument("--preset", help="a preset of pipeline/core/presets.yaml to write into params.yaml")
    run.add_argument("--set", dest="overrides", metavar="KEY=VALUE", type=_override, action="append", default=[],
                     help="set a param, e.g. --set pretrain.epochs=1 (the value is read as YAML); repeatable")
    run.add_argument("--project", help="project folder (default: the current one)")
    run.add_argument("--lock-wait", type=float, default=0.0, metavar="SECONDS",
                     help=LOCK_WAIT_HELP)
    run.set_defaults(handler=_cmd_run)
    serve_cmd = commands.add_parser("serve", help="serve the end-to-end flow on a cron schedule", description=(
        f"Register deployment '{PIPELINE_FLOW}/NAME' of the end-to-end flow with the Prefect server at "
        "$PREFECT_API_URL, scheduled by CRON (UTC), and run its flow runs in the current folder until "
        "interrupted (Ctrl-C pauses the schedule)."))
    serve_cmd.add_argument("--cron", default=DEFAULT_CRON, help=f"cron schedule, UTC (default: {DEFAULT_CRON!r})")
    serve_cmd.add_argument("--name", default=DEFAULT_DEPLOYMENT,
                           help=f"deployment name (default: {DEFAULT_DEPLOYMENT})")
    serve_cmd.add_argument("--lock-wait", type=float, default=DEFAULT_SERVE_LOCK_WAIT_S, metavar="SECONDS",
                           help="how long a scheduled run waits for a repository another process holds "
                                f"(default {DEFAULT_SERVE_LOCK_WAIT_S:g})")
    serve_cmd.set_defaults(handler=_cmd_serve)
    worker = commands.add_parser("worker", help="run sweep points sent to the team's work pool, in this clone",
                                 description=(
        f"Start a Prefect process worker of work pool POOL (default {SWEEP_POOL}) for this clone, one flow run at "
        "a time, until interrupted: it runs the points of `llm-pipeline sweep --deployment` as `dvc exp run --temp` "
        "of the sweep's commit and pushes them to origin and the DVC remote. Needs PREFECT_API_URL and "
        "MLFLOW_TRACKING_URI of the team's servers, a git remote origin and a default DVC remote."))
    worker.add_argument("--pool", default=SWEEP_POOL, help=f"work pool (default: {SWEEP_POOL})")
    worker.add_argument("--name", help="the worker's name (default: Prefect's)")
    worker.add_argument("--project", help="the clone (default: the current folder)")
    worker.set_defaults(handler=_cmd_worker)
    list_cmd = commands.add_parser("list", help="list the flows and the stages each runs", description=(
        "List the end-to-end flow and one flow per dvc.yaml stage, each with the stages it runs, in order."))
    list_cmd.add_argument("--project", help="project folder (default: the current one)")
    list_cmd.set_defaults(handler=_cmd_list)
    notify = commands.add_parser("notify", help="have failed flow runs post to a webhook", description=(
        "Save the notification block that failed and crashed flow runs call (a custom webhook receiving "
        "{\"subject\", \"body\"} as JSON) on the Prefect server at $PREFECT_API_URL, with the URL in "
        "$LLM_PIPELINE_FAILURE_WEBHOOK. Flow runs call the block named by $LLM_PIPELINE_FAILURE_BLOCK "
        "(default custom-webhook/llm-pipeline-failures), which may be any Prefect notification block."))
    notify.set_defaults(handler=_cmd_notify)
    return parser


def main(argv: list[str] | None = None) -> None:
    """`llm-pipeline flow run|serve|worker|list|notify`; an expected error is one line on stderr and exit status 1."""
    args = _parser().parse_args(argv)
    with reporting_errors(PROG, FlowError, RepositoryBusy):
        args.handler(args)


if __name__ == "__main__":
    main()
