"""A catalogue of bad inputs across the stages: each fails in one line naming the thing, and leaves every output as it was."""
from __future__ import annotations

import gzip
import io
import json
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from conftest import (BIN, FileServer, copy_mirror, flip_last_byte, free_port, leftovers, point_at, run_stage,
                      set_param, stage_env)
from gpt.checkpoint import save_model
from gpt.files import sha256_file
from gpt.model import GPTConfig, GPTModel
from pipeline.core.catalog import STAGES
from pipeline.core.errors import TEMPORARY_FAILURE

CLI = BIN / "llm-pipeline"
REPORT = "data/reports/validate.json"
CHECKPOINTS = "data/checkpoints/pretrain"
# The good project every case starts from: every stage that a case runs has run once, on tiny settings.
SMALL = {
    "datasets.corpus.sources": ["the-verdict"],
    "pretrain.model": "micro",
    "pretrain.context_length": 32,
    "pretrain.batch_size": 4,
    "pretrain.max_steps": 4,
    "pretrain.eval_every": 0,
    "pretrain.sample_every": 0,
    "pretrain.checkpoint_every": 2,
    "pretrain.device": "cpu",
    "evaluate.max_batches": 1,
    "evaluate.max_new_tokens": 3,
    "evaluate.prompts": ["Hi"],
    "evaluate.device": "cpu",
    "finetune_classifier.device": "cpu",
}
# tqdm repaints its bar with \r on stderr, terminal or not; those lines are progress, not the error.
PROGRESS = re.compile(r"\s*$|[\w ]+:\s+\d+%\|")


@dataclass
class Ctx:
    """One case's world: a fresh copy of the good project, and what the command runs with."""

    project: Path
    scratch: Path  # outside the project: bad mirrors live here
    mirror: Path  # the command's $LLM_PIPELINE_MIRROR
    stack: ExitStack  # servers a setup starts stop when the case ends
    env: dict[str, str] = field(default_factory=dict)
    file_size_limit: int | None = None  # RLIMIT_FSIZE: a write past it fails with EFBIG, as on a full disk
    server: FileServer | None = None
    seconds: float = 0.0  # how long the command ran


Setup = Callable[[Ctx], None]


@dataclass(frozen=True)
class Case:
    """One bad input: `setup` breaks one thing in a good project, then `stage` must fail with one line
    `<stage>: error: ...` holding `message` ("…" stands for any text), and change nothing but `may_change`."""

    id: str
    broken: str
    stage: str  # python -m pipeline.<stage>, or with `cli` the `llm-pipeline <stage>` command
    setup: Setup
    message: str
    cli: tuple[str, ...] = ()
    may_change: tuple[str, ...] = ()  # path prefixes the stage rewrites on failure by design
    check: Callable[[Ctx], None] | None = None  # what else this case must show
    status: int = 1  # the exit status: 1, or TEMPORARY_FAILURE for a network failure a flow may retry


# -- setups ------------------------------------------------------------------------------------------
def params(changes: dict) -> Setup:
    """Set dotted keys of params.yaml."""
    def setup(ctx: Ctx) -> None:
        for key, value in changes.items():
            set_param(ctx.project, key, value)
    return setup


def remove(relpath: str) -> Setup:
    def setup(ctx: Ctx) -> None:
        target = ctx.project / relpath
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
    return setup


def flip(relpath: str) -> Setup:
    return lambda ctx: flip_last_byte(ctx.project / relpath)


def raw(name: str, edit: Callable[[bytes], bytes]) -> Setup:
    """Rewrite data/raw/<name> through edit."""
    def setup(ctx: Ctx) -> None:
        path = ctx.project / "data" / "raw" / name
        path.write_bytes(edit(path.read_bytes()))
    return setup


def lines(name: str, edits: dict[int, str]) -> Setup:
    """Replace 1-based lines of data/raw/<name>."""
    def edit(data: bytes) -> bytes:
        rows = data.decode("utf-8").split("\n")
        for number, text in edits.items():
            rows[number - 1] = text
        return "\n".join(rows).encode("utf-8")
    return raw(name, edit)


def own(dataset: str, files: dict[str, bytes], **settings) -> Setup:
    """Point datasets.<dataset> at a folder my-data/ holding `files`; `settings` are more params
    of that dataset (e.g. text_column)."""
    def setup(ctx: Ctx) -> None:
        for name, data in files.items():
            (ctx.project / "my-data" / name).parent.mkdir(parents=True, exist_ok=True)
            (ctx.project / "my-data" / name).write_bytes(data)
        set_param(ctx.project, f"datasets.{dataset}.sources", ["my-data"])
        for key, value in settings.items():
            set_param(ctx.project, f"datasets.{dataset}.{key}", value)
    return setup


TOPICS = {"format": "csv", "columns": None, "text_column": "sentence", "label_column": "topic", "labels": None}


def bad_mirror(edits: dict[str, Callable[[bytes], bytes] | None], offline: bool = False) -> Setup:
    """Download from a copy of the mirror whose files are edited (or removed: None)."""
    def setup(ctx: Ctx) -> None:
        ctx.mirror = copy_mirror(ctx.mirror, ctx.scratch / "bad-mirror")
        for name, edit in edits.items():
            path = ctx.mirror / name
            if edit is None:
                path.unlink()
            else:
                path.write_bytes(edit(path.read_bytes()))
        if offline:
            ctx.env["LLM_PIPELINE_OFFLINE"] = "1"
    return setup


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)
    return buffer.getvalue()


def add_parent_member(data: bytes) -> bytes:
    """The same zip plus a member that climbs out of the folder it is extracted into."""
    spam = zipfile.ZipFile(io.BytesIO(data)).read("SMSSpamCollection")
    return zip_bytes({"../evil.txt": b"x", "SMSSpamCollection": spam})


def truncating_server(ctx: Ctx) -> None:
    """the-verdict.txt only over HTTP, from a server that announces all its bytes, sends half, hangs up."""
    verdict = (ctx.mirror / "the-verdict.txt").read_bytes()
    ctx.server = ctx.stack.enter_context(FileServer({"/verdict": verdict}, frozenset({"/verdict"})))
    point_at(ctx.project, ctx.server, "the-verdict", "/verdict")  # 2 tries, short backoff
    bad_mirror({"the-verdict.txt": None})(ctx)


def resume_checkpoint(project: Path) -> Path:
    """The pretrain stage's resumable checkpoint folder (one per params + data digest)."""
    [folder] = [p for p in (project / CHECKPOINTS).iterdir() if not p.name.startswith(".")]
    return folder


def other_architecture(ctx: Ctx) -> None:
    """Swap the resumable checkpoint's model for a 3-layer one (the params say 2)."""
    model = GPTModel(GPTConfig.from_preset("micro", context_length=SMALL["pretrain.context_length"], n_layers=3))
    save_model(model, resume_checkpoint(ctx.project) / "model")


def tamper_resume(relative: str) -> Setup:
    """Flip one byte of a file in the resumable checkpoint."""
    return lambda ctx: flip_last_byte(resume_checkpoint(ctx.project) / relative)


def corrupt_trainer_state(ctx: Ctx) -> None:
    (resume_checkpoint(ctx.project) / "trainer.json").write_text('{"state": ', encoding="utf-8")


def unreachable_tracking(ctx: Ctx) -> None:
    ctx.env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there


def disk_full_after(limit: int) -> Setup:
    def setup(ctx: Ctx) -> None:
        ctx.file_size_limit = limit
    return setup


# -- checks beyond the common ones ------------------------------------------------------------------
def report_failed(ctx: Ctx) -> None:
    assert json.loads((ctx.project / REPORT).read_text())["status"] == "failed"  # so tokenize refuses


def nothing_escaped(ctx: Ctx) -> None:
    assert not list(ctx.scratch.rglob("evil.txt"))


def retried_once(ctx: Ctx) -> None:
    assert ctx.server.hits["/verdict"] == 2


def last_good_checkpoint_kept(ctx: Ctx) -> None:
    """The failed run kept its last good checkpoint, and the earlier params' resume point survives."""
    folders = [p for p in (ctx.project / CHECKPOINTS).iterdir() if not p.name.startswith(".")]
    steps = sorted(json.loads((p / "trainer.json").read_text())["state"]["step"] for p in folders)
    assert len(steps) == 2 and steps[0] >= SMALL["pretrain.checkpoint_every"], steps


def failed_fast(ctx: Ctx) -> None:
    assert ctx.seconds < 60  # MLflow alone would retry for minutes


def validate_case(id: str, broken: str, setup: Setup, message: str) -> Case:
    """validate writes its report on failure too, with status failed: that is how tokenize refuses."""
    return Case(id, broken, "validate", setup, f"1 dataset(s) failed: {message}", may_change=(REPORT,),
                check=report_failed)


NAN_SETTINGS = {"pretrain.lr": 1.0, "pretrain.beta2": 0.0, "pretrain.grad_clip": None, "pretrain.warmup_steps": 0,
                "pretrain.max_steps": 40}  # beta2 0: Adam divides by |this gradient|, and the weights blow up
VERDICT = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt"

CASES = [
    # params.yaml is checked when it is loaded; the message names the key
    Case("param-wrong-type", "pretrain.lr is a string", "pretrain", params({"pretrain.lr": "fast"}),
         "params.yaml: pretrain.lr must be a number, got 'fast'"),
    Case("param-out-of-range", "tokenize.corpus.train_ratio is 1.5", "tokenize", params({"tokenize.corpus.train_ratio": 1.5}),
         "params.yaml: tokenize.corpus.train_ratio must be in (0, 1), got 1.5"),
    Case("param-unknown", "evaluate.temprature (a typo)", "evaluate", params({"evaluate.temprature": 0.8}),
         "params.yaml: unknown key evaluate.temprature (allowed: batch_size, …temperature"),
    Case("params-file-missing", "no params.yaml", "download", remove("params.yaml"),
         "params.yaml: params file not found"),
    # download: mirror and network
    Case("mirror-file-missing", "the-verdict.txt not in the mirror, offline", "download",
         bad_mirror({"the-verdict.txt": None}, offline=True),
         f"1 file(s) not in mirror …and offline: the-verdict.txt <{VERDICT}>"),
    Case("checksum-mismatch", "one word changed in the mirror's tinyshakespeare.txt", "download",
         bad_mirror({"tinyshakespeare.txt": lambda data: data.replace(b"Citizen", b"Citizan", 1)}),
         "tinyshakespeare.txt: sha256 mismatch (expected 86c4e6aa"),
    Case("mirror-file-truncated", "the mirror's tinyshakespeare.txt cut in half", "download",
         bad_mirror({"tinyshakespeare.txt": lambda data: data[: len(data) // 2]}),
         "tinyshakespeare.txt: sha256 mismatch (expected 86c4e6aa"),
    Case("download-truncated", "HTTP server sends half of the-verdict.txt and hangs up", "download",
         truncating_server, "could not be downloaded: the-verdict.txt <http://127.0.0.1:…/verdict> (last error: "
                            "http://127.0.0.1:…/verdict: truncated download (", check=retried_once,
         status=TEMPORARY_FAILURE),
    Case("zip-path-traversal", "spam zip holds a member ../evil.txt", "download",
         bad_mirror({"sms+spam+collection.zip": add_parent_member}),
         "sms+spam+collection.zip: unsafe member path '../evil.txt'", check=nothing_escaped),
    # validate: the raw datasets
    validate_case("spam-row-malformed", "spam line 4 has a third field", lines("SMSSpamCollection", {4: "ham\tone\tmore"}),
                  "data/raw/SMSSpamCollection: Expected 2 fields in line 4, saw 3"),
    validate_case("spam-label-unknown", "spam row 3 is labelled 'hma'", lines("SMSSpamCollection", {3: "hma\tFree entry"}),
                  "data/raw/SMSSpamCollection row 3 column label: isin(['ham', 'spam']) got 'hma'"),
    validate_case("spam-text-empty", "spam row 5's text is one space", lines("SMSSpamCollection", {5: "ham\t "}),
                  "data/raw/SMSSpamCollection row 5 column text: non_empty got ' '"),
    validate_case("instruction-output-empty", "instruction record 7 has an empty output",
                  raw("instruction-data.json", lambda data: json.dumps(
                      [dict(r, output="") if i == 7 else r for i, r in enumerate(json.loads(data))]).encode()),
                  "data/raw/instruction-data.json record 7 column output: non_empty got ''"),
    validate_case("instructions-malformed-json", "instruction-data.json cut off mid-record",
                  raw("instruction-data.json", lambda data: data[:5000]),
                  "data/raw/instruction-data.json: invalid JSON at line …column …"),
    validate_case("corpus-not-utf8", "byte 0xff at offset 1000 of the-verdict.txt",
                  raw("the-verdict.txt", lambda data: data[:1000] + b"\xff" + data[1000:]),
                  "data/raw/the-verdict.txt line 5: not valid UTF-8 (byte 1000: invalid start byte); see"),
    validate_case("corpus-shorter-than-window", "the-verdict.txt is 7 tokens, the window 32",
                  raw("the-verdict.txt", lambda data: b"Too short to train on.\n"),
                  "corpus too short: 7 tokens, fewer than pretrain.context_length + 1 = 33"),
    # validate: your own data (a folder my-data/ as the dataset's source)
    validate_case("corpus-folder-empty-file", "a corpus folder holds an empty file",
                  own("corpus", {"a.txt": b"Some text. " * 100, "b.txt": b""}), "my-data/b.txt: empty file"),
    validate_case("corpus-folder-binary-file", "a corpus folder holds a binary file",
                  own("corpus", {"a.txt": b"Some text. " * 100, "b.md": b"text\nmore\x00\x01\x02"}),
                  "my-data/b.md line 2: binary file (NUL byte at byte 9)"),
    validate_case("corpus-jsonl-missing-field", "line 2 of a corpus .jsonl has no text field",
                  own("corpus", {"docs.jsonl": b'{"text": "one"}\n{"body": "two"}\n'}),
                  "my-data/docs.jsonl line 2: missing field 'text'"),
    validate_case("corpus-gz-not-utf8", "a gzipped corpus file holds Latin-1 text",
                  own("corpus", {"a.txt.gz": gzip.compress("Caf\u00e9 au lait.\n".encode("latin-1"))}),
                  "my-data/a.txt.gz line 1: not valid UTF-8 (byte 3: invalid continuation byte); see"),
    validate_case("table-missing-column", "the label column is named category, params say topic",
                  own("classification", {"t.csv": b"sentence,category\nhi there,a\nbye now,b\n"}, **TOPICS),
                  "my-data/t.csv: no column 'topic' (datasets.classification.label_column); columns: sentence, category"),
    validate_case("table-empty-label", "row 2 of a labelled CSV has no label",
                  own("classification", {"t.csv": b"sentence,topic\nhi there,a\nbye now,\nok then,b\n"}, **TOPICS),
                  "my-data/t.csv row 2 column label: not_nullable got None"),
    validate_case("table-one-class", "every row of a labelled CSV has the same label",
                  own("classification", {"t.csv": b"sentence,topic\nhi there,a\nbye now,a\n"}, **TOPICS),
                  "my-data/t.csv: 1 class(es) ('a') in the label column; a classifier needs 2 or more"),
    validate_case("table-text-not-string", "line 2 of a labelled .jsonl has a number as its text",
                  own("classification", {"t.jsonl": b'{"sentence": "hi", "topic": "a"}\n{"sentence": 42, "topic": "b"}\n'},
                      **{**TOPICS, "format": "auto"}),
                  "my-data/t.jsonl row 2 column text: is_string got 42"),
    validate_case("instructions-jsonl-missing-field", "line 2 of an instruction .jsonl has no answer field",
                  own("instructions", {"t.jsonl": b'{"prompt": "a", "answer": "b"}\n{"prompt": "c"}\n'},
                      instruction_field="prompt", input_field="context", output_field="answer"),
                  "my-data/t.jsonl line 2 column answer: missing_field got None"),
    # "; see" after the message: the only failure (no "+1 more"), so the quoted tab and line break passed
    validate_case("table-control-character", "row 2 of a labelled CSV holds a NUL; row 1 a quoted tab and CRLF",
                  own("classification", {"t.csv": b'sentence,topic\n"one\tcell,\r\ntwo lines",a\nhi\x00there,b\n'},
                      **TOPICS),
                  "my-data/t.csv row 2 column text: no_control_characters got 'hi\\x00there'; see"),
    validate_case("instructions-control-character", "line 2 of an instruction .jsonl has an ESC in its input",
                  own("instructions", {"t.jsonl": b'{"instruction": "a", "input": "", "output": "b\\tc\\r\\nd"}\n'
                                                  b'{"instruction": "e", "input": "x\\u001by", "output": "f"}\n'}),
                  "my-data/t.jsonl line 2 column input: no_control_characters got 'x\\x1by'; see"),
    validate_case("instructions-empty-list", "an instruction .json file is []",
                  own("instructions", {"t.json": b"[]\n"}),
                  "my-data/t.json: no records; an instruction file needs at least one; see"),
    validate_case("instructions-empty-jsonl", "an instruction .jsonl file has no lines",
                  own("instructions", {"t.jsonl": b""}),
                  "my-data/t.jsonl: no records; an instruction file needs at least one; see"),
    # writing outputs
    Case("disk-full-tokenize", "files may not grow past 64 KiB (RLIMIT_FSIZE)", "tokenize", disk_full_after(1 << 16),
         "data/tokens: write failed (File too large)"),
    Case("disk-full-pretrain", "files may not grow past 3 MiB (RLIMIT_FSIZE)", "pretrain", disk_full_after(3 << 20),
         "data/models/base: write failed (File too large)"),
    # training
    Case("nan-loss", "pretrain with lr 1, beta2 0, no clipping", "pretrain", params(NAN_SETTINGS),
         "non-finite training loss (nan) at step …; the last checkpoint is kept",
         may_change=("data/checkpoints/",), check=last_good_checkpoint_kept),
    Case("checkpoint-other-architecture", "the resumable checkpoint has 3 layers, params say 2", "pretrain",
         other_architecture, f"{CHECKPOINTS}/…/model: checkpoint has n_layers=3, model has 2"),
    Case("resume-checkpoint-tampered", "one byte of the resumable checkpoint's weights flipped", "pretrain",
         tamper_resume("model/model.safetensors"),
         "/model/model.safetensors: sha256 does not match config.json (tampered or corrupt)"),
    Case("resume-optimizer-tampered", "one byte of the resumable checkpoint's AdamW moments flipped", "pretrain",
         tamper_resume("optimizer.safetensors"),
         "/optimizer.safetensors: missing or its sha256 does not match trainer.json (tampered or corrupt)"),
    Case("resume-state-corrupt", "the resumable checkpoint's trainer.json cut short", "pretrain",
         corrupt_trainer_state, "/trainer.json: not valid JSON (Expecting value: line 1 column 11 (char 10))"),
    # models and tracking
    Case("checkpoint-missing", "data/models/base deleted", "evaluate", remove("data/models/base"),
         "data/models/base/config.json: checkpoint config not found"),
    Case("checkpoint-tampered", "one byte of data/models/base/model.safetensors flipped", "evaluate",
         flip("data/models/base/model.safetensors"),
         "data/models/base/model.safetensors: sha256 does not match config.json (tampered or corrupt)"),
    Case("mlflow-unreachable", "MLFLOW_TRACKING_URI is a closed 127.0.0.1 port", "evaluate", unreachable_tracking,
         "MLflow tracking server http://127.0.0.1:…is unreachable (", check=failed_fast),
    Case("context-over-window", "finetune_classifier.max_length 1000, base context 32", "finetune_classifier",
         params({"finetune_classifier.max_length": 1000}),
         "params.yaml: finetune_classifier.max_length (1000) exceeds the base model's context length (32)"),
    Case("cli-model-missing", "llm-pipeline generate --model names no checkpoint", "generate",
         lambda ctx: None, "data/models/nothing/config.json: checkpoint config not found",
         cli=("--model", "data/models/nothing", "Hi")),
]


# -- running --------------------------------------------------------------------------------------
def copy_project(good: Path, dest: Path) -> Path:
    """A fresh copy of the good project: params, data/ and the MLflow store (no case needs its artifacts)."""
    shutil.copytree(good, dest, ignore=shutil.ignore_patterns("mlartifacts"))
    return dest


def snapshot(project: Path) -> dict[str, str]:
    """sha256 of every file under data/, by path."""
    return {str(p.relative_to(project)): sha256_file(p) for p in sorted((project / "data").rglob("*")) if p.is_file()}


def limit_file_size(limit: int) -> Callable[[], None]:
    def apply() -> None:  # in the child, before exec
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def run_command(case: Case, ctx: Ctx) -> subprocess.CompletedProcess:
    argv = [str(CLI), case.stage, *case.cli] if case.cli else [sys.executable, "-m", STAGES[case.stage].module]
    start = time.monotonic()
    result = subprocess.run(argv, cwd=ctx.project, env=stage_env(ctx.mirror, **ctx.env), capture_output=True,
                            text=True, timeout=300,
                            preexec_fn=ctx.file_size_limit and limit_file_size(ctx.file_size_limit))
    ctx.seconds = time.monotonic() - start
    return result


def matches(message: str, line: str) -> bool:
    return re.search(".*".join(map(re.escape, message.split("…"))), line) is not None


@pytest.fixture(scope="module")
def good_project(tmp_path_factory: pytest.TempPathFactory, downloaded: Path) -> Path:
    """download, validate, tokenize, pretrain and evaluate, run once on tiny settings."""
    root = tmp_path_factory.mktemp("good")
    shutil.copy(downloaded / "params.yaml", root / "params.yaml")
    shutil.copytree(downloaded / "data", root / "data")
    for key, value in SMALL.items():
        set_param(root, key, value)
    for stage in ("validate", "tokenize", "pretrain", "evaluate"):
        result = run_stage(root, stage, LLM_PIPELINE_RUN_GROUP="bad-inputs")
        assert result.returncode == 0, result.stderr
    return root


@pytest.mark.slow(7)
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_fails_in_one_line_and_keeps_outputs(case: Case, good_project: Path, mirror: Path,
                                                       tmp_path: Path):
    with ExitStack() as stack:
        ctx = Ctx(copy_project(good_project, tmp_path / "project"), tmp_path, mirror, stack)
        case.setup(ctx)
        before = snapshot(ctx.project)
        result = run_command(case, ctx)

    errors = [line for line in result.stderr.splitlines() if not PROGRESS.match(line)]
    print(errors[-1] if errors else result.stderr)  # the catalogue's messages, for `pytest -rP`
    assert result.returncode == case.status, result.stderr
    assert len(errors) == 1 and errors[0].startswith(f"{case.stage}: error: "), result.stderr
    assert matches(case.message, errors[0]), errors[0]
    assert leftovers(ctx.project) == []
    after = snapshot(ctx.project)
    changed = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    assert [path for path in changed if not path.startswith(case.may_change)] == []
    if case.check:
        case.check(ctx)


# Each stage is SIGKILLed by itself at a fixed point of its write, so the kill lands mid-write on any machine.
KILL_MID_WRITE = """
import os, signal, sys
import {module} as stage
from pipeline.core.catalog import command_line
real, calls = stage.{function}, []
def killed(*args, **kwargs):
    calls.append(1)
    if len(calls) == {call}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
stage.{function} = killed
sys.argv = ["{module}"]
command_line("{stage}", stage.main)
"""


@pytest.mark.parametrize(("stage", "function", "call", "outputs"), [
    ("download", "fetch_with_origin", 3, ("data/raw/", "data/reports/download.json")),  # two files fetched
    ("tokenize", "write_instructions", 1, ("data/tokens/",)),  # pretrain and classification splits written
])
def test_killed_mid_write_then_rerun(good_project: Path, mirror: Path, tmp_path: Path, stage: str, function: str,
                                     call: int, outputs: tuple[str, ...]):
    project = copy_project(good_project, tmp_path / "project")
    before = snapshot(project)
    code = KILL_MID_WRITE.format(stage=stage, module=STAGES[stage].module, function=function, call=call)
    killed = subprocess.run([sys.executable, "-c", code], cwd=project, env=stage_env(mirror), capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert leftovers(project), "the stage was not killed while writing"
    visible = {path: digest for path, digest in snapshot(project).items() if "/." not in path}
    assert visible == before  # the half-written output is only in a hidden temp folder

    rerun = run_stage(project, stage, mirror)
    assert rerun.returncode == 0, rerun.stderr
    assert leftovers(project) == []  # the killed run's temp folder is gone too
    again = snapshot(project)
    assert {p: d for p, d in again.items() if p.startswith(outputs)} == {
        p: d for p, d in before.items() if p.startswith(outputs)}  # the same as the clean run's
