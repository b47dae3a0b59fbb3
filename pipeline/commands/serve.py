"""`llm-pipeline serve`: a registered model over HTTP on 127.0.0.1 (`mlflow models serve`)."""
from __future__ import annotations

import sys
from argparse import ArgumentParser

from pipeline.core.errors import reporting_errors
from pipeline.core.processes import run_server, tool_env


def main(argv: list[str] | None = None) -> None:
    """Serve an MLflow model from the project's store with `mlflow models serve` (POST /invocations);
    it binds 127.0.0.1 unless --host says otherwise."""
    parser = ArgumentParser(prog="llm-pipeline serve", description=main.__doc__)
    parser.add_argument("model", nargs="?", help="model URI (default: models:/NAME@champion, NAME: params.yaml's "
                        "mlflow.models.classifier)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=5001, help="(default: 5001)")
    parser.add_argument("--params", default="params.yaml", help="params file whose mlflow section names the store")
    args = parser.parse_args(argv)
    import mlflow

    from pipeline.core.catalog import champion_uri
    from pipeline.registry.tracking import configure, model_names, project_tracking

    with reporting_errors("serve"):
        tracking = project_tracking(args.params)
        model = args.model or champion_uri(model_names(tracking)["classifier"])
        configure(tracking)
    env = {**tool_env(), "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    sys.exit(run_server([sys.executable, "-m", "mlflow", "models", "serve", "-m", model,
                         "--host", args.host, "--port", str(args.port), "--env-manager", "local"], env))


if __name__ == "__main__":
    main()
