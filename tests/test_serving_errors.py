"""Served models answer bad input with a 400; `llm-pipeline serve` needs no venv on PATH and stops its whole server."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import pytest
import torch
from mlflow import MlflowClient

from conftest import BIN, answers, free_port, stage_env, stop, wait_until
from gpt.checkpoint import save_model
from gpt.classifier import ClassifierSpec, add_class_head, save_classifier
from gpt.model import GPTConfig, GPTModel
from pipeline.registry.pyfuncs import gpt_generator, spam_classifier
from pipeline.registry.pyfuncs.inputs import MAX_ROWS, MAX_TEXT_CHARS, InvalidInput, check_texts
from pipeline.registry.pyfuncs.spam_classifier import signature
from pipeline.registry.tracking import log_pyfunc
from test_serving import register_champion, served

LEAKS = ("Traceback", 'File "', "/work", "site-packages", "/tmp")


def post(base: str, payload: dict) -> tuple[int, str]:
    """(HTTP status, body) of POST /invocations with a JSON payload."""
    request = urllib.request.Request(f"{base}/invocations", json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def assert_rejected(base: str, payload: dict, *named: str) -> None:
    """The request gets 400, a message holding every string in `named`, and no trace of the server's code."""
    status, body = post(base, payload)
    assert status == 400, body
    message = json.loads(body)["message"]
    assert all(part in message for part in named), message
    assert not [leak for leak in LEAKS if leak in body], body


def classifier_champion(tmp_path: Path, bpe_dir: Path) -> str:
    torch.manual_seed(0)
    model = add_class_head(GPTModel(GPTConfig.from_preset("micro")), 2).eval()
    folder = save_classifier(model, ClassifierSpec(("ham", "spam"), "last_nonpad", 32), tmp_path / "classifier")
    return register_champion("gpt-spam-classifier", lambda: log_pyfunc(
        spam_classifier, {"classifier": folder, "bpe": bpe_dir}, "gpt-spam-classifier", None,
        {"test_accuracy": 0.5}, signature=signature(("ham", "spam"))))


def split(*rows: object) -> dict:
    return {"dataframe_split": {"columns": ["text"], "data": [[row] for row in rows]}}


@pytest.mark.slow
def test_served_classifier_rejects_bad_input_with_400(store: MlflowClient, tmp_path: Path, bpe_dir: Path):
    uri = classifier_champion(tmp_path, bpe_dir)
    with served(uri, tmp_path) as (base, _):
        assert post(base, split("hello", "win a prize"))[0] == 200
        assert_rejected(base, split("hello", ""), "row 2", "text", "empty")
        assert_rejected(base, {"inputs": {"text": ["hello", "ok", "   "]}}, "row 3", "empty")
        assert_rejected(base, split("hello", 5), "row 2", "text", "string")
        assert_rejected(base, {"dataframe_records": [{"text": None}]}, "row 1", "text", "missing")
        assert_rejected(base, {"dataframe_split": {"columns": ["body"], "data": [["hello"]]}}, "text")
        assert_rejected(base, {"inputs": {"text": ["hi"] * (MAX_ROWS + 1)}}, str(MAX_ROWS + 1), str(MAX_ROWS))
        assert_rejected(base, split("hi", "x" * (MAX_TEXT_CHARS + 1)), "row 2", str(MAX_TEXT_CHARS))


@pytest.mark.slow
def test_served_generator_rejects_an_empty_prompt(store: MlflowClient, tmp_path: Path, bpe_dir: Path):
    torch.manual_seed(0)
    checkpoint = save_model(GPTModel(GPTConfig.from_preset("micro")), tmp_path / "checkpoint")
    artifacts = {"checkpoint": checkpoint, "bpe": bpe_dir}
    uri = register_champion("gpt-base", lambda: log_pyfunc(gpt_generator, artifacts, "gpt-base", None, {"val_loss": 6.0}))
    with served(uri, tmp_path) as (base, _):
        assert_rejected(base, {"inputs": {"prompt": ["Hello", ""]}, "params": {"max_new_tokens": 1}},
                        "row 2", "prompt", "empty")


def test_check_texts_for_the_instruct_columns():
    check_texts(pd.DataFrame({"instruction": ["Name a color."], "input": [None]}), ["instruction"], ["input"])
    check_texts(pd.DataFrame({"instruction": ["Name a color."]}), ["instruction"], ["input"])
    for frame, message in [
        (pd.DataFrame({"input": ["x"]}), "missing input column 'instruction'"),
        (pd.DataFrame({"instruction": ["ok", " "], "input": ["", ""]}), "row 2: 'instruction' is empty"),
        (pd.DataFrame({"instruction": ["ok"], "input": [3]}), "row 1: 'input' must be a string, not int"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            check_texts(frame, ["instruction"], ["input"])


@pytest.mark.slow
def test_serve_stops_its_whole_server_on_sigterm(store: MlflowClient, tmp_path: Path, bpe_dir: Path):
    uri = classifier_champion(tmp_path, bpe_dir)
    port, log = free_port(), tmp_path / "serve.log"
    env = stage_env(None, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri())
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])  # mlflow starts `uvicorn` from PATH
    with log.open("w") as out:
        command = subprocess.Popen([str(BIN / "llm-pipeline"), "serve", uri, "--port", str(port)], cwd=tmp_path,
                                   env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        wait_until("llm-pipeline serve", lambda: answers(f"http://127.0.0.1:{port}/ping"), command, log)
        tree = psutil.Process(command.pid).children(recursive=True)
        assert tree, "the server runs as a child process"
        command.send_signal(signal.SIGTERM)
        assert command.wait(timeout=60) == 128 + signal.SIGTERM
        assert not answers(f"http://127.0.0.1:{port}/ping")
        left = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert left == [], f"still running after SIGTERM: {left}"
    finally:
        if command.poll() is None:
            stop(command)
        for process in tree:
            if process.is_running():
                process.kill()


@pytest.mark.slow
def test_serve_finds_its_tools_without_an_activated_venv(store: MlflowClient, tmp_path: Path, bpe_dir: Path):
    """As cron or systemd start it: the venv's script by its path, with a PATH that lacks the venv's bin
    folder, from which `mlflow models serve` would exec `uvicorn` by name."""
    uri = classifier_champion(tmp_path, bpe_dir)
    port, log = free_port(), tmp_path / "serve.log"
    env = {key: value for key, value in stage_env(None, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri()).items()
           if key != "VIRTUAL_ENV"}
    env["PATH"] = "/usr/bin:/bin"
    with log.open("w") as out:
        command = subprocess.Popen([str(BIN / "llm-pipeline"), "serve", uri, "--port", str(port)], cwd=tmp_path,
                                   env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until("llm-pipeline serve without the venv on PATH", lambda: answers(f"{base}/ping"), command, log)
        status, body = post(base, split("hello", "win a prize"))
        assert status == 200, body
        labels = [row["label"] for row in json.loads(body)["predictions"]]
        assert len(labels) == 2 and set(labels) <= {"ham", "spam"}
    finally:
        if command.poll() is None:
            stop(command)
    assert "Traceback" not in log.read_text()
