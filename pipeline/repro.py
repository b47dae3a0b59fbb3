"""How `dvc repro` is run for the pipeline: the environment every stage gets (interpreter, run group)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

RUN_GROUP_ENV = "LLM_PIPELINE_RUN_GROUP"  # one MLflow parent run for the stages that share it


def dvc_env(run_group: str) -> dict[str, str]:
    """Environment for `dvc repro`: this interpreter first on PATH (dvc.yaml runs `python`), every
    stage in MLflow run group `run_group`, no DVC analytics, stage output unbuffered."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env[RUN_GROUP_ENV] = run_group
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env
