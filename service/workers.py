"""Workers: claim jobs with a lease, digitize them, write the results, send the deliveries.

One :class:`Worker` runs in each worker process and has three threads:

* the job loop (main thread) claims up to ``batch_size`` due jobs, decodes their pages,
  digitizes them together (batched when the digitizer offers ``digitize_batch``), writes the
  outputs into a staging folder and completes the job — results installed, job done and one
  outbox row per destination — in one transaction fenced by the lease token;
* the heartbeat thread pushes the leases of everything held forward every third of
  ``lease_seconds``, so a live worker keeps its jobs and a dead one's are claimed again when
  its lease expires;
* the outbox thread sends due deliveries (:mod:`service.delivery`) and, on worker 0 of a
  node, runs the retention purge now and then.

The digitizer runs in a killable child process (:class:`service.digitize_worker.
DigitizerWorker`): a page past ``job_timeout_seconds`` is abandoned, the child replaced and
the attempt failed as retryable. Pictures that hold no ECG fail the job for good with the
digitizer's reason; transient trouble is retried with backoff until ``max_attempts``. The
failure's type decides which is which (:func:`service.errors.is_transient`), never its text.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.result import Digitization
from service import observability as obs
from service.config import Settings
from service.db.models import JobState
from service.delivery import Outbox
from service.digitize_worker import DigitizerWorker, WorkerStartError, WorkResult
from service.errors import is_transient
from service.outputs import AdapterMissingError, adapter, build_outputs, page_dir, page_source
from service.store import ClaimedJob, JobStore

log = logging.getLogger(__name__)

MAX_PAGES = 16
"""Pages digitized per received object (a long PDF is most likely not all ECGs)."""
STAGING_DIR = ".staging"
START_FAILURE_PAUSE_S = 30.0
RETENTION_WORKER = 0

def worker_id(index: int) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{index}"


class DecodeError(Exception):
    """The received object can't be turned into pages; ``permanent`` says if retrying helps."""

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.permanent = permanent


def decode_pages(data: bytes, media_type: str) -> list[np.ndarray]:
    """RGB pages of a received object, by its media type."""
    from pipeline.errors import DigitizationError

    try:
        if media_type == "application/dicom" or data[128:132] == b"DICM":
            read_dicom = adapter("read_dicom", "adapters.dicom", "adapters.dicom.decode")
            pages, _meta = read_dicom(data, max_pages=MAX_PAGES)
        else:
            load_pages = adapter("load_pages", "adapters.images")
            pages = load_pages(data, media_type=media_type, max_pages=MAX_PAGES)
    except DigitizationError as exc:  # UnreadableImageError and the DICOM decode errors
        raise DecodeError(" ".join(str(exc).split()) or type(exc).__name__,
                          permanent=not is_transient(exc)) from exc
    except AdapterMissingError as exc:
        raise DecodeError(str(exc), permanent=False) from exc
    except Exception as exc:  # a decoder bug or out of memory: not the picture's fault
        raise DecodeError(f"internal error decoding the object: {type(exc).__name__}",
                          permanent=False) from exc
    return list(pages)[:MAX_PAGES]


@dataclass
class _Held:
    """Leases this worker holds, for the heartbeat."""

    jobs: dict[str, tuple[str, float]]
    deliveries: dict[str, str]
    lock: threading.Lock


class Worker:
    """The loops of one worker process (see the module docstring)."""

    def __init__(self, settings: Settings, store: JobStore | None = None, *,
                 index: int = 0, owner: str | None = None) -> None:
        self.settings = settings
        self.store = store or JobStore(settings)
        self.index = index
        self.owner = owner or worker_id(index)
        self.outbox = Outbox(settings, self.store, owner=self.owner)
        self.digitizer = DigitizerWorker(
            engine=settings.engine_name, device=settings.device, qa=True,
            target=settings.digitizer_target,
        )
        self._held = _Held({}, {}, threading.Lock())
        self._next_retention = 0.0
        self.hard_limit_s = settings.job_timeout_seconds * (MAX_PAGES + 1) + 60

    # Loops ------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set, then finish the jobs in hand and return."""
        done = threading.Event()  # the heartbeat outlives ``stop`` until the last job ends
        threads = [
            threading.Thread(target=self._heartbeat_loop, args=(done,), name="heartbeat",
                             daemon=True),
            threading.Thread(target=self._outbox_loop, args=(stop,), name="outbox",
                             daemon=True),
        ]
        for t in threads:
            t.start()
        log.info("worker started", extra={"worker": self.owner})
        try:
            while not stop.is_set():
                try:
                    n = self.run_jobs_once(stop)
                except Exception:
                    log.exception("job loop error", extra={"worker": self.owner})
                    n = 0
                if n == 0:
                    stop.wait(self.settings.poll_seconds)
        finally:
            threads[1].join(timeout=self.settings.shutdown_grace_seconds)
            done.set()
            threads[0].join(timeout=5)
            self.digitizer.close()
            log.info("worker stopped", extra={"worker": self.owner})

    def _heartbeat_loop(self, done: threading.Event) -> None:
        interval = max(0.2, self.settings.lease_seconds / 3)
        while not done.wait(interval):
            self.heartbeat()

    def heartbeat(self) -> None:
        now = time.monotonic()
        with self._held.lock:
            jobs = [(j, tok) for j, (tok, since) in self._held.jobs.items()
                    if now - since < self.hard_limit_s]
            overdue = [j for j, (_tok, since) in self._held.jobs.items()
                       if now - since >= self.hard_limit_s]
            deliveries = list(self._held.deliveries.items())
        for j in overdue:
            log.error("job exceeded the hard time limit; letting its lease expire",
                      extra={"job_id": j, "worker": self.owner})
        if not jobs and not deliveries:
            return
        try:
            lost = self.store.extend_leases(jobs=jobs, deliveries=deliveries,
                                            lease_s=self.settings.lease_seconds)
        except Exception:
            log.exception("heartbeat failed", extra={"worker": self.owner})
            return
        for item in lost:
            log.warning("lease lost", extra={"job_id": item, "worker": self.owner})

    def _outbox_loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                n = self.run_deliveries_once(stop)
                self._maybe_purge()
            except Exception:
                log.exception("outbox loop error", extra={"worker": self.owner})
                n = 0
            if n == 0:
                stop.wait(self.settings.poll_seconds)

    def _maybe_purge(self) -> None:
        if self.index != RETENTION_WORKER or self.settings.retention_days <= 0:
            return
        now = time.monotonic()
        if now < self._next_retention:
            return
        self._next_retention = now + self.settings.retention_check_seconds
        from service.retention import purge

        purge(self.store)

    # One round ---------------------------------------------------------------------------

    def run_jobs_once(self, stop: threading.Event | None = None) -> int:
        """Claim and process one batch; returns how many jobs were claimed."""
        claims = self.store.claim_jobs(self.owner, self.settings.batch_size,
                                       self.settings.lease_seconds)
        if not claims:
            return 0
        with self._held.lock:
            for c in claims:
                self._held.jobs[c.id] = (c.lease_token, time.monotonic())
        try:
            self._process_batch(claims, stop or threading.Event())
        finally:
            with self._held.lock:
                for c in claims:
                    self._held.jobs.pop(c.id, None)
        return len(claims)

    def run_deliveries_once(self, stop: threading.Event | None = None) -> int:
        """Claim and send one batch of due deliveries; returns how many were claimed."""
        tasks = self.store.claim_deliveries(self.owner, self.settings.batch_size,
                                            self.settings.lease_seconds)
        for task in tasks:
            if stop is not None and stop.is_set():
                self.store.release_delivery(task)
                continue
            with self._held.lock:
                self._held.deliveries[task.id] = task.lease_token
            try:
                with obs.log_context(job_id=task.job_id, source_uid=task.source_id):
                    self.outbox.deliver(task)
            finally:
                with self._held.lock:
                    self._held.deliveries.pop(task.id, None)
        return len(tasks)

    # Processing ----------------------------------------------------------------------------

    def _process_batch(self, claims: list[ClaimedJob], stop: threading.Event) -> None:
        decoded: list[tuple[ClaimedJob, list[np.ndarray], float]] = []
        for claim in claims:
            if stop.is_set():
                self.store.release_job(claim)
                continue
            with obs.log_context(job_id=claim.id, source_uid=claim.source_id):
                started = time.perf_counter()
                try:
                    pages = decode_pages(claim.spool_path.read_bytes(), claim.media_type)
                except FileNotFoundError:
                    self._fail(claim, "the received object is missing from the spool",
                               permanent=True)
                    continue
                except DecodeError as exc:
                    self._fail(claim, str(exc), permanent=exc.permanent)
                    continue
                decoded.append((claim, pages, time.perf_counter() - started))
        if not decoded:
            return
        try:
            results = self._digitize([pages for _, pages, _ in decoded], decoded[0][0])
        except WorkerStartError as exc:
            log.error("digitizer unavailable: %s", exc, extra={"worker": self.owner})
            for claim, _, _ in decoded:
                self.store.release_job(claim)
            if stop.wait(START_FAILURE_PAUSE_S):
                return
            self.digitizer = DigitizerWorker(
                engine=self.settings.engine_name, device=self.settings.device, qa=True,
                target=self.settings.digitizer_target)
            return
        for (claim, _pages, decode_s), page_results in zip(decoded, results, strict=True):
            with obs.log_context(job_id=claim.id, source_uid=claim.source_id):
                obs.DIGITIZATION_SECONDS.labels("decode").observe(decode_s)
                self._finish(claim, page_results)

    def _digitize(self, jobs_pages: list[list[np.ndarray]],
                  first: ClaimedJob) -> list[list[WorkResult]]:
        """Digitize every page of every job; one batch, then singly after a batch failure."""
        flat = [p for pages in jobs_pages for p in pages]
        fs = float(first.params.get("fs", self.settings.fs))
        timeout = self.settings.job_timeout_seconds
        results = (self.digitizer.run_batch(list(flat), fs=fs, timeout_s=timeout)
                   if len(flat) > 1 else [self.digitizer.run(flat[0], fs=fs, timeout_s=timeout)])
        if len(flat) > 1 and all(r.retryable for r in results):
            # One bad page (hang, crash) sinks a whole batch; give each page its own chance.
            results = [self.digitizer.run(p, fs=fs, timeout_s=timeout) for p in flat]
        out: list[list[WorkResult]] = []
        i = 0
        for pages in jobs_pages:
            out.append(results[i:i + len(pages)])
            i += len(pages)
        return out

    def _fail(self, claim: ClaimedJob, reason: str, *, permanent: bool) -> None:
        state = self.store.fail_job(claim, reason, permanent=permanent, owner=self.owner)
        counter = {JobState.FAILED: obs.FAILED, JobState.DEAD: obs.DEAD,
                   JobState.QUEUED: obs.RETRIED}.get(state or "")
        if counter is not None:
            counter.labels(claim.route).inc()
        level = logging.WARNING if state == JobState.QUEUED else logging.ERROR
        log.log(level, "job %s: %s", state or "lease lost", reason,
                extra={"state": state, "attempt": claim.attempt})

    def _finish(self, claim: ClaimedJob, results: list[WorkResult]) -> None:
        ok: list[tuple[int, Digitization]] = [
            (n, r.digitization) for n, r in enumerate(results, 1) if r.digitization is not None]
        errors = [(n, r.error or "unknown error") for n, r in enumerate(results, 1)
                  if r.digitization is None]
        if not ok:
            reason = errors[0][1] if len(errors) == 1 else "; ".join(
                f"page {n}: {e}" for n, e in errors)
            self._fail(claim, reason,
                       permanent=not any(r.retryable for r in results if r.digitization is None))
            return
        staging = self.store.results_root / STAGING_DIR / f"{claim.id}-{claim.lease_token}"
        started = time.perf_counter()
        try:
            produced: list[str] = []
            first = ok[0][0]
            for n, dig in ok:
                kinds = build_outputs(claim.id, dig, page_source(claim.source, n),
                                      self.settings, out_dir=page_dir(staging, n, first))
                if n == first:
                    produced = kinds
        except Exception as exc:
            shutil.rmtree(staging, ignore_errors=True)
            log.exception("writing outputs failed")
            self._fail(claim, f"could not write outputs: {type(exc).__name__}: {exc}",
                       permanent=False)
            return
        obs.DIGITIZATION_SECONDS.labels("outputs").observe(time.perf_counter() - started)
        for _, dig in ok:
            obs.observe_stages(dig.stage_seconds)
        for r in results:
            if r.digitization is not None:
                obs.DIGITIZATION_SECONDS.labels("total").observe(r.seconds)
        detail = {"skipped_pages": [{"page": n, "reason": e} for n, e in errors]} if errors \
            else {}
        if self.store.complete_job(claim, staging_dir=staging, outputs=produced,
                                   pages=len(ok), engine=ok[0][1].engine, detail=detail,
                                   owner=self.owner):
            obs.SUCCEEDED.labels(claim.route).inc()
            log.info("job done", extra={"state": "done", "pages": len(ok),
                                        "attempt": claim.attempt})


def staging_root(store: JobStore) -> Path:
    return store.results_root / STAGING_DIR
