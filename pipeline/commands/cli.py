"""`llm-pipeline`: one command for the project; each subcommand is a module's own CLI."""
from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from argparse import ArgumentParser, RawDescriptionHelpFormatter
from pathlib import Path

# name -> ("module:function" taking argv, one-line help). Targets are imported only when used,
# so `llm-pipeline --help` does not wait for torch or MLflow to load.
COMMANDS = {
    "run": ("pipeline.commands.cli:run", "run the DVC pipeline (dvc repro) as one MLflow run group"),
    "register": ("pipeline.commands.cli:register", "register the trained models of data/models in MLflow (no retraining)"),
    "flow": ("pipeline.flows:main", "run Prefect flows, or serve the scheduled deployment"),
    "generate": ("pipeline.commands.generate:main", "continue prompts with the pretrained GPT"),
    "chat": ("pipeline.commands.chat:main", "ask the instruction-finetuned model"),
    "classify": ("pipeline.commands.classify:main", "classify texts, with the probability of every class"),
    "review": ("pipeline.commands.review:main", "print the registered models: versions, aliases, key metrics, lineage"),
    "dvc-yaml": ("pipeline.dvcyaml:main", "rewrite dvc.yaml's generated parts (cmd, params, metrics, code deps) from pipeline.stages"),
    "serve": ("pipeline.commands.cli:serve", "serve a registered model over HTTP on 127.0.0.1 (mlflow models serve)"),
    "services": ("pipeline.services:main", "start or stop PostgreSQL, MLflow and Prefect servers and a worker on 127.0.0.1"),
}


LOCK_WAIT_HELP = ("if another process holds the DVC repository's lock, wait up to this long for it, "
                  "saying whom it waits for (default 0: fail at once, naming that process)")


def _repro(prog: str, arguments: list[str], lock_wait_s: float, env: dict[str, str]) -> None:
    """`dvc repro ARGUMENTS` in the current folder once its lock is free (pipeline.repro.run_dvc); exits with
    DVC's status, or 1 with one line naming the process that holds the lock."""
    from pipeline.errors import reporting_errors
    from pipeline.repro import RepositoryBusy, run_dvc

    with reporting_errors(prog, RepositoryBusy):
        code = run_dvc([sys.executable, "-m", "dvc", "repro", *arguments], Path.cwd(), env, lock_wait_s)
    sys.exit(code)


def _run_group_env() -> dict[str, str]:
    from pipeline.repro import RUN_GROUP_ENV, dvc_env

    return dvc_env(os.environ.get(RUN_GROUP_ENV) or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))


def run(argv: list[str]) -> None:
    """Run `dvc repro [TARGET...]` in the current folder; every stage it runs logs under one MLflow
    parent run (run group: $LLM_PIPELINE_RUN_GROUP, else the UTC start time)."""
    parser = ArgumentParser(prog="llm-pipeline run", description=run.__doc__)
    parser.add_argument("targets", nargs="*", metavar="STAGE", help="stages to bring up to date (default: all)")
    parser.add_argument("--force", action="store_true", help="rerun stages even when DVC finds them up to date")
    parser.add_argument("--nproc", type=int, default=1,
                        help="pretrain with this many data-parallel processes (torchrun, DDP); default 1")
    parser.add_argument("--lock-wait", type=float, default=0.0, metavar="SECONDS", help=LOCK_WAIT_HELP)
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error("--nproc must be >= 1")
    from pipeline.stages import PRETRAIN_LAUNCH_ENV

    env = _run_group_env()
    if args.nproc > 1:  # read by dvc.yaml's pretrain cmd
        env[PRETRAIN_LAUNCH_ENV] = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node={args.nproc}"
    _repro("run", [*args.targets, *(["--force"] if args.force else [])], args.lock_wait, env)


def register(argv: list[str]) -> None:
    """Bring the MLflow registry in line with the trained models in data/models, without retraining: rerun the
    promote stage (`dvc repro --force --single-item promote`), which registers every training stage's output
    the registry lacks, found by its content hash (tag model_sha256), so running it again, or after `dvc pull`
    on another machine, adds no duplicate; then it moves the aliases under the promotion policy."""
    parser = ArgumentParser(prog="llm-pipeline register", description=register.__doc__)
    parser.add_argument("--lock-wait", type=float, default=0.0, metavar="SECONDS", help=LOCK_WAIT_HELP)
    args = parser.parse_args(argv)
    from pipeline.errors import reporting_errors
    from pipeline.repro import dvc_status
    from pipeline.stages import TRAINERS

    env = _run_group_env()
    status = dvc_status(Path.cwd(), [*(stage.name for stage in TRAINERS.values()), "evaluate"], env)
    with reporting_errors("register"):
        if status is None:
            raise ValueError("`dvc status` failed here; run it to see why")
        changed = list(status)
        if changed:
            raise ValueError(f"{', '.join(changed)}: outputs differ from dvc.lock (dvc status); `dvc pull` fetches "
                             "pushed outputs, `dvc repro` retrains (and registers) what changed")
    _repro("register", ["--force", "--single-item", "promote"], args.lock_wait, env)


def serve(argv: list[str]) -> None:
    """Serve an MLflow model from the project's store with `mlflow models serve` (POST /invocations);
    it binds 127.0.0.1 unless --host says otherwise."""
    from pipeline.registry import champion_uri

    parser = ArgumentParser(prog="llm-pipeline serve", description=serve.__doc__)
    default = champion_uri("finetune_classifier")
    parser.add_argument("model", nargs="?", default=default, help=f"model URI (default: {default})")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=5001, help="(default: 5001)")
    parser.add_argument("--params", default="params.yaml", help="params file whose mlflow section names the store")
    args = parser.parse_args(argv)
    import mlflow

    from pipeline.tracking import use_project_store

    use_project_store(args.params)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    sys.exit(run_server([sys.executable, "-m", "mlflow", "models", "serve", "-m", args.model,
                         "--host", args.host, "--port", str(args.port), "--env-manager", "local"], env))


def run_server(command: list[str], env: dict[str, str], grace_s: float = 30.0) -> int:
    """Run `command` in a session of its own until it exits or SIGINT/SIGTERM arrives; then stop its whole
    process group (SIGTERM, SIGKILL after grace_s) and return its exit status, or 128 + the signal."""
    # Its own session: a terminal's Ctrl-C reaches only us, and the group holds every process it starts
    # (mlflow starts uvicorn as a child, which would outlive mlflow alone).
    server = subprocess.Popen(command, env=env, start_new_session=True)
    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        signal_group(server.pid, signal.SIGTERM)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    status = server.wait()
    stop_group(server.pid, grace_s)  # whatever mlflow left behind when it exited
    return 128 + received[0] if received else status


def signal_group(pgid: int, signum: int) -> bool:
    """Send signum to process group pgid (0: none, a probe); whether the group still had a process."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user joined the group: it is there
        return True
    return True


def stop_group(pgid: int, grace_s: float) -> None:
    """SIGTERM process group pgid, wait up to grace_s for it to empty, then SIGKILL what is left."""
    signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    # Bounded: a member already dead but not yet reaped by init still counts as in the group.
    while signal_group(pgid, 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    signal_group(pgid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    listing = "\n".join(f"  {name:<10}{text}" for name, (_, text) in COMMANDS.items())
    parser = ArgumentParser(prog="llm-pipeline", formatter_class=RawDescriptionHelpFormatter,
                            description="Train, review and use the project's GPT models.",
                            epilog=f"commands:\n{listing}\n\n`llm-pipeline COMMAND --help` describes one.")
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv[:1])  # prints the help or a usage error and exits
    module, function = COMMANDS[argv[0]][0].split(":")
    getattr(importlib.import_module(module), function)(argv[1:])


if __name__ == "__main__":
    main()
