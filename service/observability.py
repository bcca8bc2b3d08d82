"""Metrics and logs.

Metrics (Prometheus). Event counters and the digitization histogram live in the process
that sees the event (API/listener process, worker processes); ``serve`` and ``worker`` set
``PROMETHEUS_MULTIPROC_DIR`` before anything imports prometheus_client, so one scrape of
the node sums them over its processes. Queue gauges (depth, oldest job, jobs and deliveries
by state) are read from the database at scrape time, so every node reports the same truth.
GPU use comes from ``nvidia-smi`` when there is one.

Logs: one JSON object per line with ``job_id`` and ``source_uid`` (a SOP Instance UID or a
``sha256:`` digest) and a fixed allow-list of other fields. Patient data never reaches a log
record: nothing outside the allow-list is emitted, and messages are written to name ids only.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector

if TYPE_CHECKING:
    from service.config import Settings
    from service.store import JobStore

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

RECEIVED = Counter("cardioscan_received", "Objects accepted into the store", ["route"])
DUPLICATES = Counter("cardioscan_duplicates", "Objects received again (not re-digitized)",
                     ["route"])
SUCCEEDED = Counter("cardioscan_jobs_succeeded", "Jobs digitized", ["route"])
FAILED = Counter("cardioscan_jobs_failed", "Jobs failed for good (e.g. no ECG)", ["route"])
RETRIED = Counter("cardioscan_jobs_retried", "Job attempts failed and rescheduled", ["route"])
DEAD = Counter("cardioscan_jobs_dead", "Jobs dead after their last attempt", ["route"])
DIGITIZATION_SECONDS = Histogram(
    "cardioscan_digitization_seconds", "Seconds per page, by pipeline stage", ["stage"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120),
)
DELIVERY_ATTEMPTS = Counter("cardioscan_delivery_attempts", "Delivery attempts",
                            ["destination", "kind"])
DELIVERY_FAILURES = Counter("cardioscan_delivery_failures", "Failed delivery attempts",
                            ["destination", "kind", "reason"])


def observe_stages(stage_seconds: dict[str, float], total: float | None = None) -> None:
    for stage, seconds in stage_seconds.items():
        DIGITIZATION_SECONDS.labels(stage).observe(seconds)
    if total is not None:
        DIGITIZATION_SECONDS.labels("total").observe(total)


def mark_process_dead(pid: int) -> None:
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


class QueueCollector(Collector):
    """Queue gauges computed from the database at scrape time."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterable[Metric]:
        try:
            stats = self.store.queue_stats()
        except Exception:  # a scrape must not fail because the DB blinked
            up = GaugeMetricFamily("cardioscan_store_up", "Job store reachable")
            up.add_metric([], 0)
            yield up
            return
        up = GaugeMetricFamily("cardioscan_store_up", "Job store reachable")
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily("cardioscan_jobs", "Jobs by route and state",
                                 labels=["route", "state"])
        for (route, state), n in sorted(stats.jobs.items()):
            jobs.add_metric([route, state], n)
        yield jobs
        depth = GaugeMetricFamily("cardioscan_queue_depth", "Jobs queued or running")
        depth.add_metric([], stats.count("queued") + stats.count("running"))
        yield depth
        oldest = GaugeMetricFamily("cardioscan_oldest_job_age_seconds",
                                   "Age of the oldest queued or running job")
        age = 0.0
        if stats.oldest_pending_at is not None:
            age = max(0.0, (datetime.now(UTC) - stats.oldest_pending_at).total_seconds())
        oldest.add_metric([], age)
        yield oldest
        dels = GaugeMetricFamily("cardioscan_deliveries", "Deliveries by destination and state",
                                 labels=["destination", "kind", "state"])
        for (dest, kind, state), n in sorted(stats.deliveries.items()):
            dels.add_metric([dest, kind, state], n)
        yield dels


class GpuCollector(Collector):
    """Device-wide GPU utilisation and memory from ``nvidia-smi`` (no CUDA context here)."""

    QUERY = "index,utilization.gpu,memory.used,memory.total"

    def __init__(self) -> None:
        self.binary = shutil.which("nvidia-smi")

    def collect(self) -> Iterable[Metric]:
        if self.binary is None:
            return
        try:
            out = subprocess.run(
                [self.binary, f"--query-gpu={self.QUERY}", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=3, check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return
        util = GaugeMetricFamily("cardioscan_gpu_utilization_ratio", "GPU busy fraction",
                                 labels=["gpu"])
        used = GaugeMetricFamily("cardioscan_gpu_memory_used_bytes", "GPU memory in use",
                                 labels=["gpu"])
        total = GaugeMetricFamily("cardioscan_gpu_memory_total_bytes", "GPU memory",
                                  labels=["gpu"])
        for line in out.strip().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 4:
                continue
            with contextlib.suppress(ValueError):
                idx, u, m_used, m_total = parts[0], float(parts[1]), float(parts[2]), \
                    float(parts[3])
                util.add_metric([idx], u / 100.0)
                used.add_metric([idx], m_used * 1024 * 1024)
                total.add_metric([idx], m_total * 1024 * 1024)
        yield from (util, used, total)


_gpu = GpuCollector()


def render_metrics(store: JobStore | None) -> bytes:
    """The exposition text for /metrics: process (or multi-process) metrics + DB gauges."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        parts = [generate_latest(registry)]
    else:
        parts = [generate_latest(REGISTRY)]
    extra = CollectorRegistry()
    extra.register(_gpu)
    if store is not None:
        extra.register(QueueCollector(store))
    parts.append(generate_latest(extra))
    return b"".join(parts)


# Logging -------------------------------------------------------------------------------

LOG_FIELDS = (
    "job_id", "source_uid", "delivery_id", "destination", "route", "worker", "state",
    "attempt", "caller", "remote_id", "duration_s", "pages", "status", "method", "path",
)
"""The only record attributes a log line may carry besides the message."""

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "cardioscan_log_context", default=None)


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Attach fields (job_id, source_uid, ...) to every record logged inside the block."""
    merged = {**(_context.get() or {}), **{k: v for k, v in fields.items() if v is not None}}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for k, v in (_context.get() or {}).items():
            if not hasattr(record, k):
                setattr(record, k, v)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for k in LOG_FIELDS:
            v = getattr(record, k, None)
            if v is not None:
                doc[k] = v
        if record.exc_info and record.exc_info[0] is not None:
            doc["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
            doc["trace"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={getattr(record, k)}" for k in LOG_FIELDS
                          if getattr(record, k, None) is not None)
        base = f"{time.strftime('%H:%M:%S')} {record.levelname:<7} {record.name}: " \
               f"{record.getMessage()}"
        text = f"{base} [{fields}]" if fields else base
        if record.exc_info and record.exc_info[0] is not None:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure_logging(settings: Settings) -> None:
    """Route every logger (ours, uvicorn's, pynetdicom's) to stderr in one format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_json else TextFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    # pynetdicom logs every PDU (with patient attributes at DEBUG); keep it at WARNING.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
