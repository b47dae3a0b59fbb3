"""A lock per registered model, kept in the model registry itself, so that it holds on sqlite and on a server.

Registering an output and promoting a version each read the registry, decide, then write; two processes doing
it for one model at once would decide on what the other is about to change. MLflow gives no compare-and-set
(aliases are last-writer-wins), but it numbers a model's versions atomically on every backend: each waiter
creates a version of the model's lock model (a ticket), and the live ticket with the lowest number holds the
lock. A ticket is live until it is deleted or its lease runs out; a thread renews it while its process lives,
so a holder killed with `kill -9` blocks the others for one lease at most (on its own host, not at all: a
ticket whose process is gone is not live).
"""
from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from pipeline.core.errors import refusal
from pipeline.core.processes import process_alive
from pipeline.registry.tracking import versions_of

LOCK_SUFFIX = ".lock"  # the lock of model `m` is registered model `m.lock`
LOCK_TAG = "llm_pipeline.lock_of"  # on a lock model: the model it serializes
EXPIRES_TAG = "expires"  # on a ticket: when its lease runs out (seconds since the epoch)
HOLDER_TAG = "holder"  # on a ticket: host:pid; a ticket whose process on this host is gone is not live
LEASE_S = 30.0
RENEW_EVERY_S = LEASE_S / 6
POLL_S = 0.25
# A placeholder source: a ticket holds no model, and a server accepts a non-local URI with an absolute path and no run.
TICKET_SOURCE = "llm-pipeline://registry/lock-ticket"
CREATE_TRIES = 20  # MLflow retries a version number taken by another writer only 3 times


def lock_name(model: str) -> str:
    return model + LOCK_SUFFIX


def is_lock(model: object) -> bool:
    """Whether a registered model (as search_registered_models returns it) is one of these locks."""
    return LOCK_TAG in (getattr(model, "tags", None) or {})


def _live(ticket: ModelVersion, now: float) -> bool:
    # Expired, or taken by a process of this host that is gone (killed: it released nothing): not live.
    host, _, pid = ticket.tags.get(HOLDER_TAG, "").rpartition(":")
    if host == socket.gethostname() and pid.isdecimal() and not process_alive(int(pid)):
        return False
    try:
        return float(ticket.tags.get(EXPIRES_TAG, "0")) > now
    except ValueError:
        return False


def _create_lock_model(client: mlflow.MlflowClient, model: str) -> None:
    try:
        client.create_registered_model(lock_name(model), tags={LOCK_TAG: model},
                                       description=f"Serializes registering and promoting {model} "
                                                   "(docs/registry.md, many writers at once)")
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


def _take_ticket(client: mlflow.MlflowClient, lock: str) -> ModelVersion:
    holder = f"{socket.gethostname()}:{os.getpid()}"
    for attempt in itertools.count(1):
        try:
            # A ticket holds no files: nothing to wait for (nor a "waiting for creation" line on stderr).
            return client.create_model_version(lock, TICKET_SOURCE, tags={
                HOLDER_TAG: holder, EXPIRES_TAG: f"{time.time() + LEASE_S:.3f}"}, await_creation_for=None)
        except MlflowException as exc:
            # "Giving up after 3 attempts": other writers took each number first; take the next.
            if "Giving up" not in exc.message or attempt == CREATE_TRIES:
                raise
            time.sleep(POLL_S * (attempt % 4))


class _Renewal(threading.Thread):
    """Pushes a ticket's lease forward until stopped; dies with its process, so the lease then runs out."""

    def __init__(self, client: mlflow.MlflowClient, lock: str, version: str):
        super().__init__(daemon=True, name=f"lease {lock} {version}")
        self.client, self.lock, self.version = client, lock, version
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(RENEW_EVERY_S):
            try:
                self.client.set_model_version_tag(self.lock, self.version, EXPIRES_TAG,
                                                  f"{time.time() + LEASE_S:.3f}")
            except MlflowException:
                pass  # a store busy for a moment: the next renewal comes well before the lease ends


@contextmanager
def model_lock(client: mlflow.MlflowClient, model: str) -> Iterator[None]:
    """Hold `model`'s lock: wait until every ticket taken before ours is released or expired."""
    _create_lock_model(client, model)
    lock = lock_name(model)
    ticket = _take_ticket(client, lock)
    mine = int(ticket.version)
    renewal = _Renewal(client, lock, ticket.version)
    renewal.start()
    try:
        while True:
            now = time.time()
            ahead = [t for t in versions_of(client, lock) if int(t.version) < mine and _live(t, now)]
            if not ahead:
                break
            time.sleep(POLL_S)
        yield
    finally:
        renewal.stopped.set()
        renewal.join()
        # Released: expired first, which EDIT allows (a reviewer's decisions take the lock too), then deleted
        # where the user may (MANAGE, the service account); a reviewer's ticket stays, expired, hidden from review.
        client.set_model_version_tag(lock, ticket.version, EXPIRES_TAG, "0")
        try:
            client.delete_model_version(lock, ticket.version)
        except MlflowException as exc:
            if refusal(str(exc)) is None:
                raise
