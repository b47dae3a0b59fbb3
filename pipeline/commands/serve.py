"""`llm-pipeline serve`: a registered model over HTTP on 127.0.0.1 (`mlflow models serve`)."""
from __future__ import annotations

import sys
from argparse import ArgumentParser

from pipeline.core.processes import run_server, tool_env


def main(argv: list[str] | None = None) -> None:
    """Serve an MLflow model from the project's store with `mlflow models serve` (POST /invocations);
    it binds 127.0.0.1 unless --host says otherwise."""
    from pipeline.core.catalog import champion_uri

    parser = ArgumentParser(prog="llm-pipeline serve", description=main.__doc__)
    default = champion_uri("finetune_classifier")
    parser.add_argument("model", nargs="?", default=default, help=f"model URI (default: {default})")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=5001, help="(default: 5001)")
    parser.add_argument("--params", default="params.yaml", help="params file whose mlflow section names the store")
    args = parser.parse_args(argv)
    import mlflow

    from pipeline.registry.tracking import use_project_store

    use_project_store(args.params)
    env = {**tool_env(), "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    sys.exit(run_server([sys.executable, "-m", "mlflow", "models", "serve", "-m", args.model,
                         "--host", args.host, "--port", str(args.port), "--env-manager", "local"], env))


if __name__ == "__main__":
    main()
