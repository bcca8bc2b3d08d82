"""Several ``cardioscan worker`` processes on PostgreSQL: exactly-once, and kill -9 mid-job.

Each worker is a real ``cardioscan worker`` command (its own process group: supervisor,
worker process, digitizer child) sharing the spool and results folders, as worker nodes on
a shared volume would. The stand-in digitizer logs every start and end, so the tests can
count how often each picture was digitized.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_support import (
    SLOW,
    cardioscan,
    log_counts,
    page_png,
    postgres_available,
    postgres_database,
    settings_env,
    wait_for,
)

from adapters.source import SourceMeta
from service.config import load_settings
from service.store import JobStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def pg_url() -> Iterator[str]:
    if not postgres_available():
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    with postgres_database() as url:
        yield url


def accept(store: JobStore, ident: int, behaviour: int = 0) -> str:
    data = page_png(ident, behaviour)
    source = SourceMeta(route="dicom", source_id="sha256:" + hashlib.sha256(data).hexdigest(),
                        media_type="image/png", caller="TEST_SCU")
    return store.accept(data, source).job_id


def stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    """SIGTERM (graceful) and expect a clean exit."""
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(30)
    except subprocess.TimeoutExpired as exc:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"worker did not stop:\n{log.read_text()[-3000:]}") from exc
    assert code == 0, log.read_text()[-3000:]


def test_200_jobs_on_three_workers_each_digitized_exactly_once(pg_url: str,
                                                              tmp_path: Path) -> None:
    data = tmp_path / "var"
    fake_log = tmp_path / "fake.log"
    env = settings_env(data, database_url=pg_url, outputs='["json"]', batch_size=4,
                       workers=1, lease_seconds=20)
    env["CARDIOSCAN_FAKE_LOG"] = str(fake_log)
    store = JobStore(load_settings(data_dir=data, database_url=pg_url,
                                   spool_min_free_bytes=0))
    try:
        ids = [accept(store, i) for i in range(200)]
        logs = [tmp_path / f"worker{i}.log" for i in range(3)]
        procs = [cardioscan("worker", env=env, log_path=log) for log in logs]
        try:
            wait_for(lambda: store.count_jobs(state="done") == 200, 120, "200 jobs done",
                     interval=0.5)
        finally:
            for p, log in zip(procs, logs, strict=True):
                stop(p, log)
        starts = log_counts(fake_log, "start")
        assert starts == {i: 1 for i in range(200)}, "a picture was digitized twice or never"
        assert all(store.get_job(j).attempts == 1 for j in ids[:20])  # type: ignore[union-attr]
        digitized = store.audit_events(action="digitized", limit=1000)
        assert sorted(e.job_id or "" for e in digitized) == sorted(ids)
        owners = {e.actor for e in digitized}
        assert len(owners) >= 2, f"only {owners} did the work"
        pids = {line.split()[2] for line in fake_log.read_text().splitlines()}
        assert len(pids) >= 2  # several digitizer processes
    finally:
        store.close()


def test_kill_9_of_a_worker_mid_job_completes_once_after_the_lease(pg_url: str,
                                                                   tmp_path: Path) -> None:
    data = tmp_path / "var"
    archive = tmp_path / "archive"
    fake_log = tmp_path / "fake.log"
    env = settings_env(data, database_url=pg_url, lease_seconds=2,
                       folders=f'[{{"name": "archive", "path": "{archive}"}}]')
    env.update(CARDIOSCAN_FAKE_LOG=str(fake_log), CARDIOSCAN_FAKE_SLEEP="2")
    store = JobStore(load_settings(data_dir=data, database_url=pg_url, spool_min_free_bytes=0))
    try:
        job_id = accept(store, 7, SLOW)
        first = cardioscan("worker", env=env, log_path=tmp_path / "a.log")
        wait_for(lambda: log_counts(fake_log, "start").get(7), 60, "the job to start")
        os.killpg(first.pid, signal.SIGKILL)  # the whole node: supervisor, worker, digitizer
        first.wait(10)
        held = store.get_job(job_id)
        assert held is not None and held.state == "running" and held.lease_owner
        second = cardioscan("worker", env=env, log_path=tmp_path / "b.log")
        try:
            wait_for(lambda: (j := store.get_job(job_id)) and j.state == "done"
                     and j.deliveries and j.deliveries[0].state == "done", 60,
                     "the job to be done and delivered")
        finally:
            stop(second, tmp_path / "b.log")
        job = store.get_job(job_id)
        assert job is not None and job.attempts == 2
        assert log_counts(fake_log, "start") == {7: 2}  # killed once, digitized once more
        assert log_counts(fake_log, "end") == {7: 1}
        assert len(store.audit_events(job_id=job_id, action="digitized")) == 1
        assert len(store.audit_events(job_id=job_id, action="delivered")) == 1
        assert job.lease_owner is None and held.lease_owner not in {
            e.actor for e in store.audit_events(job_id=job_id, action="digitized")}
        assert (archive / job_id / "result.json").exists()
        assert sorted(p.name for p in archive.iterdir()) == [job_id]
    finally:
        store.close()
