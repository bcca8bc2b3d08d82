"""The delivery outbox: send each finished job's results to every configured destination.

When a job is marked done, the same transaction adds one ``deliveries`` row per
destination (:meth:`JobStore.complete_job`), so a result can't be finished without its
deliveries queued, and none are lost across a restart. Workers claim due rows with a lease
and hand each to the :class:`Sender` of the destination's kind:

==========  =============================  =========================================
kind        module                         what it does
==========  =============================  =========================================
pacs        service.pacs_delivery          C-STORE of ``ecg.dcm`` (DICOM engineer)
ehr         service.ehr_delivery           FHIR transaction of the bundle (FHIR engineer)
folder      service.delivery               copies the result files into a directory
==========  =============================  =========================================

A sender module exposes ``create_sender(settings: Settings, destination: Destination) ->
Sender``. ``send`` raises :class:`RetryableDeliveryError` (retried with backoff, dead after
``delivery_max_attempts``) or :class:`PermanentDeliveryError` (dead at once, the reason
kept); any other exception counts as retryable. Sends must be idempotent — the adapters
derive UIDs and identifiers from the source — because a crash between a successful send
and the commit that records it means the row is sent again.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from service.config import Destination, FolderDestination, Settings
from service.spool import fsync_dir
from service.store import DeliveryTask, JobStore

log = logging.getLogger(__name__)


class RetryableDeliveryError(Exception):
    """The destination may accept it later (network, 5xx, PACS down)."""


class PermanentDeliveryError(Exception):
    """The destination refused it for good (4xx, rejected object); ``str()`` is kept."""


class Sender(Protocol):
    def send(self, delivery: DeliveryTask, result_dir: Path) -> str | None:
        """Deliver the job's results; return the remote id if the destination gives one."""
        ...


SenderFactory = Callable[[Settings, Destination], Sender]

SENDER_MODULES: dict[str, str] = {
    "pacs": "service.pacs_delivery",
    "ehr": "service.ehr_delivery",
    "folder": "service.delivery",
}
_factories: dict[str, SenderFactory] = {}


def register_sender(kind: str, factory: SenderFactory) -> None:
    """Use ``factory`` for destinations of ``kind`` in this process (plugins, tests)."""
    _factories[kind] = factory


def make_sender(settings: Settings, destination: Destination) -> Sender:
    """The sender for ``destination``; RetryableDeliveryError if its module is missing."""
    factory = _factories.get(destination.kind)
    if factory is None:
        module_name = SENDER_MODULES.get(destination.kind)
        if module_name is None:
            raise PermanentDeliveryError(f"no sender for destination kind {destination.kind!r}")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise RetryableDeliveryError(f"sender module {module_name} not installed") from exc
        factory = getattr(module, "create_sender", None)
        if factory is None:
            raise RetryableDeliveryError(f"{module_name} has no create_sender()")
    return factory(settings, destination)


class Outbox:
    """Sends due deliveries for one worker; caches one sender per destination."""

    def __init__(self, settings: Settings, store: JobStore, *, owner: str) -> None:
        self.settings = settings
        self.store = store
        self.owner = owner
        self._senders: dict[str, Sender] = {}

    def _sender(self, task: DeliveryTask) -> Sender:
        sender = self._senders.get(task.destination)
        if sender is None:
            dest = self.settings.destination(task.destination)
            if dest is None:
                raise PermanentDeliveryError(
                    f"destination {task.destination!r} is no longer configured")
            sender = make_sender(self.settings, dest)
            self._senders[task.destination] = sender
        return sender

    def deliver(self, task: DeliveryTask) -> str | None:
        """Attempt one delivery and record the outcome; returns the new state."""
        from service import observability as obs

        extra = {"job_id": task.job_id, "source_uid": task.source_id,
                 "delivery_id": task.id, "destination": task.destination}
        obs.DELIVERY_ATTEMPTS.labels(task.destination, task.kind).inc()
        try:
            sender = self._sender(task)
            remote_id = sender.send(task, self.store.result_dir(task.job_id))
        except PermanentDeliveryError as exc:
            obs.DELIVERY_FAILURES.labels(task.destination, task.kind, "permanent").inc()
            log.error("delivery refused: %s", exc, extra=extra)
            return self.store.fail_delivery(task, _reason(exc), permanent=True, owner=self.owner)
        except Exception as exc:
            obs.DELIVERY_FAILURES.labels(task.destination, task.kind, "retryable").inc()
            log.warning("delivery failed, will retry: %s", _reason(exc), extra=extra)
            return self.store.fail_delivery(task, _reason(exc), permanent=False,
                                            owner=self.owner)
        if self.store.finish_delivery(task, remote_id=remote_id, owner=self.owner):
            log.info("delivered", extra=extra)
            return "done"
        return None


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if text and isinstance(exc, RetryableDeliveryError | PermanentDeliveryError) \
        else f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# The folder destination ----------------------------------------------------------------

MANIFEST = "manifest.json"


class FolderSender:
    """Copies a job's result files to ``<path>/<job_id>/`` (for research archives).

    The copy is made under a temporary name and renamed into place, so a reader never sees
    a half-written folder; a second delivery of the same job replaces it (idempotent).
    """

    def __init__(self, destination: FolderDestination) -> None:
        self.root = destination.path

    def send(self, delivery: DeliveryTask, result_dir: Path) -> str | None:
        if not result_dir.is_dir():
            raise PermanentDeliveryError(f"job {delivery.job_id} has no result files")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            final = self.root / delivery.job_id
            tmp = self.root / f".{delivery.job_id}.{uuid.uuid4().hex}.tmp"
            shutil.copytree(result_dir, tmp)
            (tmp / MANIFEST).write_text(json.dumps({
                "job_id": delivery.job_id, "source_id": delivery.source_id,
                "files": sorted(str(p.relative_to(result_dir))
                                for p in result_dir.rglob("*") if p.is_file()),
            }, indent=1))
            for p in tmp.rglob("*"):
                if p.is_file():
                    with open(p, "rb") as f:
                        os.fsync(f.fileno())
            fsync_dir(tmp)
            old = self.root / f".{delivery.job_id}.{uuid.uuid4().hex}.old"
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            fsync_dir(self.root)
            shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:
            raise RetryableDeliveryError(f"cannot write to {self.root}: {exc.strerror}") from exc
        return str(final)


def create_sender(settings: Settings, destination: Destination) -> Sender:
    """Factory for the ``folder`` kind."""
    assert isinstance(destination.config, FolderDestination)
    return FolderSender(destination.config)
