"""Retention: remove spool files and result folders older than ``retention_days``.

Only finished jobs are purged (done, failed or dead, finished before the cutoff) and only
when none of their deliveries is still pending — nothing in flight is ever removed. The
database rows stay (marked ``purged_at``) so the audit trail and the job history survive;
each run is recorded in ``purges`` and each job gets a ``purged`` audit event.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import exists, select

from service import audit
from service.db.models import (
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Purge,
    ReceivedObject,
)
from service.store import JobStore

log = logging.getLogger(__name__)

BATCH = 500
STALE_STAGING_S = 24 * 3600.0


@dataclass
class PurgeReport:
    cutoff: datetime | None
    jobs: int = 0
    spool_files: int = 0
    result_dirs: int = 0
    bytes_freed: int = 0


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def purge(store: JobStore, *, now: datetime | None = None) -> PurgeReport:
    """Purge what is past retention; returns what was removed (also recorded in the DB)."""
    days = store.settings.retention_days
    if days <= 0:
        return PurgeReport(cutoff=None)
    started = now or datetime.now(UTC)
    cutoff = started - timedelta(days=days)
    report = PurgeReport(cutoff=cutoff)
    in_flight = exists().where(Delivery.job_id == Job.id,
                               Delivery.state.not_in(DeliveryState.TERMINAL))
    q = (select(Job, ReceivedObject).join(ReceivedObject, Job.received_id == ReceivedObject.id)
         .where(Job.purged_at.is_(None), Job.state.in_(JobState.TERMINAL),
                Job.finished_at < cutoff, ~in_flight)
         .limit(BATCH))
    while True:
        with store.transaction() as s:
            rows = s.execute(q).all()
            for job, rec in rows:
                spooled = store.spool.path(rec.spool_path)
                if spooled.exists():
                    report.spool_files += 1
                freed = store.spool.remove(rec.spool_path)
                result = store.result_dir(job.id)
                if result.exists():
                    freed += _tree_size(result)
                    shutil.rmtree(result, ignore_errors=True)
                    report.result_dirs += 1
                report.bytes_freed += freed
                job.purged_at = rec.purged_at = datetime.now(UTC)
                audit.record(s, audit.Action.PURGED, actor=audit.SYSTEM_ACTOR, route=job.route,
                             job_id=job.id, source_id=job.source_id,
                             detail={"bytes": freed, "retention_days": days})
            report.jobs += len(rows)
        if len(rows) < BATCH:
            break
    _clean_staging(store)
    with store.transaction() as s:
        s.add(Purge(started_at=started, finished_at=datetime.now(UTC), cutoff=cutoff,
                    jobs=report.jobs, spool_files=report.spool_files,
                    result_dirs=report.result_dirs, bytes_freed=report.bytes_freed))
    if report.jobs:
        log.info("retention purged %d jobs, %d bytes", report.jobs, report.bytes_freed)
    return report


def _clean_staging(store: JobStore) -> None:
    """Remove staging folders a crashed worker left behind, and half-received files (a
    listener or upload killed mid-transfer) in the spool's ``tmp/``."""
    from service.spool import TMP_DIR
    from service.workers import STAGING_DIR

    limit = time.time() - STALE_STAGING_S
    for root in (store.results_root / STAGING_DIR, store.spool.root / TMP_DIR):
        if not root.is_dir():
            continue
        for p in root.iterdir():
            try:
                if p.stat().st_mtime >= limit:
                    continue
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink()
            except FileNotFoundError:  # another node cleaned it first
                continue
