"""The job store: durable intake, the job queue with leases, and the delivery outbox.

API (thread-safe; every call is one short transaction)::

    store = JobStore(settings)            # opens the DB and applies migrations (migrate=True)

    # intake — durable before it returns: spool file + directory fsync'ed, rows committed
    store.accept(data: bytes, source: SourceMeta, *, params: dict | None = None) -> AcceptResult
    store.spool_tempfile() -> Path        # stream a large object into this file, then:
    store.accept_path(path: Path, source: SourceMeta, *, params=None) -> AcceptResult
        AcceptResult(job_id: str, received_id: str, duplicate: bool)
        # idempotent on source.source_id: a duplicate returns the existing job
        # raises StoreFullError (disk full / under the free-space floor; DICOM 0xA700,
        # HTTP 507) or StoreError (anything else that stopped the object being stored)

    # reading
    store.get_job(job_id) -> JobInfo | None
    store.get_job_by_source(source_id) -> JobInfo | None
    store.list_jobs(*, state=None, route=None, source_id=None, limit=50, offset=0) -> list[JobInfo]
    store.count_jobs(*, state=None, route=None) -> int
    store.wait_for_job(job_id, timeout_s) -> JobInfo   # until done/failed/dead or timeout
    store.get_source(job_id) -> SourceMeta             # holds PHI: never log it
    store.source_path(job_id) -> Path                  # the spooled original
    store.result_dir(job_id) -> Path                   # <results_dir>/<job_id>/
    store.output_path(job_id, kind) -> Path | None     # kind: json dicom fhir csv overlay hea dat
    store.read_fhir_bundle(job_id) -> dict | None      # the job's FHIR result Bundle

    # operators
    store.retry_job(job_id, *, actor) -> JobInfo       # failed/dead job, or its dead deliveries
    store.retry_delivery(delivery_id, *, actor) -> DeliveryInfo
    store.retry_all_dead(*, actor) -> tuple[int, int]  # (jobs, deliveries) re-queued
    store.queue_stats() -> QueueStats
    store.audit_events(*, job_id=None, action=None, actor=None, since=None, until=None,
                       limit=100, offset=0) -> list[AuditRecord]

    # workers (service.workers, service.delivery): claim_jobs, extend_leases, complete_job,
    # fail_job, release_job, claim_deliveries, finish_delivery, fail_delivery, release_delivery

Errors (service.errors, re-exported here): StoreError, StoreFullError, JobNotFoundError,
JobStateError. Jobs: queued -> running (lease) -> done | failed (permanent, with the reason)
| dead (attempts exhausted); transient failures go back to queued with a backoff.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, selectinload

from adapters.source import SourceMeta
from service import audit, observability
from service.config import Settings
from service.db.engine import is_postgres, make_engine, session_factories
from service.db.migrate import upgrade
from service.db.models import (
    AuditEvent,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    ReceivedObject,
    where_given,
)
from service.errors import JobNotFoundError, JobStateError, StoreError, StoreFullError
from service.spool import Spool, SpooledFile

__all__ = [
    "AcceptResult",
    "ClaimedJob",
    "DeliveryInfo",
    "DeliveryTask",
    "JobInfo",
    "JobNotFoundError",
    "JobStateError",
    "JobStore",
    "QueueStats",
    "StoreError",
    "StoreFullError",
    "backoff_seconds",
]

log = logging.getLogger(__name__)

_PG_DISK_FULL = "53100"
WAIT_POLL_SECONDS = 0.2


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


def backoff_seconds(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter: ``base * 2**(attempt-1)``, capped, times U(0.5, 1)."""
    delay = min(cap, base * 2 ** max(0, attempt - 1))
    return delay * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class AcceptResult:
    job_id: str
    received_id: str
    duplicate: bool


@dataclass(frozen=True)
class DeliveryInfo:
    id: str
    job_id: str
    destination: str
    kind: str
    state: str
    attempts: int
    next_try_at: datetime
    last_error: str | None
    remote_id: str | None
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(self.__dict__)


@dataclass(frozen=True)
class JobInfo:
    """A job as the API and operators see it (no PHI)."""

    id: str
    received_id: str
    state: str
    route: str
    source_id: str
    media_type: str
    caller: str | None
    size_bytes: int
    attempts: int
    error: str | None
    outputs: list[str]
    pages: int | None
    engine: str | None
    params: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    next_try_at: datetime
    lease_owner: str | None
    lease_expires_at: datetime | None
    purged_at: datetime | None
    deliveries: list[DeliveryInfo] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.state in JobState.TERMINAL

    def to_dict(self) -> dict[str, Any]:
        d = _jsonable({k: v for k, v in self.__dict__.items() if k != "deliveries"})
        d["deliveries"] = [x.to_dict() for x in self.deliveries]
        return d


@dataclass(frozen=True)
class ClaimedJob:
    """A job leased to one worker; ``lease_token`` fences every later write."""

    id: str
    lease_token: str
    attempt: int
    route: str
    source_id: str
    media_type: str
    spool_path: Path
    source: SourceMeta
    params: dict[str, Any]


@dataclass(frozen=True)
class DeliveryTask:
    """One delivery attempt handed to a Sender."""

    id: str
    job_id: str
    destination: str
    kind: str
    attempt: int
    source_id: str
    lease_token: str


@dataclass
class QueueStats:
    jobs: dict[tuple[str, str], int]
    """(route, state) -> count."""
    deliveries: dict[tuple[str, str, str], int]
    """(destination, kind, state) -> count."""
    oldest_pending_at: datetime | None
    """Creation time of the oldest queued or running job."""

    def count(self, state: str) -> int:
        return sum(n for (_, s), n in self.jobs.items() if s == state)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in d.items()}


def _delivery_info(d: Delivery) -> DeliveryInfo:
    return DeliveryInfo(
        id=d.id, job_id=d.job_id, destination=d.destination, kind=d.kind, state=d.state,
        attempts=d.attempts, next_try_at=d.next_try_at, last_error=d.last_error,
        remote_id=d.remote_id, created_at=d.created_at, updated_at=d.updated_at,
        delivered_at=d.delivered_at,
    )


def _job_info(j: Job) -> JobInfo:
    r = j.received
    return JobInfo(
        id=j.id, received_id=j.received_id, state=j.state, route=j.route,
        source_id=j.source_id, media_type=r.media_type, caller=r.caller,
        size_bytes=r.size_bytes, attempts=j.attempts, error=j.error,
        outputs=list(j.outputs or []), pages=j.pages, engine=j.engine,
        params=dict(j.params or {}), created_at=j.created_at, updated_at=j.updated_at,
        started_at=j.started_at, finished_at=j.finished_at, next_try_at=j.next_try_at,
        lease_owner=j.lease_owner, lease_expires_at=j.lease_expires_at,
        purged_at=j.purged_at, deliveries=[_delivery_info(d) for d in j.deliveries],
    )


def _drop_lease(row: Job | Delivery) -> None:
    """Nobody holds ``row`` any more (its work finished, failed or was given back)."""
    row.lease_owner = row.lease_token = None
    row.lease_expires_at = None


def _is_disk_full(exc: SQLAlchemyError) -> bool:
    orig = getattr(exc, "orig", None)
    if getattr(orig, "sqlstate", None) == _PG_DISK_FULL:
        return True
    return isinstance(exc, OperationalError) and "disk is full" in str(orig)


class JobStore:
    """Durable intake, job queue and outbox over SQLAlchemy (SQLite or PostgreSQL)."""

    def __init__(self, settings: Settings, *, migrate: bool = True) -> None:
        self.settings = settings
        self.engine = make_engine(settings.db_url)
        self._rw, self._ro = session_factories(self.engine)
        self.spool = Spool(settings.spool_path, min_free_bytes=settings.spool_min_free_bytes)
        self.results_root = settings.results_path
        if migrate:
            upgrade(self.engine)
        self.spool.ensure()
        self.results_root.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        self.engine.dispose()

    @property
    def is_postgres(self) -> bool:
        return is_postgres(self.engine)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A read-write session in one transaction (``BEGIN IMMEDIATE`` on SQLite)."""
        with self._rw() as s, s.begin():
            yield s

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._ro() as s, s.begin():
            yield s

    # Intake ---------------------------------------------------------------------------

    def accept(self, data: bytes, source: SourceMeta, *,
               params: dict[str, Any] | None = None) -> AcceptResult:
        """Store ``data`` durably and queue a job for it; see the module docstring."""
        existing = self._existing(source.source_id)
        if existing is not None:
            self._audit_duplicate(existing, source)
            return existing
        received_id = new_id()
        spooled = self.spool.write(data, received_id, source.media_type)
        return self._record(received_id, spooled, source, params)

    def spool_tempfile(self) -> Path:
        """A new temp path inside the spool for streaming a large object to disk."""
        return self.spool.tempfile()

    def accept_path(self, path: Path, source: SourceMeta, *,
                    params: dict[str, Any] | None = None) -> AcceptResult:
        """Like :meth:`accept` for an object already written to ``path`` (ideally from
        :meth:`spool_tempfile`). The file is moved into the spool, or deleted when the
        object is a duplicate."""
        existing = self._existing(source.source_id)
        if existing is not None:
            path.unlink(missing_ok=True)
            self._audit_duplicate(existing, source)
            return existing
        received_id = new_id()
        spooled = self.spool.adopt(path, received_id, source.media_type)
        return self._record(received_id, spooled, source, params)

    def _existing(self, source_id: str) -> AcceptResult | None:
        try:
            with self._read() as s:
                row = s.execute(
                    select(Job.id, Job.received_id)
                    .join(ReceivedObject, Job.received_id == ReceivedObject.id)
                    .where(ReceivedObject.source_id == source_id)
                ).first()
        except SQLAlchemyError as exc:
            raise StoreError(f"job store unavailable: {type(exc).__name__}") from exc
        return AcceptResult(row.id, row.received_id, True) if row else None

    def _audit_duplicate(self, existing: AcceptResult, source: SourceMeta) -> None:
        observability.DUPLICATES.labels(source.route).inc()
        try:
            with self.transaction() as s:
                audit.record(s, audit.Action.RECEIVED, actor=source.caller or source.route,
                             route=source.route, job_id=existing.job_id,
                             source_id=source.source_id, detail={"duplicate": True})
        except SQLAlchemyError:
            log.warning("could not audit a duplicate", extra={"job_id": existing.job_id})

    def _record(self, received_id: str, spooled: SpooledFile, source: SourceMeta,
                params: dict[str, Any] | None) -> AcceptResult:
        now = utcnow()
        job_id = new_id()
        try:
            with self.transaction() as s:
                s.add(ReceivedObject(
                    id=received_id, source_id=source.source_id, route=source.route,
                    media_type=source.media_type, caller=source.caller,
                    spool_path=spooled.relpath, size_bytes=spooled.size, sha256=spooled.sha256,
                    source_meta=source.to_dict(), received_at=now,
                ))
                s.flush()
                s.add(Job(
                    id=job_id, received_id=received_id, route=source.route,
                    source_id=source.source_id, state=JobState.QUEUED,
                    params=params or {}, attempts=0, next_try_at=now, outputs=[],
                    created_at=now, updated_at=now,
                ))
                audit.record(s, audit.Action.RECEIVED, actor=source.caller or source.route,
                             route=source.route, job_id=job_id, source_id=source.source_id,
                             detail={"media_type": source.media_type, "bytes": spooled.size,
                                     "sha256": spooled.sha256}, at=now)
        except IntegrityError:
            # Another connection stored the same source_id between our check and insert.
            self.spool.remove(spooled.relpath)
            existing = self._existing(source.source_id)
            if existing is None:
                raise StoreError("could not record the object") from None
            return existing
        except SQLAlchemyError as exc:
            self.spool.remove(spooled.relpath)
            if _is_disk_full(exc):
                raise StoreFullError("database is out of disk space") from exc
            raise StoreError(f"could not record the object: {type(exc).__name__}") from exc
        observability.RECEIVED.labels(source.route).inc()
        log.info("accepted", extra={"job_id": job_id, "source_uid": source.source_id,
                                    "route": source.route, "caller": source.caller})
        return AcceptResult(job_id=job_id, received_id=received_id, duplicate=False)

    # Reading --------------------------------------------------------------------------

    def _job_query(self) -> Any:
        return select(Job).options(selectinload(Job.received), selectinload(Job.deliveries))

    def get_job(self, job_id: str) -> JobInfo | None:
        with self._read() as s:
            job = s.scalars(self._job_query().where(Job.id == job_id)).first()
            return _job_info(job) if job else None

    def require_job(self, job_id: str) -> JobInfo:
        info = self.get_job(job_id)
        if info is None:
            raise JobNotFoundError(f"no job {job_id}")
        return info

    def get_job_by_source(self, source_id: str) -> JobInfo | None:
        with self._read() as s:
            job = s.scalars(self._job_query().where(Job.source_id == source_id)).first()
            return _job_info(job) if job else None

    def list_jobs(self, *, state: str | None = None, route: str | None = None,
                  source_id: str | None = None, limit: int = 50,
                  offset: int = 0) -> list[JobInfo]:
        """Newest first."""
        q = where_given(self._job_query(), state=state, route=route, source_id=source_id)
        q = q.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
        with self._read() as s:
            return [_job_info(j) for j in s.scalars(q)]

    def count_jobs(self, *, state: str | None = None, route: str | None = None) -> int:
        q = where_given(select(func.count()).select_from(Job), state=state, route=route)
        with self._read() as s:
            return int(s.scalar(q) or 0)

    def wait_for_job(self, job_id: str, timeout_s: float) -> JobInfo:
        """Poll until the job is done, failed or dead, or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.require_job(job_id)
            if info.terminal or time.monotonic() >= deadline:
                return info
            time.sleep(min(WAIT_POLL_SECONDS, max(0.0, deadline - time.monotonic())))

    def get_source(self, job_id: str) -> SourceMeta:
        with self._read() as s:
            meta = s.scalar(select(ReceivedObject.source_meta)
                            .join(Job, Job.received_id == ReceivedObject.id)
                            .where(Job.id == job_id))
        if meta is None:
            raise JobNotFoundError(f"no job {job_id}")
        return SourceMeta.from_dict(meta)

    def source_path(self, job_id: str) -> Path:
        with self._read() as s:
            rel = s.scalar(select(ReceivedObject.spool_path)
                           .join(Job, Job.received_id == ReceivedObject.id)
                           .where(Job.id == job_id))
        if rel is None:
            raise JobNotFoundError(f"no job {job_id}")
        return self.spool.path(rel)

    def result_dir(self, job_id: str) -> Path:
        return self.results_root / job_id

    def output_path(self, job_id: str, kind: str) -> Path | None:
        """The file holding output ``kind`` of a finished job, if it was produced."""
        from service.outputs import OUTPUT_FILES

        name = OUTPUT_FILES.get(kind)
        if name is None:
            raise ValueError(f"unknown output kind {kind!r}")
        p = self.result_dir(job_id) / name
        return p if p.is_file() else None

    def read_fhir_bundle(self, job_id: str) -> dict[str, Any] | None:
        p = self.output_path(job_id, "fhir")
        if p is None:
            return None
        data: dict[str, Any] = json.loads(p.read_text())
        return data

    # Workers: jobs --------------------------------------------------------------------

    def claim_jobs(self, owner: str, limit: int, lease_s: float) -> list[ClaimedJob]:
        """Lease up to ``limit`` due jobs (queued and due, or running with an expired lease).

        PostgreSQL: ``FOR UPDATE SKIP LOCKED``; SQLite: the ``BEGIN IMMEDIATE`` transaction.
        A job whose lease expired after its last allowed attempt goes to ``dead``.
        """
        now = utcnow()
        due = or_(
            and_(Job.state == JobState.QUEUED, Job.next_try_at <= now),
            and_(Job.state == JobState.RUNNING, Job.lease_expires_at < now),
        )
        q = select(Job).where(due).order_by(Job.next_try_at).limit(limit)
        if self.is_postgres:
            q = q.with_for_update(skip_locked=True)
        claimed: list[ClaimedJob] = []
        with self.transaction() as s:
            for job in s.scalars(q).all():
                if job.state == JobState.RUNNING and job.attempts >= self.settings.max_attempts:
                    self._to_dead(s, job, "worker lost (lease expired) on the last attempt", now)
                    continue
                if job.state == JobState.RUNNING:
                    log.warning("re-claiming a job whose lease expired",
                                extra={"job_id": job.id, "source_uid": job.source_id})
                token = new_id()
                job.state = JobState.RUNNING
                job.attempts += 1
                job.lease_owner = owner
                job.lease_token = token
                job.lease_expires_at = now + timedelta(seconds=lease_s)
                job.heartbeat_at = now
                job.started_at = now
                job.updated_at = now
                rec = s.get(ReceivedObject, job.received_id)
                assert rec is not None
                claimed.append(ClaimedJob(
                    id=job.id, lease_token=token, attempt=job.attempts, route=job.route,
                    source_id=job.source_id, media_type=rec.media_type,
                    spool_path=self.spool.path(rec.spool_path),
                    source=SourceMeta.from_dict(rec.source_meta), params=dict(job.params or {}),
                ))
        return claimed

    def extend_leases(self, *, jobs: Sequence[tuple[str, str]] = (),
                      deliveries: Sequence[tuple[str, str]] = (),
                      lease_s: float) -> set[str]:
        """Heartbeat: push the leases (id, token) forward; returns the ids no longer held."""
        now = utcnow()
        until = now + timedelta(seconds=lease_s)
        lost: set[str] = set()
        with self.transaction() as s:
            for job_id, token in jobs:
                res = s.execute(update(Job).where(
                    Job.id == job_id, Job.lease_token == token, Job.state == JobState.RUNNING,
                ).values(lease_expires_at=until, heartbeat_at=now))
                if getattr(res, "rowcount", 0) == 0:
                    lost.add(job_id)
            for d_id, token in deliveries:
                res = s.execute(update(Delivery).where(
                    Delivery.id == d_id, Delivery.lease_token == token,
                    Delivery.state == DeliveryState.SENDING,
                ).values(lease_expires_at=until))
                if getattr(res, "rowcount", 0) == 0:
                    lost.add(d_id)
        return lost

    def _held(self, s: Session, claim: ClaimedJob) -> Job | None:
        q = select(Job).where(Job.id == claim.id)
        if self.is_postgres:
            q = q.with_for_update()
        job = s.scalars(q).first()
        if job is None or job.state != JobState.RUNNING or job.lease_token != claim.lease_token:
            log.warning("lease lost; discarding this worker's result",
                        extra={"job_id": claim.id, "source_uid": claim.source_id})
            return None
        return job

    def complete_job(self, claim: ClaimedJob, *, staging_dir: Path | None, outputs: list[str],
                     pages: int, engine: str | None, detail: dict[str, Any] | None = None,
                     owner: str | None = None) -> bool:
        """Install the results, mark the job done and queue one delivery per configured
        destination, atomically. False when the lease was lost (someone else owns it)."""
        now = utcnow()
        with self.transaction() as s:
            job = self._held(s, claim)
            if job is None:
                if staging_dir is not None:
                    shutil.rmtree(staging_dir, ignore_errors=True)
                return False
            if staging_dir is not None:
                self._install_results(staging_dir, self.result_dir(job.id), claim.lease_token)
            job.state = JobState.DONE
            job.error = None
            job.outputs = outputs
            job.pages = pages
            job.engine = engine
            job.finished_at = now
            job.updated_at = now
            _drop_lease(job)
            existing = {d.destination for d in job.deliveries}
            for dest in self.settings.destinations():
                if dest.name in existing:
                    continue
                s.add(Delivery(
                    id=new_id(), job_id=job.id, destination=dest.name, kind=dest.kind,
                    state=DeliveryState.PENDING, attempts=0, next_try_at=now,
                    created_at=now, updated_at=now,
                ))
            audit.record(s, audit.Action.DIGITIZED, actor=owner or audit.SYSTEM_ACTOR,
                         route=job.route, job_id=job.id, source_id=job.source_id,
                         detail={"outputs": outputs, "pages": pages, "engine": engine,
                                 **(detail or {})}, at=now)
        return True

    @staticmethod
    def _install_results(staging: Path, final: Path, token: str) -> None:
        old = final.with_name(f".{final.name}.old-{token}")
        if final.exists():
            final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def fail_job(self, claim: ClaimedJob, error: str, *, permanent: bool,
                 owner: str | None = None) -> str | None:
        """Record a failed attempt. Permanent -> ``failed``; otherwise ``queued`` with a
        backoff, or ``dead`` after ``max_attempts``. Returns the new state (None: lease lost)."""
        now = utcnow()
        with self.transaction() as s:
            job = self._held(s, claim)
            if job is None:
                return None
            job.error = error
            job.updated_at = now
            _drop_lease(job)
            actor = owner or audit.SYSTEM_ACTOR
            if permanent:
                job.state = JobState.FAILED
                job.finished_at = now
                audit.record(s, audit.Action.FAILED, actor=actor, outcome="failure",
                             route=job.route, job_id=job.id, source_id=job.source_id,
                             detail={"error": error, "attempt": job.attempts}, at=now)
            elif job.attempts >= self.settings.max_attempts:
                self._to_dead(s, job, error, now, actor=actor)
            else:
                delay = backoff_seconds(job.attempts, self.settings.backoff_base_seconds,
                                        self.settings.backoff_max_seconds)
                job.state = JobState.QUEUED
                job.next_try_at = now + timedelta(seconds=delay)
                audit.record(s, audit.Action.RETRY_SCHEDULED, actor=actor, outcome="failure",
                             route=job.route, job_id=job.id, source_id=job.source_id,
                             detail={"error": error, "attempt": job.attempts,
                                     "retry_in_s": round(delay, 1)}, at=now)
            return job.state

    @staticmethod
    def _to_dead(s: Session, job: Job, error: str, now: datetime,
                 actor: str = audit.SYSTEM_ACTOR) -> None:
        job.state = JobState.DEAD
        job.error = error
        job.finished_at = now
        job.updated_at = now
        _drop_lease(job)
        audit.record(s, audit.Action.DEAD, actor=actor, outcome="failure", route=job.route,
                     job_id=job.id, source_id=job.source_id,
                     detail={"error": error, "attempts": job.attempts}, at=now)

    def release_job(self, claim: ClaimedJob) -> bool:
        """Give a claimed job back unprocessed (shutdown); the attempt does not count."""
        now = utcnow()
        with self.transaction() as s:
            job = self._held(s, claim)
            if job is None:
                return False
            job.state = JobState.QUEUED
            job.attempts = max(0, job.attempts - 1)
            job.next_try_at = now
            job.updated_at = now
            _drop_lease(job)
            return True

    def release_owner(self, owner: str) -> int:
        """Give back every job and delivery leased by ``owner`` (a worker that was stopped
        for good); their attempts still count."""
        now = utcnow()
        with self.transaction() as s:
            n = s.execute(update(Job).where(Job.lease_owner == owner,
                                            Job.state == JobState.RUNNING).values(
                state=JobState.QUEUED, next_try_at=now, updated_at=now, lease_owner=None,
                lease_token=None, lease_expires_at=None))
            m = s.execute(update(Delivery).where(Delivery.lease_owner == owner,
                                                 Delivery.state == DeliveryState.SENDING).values(
                state=DeliveryState.FAILED, next_try_at=now, updated_at=now, lease_owner=None,
                lease_token=None, lease_expires_at=None))
            return int(getattr(n, "rowcount", 0) or 0) + int(getattr(m, "rowcount", 0) or 0)

    # Workers: deliveries --------------------------------------------------------------

    def claim_deliveries(self, owner: str, limit: int, lease_s: float) -> list[DeliveryTask]:
        now = utcnow()
        due = or_(
            and_(Delivery.state.in_((DeliveryState.PENDING, DeliveryState.FAILED)),
                 Delivery.next_try_at <= now),
            and_(Delivery.state == DeliveryState.SENDING, Delivery.lease_expires_at < now),
        )
        q = select(Delivery).where(due).order_by(Delivery.next_try_at).limit(limit)
        if self.is_postgres:
            q = q.with_for_update(skip_locked=True)
        tasks: list[DeliveryTask] = []
        with self.transaction() as s:
            for d in s.scalars(q).all():
                source_id = s.scalar(select(Job.source_id).where(Job.id == d.job_id)) or ""
                if (d.state == DeliveryState.SENDING
                        and d.attempts >= self.settings.delivery_max_attempts):
                    self._delivery_dead(s, d, source_id, "worker lost during the last attempt",
                                        now)
                    continue
                token = new_id()
                d.state = DeliveryState.SENDING
                d.attempts += 1
                d.lease_owner = owner
                d.lease_token = token
                d.lease_expires_at = now + timedelta(seconds=lease_s)
                d.updated_at = now
                tasks.append(DeliveryTask(id=d.id, job_id=d.job_id, destination=d.destination,
                                          kind=d.kind, attempt=d.attempts, source_id=source_id,
                                          lease_token=token))
        return tasks

    def _held_delivery(self, s: Session, task: DeliveryTask) -> Delivery | None:
        q = select(Delivery).where(Delivery.id == task.id)
        if self.is_postgres:
            q = q.with_for_update()
        d = s.scalars(q).first()
        if d is None or d.state != DeliveryState.SENDING or d.lease_token != task.lease_token:
            log.warning("delivery lease lost", extra={"job_id": task.job_id,
                                                      "delivery_id": task.id})
            return None
        return d

    def finish_delivery(self, task: DeliveryTask, *, remote_id: str | None = None,
                        owner: str | None = None) -> bool:
        now = utcnow()
        with self.transaction() as s:
            d = self._held_delivery(s, task)
            if d is None:
                return False
            d.state = DeliveryState.DONE
            d.remote_id = remote_id
            d.last_error = None
            d.delivered_at = now
            d.updated_at = now
            _drop_lease(d)
            audit.record(s, audit.Action.DELIVERED, actor=owner or audit.SYSTEM_ACTOR,
                         job_id=d.job_id, source_id=task.source_id, destination=d.destination,
                         detail={"kind": d.kind, "remote_id": remote_id,
                                 "attempt": d.attempts}, at=now)
            return True

    def fail_delivery(self, task: DeliveryTask, error: str, *, permanent: bool,
                      owner: str | None = None) -> str | None:
        now = utcnow()
        with self.transaction() as s:
            d = self._held_delivery(s, task)
            if d is None:
                return None
            _drop_lease(d)
            d.updated_at = now
            if permanent or d.attempts >= self.settings.delivery_max_attempts:
                self._delivery_dead(s, d, task.source_id, error, now,
                                    actor=owner or audit.SYSTEM_ACTOR)
            else:
                delay = backoff_seconds(d.attempts, self.settings.backoff_base_seconds,
                                        self.settings.backoff_max_seconds)
                d.state = DeliveryState.FAILED
                d.last_error = error
                d.next_try_at = now + timedelta(seconds=delay)
                audit.record(s, audit.Action.DELIVERY_FAILED, actor=owner or audit.SYSTEM_ACTOR,
                             outcome="failure", job_id=d.job_id, source_id=task.source_id,
                             destination=d.destination,
                             detail={"error": error, "attempt": d.attempts,
                                     "retry_in_s": round(delay, 1)}, at=now)
            return d.state

    @staticmethod
    def _delivery_dead(s: Session, d: Delivery, source_id: str, error: str, now: datetime,
                       actor: str = audit.SYSTEM_ACTOR) -> None:
        d.state = DeliveryState.DEAD
        d.last_error = error
        d.updated_at = now
        _drop_lease(d)
        audit.record(s, audit.Action.DELIVERY_DEAD, actor=actor, outcome="failure",
                     job_id=d.job_id, source_id=source_id, destination=d.destination,
                     detail={"error": error, "attempts": d.attempts}, at=now)

    def release_delivery(self, task: DeliveryTask) -> bool:
        now = utcnow()
        with self.transaction() as s:
            d = self._held_delivery(s, task)
            if d is None:
                return False
            d.state = DeliveryState.PENDING if d.attempts <= 1 else DeliveryState.FAILED
            d.attempts = max(0, d.attempts - 1)
            d.next_try_at = now
            d.updated_at = now
            _drop_lease(d)
            return True

    # Operators ------------------------------------------------------------------------

    def retry_job(self, job_id: str, *, actor: str) -> JobInfo:
        """Re-queue a failed or dead job; for a done job, re-queue its dead or failed
        deliveries. Raises JobStateError when there is nothing to retry."""
        now = utcnow()
        with self.transaction() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise JobNotFoundError(f"no job {job_id}")
            if job.purged_at is not None:
                raise JobStateError("the job's files were purged by retention")
            if job.state in (JobState.FAILED, JobState.DEAD):
                self._requeue(s, job, actor, now)
            else:
                redo = [d for d in job.deliveries
                        if d.state in (DeliveryState.DEAD, DeliveryState.FAILED)]
                if not redo:
                    raise JobStateError(f"job is {job.state}; nothing to retry")
                for d in redo:
                    self._requeue_delivery(s, d, job.source_id, actor, now)
        return self.require_job(job_id)

    def retry_delivery(self, delivery_id: str, *, actor: str) -> DeliveryInfo:
        now = utcnow()
        with self.transaction() as s:
            d = s.get(Delivery, delivery_id)
            if d is None:
                raise JobNotFoundError(f"no delivery {delivery_id}")
            if d.state not in (DeliveryState.DEAD, DeliveryState.FAILED):
                raise JobStateError(f"delivery is {d.state}; nothing to retry")
            self._requeue_delivery(s, d, d.job.source_id, actor, now)
            return _delivery_info(d)

    def retry_all_dead(self, *, actor: str) -> tuple[int, int]:
        now = utcnow()
        with self.transaction() as s:
            jobs = s.scalars(select(Job).where(Job.state == JobState.DEAD,
                                               Job.purged_at.is_(None))).all()
            for job in jobs:
                self._requeue(s, job, actor, now)
            dels = s.scalars(select(Delivery).where(Delivery.state == DeliveryState.DEAD)).all()
            for d in dels:
                self._requeue_delivery(s, d, d.job.source_id, actor, now)
            return len(jobs), len(dels)

    @staticmethod
    def _requeue(s: Session, job: Job, actor: str, now: datetime) -> None:
        prev = job.state
        job.state = JobState.QUEUED
        job.attempts = 0
        job.next_try_at = now
        job.finished_at = None
        job.updated_at = now
        audit.record(s, audit.Action.RETRIED, actor=actor, route=job.route, job_id=job.id,
                     source_id=job.source_id, detail={"from": prev, "error": job.error}, at=now)
        job.error = None

    @staticmethod
    def _requeue_delivery(s: Session, d: Delivery, source_id: str, actor: str,
                          now: datetime) -> None:
        prev = d.state
        d.state = DeliveryState.PENDING
        d.attempts = 0
        d.next_try_at = now
        d.updated_at = now
        audit.record(s, audit.Action.DELIVERY_RETRIED, actor=actor, job_id=d.job_id,
                     source_id=source_id, destination=d.destination,
                     detail={"from": prev, "error": d.last_error}, at=now)

    # Statistics -----------------------------------------------------------------------

    def queue_stats(self) -> QueueStats:
        with self._read() as s:
            jobs = {(r, st): int(n) for r, st, n in s.execute(
                select(Job.route, Job.state, func.count()).group_by(Job.route, Job.state))}
            dels = {(d, k, st): int(n) for d, k, st, n in s.execute(
                select(Delivery.destination, Delivery.kind, Delivery.state, func.count())
                .group_by(Delivery.destination, Delivery.kind, Delivery.state))}
            oldest = s.scalar(select(func.min(Job.created_at)).where(
                Job.state.in_((JobState.QUEUED, JobState.RUNNING))))
        return QueueStats(jobs=jobs, deliveries=dels, oldest_pending_at=oldest)

    def audit_events(self, *, job_id: str | None = None, action: str | None = None,
                     actor: str | None = None, since: datetime | None = None,
                     until: datetime | None = None, limit: int = 100,
                     offset: int = 0) -> list[audit.AuditRecord]:
        """Audit events, oldest first."""
        q = audit.query(job_id=job_id, action=action, actor=actor, since=since, until=until)
        q = q.order_by(AuditEvent.id).limit(limit).offset(offset)
        with self._read() as s:
            return [audit.to_record(r) for r in s.scalars(q)]

    def ping(self) -> None:
        """Raise when the database cannot be reached."""
        with self._read() as s:
            s.execute(select(1))
