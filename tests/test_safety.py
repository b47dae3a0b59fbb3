"""Safe defaults: no code path unpickles a file a user could swap, and servers bind to 127.0.0.1 unless told otherwise."""
from __future__ import annotations

import ast
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, stage_env
from pipeline.commands import serve

SOURCES = sorted((REPO / "gpt").rglob("*.py")) + sorted((REPO / "pipeline").rglob("*.py"))
# Modules that unpickle (or execute) what they load.
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


def _name(node: ast.AST) -> str:
    """Dotted name of a call target such as torch.load or np.load ("" when not a plain name)."""
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_loads(tree: ast.AST) -> list[str]:
    """Imports of pickling modules and loads that may unpickle, in one module's syntax tree."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _name(node.func)
            weights_only = _keyword(node, "weights_only")
            if name.endswith("torch.load") and not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(f"{name} without weights_only=True")
            allow_pickle = _keyword(node, "allow_pickle")
            if name.split(".")[-1] == "load" and name.split(".")[0] in ("np", "numpy") and not (
                    allow_pickle is None or isinstance(allow_pickle, ast.Constant) and allow_pickle.value is False):
                found.append(f"{name} with allow_pickle")
            if name.endswith(("torch.save", "read_pickle", "to_pickle")):
                found.append(name)  # weights are safetensors; no pickles written either
    return found


def test_the_scan_sees_what_it_must_refuse():
    bad = ("import pickle\nfrom joblib import load\nimport torch, numpy as np\n"
           "torch.load(f)\ntorch.load(f, weights_only=False)\nnp.load(f, allow_pickle=True)\n"
           "torch.save(m, f)\npd.read_pickle(f)\n")
    good = "import torch, numpy as np\ntorch.load(f, weights_only=True)\nnp.load(f)\nnp.load(f, allow_pickle=False)\n"
    assert len(unsafe_loads(ast.parse(bad))) == 7
    assert unsafe_loads(ast.parse(good)) == []


def test_no_unpickling_in_gpt_and_pipeline():
    assert len(SOURCES) > 30
    found = {str(path.relative_to(REPO)): unsafe_loads(ast.parse(path.read_text(encoding="utf-8"), str(path)))
             for path in SOURCES}
    assert {path: hits for path, hits in found.items() if hits} == {}


def test_serve_passes_loopback_as_its_default_host(monkeypatch: pytest.MonkeyPatch):
    launched = []
    monkeypatch.setattr("pipeline.registry.tracking.use_project_store", lambda params: "0")
    monkeypatch.setattr(serve, "run_server", lambda argv, env: launched.append(argv) or 0)
    with pytest.raises(SystemExit):
        serve.main([])
    [argv] = launched
    assert argv[argv.index("--host") + 1] == "127.0.0.1"


def test_prefect_server_host_defaults_to_loopback(tmp_path: Path):
    # In a fresh interpreter: Prefect reads its settings when imported, and this process may have imported it.
    code = ("import pipeline.orchestration.flows, os; from prefect.settings import PREFECT_SERVER_API_HOST as host; "
            "print(os.environ['PREFECT_SERVER_API_HOST'], host.value())")
    env = {k: v for k, v in stage_env(None).items() if k != "PREFECT_SERVER_API_HOST"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["127.0.0.1", "127.0.0.1"]


def test_a_server_that_ignores_its_stop_signal_is_killed_after_the_grace(tmp_path: Path):
    """run_server forwards SIGTERM to the group it started; a member that ignores it (a Prefect worker was seen
    lingering) is killed grace_s later, so stopping the parent never leaves it running alone."""
    pid_file = tmp_path / "pid"
    child = (f"import os, signal, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
             "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)")
    code = ("import sys; from pipeline.core.processes import run_server\n"
            f"sys.exit(run_server([sys.executable, '-c', {child!r}], {{}}, 2.0))")
    parent = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 128 + signal.SIGTERM
    assert not psutil.pid_exists(int(pid_file.read_text()))
