"""How `dvc repro` is run for the pipeline: the environment every stage gets, and the repository's lock."""
from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil

from pipeline.core.catalog import RUN_GROUP_ENV
from pipeline.core.processes import process_alive, tool_env


def dvc_env(run_group: str) -> dict[str, str]:
    """Environment for `dvc repro`: this interpreter first on PATH (dvc.yaml runs `python`), every
    stage in MLflow run group `run_group`, no DVC analytics, stage output unbuffered."""
    env = tool_env()
    env[RUN_GROUP_ENV] = run_group
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class RepositoryBusy(RuntimeError):
    """Another process holds the DVC repository's lock (names it); waiting, not retrying, is what helps."""


@dataclass(frozen=True)
class LockHolder:
    """A live process holding a DVC lock of the repository."""

    pid: int
    command: str

    def __str__(self) -> str:
        return f"process {self.pid} ({self.command})"


# DVC's two lock errors: the workspace lock (held while DVC plans and commits), and the per-path locks
# (held on a stage's deps and outs while its command runs). Only these; any other failure is the stage's.
DVC_LOCK_ERRORS = ("Unable to acquire lock", "is busy, it is being blocked by")
# DVC's advice after the second, wrong and harmful while the holder lives: never passed on.
DVC_LOCK_ADVICE = re.compile(r"\n*If there are no processes with such PIDs, you can manually remove '[^']*' and try again\.?\n?")
_BLOCKER = re.compile(r"\(PID (\d+)\): (.+)")


def dvc_status(project: Path, stages: list[str], env: dict[str, str]) -> dict | None:
    """`dvc status --json` of `stages` in `project` ({} when all are up to date); None when it fails."""
    result = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", *stages], cwd=project, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True)
    try:
        status = json.loads(result.stdout) if result.returncode == 0 else None
    except ValueError:
        return None
    return status if isinstance(status, dict) else None


def _command(pid: int, recorded: str = "?") -> str:
    # The process's own command line (DVC records its sys.argv, which reads oddly under `python -m dvc`).
    try:
        return " ".join(psutil.Process(pid).cmdline()) or recorded
    except psutil.Error:
        return recorded


def lock_holder(project: Path) -> LockHolder | None:
    """A live process holding a lock of the DVC repository in `project`, or None when it is free."""
    tmp = project / ".dvc" / "tmp"
    try:
        locks = json.loads((tmp / "rwlock").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        locks = {}
    held = [*locks.get("write", {}).values(), *(info for infos in locks.get("read", {}).values() for info in infos)]
    for info in held:  # entries of dead processes are DVC's to clean up; they block nothing
        if isinstance(info, dict) and process_alive(info.get("pid")):
            return LockHolder(info["pid"], _command(info["pid"], str(info.get("cmd", "?"))))
    try:
        workspace = open(tmp / "lock", "a+", encoding="utf-8")
    except FileNotFoundError:
        return None
    with workspace:  # DVC takes it with flock through zc.lockfile, which writes the holder's pid into it
        try:
            fcntl.flock(workspace.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            workspace.seek(0)
            text = workspace.read().strip()
            pid = int(text) if text.isdecimal() else 0
            return LockHolder(pid, _command(pid) if pid else "?")
        fcntl.flock(workspace.fileno(), fcntl.LOCK_UN)
    return None


def busy_message(project: Path, holder: LockHolder) -> str:
    """The one line for a repository found locked."""
    return (f"{project}: the DVC repository is locked by {holder}; run again when it has finished, "
            "or pass --lock-wait SECONDS to wait for it")


def wait_for_lock(project: Path, wait_s: float, say: Callable[[str], None], every_s: float = 30.0) -> None:
    """Return once the repository is free; fail at once (wait_s 0) or after wait_s seconds with RepositoryBusy
    naming the holder, saying every every_s seconds whom it waits for."""
    holder = lock_holder(project)
    if holder is None:
        return
    if wait_s <= 0:
        raise RepositoryBusy(busy_message(project, holder))
    start = time.monotonic()
    said = -every_s
    while holder is not None:
        waited = time.monotonic() - start
        if waited >= wait_s:
            raise RepositoryBusy(f"{project}: the DVC repository is still locked by {holder} after waiting "
                                 f"{wait_s:g} s (--lock-wait)")
        if waited - said >= every_s:
            say(f"waiting for {holder} to release the DVC repository's lock ({waited:.0f} of {wait_s:g} s)")
            said = waited
        time.sleep(min(1.0, wait_s - waited))
        holder = lock_holder(project)


def lock_error(project: Path, dvc_output: str) -> RepositoryBusy | None:
    """The RepositoryBusy that DVC's output reports (it met a lock after our check), naming the holder; None
    when DVC failed for another reason."""
    if not any(text in dvc_output for text in DVC_LOCK_ERRORS):
        return None
    holder = lock_holder(project)
    if holder is None:
        found = _BLOCKER.search(dvc_output)
        holder = LockHolder(int(found.group(1)), found.group(2).strip()) if found else LockHolder(0, "?")
    return RepositoryBusy(busy_message(project, holder))


def _run_forwarding(command: list[str], project: Path, env: dict[str, str]) -> tuple[int, str]:
    # stderr passes through as it comes (progress bars included) up to DVC's first ERROR, which is held back
    # until the end: a lock error is then reported in one line of our own instead.
    proc = subprocess.Popen(command, cwd=project, env=env, stderr=subprocess.PIPE)
    text, held = "", False
    while chunk := os.read(proc.stderr.fileno(), 65536):
        part = chunk.decode("utf-8", "replace")
        text += part
        if not held and "ERROR:" in part:
            before, _, _ = part.partition("ERROR:")
            sys.stderr.write(before)
            held = True
        elif not held:
            sys.stderr.write(part)
        sys.stderr.flush()
    proc.stderr.close()
    code = proc.wait()
    if held and lock_error(project, text) is None:
        sys.stderr.write(text[text.index("ERROR:"):])
    return code, text


def run_dvc(command: list[str], project: Path, env: dict[str, str], lock_wait_s: float) -> int:
    """Run a DVC command in `project` and return its exit status, once the repository's lock is free: wait up
    to lock_wait_s for it (0: not at once), then raise RepositoryBusy naming the holder."""
    deadline = time.monotonic() + lock_wait_s

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    while True:
        wait_for_lock(project, max(0.0, deadline - time.monotonic()), say)
        code, errors = _run_forwarding(command, project, env)
        busy = lock_error(project, errors) if code else None
        if busy is None:
            return code
        if time.monotonic() >= deadline:  # DVC met a lock taken after the check
            raise busy
