"""Registered champions as pyfunc models, and served by `mlflow models serve` over HTTP on 127.0.0.1."""
from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
import pandas as pd
import psutil
import pytest
import torch
from mlflow import MlflowClient

from conftest import POLICY, ROLES, BIN, answers, free_port, stage_env, stop, wait_until
from gpt.checkpoint import load_model, save_model
from gpt.classifier import ClassifierSpec, add_class_head, save_classifier
from gpt.generate import generate_text
from gpt.instruct import format_prompt
from gpt.model import GPTConfig, GPTModel
from gpt.tokenizer import load_tokenizer
from pipeline.registry.pyfuncs import gpt_generator, instruct_generator, spam_classifier
from pipeline.registry.pyfuncs.spam_classifier import predict_frame, signature
from pipeline.registry.tracking import log_pyfunc, stage_run
from pipeline.stages import promote

pytestmark = pytest.mark.slow  # every test here takes more than ~10 s

MLFLOW = BIN / "mlflow"
TEXTS = ["Ok lar... Joking wif u oni...", "WINNER!! You have won a 1000 cash prize. Call 09061701461 to claim now"]


def listening(pid: int, port: int) -> set[str]:
    """The addresses the server process (or its children) listen on at `port`."""
    root = psutil.Process(pid)
    found = set()
    for proc in [root, *root.children(recursive=True)]:
        for conn in proc.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                found.add(conn.laddr.ip)
    return found


@contextmanager
def served(model_uri: str, workdir: Path) -> Iterator[tuple[str, int]]:
    """Run `mlflow models serve` on a free loopback port until /ping answers; yield (base URL, pid); stop it."""
    port, log = free_port(), workdir / f"serve-{time.monotonic_ns()}.log"
    env = stage_env(None, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri())
    env["PATH"] = os.pathsep.join([str(MLFLOW.parent), env.get("PATH", "")])  # mlflow starts `uvicorn` from PATH
    with log.open("w") as out:
        server = subprocess.Popen([str(MLFLOW), "models", "serve", "-m", model_uri, "--host", "127.0.0.1",
                                   "--port", str(port), "--env-manager", "local"],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(f"mlflow models serve on {base}", lambda: answers(f"{base}/ping"), server, log)
        yield base, server.pid
    finally:
        stop(server)  # the whole session: the mlflow CLI and the uvicorn it started


def invoke(base: str, payload: dict) -> list[dict]:
    request = urllib.request.Request(f"{base}/invocations", json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["predictions"]


def register_champion(name: str, log) -> str:
    """Log and register a version inside a stage run with log(), promote it (the first: champion)."""
    with stage_run("serve-test", {}):
        version = log()
    promote.promote(MlflowClient(), ROLES[name], name, version.version, POLICY)
    return f"models:/{name}@champion"


def test_classifier_champion_is_served_on_loopback(store: MlflowClient, tmp_path: Path,
                                                   bpe_dir: Path):
    torch.manual_seed(0)
    labels = ("ham", "promo", "spam")
    columns = ["label", "p_ham", "p_promo", "p_spam"]
    model = add_class_head(GPTModel(GPTConfig.from_preset("micro")), len(labels)).eval()
    spec = ClassifierSpec(labels, "last_nonpad", 32)
    folder = save_classifier(model, spec, tmp_path / "classifier")
    uri = register_champion("gpt-spam-classifier", lambda: log_pyfunc(
        spam_classifier, {"classifier": folder, "bpe": bpe_dir}, "gpt-spam-classifier", None,
        {"test_accuracy": 0.5}, signature=signature(labels)))
    expected = predict_frame(model, spec, load_tokenizer(bpe_dir), TEXTS)
    assert list(expected.columns) == columns
    assert mlflow.pyfunc.load_model(uri).metadata.get_output_schema().input_names() == columns

    with served(uri, tmp_path) as (base, pid):
        predictions = invoke(base, {"dataframe_split": {"columns": ["text"], "data": [[t] for t in TEXTS]},
                                    "params": {"batch_size": 2}})
        assert listening(pid, int(base.rsplit(":", 1)[1])) == {"127.0.0.1"}  # loopback only
    assert [list(p) for p in predictions] == [columns] * len(TEXTS)  # every class's probability, in class order
    assert [p["label"] for p in predictions] == expected["label"].tolist()
    for prediction, (_, row) in zip(predictions, expected.iterrows()):
        assert sum(prediction[c] for c in columns[1:]) == pytest.approx(1.0, abs=1e-6)
        assert [prediction[c] for c in columns[1:]] == pytest.approx([row[c] for c in columns[1:]], abs=1e-6)


def test_generator_champion_is_served_with_no_fixed_length(store: MlflowClient, tmp_path: Path,
                                                           bpe_dir: Path):
    torch.manual_seed(0)
    checkpoint = save_model(GPTModel(GPTConfig.from_preset("micro")), tmp_path / "checkpoint")
    artifacts = {"checkpoint": checkpoint, "bpe": bpe_dir}
    uri = register_champion("gpt-base", lambda: log_pyfunc(gpt_generator, artifacts, "gpt-base", None, {"val_loss": 6.0}))
    direct, tokenizer = load_model(checkpoint), load_tokenizer(bpe_dir)
    # One short prompt and one longer than the model's context, in one request: nothing fixes the length.
    prompts = ["Hello", "the cat sat on the mat " * 20]
    assert len(tokenizer.encode(prompts[1])) > direct.cfg.context_length > len(tokenizer.encode(prompts[0]))

    with served(uri, tmp_path) as (base, pid):
        predictions = invoke(base, {"inputs": {"prompt": prompts}, "params": {"max_new_tokens": 5}})
        assert listening(pid, int(base.rsplit(":", 1)[1])) == {"127.0.0.1"}
    assert [p["text"] for p in predictions] == [generate_text(direct, tokenizer, p, max_new_tokens=5) for p in prompts]

    # The instruction model is the same generator behind the Alpaca prompt, loaded as pyfunc.
    with stage_run("serve-test", {}):
        log_pyfunc(instruct_generator, {"checkpoint": checkpoint, "bpe": bpe_dir}, "gpt-instruct", None,
                   {"rouge_l_f1": 0.1})
    promote.promote(MlflowClient(), "instruct", "gpt-instruct", 1, POLICY)
    instruct = mlflow.pyfunc.load_model("models:/gpt-instruct@champion")
    answer = instruct.predict(pd.DataFrame({"instruction": ["Name a color.", "Fix: freind"], "input": ["", "x"]}),
                              params={"max_new_tokens": 4})
    assert answer["text"].tolist() == [
        generate_text(direct, tokenizer, format_prompt(i, x), max_new_tokens=4).strip()
        for i, x in [("Name a color.", ""), ("Fix: freind", "x")]]
