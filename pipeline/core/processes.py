"""Processes the pipeline starts and watches: their PATH, liveness by pid, servers in a process group of their own."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent  # this environment's programs: python, mlflow, uvicorn, prefect, dvc


def tool_env() -> dict[str, str]:
    """A copy of os.environ with this interpreter's bin folder first on PATH.

    The tools we start start others by name (`mlflow models serve` execs `uvicorn`, dvc.yaml runs
    `python`); cron and systemd start us without the virtual environment on PATH, and then those names
    would be another environment's or none at all.
    """
    env = dict(os.environ)
    # No empty entry when PATH is unset or empty: an empty entry means the current folder.
    env["PATH"] = os.pathsep.join(filter(None, [str(BIN), env.get("PATH")]))
    return env


def process_alive(pid: object) -> bool:
    """Whether `pid` is a live process id on this host."""
    return isinstance(pid, int) and pid > 0 and psutil.pid_exists(pid)


def run_server(command: list[str], env: dict[str, str], grace_s: float = 30.0) -> int:
    """Run `command` in a session of its own until it exits or SIGINT/SIGTERM arrives; then stop its whole
    process group (SIGTERM, SIGKILL after grace_s) and return its exit status, or 128 + the signal."""
    # Its own session: a terminal's Ctrl-C reaches only us, and the group holds every process it starts
    # (mlflow starts uvicorn as a child, which would outlive mlflow alone).
    server = subprocess.Popen(command, env=env, start_new_session=True)
    received: list[tuple[int, float]] = []  # (signal, when)

    def forward(signum: int, frame: object) -> None:
        received.append((signum, time.monotonic()))
        signal_group(server.pid, signal.SIGTERM)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    # Polled, not a plain wait(): a server that ignores the forwarded signal is killed grace_s later, so that
    # stopping us never leaves it running without us.
    while server.poll() is None:
        time.sleep(0.2)
        if received and time.monotonic() - received[0][1] > grace_s:
            signal_group(server.pid, signal.SIGKILL)
    status = server.returncode
    stop_group(server.pid, grace_s)  # whatever mlflow left behind when it exited
    return 128 + received[0][0] if received else status


def signal_group(pgid: int, signum: int) -> bool:
    """Send signum to process group pgid (0: none, a probe); whether the group still had a process."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user joined the group: it is there
        return True
    return True


def stop_group(pgid: int, grace_s: float) -> None:
    """SIGTERM process group pgid, wait up to grace_s for it to empty, then SIGKILL what is left."""
    signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    # Bounded: a member already dead but not yet reaped by init still counts as in the group.
    while signal_group(pgid, 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    signal_group(pgid, signal.SIGKILL)
