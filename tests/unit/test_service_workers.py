"""Workers on the embedded store: batches, time limits, crashes, multi-page objects, logs."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from service_support import (
    CRASH,
    ENGINE,
    HANG,
    NO_GRID,
    NOT_ECG_ODD_TEXT,
    OK,
    TIMEOUT,
    WRAPPED_BUG,
    log_counts,
    page_png,
)

from adapters.dicom.decode import DicomParseError
from adapters.source import SourceMeta
from pipeline.errors import (
    DigitizationError,
    DigitizationTimeout,
    NoGridError,
    NotAnECGError,
    UnreadableImageError,
)
from service.config import Settings, load_settings
from service.errors import is_transient
from service.observability import JsonFormatter, _ContextFilter
from service.outputs import AdapterMissingError, adapter
from service.store import JobStore
from service.workers import Worker


def source_for(data: bytes, **meta: Any) -> SourceMeta:
    return SourceMeta(route="rest", source_id="sha256:" + hashlib.sha256(data).hexdigest(),
                      media_type="image/png", caller="test", **meta)


def make(tmp_path: Path, **overrides: Any) -> tuple[Settings, JobStore, Worker]:
    settings = load_settings(data_dir=tmp_path / "var", engine=ENGINE, spool_min_free_bytes=0,
                             backoff_base_seconds=0, **overrides)
    store = JobStore(settings)
    return settings, store, Worker(settings, store)


@pytest.fixture
def fake_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "fake.log"
    monkeypatch.setenv("CARDIOSCAN_FAKE_LOG", str(path))
    return path


@pytest.fixture
def worker(tmp_path: Path, fake_log: Path) -> Iterator[tuple[Settings, JobStore, Worker]]:
    trio = make(tmp_path, batch_size=4, job_timeout_seconds=2, max_attempts=2)
    yield trio
    trio[2].digitizer.close()
    trio[1].close()


def test_a_batch_is_claimed_and_digitized_together(worker: tuple[Settings, JobStore, Worker],
                                                   fake_log: Path) -> None:
    _, store, w = worker
    ids = [store.accept(page_png(i), source_for(page_png(i))).job_id for i in range(5)]
    assert w.run_jobs_once() == 4  # batch_size
    assert w.run_jobs_once() == 1
    assert w.run_jobs_once() == 0
    assert [store.get_job(j).state for j in ids] == ["done"] * 5  # type: ignore[union-attr]
    assert log_counts(fake_log, "end") == {i: 1 for i in range(5)}


def test_a_hung_page_times_out_then_goes_dead(tmp_path: Path, fake_log: Path) -> None:
    _, store, w = make(tmp_path, batch_size=4, job_timeout_seconds=0.5, max_attempts=2)
    job = store.accept(page_png(1, HANG), source_for(page_png(1, HANG))).job_id
    ok = store.accept(page_png(2), source_for(page_png(2))).job_id
    w.run_jobs_once()
    info = store.get_job(job)
    assert info is not None and info.state == "queued" and info.attempts == 1
    assert info.error == "timed out after 0.5 s"
    assert store.get_job(ok).state == "done"  # type: ignore[union-attr]  # its batch-mate
    w.run_jobs_once()
    info = store.get_job(job)
    assert info is not None and info.state == "dead" and info.attempts == 2
    w.digitizer.close()
    store.close()


def test_a_crashing_digitizer_is_retried(worker: tuple[Settings, JobStore, Worker]) -> None:
    _, store, w = worker
    job = store.accept(page_png(3, CRASH), source_for(page_png(3, CRASH))).job_id
    w.run_jobs_once()
    info = store.get_job(job)
    assert info is not None and info.state == "queued"
    assert info.error is not None and info.error.startswith("digitizer process died")
    # the worker recovers: the next picture is digitized by a fresh child
    ok = store.accept(page_png(4), source_for(page_png(4))).job_id
    while w.run_jobs_once():
        pass
    assert store.get_job(ok).state == "done"  # type: ignore[union-attr]


def _wrapped(cause: BaseException) -> DigitizationError:
    try:
        raise cause
    except BaseException as exc:
        try:
            raise DigitizationError("internal error during layout") from exc
        except DigitizationError as wrapped:
            return wrapped


@pytest.mark.parametrize(("exc", "transient"), [
    (NotAnECGError("not an ECG"), False),
    (NoGridError(), False),
    (UnreadableImageError("truncated PNG file"), False),
    (DicomParseError("truncated data set"), False),
    (DigitizationError("found 0 trace rows"), False),
    (DigitizationTimeout("took longer than 60 s"), True),
    (_wrapped(KeyError("x")), True),
    (_wrapped(MemoryError()), True),
    (_wrapped(NoGridError()), False),
    (MemoryError(), True),
    (RuntimeError("no ECG grid found"), True),
])
def test_is_transient_goes_by_type(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


@pytest.mark.parametrize(("behaviour", "final"), [
    (WRAPPED_BUG, "dead"), (TIMEOUT, "dead"), (NOT_ECG_ODD_TEXT, "failed"), (NO_GRID, "failed")])
def test_the_failure_type_decides_whether_to_retry(
        worker: tuple[Settings, JobStore, Worker], behaviour: int, final: str) -> None:
    """Transient (bug, time limit): queued again, dead after max_attempts (2). The picture's
    fault: failed at once. Each failure's text says the opposite of its type."""
    _, store, w = worker
    data = page_png(60 + behaviour, behaviour)
    job = store.accept(data, source_for(data)).job_id
    w.run_jobs_once()
    info = store.get_job(job)
    assert info is not None
    assert (info.state, info.attempts) == (("queued", 1) if final == "dead" else ("failed", 1))
    w.run_jobs_once()
    info = store.get_job(job)
    assert info is not None and info.state == final and info.error


def test_unreadable_object_fails_for_good(worker: tuple[Settings, JobStore, Worker]) -> None:
    _, store, w = worker
    data = b"\x89PNG\r\n\x1a\n" + b"\0" * 50  # a PNG signature and nothing else
    job = store.accept(data, source_for(data)).job_id
    w.run_jobs_once()
    info = store.get_job(job)
    assert info is not None and info.state == "failed" and info.attempts == 1
    assert info.error and "PNG" in info.error


def tiff(*pages: bytes) -> bytes:
    frames = [Image.open(io.BytesIO(p)).convert("RGB") for p in pages]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def test_every_page_of_a_multi_page_object(worker: tuple[Settings, JobStore, Worker]) -> None:
    _, store, w = worker
    data = tiff(page_png(40), page_png(41, NO_GRID), page_png(42))
    src = SourceMeta(route="rest", source_id="1.2.826.0.1.3680043.8.498.1", media_type="image/tiff")
    job_id = store.accept(data, src).job_id
    w.run_jobs_once()
    info = store.get_job(job_id)
    assert info is not None and info.state == "done" and info.pages == 2
    root = store.result_dir(job_id)
    first = pydicom.dcmread(root / "ecg.dcm")
    third = pydicom.dcmread(root / "page-3" / "ecg.dcm")
    assert not (root / "page-2").exists()  # page 2 held no ECG
    assert first.SOPInstanceUID != third.SOPInstanceUID
    assert first.StudyInstanceUID == third.StudyInstanceUID
    digitized = store.audit_events(job_id=job_id, action="digitized")[0]
    assert digitized.detail["skipped_pages"] == [{"page": 2, "reason": "no ECG grid found"}]


def test_a_page_without_ecg_fails_the_job_with_the_reason(
        worker: tuple[Settings, JobStore, Worker]) -> None:
    _, store, w = worker
    job = store.accept(page_png(5, NO_GRID), source_for(page_png(5, NO_GRID))).job_id
    w.run_jobs_once()
    info = store.get_job(job)
    assert info is not None and (info.state, info.error) == ("failed", "no ECG grid found")
    assert not store.result_dir(job).exists()


def test_logs_carry_ids_and_no_patient_data(worker: tuple[Settings, JobStore, Worker]) -> None:
    _, store, w = worker
    records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Capture()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    old = root.level
    root.setLevel(logging.DEBUG)
    phi = {"patient_name": "Doe^Jane", "patient_id": "MRN-99812", "patient_birth_date": "19470312",
           "accession_number": "ACC-5521", "referring_physician_name": "House^Gregory"}
    try:
        data = page_png(6, OK)
        job_id = store.accept(data, source_for(data, **phi)).job_id
        w.run_jobs_once()
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
    lines = [json.loads(r) for r in records]
    text = "\n".join(records)
    for value in phi.values():
        assert value not in text
    mine = [line for line in lines if line.get("job_id") == job_id]
    assert {line["msg"] for line in mine} >= {"accepted", "job done"}
    assert all(line["source_uid"].startswith("sha256:") for line in mine)
    assert store.get_source(job_id).patient_name == "Doe^Jane"  # kept in the DB


def test_missing_adapter_is_reported_not_fatal() -> None:
    with pytest.raises(AdapterMissingError):
        adapter("build", "adapters.no_such_adapter")
    assert callable(adapter("load_pages", "adapters.no_such_adapter", "adapters.images"))


def test_outputs_follow_the_configuration(tmp_path: Path) -> None:
    _, store, w = make(tmp_path, outputs=["wfdb"])
    try:
        job = store.accept(page_png(7), source_for(page_png(7))).job_id
        w.run_jobs_once()
        info = store.get_job(job)
        assert info is not None and info.outputs == ["wfdb"]
        assert sorted(p.name for p in store.result_dir(job).iterdir()) == [
            "record.dat", "record.hea"]
        assert store.output_path(job, "dicom") is None
        signals = np.loadtxt(store.result_dir(job) / "record.hea", dtype=str, max_rows=1)
        assert signals[1] == "12"
    finally:
        w.digitizer.close()
        store.close()
