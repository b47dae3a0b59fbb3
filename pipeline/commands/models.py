"""What the model-using commands share: the --model option, and loading a checkpoint folder or an MLflow model."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline.core.layout import BPE_DIR

MODEL_URI_SCHEMES = ("models:/", "runs:/")


def is_model_uri(model: str) -> bool:
    """Whether `model` names an MLflow model (models:/ or runs:/) rather than a checkpoint folder."""
    return model.startswith(MODEL_URI_SCHEMES)


def add_model_options(parser: argparse.ArgumentParser, default: str, role: str) -> None:
    """--model (a checkpoint folder or an MLflow URI) and --fast-decode, for the commands that generate with the
    `role` model."""
    parser.add_argument("--model", default=default,
                        help=f"checkpoint folder or MLflow URI such as models:/NAME@champion (NAME: params.yaml's "
                             f"mlflow.models.{role}) (default: {default})")
    parser.add_argument("--fast-decode", action="store_true",
                        help="decode on CPU with gpt.fast_decode's fused C++ step (several times PyTorch's "
                             "speed on large models; built on first use, ~20 s, needs a C++ compiler)")


def parse_model_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, refusing --fast-decode for an MLflow model (its own code loads the weights)."""
    args = parser.parse_args(argv)
    if args.fast_decode and is_model_uri(args.model):
        parser.error("--fast-decode needs a local checkpoint folder as --model")
    return args


def load_local_model(path: str, fast_decode: bool) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from a checkpoint folder and the project's BPE files."""
    from gpt.checkpoint import load_model
    from gpt.fast_decode import use_fast_decode
    from gpt.tokenizer import load_tokenizer

    model = load_model(path).eval()
    use_fast_decode(model, fast_decode)
    return model, load_tokenizer(BPE_DIR)


def load_mlflow_model(uri: str, params_path: Path | None = Path("params.yaml")) -> Any:
    """The pyfunc model at `uri`, from the store of `params_path`'s mlflow section (the stages' store);
    a missing model or alias is a ValueError naming the URI."""
    # Imported here: commands that read a checkpoint folder should not wait for MLflow to load.
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.registry.versions import missing_model_hint
    from pipeline.registry.tracking import absent_store, project_tracking, tracking_uri, use_project_store

    store = tracking_uri(project_tracking(params_path))
    if absent_store(store):  # reading must not create one
        raise ValueError(f"{uri}: no MLflow store at {store}; {missing_model_hint()}")
    use_project_store(params_path)
    try:
        return mlflow.pyfunc.load_model(uri)
    except MlflowException as exc:
        hint = f"; {missing_model_hint()}" if uri.startswith("models:/") else ""
        raise ValueError(f"{uri}: {exc.message}{hint}") from None
