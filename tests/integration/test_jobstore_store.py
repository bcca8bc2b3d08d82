"""The job store on SQLite and on the PostgreSQL on loopback: intake, leases, outbox, retention."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from service_support import postgres_available, postgres_database
from sqlalchemy import func, select, update

from adapters.source import SourceMeta
from service.config import load_settings
from service.db.models import Delivery, Job, Purge
from service.delivery import Outbox, PermanentDeliveryError, register_sender
from service.errors import JobStateError, StoreFullError
from service.retention import purge
from service.store import ClaimedJob, DeliveryTask, JobStore, backoff_seconds

pytestmark = pytest.mark.integration

UID = "1.2.826.0.1.3680043.8.498.{}"


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    if not postgres_available():
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    with postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty, migrated-or-not database of each kind (PostgreSQL: one per module, emptied)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    url: str = request.getfixturevalue("pg_url")
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('jobs')").fetchone() != (None,):
            conn.execute("TRUNCATE received_objects, jobs, deliveries, audit_events, purges "
                         "RESTART IDENTITY CASCADE")
    return url


def open_store(db_url: str, tmp_path: Path, **overrides: Any) -> JobStore:
    settings = load_settings(data_dir=tmp_path / "var", database_url=db_url,
                             spool_min_free_bytes=0, backoff_base_seconds=0,
                             **overrides)
    return JobStore(settings)


@pytest.fixture
def store(db_url: str, tmp_path: Path) -> Iterator[JobStore]:
    s = open_store(db_url, tmp_path, max_attempts=2, delivery_max_attempts=2,
                   folders=[{"name": "archive", "path": str(tmp_path / "archive")}])
    yield s
    s.close()


def src(n: int, **kw: Any) -> SourceMeta:
    return SourceMeta(route="dicom", source_id=UID.format(n), media_type="application/dicom",
                      caller="MODALITY", **kw)


def test_accept_is_durable_and_idempotent(store: JobStore) -> None:
    first = store.accept(b"DICM-ish payload", src(1, patient_name="Doe^Jane"))
    again = store.accept(b"DICM-ish payload", src(1))
    assert not first.duplicate and again.duplicate
    assert (again.job_id, again.received_id) == (first.job_id, first.received_id)
    path = store.source_path(first.job_id)
    assert path.read_bytes() == b"DICM-ish payload" and path.suffix == ".dcm"
    assert store.get_source(first.job_id).patient_name == "Doe^Jane"
    info = store.get_job(first.job_id)
    assert info is not None and info.state == "queued" and info.size_bytes == 16
    assert store.count_jobs() == 1


def test_accept_path_moves_a_streamed_file_in(store: JobStore) -> None:
    tmp = store.spool_tempfile()
    tmp.write_bytes(b"x" * 100_000)
    res = store.accept_path(tmp, src(2))
    assert not tmp.exists() and store.source_path(res.job_id).stat().st_size == 100_000
    dup = store.spool_tempfile()
    dup.write_bytes(b"x" * 10)
    assert store.accept_path(dup, src(2)).duplicate and not dup.exists()


def test_concurrent_duplicates_make_one_job(store: JobStore) -> None:
    results = []

    def send() -> None:
        results.append(store.accept(b"same object", src(3)))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.job_id for r in results}) == 1
    assert sum(not r.duplicate for r in results) == 1
    assert store.count_jobs() == 1
    spooled = [p for p in store.spool.root.rglob("*") if p.is_file()]
    assert len(spooled) == 1  # the losers' files were removed


def test_full_disk_refuses_and_keeps_nothing(store: JobStore,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(StoreFullError):
        store.accept(b"payload", src(4))
    monkeypatch.undo()
    store.spool.min_free_bytes = 1 << 60  # the free-space floor
    with pytest.raises(StoreFullError):
        store.accept(b"payload", src(4))
    assert store.count_jobs() == 0
    assert not [p for p in store.spool.root.rglob("*") if p.is_file()]


def claim_one(store: JobStore, owner: str, lease: float = 30) -> ClaimedJob:
    claims = store.claim_jobs(owner, 1, lease)
    assert len(claims) == 1
    return claims[0]


def test_a_claim_is_exclusive_until_the_lease_expires(store: JobStore, tmp_path: Path) -> None:
    job_id = store.accept(b"a", src(5)).job_id
    a = claim_one(store, "worker-a", lease=0.5)
    assert store.claim_jobs("worker-b", 5, 30) == []
    time.sleep(0.6)
    b = claim_one(store, "worker-b")
    assert (b.id, b.attempt) == (job_id, 2)
    # the first worker wakes up: its lease is gone, so it cannot finish or fail the job
    staging = tmp_path / "stale"
    staging.mkdir()
    assert store.extend_leases(jobs=[(a.id, a.lease_token)], lease_s=30) == {a.id}
    assert not store.complete_job(a, staging_dir=staging, outputs=[], pages=1, engine="x")
    assert not staging.exists()
    assert store.fail_job(a, "late", permanent=True) is None
    assert store.complete_job(b, staging_dir=None, outputs=[], pages=1, engine="x")
    assert store.get_job(job_id).state == "done"  # type: ignore[union-attr]
    assert len(store.audit_events(job_id=job_id, action="digitized")) == 1


def test_heartbeat_keeps_a_lease(store: JobStore) -> None:
    store.accept(b"b", src(6))
    a = claim_one(store, "worker-a", lease=0.6)
    for _ in range(3):
        time.sleep(0.3)
        assert store.extend_leases(jobs=[(a.id, a.lease_token)], lease_s=0.6) == set()
    assert store.claim_jobs("worker-b", 1, 30) == []


def test_retries_back_off_then_go_dead(store: JobStore) -> None:
    job_id = store.accept(b"c", src(7)).job_id
    a = claim_one(store, "w")
    assert store.fail_job(a, "flaky", permanent=False) == "queued"
    b = claim_one(store, "w")
    assert store.fail_job(b, "flaky again", permanent=False) == "dead"  # max_attempts=2
    info = store.retry_job(job_id, actor="operator")
    assert (info.state, info.attempts, info.error) == ("queued", 0, None)
    c = claim_one(store, "w")
    assert store.fail_job(c, "no ECG grid found", permanent=True) == "failed"
    with pytest.raises(JobStateError):
        store.retry_job(store.accept(b"d", src(8)).job_id, actor="operator")  # queued


def test_a_dead_workers_last_attempt_goes_dead(store: JobStore) -> None:
    job_id = store.accept(b"e", src(9)).job_id
    claim_one(store, "w", lease=0.01)
    time.sleep(0.05)
    claim_one(store, "w", lease=0.01)  # attempt 2 of 2
    time.sleep(0.05)
    assert store.claim_jobs("w", 1, 30) == []
    info = store.get_job(job_id)
    assert info is not None and info.state == "dead" and "lease expired" in (info.error or "")


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    delays = [backoff_seconds(n, 2.0, 60.0) for n in (1, 2, 3, 4, 10)]
    assert 1.0 <= delays[0] <= 2.0 and 2.0 <= delays[1] <= 4.0 and 4.0 <= delays[2] <= 8.0
    assert 30.0 <= delays[4] <= 60.0
    assert len({backoff_seconds(3, 2.0, 60.0) for _ in range(20)}) > 1


def test_release_gives_back_without_counting(store: JobStore) -> None:
    job_id = store.accept(b"f", src(10)).job_id
    a = claim_one(store, "w")
    assert store.release_job(a)
    b = claim_one(store, "w2")
    assert b.attempt == 1 and b.id == job_id
    assert store.release_owner("w2") == 1
    assert claim_one(store, "w3").attempt == 2  # released by owner: the attempt counted


def finish(store: JobStore, n: int, tmp_path: Path) -> str:
    job_id = store.accept(f"obj{n}".encode(), src(n)).job_id
    claim = claim_one(store, "w")
    staging = tmp_path / f"staging-{n}"
    staging.mkdir()
    (staging / "result.json").write_text("{}")
    assert store.complete_job(claim, staging_dir=staging, outputs=["json"], pages=1,
                              engine="x")
    return job_id


def test_done_job_has_its_outbox_and_results(store: JobStore, tmp_path: Path) -> None:
    job_id = finish(store, 11, tmp_path)
    info = store.get_job(job_id)
    assert info is not None and [(d.destination, d.kind, d.state) for d in info.deliveries] == [
        ("archive", "folder", "pending")]
    assert store.output_path(job_id, "json") is not None
    [task] = store.claim_deliveries("w", 10, 30)
    assert store.claim_deliveries("w2", 10, 30) == []  # leased
    assert Outbox(store.settings, store, owner="w").deliver(task) == "done"
    copied = tmp_path / "archive" / job_id
    assert (copied / "result.json").exists() and (copied / "manifest.json").exists()
    d = store.get_job(job_id).deliveries[0]  # type: ignore[union-attr]
    assert d.state == "done" and d.remote_id == str(copied)


class Flaky:
    calls = 0

    def __init__(self, permanent: bool) -> None:
        self.permanent = permanent

    def send(self, delivery: DeliveryTask, result_dir: Path) -> str | None:
        Flaky.calls += 1
        if self.permanent:
            raise PermanentDeliveryError("rejected: 400 Bad Request")
        raise ConnectionRefusedError("destination down")


@pytest.mark.parametrize("permanent", [False, True])
def test_failed_deliveries_retry_then_dead_letter(store: JobStore, tmp_path: Path,
                                                  permanent: bool) -> None:
    register_sender("folder", lambda settings, dest: Flaky(permanent))
    try:
        job_id = finish(store, 12, tmp_path)
        outbox = Outbox(store.settings, store, owner="w")
        states = []
        for _ in range(3):
            tasks = store.claim_deliveries("w", 10, 30)
            states += [outbox.deliver(t) for t in tasks]
        assert states == (["dead"] if permanent else ["failed", "dead"])
        d = store.get_job(job_id).deliveries[0]  # type: ignore[union-attr]
        assert d.state == "dead"
        assert d.last_error == ("rejected: 400 Bad Request" if permanent
                                else "ConnectionRefusedError: destination down")
        assert store.retry_all_dead(actor="operator") == (0, 1)
        assert store.get_job(job_id).deliveries[0].state == "pending"  # type: ignore[union-attr]
    finally:
        from service import delivery

        delivery._factories.clear()


def test_queue_stats(store: JobStore, tmp_path: Path) -> None:
    finish(store, 13, tmp_path)
    store.accept(b"q", src(14))
    stats = store.queue_stats()
    assert stats.jobs == {("dicom", "done"): 1, ("dicom", "queued"): 1}
    assert stats.deliveries == {("archive", "folder", "pending"): 1}
    assert stats.oldest_pending_at is not None
    assert datetime.now(UTC) - stats.oldest_pending_at < timedelta(minutes=1)


def test_retention_purges_only_what_is_finished(store: JobStore, tmp_path: Path) -> None:
    old_done = finish(store, 15, tmp_path)
    [task] = store.claim_deliveries("w", 10, 30)
    Outbox(store.settings, store, owner="w").deliver(task)
    pending = finish(store, 17, tmp_path)  # delivery still pending: kept
    old_queued = store.accept(b"still waiting", src(16)).job_id
    long_ago = datetime.now(UTC) - timedelta(days=40)
    with store.transaction() as s:
        s.execute(update(Job).values(finished_at=long_ago, created_at=long_ago))
    report = purge(store)
    assert report.jobs == 1 and report.spool_files == 1 and report.result_dirs == 1
    assert report.bytes_freed > 0
    assert not store.source_path(old_done).exists() and not store.result_dir(old_done).exists()
    assert store.source_path(old_queued).exists() and store.result_dir(pending).exists()
    assert store.get_job(old_done).purged_at is not None  # type: ignore[union-attr]
    with store.transaction() as s:
        assert s.scalar(select(func.count()).select_from(Purge)) == 1
        assert s.scalar(select(func.count()).select_from(Delivery)) == 2
    assert [e.action for e in store.audit_events(job_id=old_done)][-1] == "purged"
    assert purge(store).jobs == 0
    with pytest.raises(JobStateError):
        store.retry_job(old_done, actor="operator")


def test_retention_removes_stale_half_received_files(store: JobStore) -> None:
    tmp = store.spool.root / "tmp"
    stale, fresh = tmp / "dicom-abandoned.dcm", tmp / "dicom-arriving.dcm"
    stale.write_bytes(b"half a data set")
    fresh.write_bytes(b"still arriving")
    two_days_ago = time.time() - 2 * 86400
    os.utime(stale, (two_days_ago, two_days_ago))
    purge(store)
    assert not stale.exists() and fresh.exists()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_migrations_run_once_for_concurrent_starters(kind: str, tmp_path: Path) -> None:
    if kind == "postgresql" and not postgres_available():
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    errors: list[BaseException] = []
    with (postgres_database() if kind == "postgresql"
          else contextlib.nullcontext(f"sqlite:///{tmp_path / 'fresh.db'}")) as url:

        def start() -> None:
            try:
                open_store(url, tmp_path).close()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=start) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        store = open_store(url, tmp_path)
        assert store.accept(b"ok", src(99)).duplicate is False
        store.close()
