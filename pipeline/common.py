"""Helpers shared by the stages: data paths, atomic writes, mirror lookup, the CLI wrapper."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from gpt.atomic import remove_stale_temps, reporting_full_disk
from gpt.errors import GPTError
from gpt.fetch import FetchError, temp_beside
from gpt.tokenizer import TokenizerError
from pipeline.params import ParamsError

DATA = Path("data")
RAW = DATA / "raw"
METRICS = DATA / "metrics"
BPE_DIR = RAW / "gpt2_bpe"  # what gpt.tokenizer.load_tokenizer reads
BASE_MODEL_DIR = DATA / "models" / "base"  # the pretrain stage's model
CLASSIFIER_MODEL_DIR = DATA / "models" / "classifier"  # finetune_classifier's
INSTRUCT_MODEL_DIR = DATA / "models" / "instruct"  # finetune_instruct's
VALIDATE_REPORT = METRICS / "validate.json"
MIRROR_ENV = "LLM_PIPELINE_MIRROR"
OFFLINE_ENV = "LLM_PIPELINE_OFFLINE"
RUN_GROUP_ENV = "LLM_PIPELINE_RUN_GROUP"  # one MLflow parent run for the stages that share it
MODEL_URI_SCHEMES = ("models:/", "runs:/")


class DataError(ValueError):
    """An input file breaks its schema or cannot be used (names the file and row)."""


def raw_file(name: str) -> Path:
    """data/raw/<name>, which must exist."""
    path = RAW / name
    if not path.is_file():
        raise DataError(f"{path}: missing; run the download stage first")
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write data to path through a temp file in the same folder, then rename over it; a full
    disk is an OSError naming path, and temp files of an earlier killed write are removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    with reporting_full_disk(path):
        tmp = temp_beside(path)
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """atomic_write_bytes of UTF-8 text with \\n line ends."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    """Write data as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def resolve_mirror(param: str | None) -> Path | None:
    """The mirror folder: the `download.mirror` param, else $LLM_PIPELINE_MIRROR, else none."""
    chosen = param or os.environ.get(MIRROR_ENV) or None
    if chosen is None:
        return None
    mirror = Path(chosen).expanduser()
    if not mirror.is_dir():
        raise FetchError(f"mirror folder {mirror} does not exist")
    return mirror


def env_offline() -> bool:
    """Whether $LLM_PIPELINE_OFFLINE asks for no network access."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes"}


def is_model_uri(model: str) -> bool:
    """Whether `model` names an MLflow model (models:/ or runs:/) rather than a checkpoint folder."""
    return model.startswith(MODEL_URI_SCHEMES)


def add_model_options(parser: argparse.ArgumentParser, default: str, example_uri: str) -> None:
    """--model (a checkpoint folder or an MLflow URI) and --fast-decode, for the generating commands."""
    parser.add_argument("--model", default=default,
                        help=f"checkpoint folder or MLflow URI such as {example_uri} (default: {default})")
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

    from pipeline.tracking import use_project_store

    use_project_store(params_path)
    try:
        return mlflow.pyfunc.load_model(uri)
    except MlflowException as exc:
        raise ValueError(f"{uri}: {exc.message}") from None


# ValueError covers ParamsError, DataError and the value checks of gpt/; anything else is a bug
# and keeps its traceback.
EXPECTED_ERRORS = (ParamsError, FetchError, TokenizerError, GPTError, ValueError, OSError)


@contextmanager
def reporting_errors(prog: str, *also: type[BaseException]) -> Iterator[None]:
    """Turn an expected error from the block (EXPECTED_ERRORS, MLflow's, or `also`) into one line
    `<prog>: error: <message>` on stderr and exit status 1, without a traceback; anything else is a
    bug and keeps its traceback."""
    try:
        yield
    except Exception as exc:
        # MLflow is checked without importing it: commands that never loaded it cannot raise its errors.
        mlflow_errors = sys.modules.get("mlflow.exceptions")
        if not (isinstance(exc, (*EXPECTED_ERRORS, *also))
                or (mlflow_errors is not None and isinstance(exc, mlflow_errors.MlflowException))):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(1)


def dvc_env(run_group: str) -> dict[str, str]:
    """Environment for `dvc repro`: this interpreter first on PATH (dvc.yaml runs `python`), every
    stage in MLflow run group `run_group`, no DVC analytics, stage output unbuffered."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env[RUN_GROUP_ENV] = run_group
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_stage(name: str, main: Callable[[Path], None]) -> None:
    """Parse `--params`, run main(params_path) and exit; an expected error becomes one line
    `<name>: error: <message>` on stderr and exit status 1, without a traceback."""
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.{name}",
                                     description=f"Run the {name} stage in the current folder.")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="params file (default: params.yaml)")
    args = parser.parse_args()
    with reporting_errors(name):
        main(args.params)
