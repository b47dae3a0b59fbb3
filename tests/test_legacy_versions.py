"""Model versions registered before pipeline/ was grouped by part still load in this code and serve over HTTP."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from io import BytesIO
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from conftest import REPO
from gpt.checkpoint import load_model
from gpt.generate import generate_text
from gpt.tokenizer import load_tokenizer
from test_serving import invoke, served

pytestmark = pytest.mark.slow  # every test here takes more than ~10 s

# The last commit of the flat layout: its pyfuncs import pipeline.mlflow_models.* and gpt.train.pick_device.
LEGACY_COMMIT = "55cb3b43eed4e0d6021eccbef9ba45a372d791b7"
# Run by that commit's code: a micro GPT as gpt-base and gpt-instruct, a 2-class head as gpt-spam-classifier.
LOG_WITH_LEGACY_CODE = """
import sys
from pathlib import Path
import torch
from gpt.checkpoint import save_model
from gpt.classifier import ClassifierSpec, add_class_head, save_classifier
from gpt.model import GPTConfig, GPTModel
from pipeline.mlflow_models import gpt_generator, instruct_generator, spam_classifier
from pipeline.tracking import log_pyfunc, stage_run
assert 'legacy' in gpt_generator.__file__, gpt_generator.__file__
bpe = Path(sys.argv[1])
torch.manual_seed(0)
checkpoint = save_model(GPTModel(GPTConfig.from_preset("micro")), Path("checkpoint"))
classifier = save_classifier(add_class_head(GPTModel(GPTConfig.from_preset("micro")), 2).eval(),
                             ClassifierSpec(("ham", "spam"), "last_nonpad", 32), Path("classifier"))
with stage_run("legacy", {}):
    log_pyfunc(gpt_generator, {"checkpoint": checkpoint, "bpe": bpe}, "gpt-base", None, {"val_loss": 6.0})
    log_pyfunc(instruct_generator, {"checkpoint": checkpoint, "bpe": bpe}, "gpt-instruct", None, {"rouge_l_f1": 0.1})
    log_pyfunc(spam_classifier, {"classifier": classifier, "bpe": bpe}, "gpt-spam-classifier", None,
               {"test_accuracy": 0.5}, signature=spam_classifier.signature(("ham", "spam")))
"""


def legacy_tree(dest: Path) -> Path:
    """gpt/ and pipeline/ as LEGACY_COMMIT had them, unpacked under dest."""
    archive = subprocess.run(["git", "archive", "--format=tar", LEGACY_COMMIT, "gpt", "pipeline"], cwd=REPO,
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def test_versions_logged_by_the_flat_layout_load_and_serve(store: MlflowClient, tmp_path: Path, bpe_dir: Path):
    legacy = legacy_tree(tmp_path / "legacy")
    env = {**os.environ, "PYTHONPATH": str(legacy), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    logged = subprocess.run([sys.executable, "-c", LOG_WITH_LEGACY_CODE, str(bpe_dir)], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert logged.returncode == 0, logged.stderr
    direct, tokenizer = load_model(tmp_path / "checkpoint"), load_tokenizer(bpe_dir)
    expected = generate_text(direct, tokenizer, "Hello", max_new_tokens=4)

    # In this process, where today's pipeline package is loaded: the old model code's imports meet the shims.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    base = mlflow.pyfunc.load_model("models:/gpt-base/1")
    assert base.predict({"prompt": ["Hello"]}, params={"max_new_tokens": 4})["text"].tolist() == [expected]
    instruct = mlflow.pyfunc.load_model("models:/gpt-instruct/1")
    answer = instruct.predict(pd.DataFrame({"instruction": ["Name a color."], "input": [""]}),
                              params={"max_new_tokens": 4})
    assert len(answer["text"]) == 1 and isinstance(answer["text"][0], str)
    classifier = mlflow.pyfunc.load_model("models:/gpt-spam-classifier/1")
    labels = classifier.predict(pd.DataFrame({"text": ["WINNER!! Call now", "see you at 5"]}))["label"].tolist()
    assert set(labels) <= {"ham", "spam"} and len(labels) == 2

    # Served by `mlflow models serve` over HTTP on 127.0.0.1, as `llm-pipeline serve` starts it.
    with served("models:/gpt-base/1", tmp_path) as (url, _):
        predictions = invoke(url, {"inputs": {"prompt": ["Hello"]}, "params": {"max_new_tokens": 4}})
    assert [p["text"] for p in predictions] == [expected]
