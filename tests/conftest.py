"""Shared fixtures and helpers: the dataset mirror, temp projects, stage subprocesses, test servers."""
from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import pytest
import yaml

from pipeline.core.catalog import STAGES, TRAINERS
from pipeline.orchestration.services import MLFLOW_SERVER_ENV

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # this venv's console scripts: dvc, prefect, llm-pipeline
MIRROR_ENV = "LLM_PIPELINE_MIRROR"
# The promotion policy as params.yaml sets it (the promote params), for tests that promote directly.
POLICY = yaml.safe_load((REPO / "params.yaml").read_text())["promote"]
NAMES = {role: trainer.model.default_name for role, trainer in TRAINERS.items()}  # the default registered names
ROLES = {name: role for role, name in NAMES.items()}
DEFAULT_MIRROR = Path(__file__).resolve().parents[2] / "shared" / "datasets"


# -- running in parallel (pytest-xdist, see docs/development.md) --------------------------------------
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ... in a worker; None in a plain run
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKER and "OMP_NUM_THREADS" not in os.environ:
    # The workers share the cores: torch's default (all of them, in every worker and every stage process
    # it starts) would oversubscribe them, and OpenMP threads spinning at barriers then slow everyone down.
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // WORKERS))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # and a test that pins more threads must not spin
# The marker of tests that take more than ~10 s, left out by `make test-fast`; `slow(SECONDS)` says about how
# long one takes on a 2-core machine (10 s where not said), so that a parallel run starts the longest first.
SLOW = "slow"
SLOW_DEFAULT_S = 10
# Fixtures that take more than ~10 s to build, and about how long: a test that uses one is slow, however quick
# it is itself.
SLOW_FIXTURES = {"small_pipeline": 140, "prefect_api": 20}


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker more than there are CPUs, as the tests often wait on a subprocess or a server
    (on 2 cores, 3 workers ran the training tests in 0.75 of the time 2 took; 4 were no faster); at most 6."""
    return min(6, (os.cpu_count() or 1) + 1)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{SLOW}(seconds={SLOW_DEFAULT_S}): takes more than ~10 s (itself, or a "
                                       "fixture it needs); `make test-fast` leaves it out")


# Tests that share an expensive fixture run on one worker, so that it is built once: the modules with a
# module-scoped fixture, and these groups of modules. (A module missing here would only build its fixture twice:
# pytest_collection_modifyitems refuses that.)
SHARED_MODULES = {"test_dvc_stages": "small_pipeline", "test_registry_consistency": "small_pipeline"}
MODULE_FIXTURES = {"test_bad_inputs", "test_corpus", "test_cpu_kernels", "test_fast_decode", "test_flows",
                   "test_generate", "test_tokenize"}


def work_unit(nodeid: str) -> str:
    """What one worker runs together: a test's group of modules, its module, or the test alone."""
    module = Path(nodeid.split("::")[0]).stem
    return SHARED_MODULES.get(module) or (module if module in MODULE_FIXTURES else nodeid)


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """xdist's scope scheduling with our work units (its own `loadgroup` no longer takes effect under pytest 9,
    which ignores the node ids it rewrites)."""
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return SharedFixtureScheduling(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests that need a slow fixture slow. Under xdist, order the work units longest first, so that
    no long one starts last (the scheduler hands them out in this order)."""
    units: dict[str, list[pytest.Item]] = {}
    for item in items:
        slow_fixture = bool(SLOW_FIXTURES.keys() & set(item.fixturenames))
        if slow_fixture:
            item.add_marker(SLOW)
        unit = work_unit(item.nodeid)
        shared = slow_fixture or any(definitions[-1].scope == "module"
                                     for definitions in item._fixtureinfo.name2fixturedefs.values())
        if WORKER and shared and unit == item.nodeid:
            raise pytest.UsageError(f"{item.nodeid} shares an expensive fixture: add its module to "
                                    "SHARED_MODULES or MODULE_FIXTURES in tests/conftest.py")
        units.setdefault(unit, []).append(item)
    if not WORKER:
        return
    ordered = sorted(units.values(), key=lambda unit: -expected_seconds(unit))
    items[:] = [item for unit in ordered for item in unit]


def expected_seconds(unit: list[pytest.Item]) -> float:
    """About how long a group of tests takes: its slow tests' marks, 1 s for any other, and each slow fixture
    they use, once."""
    marks = [[mark.args[0] if mark.args else SLOW_DEFAULT_S for mark in item.iter_markers(SLOW)] for item in unit]
    fixtures = set().union(*(item.fixturenames for item in unit))
    return sum(max(seconds, default=1) for seconds in marks) + sum(SLOW_FIXTURES.get(name, 0) for name in fixtures)


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The real dataset mirror ($LLM_PIPELINE_MIRROR, default <repo>/../shared/datasets)."""
    path = Path(os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR)
    assert path.is_dir(), f"dataset mirror {path} is missing; set {MIRROR_ENV}"
    return path


@pytest.fixture(scope="session")
def bpe_dir(mirror: Path) -> Path:
    """The GPT-2 BPE files in the mirror."""
    return mirror / "gpt2_bpe"


def stage_env(mirror: Path | None, **extra: str) -> dict:
    """Environment for a stage subprocess: repo importable, no inherited mirror/offline settings."""
    env = {k: v for k, v in os.environ.items() if k not in (MIRROR_ENV, "LLM_PIPELINE_OFFLINE")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if mirror is not None:
        env[MIRROR_ENV] = str(mirror)
    env.update(extra)
    return env


def run_stage(project: Path, stage: str, mirror: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """Run stage `stage` (`python -m <its module>`) in project; return the finished process (text output)."""
    return subprocess.run([sys.executable, "-m", STAGES[stage].module], cwd=project, env=stage_env(mirror, **env),
                          capture_output=True, text=True, timeout=300)


def set_param(project: Path, dotted: str, value) -> None:
    """Change one key of project/params.yaml, e.g. set_param(p, "tokenize.corpus.train_ratio", 0.5)."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    *parents, last = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[last] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def flip_last_byte(path: Path) -> None:
    """Tamper with a file the way a bad disk or a hand edit would: one changed byte."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def leftovers(project: Path) -> list[str]:
    """Temp files or folders a stage left under data/ (names starting with a dot)."""
    return sorted(str(p.relative_to(project)) for p in (project / "data").rglob(".*")) if (project / "data").exists() else []


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """An empty project folder holding a copy of the repo's params.yaml."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


@pytest.fixture(scope="session")
def downloaded(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> Path:
    """A project where the download stage has run once from the mirror (copy data/ from it)."""
    root = tmp_path_factory.mktemp("downloaded")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    result = run_stage(root, "download", mirror)
    assert result.returncode == 0, result.stderr
    return root


@pytest.fixture
def raw_project(project: Path, downloaded: Path) -> Path:
    """A fresh project with data/raw/ already downloaded."""
    shutil.copytree(downloaded / "data" / "raw", project / "data" / "raw")
    return project


def sh(cwd: Path, env: dict, *args: str) -> str:
    """Run a command that must succeed; return its stdout + stderr."""
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


STARTUP_S = 120  # for a server to answer on a busy 2-core machine


def wait_until(what: str, ready: Callable[[], bool], proc: subprocess.Popen, log: Path) -> None:
    """Poll ready() until true; fail early, with the process log, if proc exits or time runs out."""
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{what}: process exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        if ready():
            return
        time.sleep(0.5)
    pytest.fail(f"{what}: not ready after {STARTUP_S} s:\n{log.read_text()[-3000:]}")


def answers(url: str) -> bool:
    """Whether GET url answers 200 (False while nothing listens yet)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:  # URLError is an OSError
        return False


def stop(proc: subprocess.Popen) -> None:
    """Stop a server started with start_new_session=True and every process it started: TERM, then KILL."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def mlflow_server(db: Path, log: Path) -> Iterator[str]:
    """A real `mlflow server` on a sqlite store at db, on a free loopback port; yields its URL, then stops it.
    One worker and no job runners (as `services up` starts it): the tests need neither, and each would import
    MLflow again."""
    port = free_port()
    with log.open("w") as out:
        server = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{db}",
                                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=db.parent,
                                  env={**os.environ, **MLFLOW_SERVER_ENV}, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until("mlflow server", lambda: answers(f"http://127.0.0.1:{port}/health"), server, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(server)


PORT_BLOCK = 500  # each xdist worker takes its ports from its own block below Linux's ephemeral range (32768+),
_next_port = itertools.count()  # so neither another worker nor an outgoing connection can be handed the same one


def free_port() -> int:
    """A loopback port that was free a moment ago, from this worker's block."""
    first = 20000 + PORT_BLOCK * int(WORKER[2:] if WORKER else 0)
    for _ in range(PORT_BLOCK):
        port = first + next(_next_port) % PORT_BLOCK
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:  # in use, or still in TIME_WAIT after an earlier test
                continue
            return port
    raise RuntimeError(f"no free port in {first}-{first + PORT_BLOCK - 1}")


def make_dvc_repo(root: Path, mirror: Path) -> tuple[Path, dict]:
    """A scratch git + DVC project under root holding a copy of the pipeline, committed; and the
    environment its `dvc` commands need (this venv first on PATH, as dvc.yaml runs `python`)."""
    repo = root / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", "prefect.yaml", ".gitignore"):
        shutil.copy(REPO / name, repo / name)
    for package in ("pipeline", "gpt"):
        shutil.copytree(REPO / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    env = stage_env(mirror, DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
                    GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    sh(repo, env, "git", "init", "-q")
    sh(repo, env, str(BIN / "dvc"), "init", "-q")
    sh(repo, env, "git", "add", "-A")
    sh(repo, env, "git", "commit", "-q", "-m", "init")
    return repo, env


# Params for a whole pipeline run of about a minute (a micro model, one epoch of finetuning).
SMALL_TRAINING = {
    "datasets.corpus.sources": ["the-verdict"],
    "pretrain.model": "micro",
    "pretrain.context_length": 32,
    "pretrain.batch_size": 4,
    "pretrain.max_steps": 6,
    "pretrain.eval_every": 3,
    "pretrain.eval_batches": 2,
    "pretrain.sample_every": 3,
    "pretrain.sample_tokens": 5,
    "pretrain.checkpoint_every": 2,
    "evaluate.max_batches": 2,
    "evaluate.max_new_tokens": 5,
    "finetune_classifier.epochs": 1,
    "finetune_classifier.batch_size": 32,
    "finetune_classifier.eval_batches": 1,
    "finetune_instruct.epochs": 1,
    "finetune_instruct.eval_batches": 1,
    "finetune_instruct.max_new_tokens": 5,
    "finetune_instruct.max_test_examples": 3,
}
SMALL_RUN_GROUP = "e2e-test"


@pytest.fixture(scope="session")
def small_pipeline(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> tuple[Path, dict, str]:
    """A scratch DVC repo after one full `dvc repro` with SMALL_TRAINING (committed, run group
    SMALL_RUN_GROUP), its environment and the output of that repro. Tests change copies (copy_repo)."""
    repo, env = make_dvc_repo(tmp_path_factory.mktemp("small-pipeline"), mirror)
    for key, value in SMALL_TRAINING.items():
        set_param(repo, key, value)
    sh(repo, env, "git", "commit", "-qam", "small training")
    output = sh(repo, {**env, "LLM_PIPELINE_RUN_GROUP": SMALL_RUN_GROUP}, str(BIN / "dvc"), "repro")
    return repo, env, output


def copy_repo(repo: Path, dest: Path) -> Path:
    """A copy of a scratch repo (git, DVC cache, outputs, MLflow store) at dest/repo, to change freely."""
    copy = dest / "repo"
    shutil.copytree(repo, copy, symlinks=True)
    return copy


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A temp project as cwd with run group g1; yields a client on its sqlite store."""
    monkeypatch.chdir(tmp_path)
    # set then delete, so monkeypatch restores a URI that MLflow itself may export meanwhile
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("LLM_PIPELINE_RUN_GROUP", "g1")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow  # here, so tests that need no store do not load MLflow

    yield mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(None)


# -- quick pretraining projects -----------------------------------------------------------------
# Params for a pretrain run of seconds on the-verdict (a tiny model, 40 steps).
QUICK_PRETRAIN = {
    "datasets.corpus.sources": ["the-verdict"],
    "pretrain.model": "tiny",
    "pretrain.context_length": 64,
    "pretrain.batch_size": 4,
    "pretrain.max_steps": 40,
    "pretrain.eval_every": 10,
    "pretrain.eval_batches": 2,
    "pretrain.sample_every": 0,
    "pretrain.checkpoint_every": 2,
    "evaluate.max_batches": 2,
    "evaluate.max_new_tokens": 5,
}


@pytest.fixture(scope="session")
def quick_tokens(tmp_path_factory: pytest.TempPathFactory, downloaded: Path) -> Path:
    """A project with QUICK_PRETRAIN set and the validate and tokenize stages run, once: copy it (quick_project)."""
    project = tmp_path_factory.mktemp("quick-tokens")
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    shutil.copytree(downloaded / "data" / "raw", project / "data" / "raw")
    for key, value in QUICK_PRETRAIN.items():
        set_param(project, key, value)
    for stage in ("validate", "tokenize"):
        result = run_stage(project, stage)
        assert result.returncode == 0, result.stderr
    return project


@pytest.fixture
def quick_project(project: Path, quick_tokens: Path) -> Path:
    """A fresh project with QUICK_PRETRAIN set and the validate and tokenize stages run (a copy of quick_tokens)."""
    shutil.copytree(quick_tokens, project, dirs_exist_ok=True)
    return project


# -- a writable mirror and loopback HTTP fakes --------------------------------------------------
def copy_mirror(mirror: Path, dest: Path, without: tuple[str, ...] = ()) -> Path:
    """A writable copy of the mirror, minus some files."""
    shutil.copytree(mirror, dest, ignore=shutil.ignore_patterns("SOURCES.md"))
    for name in without:
        (dest / name).unlink()
    return dest


class FileServer:
    """Loopback HTTP server: serves `files`; paths in `truncate` announce the full length but
    send half and hang up. Counts requests per path. With `etags`, each file has an ETag (a hash of
    its bytes) and a matching If-None-Match gets 304 Not Modified; `statuses` logs what was answered."""

    def __init__(self, files: dict[str, bytes], truncate: frozenset[str] = frozenset(), etags: bool = False):
        self.files, self.truncate, self.hits, self.statuses = files, truncate, {}, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"' if etags else None
                if etag and self.headers.get("If-None-Match") == etag:
                    server.statuses.append((self.path, 304))
                    self.send_response(304)
                    self.send_header("ETag", etag)
                    self.end_headers()
                    return
                server.statuses.append((self.path, 200))
                self.send_response(200)
                if etag:
                    self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2] if self.path in server.truncate else data)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def point_at(project: Path, server: FileServer, source: str, path: str) -> None:
    set_param(project, f"download.sources.{source}.urls", [f"{server.url}{path}"])
    set_param(project, "download.backoff_s", 0.01)
    set_param(project, "download.retries", 2)


UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens there


class FakeOllama(BaseHTTPRequestHandler):
    """POST /api/chat answers with the server's `reply`; requests are kept for inspection."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, body))
        payload = json.dumps({"model": body["model"], "message": {"role": "assistant", "content": self.server.reply},
                              "done": True}).encode()
        self.send_response(200 if self.path == "/api/chat" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def fake_ollama() -> Iterator[ThreadingHTTPServer]:
    """A fake judge on a free loopback port; set `.reply` to change its answer."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOllama)
    server.requests, server.reply = [], "87"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()


# -- the docs: fenced blocks of README.md and docs/*.md, read by the tests that keep the docs true -------
class DocBlock(NamedTuple):
    """One fenced block of a page: its page (relative to the repo), the headings above it (outermost
    first), the line of its opening fence (1-based), its language (the fence's first word) and its text."""

    page: str
    headings: tuple[str, ...]
    line: int
    language: str
    text: str


FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([^\s`]*)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def doc_pages(root: Path = REPO) -> list[Path]:
    """The pages the docs consist of: README.md, then docs/*.md by name."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def parse_page(path: Path, root: Path = REPO) -> tuple[list[DocBlock], list[tuple[int, tuple[str, ...], str]]]:
    """(the fenced blocks of a page, its other lines as (line number, headings above, text))."""
    blocks, prose = [], []
    headings: list[tuple[int, str]] = []
    fence, start, language, body = "", 0, "", []
    page = path.relative_to(root).as_posix()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = FENCE.match(line)
        if fence:
            if match and match.group(1).startswith(fence) and not match.group(2):
                blocks.append(DocBlock(page, tuple(h for _, h in headings), start, language, "\n".join(body) + "\n"))
                fence = ""
            else:
                body.append(line)
        elif match:
            fence, start, language, body = match.group(1), number, match.group(2).lower(), []
        else:
            heading = HEADING.match(line)
            if heading:
                level = len(heading.group(1))
                headings = [(lvl, h) for lvl, h in headings if lvl < level] + [(level, heading.group(2))]
            prose.append((number, tuple(h for _, h in headings), line))
    assert not fence, f"{page}:{start}: a fenced block is never closed"
    return blocks, prose


def doc_blocks(language: str | tuple[str, ...], page: str | None = None, section: str | None = None,
               root: Path = REPO) -> list[DocBlock]:
    """The fenced blocks of `language` (one, or any of a tuple) in README.md and docs/*.md, in order; only
    those of `page` ("docs/data.md") if given, and only those under the heading `section` (its text, at
    any level, subsections included) if given."""
    languages = (language,) if isinstance(language, str) else language
    pages = [root / page] if page else doc_pages(root)
    return [block for path in pages for block in parse_page(path, root)[0]
            if block.language in languages and (section is None or section in block.headings)]


def own_data_examples(root: Path = REPO) -> list[dict]:
    """The params blocks of docs/data.md's "Worked examples" that set datasets, in order: what
    tests/test_flows.py runs through `dvc repro` and the nightly deployment."""
    blocks = [yaml.safe_load(block.text) for block in doc_blocks("yaml", "docs/data.md", "Worked examples", root)]
    return [block for block in blocks if "datasets" in block]


def _sentences(text: str, count: int, skip: int = 0) -> list[str]:
    pieces = [" ".join(p.split()) for p in re.split(r"(?<=[.!?])\s+", text)]
    return [p for p in pieces if 20 <= len(p) <= 200][skip : skip + count]


def write_topics(path: Path, mirror: Path, per_class: dict[str, int], skip: int = 0) -> None:
    """A 3-class labelled CSV (header sentence,topic) of real sentences: art (the-verdict), drama
    (tinyshakespeare) and chat (SMS ham messages); `per_class` rows of each, after skipping `skip`."""
    texts = {
        "art": _sentences((mirror / "the-verdict.txt").read_text(encoding="utf-8"), per_class["art"], skip),
        "drama": _sentences((mirror / "tinyshakespeare.txt").read_text(encoding="utf-8"), per_class["drama"], skip),
        "chat": [line.split("\t", 1)[1] for line in (mirror / "SMSSpamCollection").read_text(encoding="utf-8").splitlines()
                 if line.startswith("ham\t") and '"' not in line][skip : skip + per_class["chat"]],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["sentence", "topic"])
        writer.writerows((text, topic) for topic, rows in texts.items() for text in rows)


def write_own_data(root: Path, mirror: Path) -> None:
    """my-data/ as the own-data examples (docs/data.md) read it: a corpus folder, a topics CSV, an instruction JSONL."""
    corpus = root / "my-data" / "corpus"
    corpus.mkdir(parents=True)
    shutil.copy(mirror / "the-verdict.txt", corpus / "verdict.txt")
    (corpus / "notes.md").write_text((mirror / "tinyshakespeare.txt").read_text(encoding="utf-8")[:30000], encoding="utf-8")
    write_topics(root / "my-data" / "topics" / "part-1.csv", mirror, {"art": 40, "drama": 60, "chat": 80})
    records = json.loads((mirror / "instruction-data.json").read_text(encoding="utf-8"))[:40]
    (root / "my-data" / "tasks.jsonl").write_text("".join(
        json.dumps({"prompt": r["instruction"], "context": r["input"], "answer": r["output"], "id": i}) + "\n"
        for i, r in enumerate(records)), encoding="utf-8")
