"""The REST API end to end in one process: upload, wait, outputs, errors, audit, metrics.

A real worker (its digitizer child running the stand-in digitizer) processes the jobs on
the embedded SQLite store, so every answer here comes from the real queue.
"""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import wfdb
from fastapi.testclient import TestClient
from service_support import ENGINE, NO_GRID, page_png

from service.api.app import create_app
from service.config import Settings, load_settings
from service.store import JobStore
from service.workers import Worker

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("api")
    return load_settings(data_dir=root / "var", engine=ENGINE, spool_min_free_bytes=0,
                         poll_seconds=0.05, http={"digitize_wait_seconds": 20},
                         folders=[{"name": "archive", "path": str(root / "archive")}])


@pytest.fixture(scope="module")
def store(settings: Settings) -> Iterator[JobStore]:
    store = JobStore(settings)
    yield store
    store.close()


@pytest.fixture(scope="module")
def client(settings: Settings, store: JobStore) -> Iterator[TestClient]:
    stop = threading.Event()
    worker = Worker(settings, store)
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    with TestClient(create_app(settings, store)) as c:
        yield c
    stop.set()
    thread.join(30)


def upload(client: TestClient, data: bytes, **params: Any) -> Any:
    return client.post("/api/v1/digitize", params=params,
                       files={"file": ("ecg.png", data, "image/png")})


def wait_done(client: TestClient, job_id: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["state"] in ("done", "failed", "dead") and all(
                d["state"] in ("done", "dead") for d in job["deliveries"]):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not finished")


def test_digitize_waits_and_answers_in_the_seed_shape(client: TestClient) -> None:
    resp = upload(client, page_png(1))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert {"steps", "leads", "lead_boxes", "metrics", "sampling_hz", "job_id"} <= body.keys()
    assert list(body["leads"]) == ["I", "II", "III", "aVR", "aVL", "aVF",
                                   "V1", "V2", "V3", "V4", "V5", "V6"]
    assert body["sampling_hz"] == 500 and len(body["leads"]["II"]) == 1250
    # the stand-in encodes the picture's id in the amplitude: this is picture 1's result
    assert max(v for v in body["leads"]["II"] if v is not None) == pytest.approx(0.002, abs=1e-4)
    assert body["leads"]["V1"][0] is None  # NaN (not printed) -> null
    assert body["steps"] and body["steps"][0]["image"].startswith("data:image/")
    assert body["links"]["self"] == f"/api/v1/jobs/{body['job_id']}"


def test_same_picture_twice_is_one_job(client: TestClient) -> None:
    first = upload(client, page_png(2)).json()["job_id"]
    second = upload(client, page_png(2)).json()["job_id"]
    assert first == second
    events = client.get("/api/v1/audit", params={"job_id": first}).json()["items"]
    received = [e for e in events if e["action"] == "received"]
    assert len(received) == 2 and received[1]["detail"] == {"duplicate": True}
    assert [e["action"] for e in events].count("digitized") == 1


def test_no_wait_answers_202_then_the_job_completes(client: TestClient) -> None:
    resp = upload(client, page_png(3), wait="false")
    assert resp.status_code == 202
    job_id = resp.json()["id"]
    assert resp.headers["location"] == f"/api/v1/jobs/{job_id}"
    job = wait_done(client, job_id)
    assert job["state"] == "done" and job["attempts"] == 1
    assert set(job["outputs"]) == {"json", "wfdb", "csv", "dicom", "fhir", "overlay"}
    assert [(d["destination"], d["state"]) for d in job["deliveries"]] == [("archive", "done")]


def test_outputs_in_every_format(client: TestClient, tmp_path: Path) -> None:
    job_id = upload(client, page_png(4)).json()["job_id"]
    base = f"/api/v1/jobs/{job_id}/outputs"

    z = client.get(f"{base}/wfdb")
    assert z.headers["content-type"] == "application/zip"
    zipfile.ZipFile(io.BytesIO(z.content)).extractall(tmp_path)
    rec = wfdb.rdrecord(str(tmp_path / "record"))
    assert rec.sig_name[:3] == ["I", "II", "III"] and rec.fs == 500 and rec.n_sig == 12
    assert np.nanmax(rec.p_signal[:, 1]) == pytest.approx(0.005, abs=2e-4)

    csv = client.get(f"{base}/csv")
    assert csv.text.splitlines()[0].startswith("time_s,I,II,III")
    ds = pydicom.dcmread(io.BytesIO(client.get(f"{base}/dicom").content))
    assert ds.Modality == "ECG"
    bundle = client.get(f"{base}/fhir")
    assert bundle.headers["content-type"].startswith("application/fhir+json")
    assert bundle.json()["resourceType"] == "Bundle"
    assert client.get(f"{base}/overlay.png").content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get(f"{base}/json").json()["sampling_hz"] == 500
    bad = client.get(f"{base}/pdf")
    assert bad.status_code == 422 and bad.headers["content-type"] == PROBLEM


def test_not_an_ecg_is_a_422_problem_and_can_be_retried(client: TestClient) -> None:
    resp = upload(client, page_png(5, NO_GRID))
    assert resp.status_code == 422 and resp.headers["content-type"] == PROBLEM
    problem = resp.json()
    assert problem["detail"] == "no ECG grid found" and problem["status"] == 422
    job_id = problem["job_id"]
    job = client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["state"] == "failed" and job["deliveries"] == []
    assert client.get(f"/api/v1/jobs/{job_id}/outputs/json").status_code == 404

    retried = client.post(f"/api/v1/jobs/{job_id}/retry")
    assert retried.status_code == 200 and retried.json()["state"] == "queued"
    assert wait_done(client, job_id)["state"] == "failed"  # the picture still holds no ECG
    actions = [e["action"] for e in
               client.get("/api/v1/audit", params={"job_id": job_id}).json()["items"]]
    assert actions == ["received", "failed", "retried", "failed"]


def test_retry_of_a_finished_job_is_a_conflict(client: TestClient) -> None:
    job_id = upload(client, page_png(6)).json()["job_id"]
    wait_done(client, job_id)
    resp = client.post(f"/api/v1/jobs/{job_id}/retry")
    assert resp.status_code == 409 and resp.headers["content-type"] == PROBLEM


@pytest.mark.parametrize(("data", "status"), [
    (b"", 400),
    (b"just some text, not a picture", 415),
    (b"GIF89a" + b"\0" * 100, 415),
])
def test_bad_uploads_are_problems(client: TestClient, data: bytes, status: int) -> None:
    resp = upload(client, data)
    assert resp.status_code == status
    assert resp.headers["content-type"] == PROBLEM and resp.json()["status"] == status


def test_limits_and_full_disk(settings: Settings, store: JobStore) -> None:
    small = settings.model_copy(update={"http": settings.http.model_copy(
        update={"max_upload_bytes": 100})})
    with TestClient(create_app(small, store)) as c:
        resp = upload(c, page_png(7) + b"\0" * 200)
        assert resp.status_code == 413 and resp.headers["content-type"] == PROBLEM
    full = JobStore(settings.model_copy(update={"spool_min_free_bytes": 1 << 60}),
                    migrate=False)
    with TestClient(create_app(settings, full)) as c:
        resp = upload(c, page_png(8))
        assert resp.status_code == 507 and resp.json()["type"].endswith("store-full")
        assert c.get("/readyz").status_code == 503
    full.close()


def test_unknown_job_and_bad_query_are_problems(client: TestClient) -> None:
    resp = client.get("/api/v1/jobs/0123456789abcdef")
    assert resp.status_code == 404 and resp.headers["content-type"] == PROBLEM
    resp = client.get("/api/v1/jobs", params={"state": "nonsense"})
    assert resp.status_code == 422 and resp.json()["errors"]


def test_jobs_list_filters_and_pages(client: TestClient) -> None:
    for i in (10, 11, 12):
        upload(client, page_png(i))
    page = client.get("/api/v1/jobs", params={"state": "done", "limit": 2}).json()
    assert len(page["items"]) == 2 and page["total"] >= 3 and page["limit"] == 2
    rest = client.get("/api/v1/jobs", params={"state": "done", "limit": 2, "offset": 2}).json()
    ids = [j["id"] for j in page["items"]] + [j["id"] for j in rest["items"]]
    assert len(set(ids)) == len(ids)
    assert all(j["state"] == "done" for j in page["items"] + rest["items"])
    created = [j["created_at"] for j in page["items"]]
    assert created == sorted(created, reverse=True)


@pytest.mark.parametrize("version", ["R4", "R5"])
def test_audit_trail_as_fhir_audit_events(client: TestClient, settings: Settings,
                                          store: JobStore, version: str) -> None:
    job_id = upload(client, page_png(20 if version == "R4" else 21)).json()["job_id"]
    wait_done(client, job_id)
    app = create_app(settings.model_copy(update={"fhir_version": version}), store)
    with TestClient(app) as c:
        resp = c.get("/api/v1/audit", params={"job_id": job_id, "format": "fhir"})
    assert resp.headers["content-type"].startswith("application/fhir+json")
    bundle = resp.json()
    events = [e["resource"] for e in bundle["entry"]]
    assert [e["resourceType"] for e in events] == ["AuditEvent"] * 3  # received, digitized,
    if version == "R4":                                                # delivered
        assert [e["type"]["code"] for e in events] == ["110107", "transform", "110106"]
        assert all(e["outcome"] == "0" for e in events)
    else:
        assert [e["category"][0]["coding"][0]["code"] for e in events] == [
            "110107", "transform", "110106"]
    assert events[0]["agent"][0]["who"]["identifier"]["value"] == "http:testclient"
    values = [ent["what"]["identifier"]["value"] for ent in events[0]["entity"]]
    assert job_id in values and any(v.startswith("ni:///sha-256;") for v in values)


def test_metrics_count_and_time_the_work(client: TestClient) -> None:
    upload(client, page_png(30))
    text = client.get("/metrics").text
    received = next(float(line.split()[-1]) for line in text.splitlines()
                    if line.startswith('cardioscan_received_total{route="rest"}'))
    assert received >= 1
    assert 'cardioscan_digitization_seconds_count{stage="fake"}' in text
    assert 'cardioscan_digitization_seconds_bucket{le="0.01",stage="decode"}' in text
    assert "cardioscan_queue_depth " in text and "cardioscan_oldest_job_age_seconds" in text
    assert 'cardioscan_jobs{route="rest",state="done"}' in text
    assert 'cardioscan_delivery_attempts_total{destination="archive",kind="folder"}' in text


def test_health_and_readiness(client: TestClient, settings: Settings, store: JobStore) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {
        "database": "ok", "spool": "ok", "digitizer": "ok"}
    broken = settings.model_copy(update={"engine": "no_such_module:digitize"})
    with TestClient(create_app(broken, store)) as c:
        resp = c.get("/readyz")
    assert resp.status_code == 503 and "no_such_module" in resp.json()["checks"]["digitizer"]


def test_openapi_documents_the_rest_api(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/api/v1/digitize", "/api/v1/jobs", "/api/v1/jobs/{job_id}",
              "/api/v1/jobs/{job_id}/outputs/{kind}", "/api/v1/jobs/{job_id}/retry",
              "/api/v1/audit", "/healthz", "/readyz"):
        assert p in paths, p
    assert "multipart/form-data" in json.dumps(paths["/api/v1/digitize"]["post"])
