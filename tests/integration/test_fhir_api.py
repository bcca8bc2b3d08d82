"""The FHIR endpoint end to end: the real app, a real worker, the digitizer, the job store and
a stand-in EHR that receives the results. Every inbound form reaches stored results, both
output versions, the asynchronous pattern, read-back, and every error status."""

from __future__ import annotations

import base64
import importlib.util
import io
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from fhir_support import FakeEhr, NodeValidator, errors_of, fake_ehr, node_validators
from httpx import Response
from PIL import Image

from pipeline.leads import LEADS
from service.api.app import create_app
from service.config import Settings, load_settings
from service.store import JobStore
from service.workers import Worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REAL_DIGITIZER = importlib.util.find_spec("pipeline.digitizer") is not None
ENGINE = "auto" if REAL_DIGITIZER else "dicom_fake_engine:digitize"
"""The real digitizer; until it is in the checkout, the DICOM tests' stand-in (a blank page
has no grid, any other page gives a 3x4+1 record)."""
MAX_UPLOAD = 3_000_000
FHIR_JSON = {"Content-Type": "application/fhir+json"}
ASYNC = {"Prefer": "respond-async"}
PAGE_WIDTH_PX = 1200
"""A scan of about 100 dpi: read as well as a larger one, in a third of the time."""


def jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass
class Service:
    client: TestClient
    settings: Settings
    store: JobStore
    ehr: FakeEhr
    page: bytes
    """A synthetic scanned ECG page (JPEG)."""
    blank: bytes
    """A picture with no ECG in it (PNG)."""
    validators: dict[str, NodeValidator]
    """The Node validator per FHIR version (empty where node cannot run)."""


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    from pipeline.synthetic import generate_page

    page = jpeg(generate_page(1, "scan", width_px=PAGE_WIDTH_PX).image)
    rng = np.random.default_rng(0)
    blank_rgb = np.clip(235 + rng.normal(0, 1.0, (600, 800, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(blank_rgb).save(buf, format="PNG")
    with node_validators() as validators, \
            fake_ehr(token="ehr-token", validator=validators.get("R4")) as ehr:
        settings = load_settings(
            None, data_dir=tmp_path_factory.mktemp("fhir-service"), engine=ENGINE,
            poll_seconds=0.05, spool_min_free_bytes=0, backoff_base_seconds=0.1,
            backoff_max_seconds=0.5, outputs=["json", "fhir", "overlay"],
            http={"max_upload_bytes": MAX_UPLOAD, "digitize_wait_seconds": 120},
            ehr={"base_url": ehr.base_url, "auth": "bearer", "token": "ehr-token"})
        store = JobStore(settings)
        stop = threading.Event()
        worker = threading.Thread(target=Worker(settings, store).run, args=(stop,),
                                  daemon=True)
        worker.start()
        try:
            with TestClient(create_app(settings, store)) as client:
                yield Service(client, settings, store, ehr, page, buf.getvalue(), validators)
        finally:
            stop.set()
            worker.join(60)
            store.close()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def poll(client: TestClient, url: str, timeout: float = 180) -> Response:
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(url)
        if response.status_code != 202 or time.monotonic() > deadline:
            return response
        assert response.headers["retry-after"]
        time.sleep(0.2)


def finished(client: TestClient, response: Response) -> Response:
    """Follow the asynchronous pattern to the end."""
    if response.status_code == 202:
        return poll(client, response.headers["content-location"])
    return response


def resources(bundle: dict[str, Any], rtype: str | None = None) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"]
            if rtype is None or e["resource"]["resourceType"] == rtype]


def ecg_of(bundle: dict[str, Any]) -> dict[str, Any]:
    [ecg] = [o for o in resources(bundle, "Observation") if "component" in o]
    return ecg


def check_result(service: Service, bundle: dict[str, Any], version: str = "R4",
                 ) -> dict[str, Any]:
    """A result Bundle as served: the 12-lead Observation and its companions."""
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection"
    ecg = ecg_of(bundle)
    assert [c["code"]["text"] for c in ecg["component"]] == list(LEADS)
    read = [c for c in ecg["component"] if "valueSampledData" in c]
    assert len(read) >= 6
    for comp in read:
        sd = comp["valueSampledData"]
        assert ("period" in sd) == (version == "R4") and ("interval" in sd) == (version == "R5")
        values = [float(v) for v in sd["data"].split() if v != "E"]
        assert values and max(abs(v) for v in values) < 10  # mV
    assert len(resources(bundle, "DiagnosticReport")) == 1
    assert len(resources(bundle, "Provenance")) == 1
    validator = service.validators.get(version)
    if validator is not None:
        assert errors_of([validator.validate(r) for r in resources(bundle)]) == []
        assert validator.validate(bundle)["ok"]
    return ecg


def job_of(ecg: dict[str, Any]) -> str:
    return str(ecg["id"]).split("-")[0]


# ---------------------------------------------------------------- what the server says


def test_metadata_and_operation_definition(service: Service) -> None:
    response = service.client.get("/fhir/metadata")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+json")
    statement = response.json()
    assert statement["fhirVersion"] == "4.0.1"
    assert statement["rest"][0]["operation"][0]["name"] == "digitize"
    op = service.client.get("/fhir/OperationDefinition/digitize").json()
    assert op["url"] == statement["rest"][0]["operation"][0]["definition"]


# ---------------------------------------------------------------- every inbound form


def test_raw_binary_synchronously_then_read_back_and_delivered(service: Service) -> None:
    c = service.client
    response = c.post("/fhir/Binary", content=service.page, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text
    ecg = check_result(service, response.json())
    job = job_of(ecg)
    assert response.headers["location"].endswith(f"/fhir/Binary/{job}")
    assert response.headers["content-location"].endswith(f"/fhir/_async/{job}")
    # Read back: the picture, the Observation, the report.
    assert c.get(f"/fhir/Binary/{job}").content == service.page
    as_json = c.get(f"/fhir/Binary/{job}", headers={"Accept": "application/fhir+json"}).json()
    assert base64.b64decode(as_json["data"]) == service.page
    assert c.get(f"/fhir/Observation/{job}-ecg").json() == ecg
    report = c.get(f"/fhir/DiagnosticReport/{job}-report").json()
    assert {"reference": f"Observation/{job}-ecg"} in report["result"]
    # Search by what the results derive from.
    for ref in (f"DocumentReference/{job}-source", f"Binary/{job}"):
        found = c.get("/fhir/Observation", params={"derived-from": ref}).json()
        assert found["type"] == "searchset" and [r["id"] for r in resources(found)] == [
            f"{job}-ecg"]
    measurements = c.get("/fhir/Observation",
                         params={"derived-from": f"Observation/{job}-ecg"}).json()
    assert {r["id"] for r in resources(measurements)} <= {
        f"{job}-{k}" for k in ("hr", "pr", "qrs", "qt", "qtc", "axis")}
    # ...and the EHR received them through the delivery outbox.
    deadline = time.monotonic() + 30
    while service.ehr.count("DiagnosticReport") == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert service.ehr.count("DiagnosticReport") >= 1
    assert service.ehr.requests[0]["auth"] == "Bearer ehr-token"


def test_binary_resource_asynchronously_and_idempotently(service: Service) -> None:
    c = service.client
    body = {"resourceType": "Binary", "contentType": "image/jpeg", "data": b64(service.page),
            "securityContext": {"reference": "Patient/async"}}
    first = c.post("/fhir/Binary", json=body, headers={**FHIR_JSON, **ASYNC})
    assert first.status_code == 202
    assert first.json()["issue"][0]["severity"] == "information"
    status_url = first.headers["content-location"]
    done = poll(c, status_url)
    assert done.status_code == 200
    ecg = check_result(service, done.json())
    assert ecg["subject"] == {"reference": "Patient/async"}
    again = c.post("/fhir/Binary", json=body, headers={**FHIR_JSON, **ASYNC})
    assert again.headers["content-location"] == status_url  # the same job, not a new one


def test_document_reference_media_and_parameters(service: Service) -> None:
    c = service.client
    att = {"contentType": "image/jpeg", "data": b64(service.page)}
    doc = {"resourceType": "DocumentReference", "status": "current",
           "subject": {"reference": "Patient/doc"}, "content": [{"attachment": att}]}
    ecg = check_result(service, finished(c, c.post("/fhir/DocumentReference", json=doc,
                                                   headers=FHIR_JSON)).json())
    assert ecg["subject"] == {"reference": "Patient/doc"}
    job = job_of(ecg)

    # A DocumentReference whose attachment points at the Binary just received.
    by_url = {**doc, "subject": {"reference": "Patient/url"},
              "content": [{"attachment": {"contentType": "image/jpeg",
                                          "url": f"Binary/{job}"}}]}
    ecg2 = check_result(service, finished(c, c.post("/fhir/DocumentReference", json=by_url,
                                                    headers=FHIR_JSON)).json())
    assert job_of(ecg2) != job

    media = {"resourceType": "Media", "status": "completed",
             "subject": {"reference": "Patient/media"}, "content": att}
    check_result(service, finished(c, c.post("/fhir/Media", json=media,
                                             headers=FHIR_JSON)).json())

    params = {"resourceType": "Parameters", "parameter": [
        {"name": "attachment", "valueAttachment": att},
        {"name": "patient", "valueReference": {"reference": "Patient/op"}},
        {"name": "encounter", "valueReference": {"reference": "Encounter/op"}},
        {"name": "reference", "valueReference": {"reference": "DocumentReference/ehr-77"}}]}
    response = c.post("/fhir/$digitize", json=params, headers={**FHIR_JSON, **ASYNC})
    assert response.status_code == 202
    ecg3 = check_result(service, poll(c, response.headers["content-location"]).json())
    assert ecg3["derivedFrom"] == [{"reference": "DocumentReference/ehr-77"}]
    assert ecg3["encounter"] == {"reference": "Encounter/op"}
    found = c.get("/fhir/Observation", params={"derived-from": "DocumentReference/ehr-77"})
    assert [r["id"] for r in resources(found.json())] == [ecg3["id"]]

    by_ref = {"resourceType": "Parameters", "parameter": [
        {"name": "reference", "valueReference": {"reference": f"Binary/{job}"}},
        {"name": "subject", "valueReference": {"reference": "Patient/ref"}}]}
    ecg4 = check_result(service, finished(c, c.post("/fhir/$digitize", json=by_ref,
                                                    headers=FHIR_JSON)).json())
    assert ecg4["subject"] == {"reference": "Patient/ref"}


def test_transaction_bundle(service: Service) -> None:
    c = service.client
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a",
         "resource": {"resourceType": "Binary", "contentType": "image/jpeg",
                      "data": b64(service.page)},
         "request": {"method": "POST", "url": "Binary"}},
        {"resource": {"resourceType": "DocumentReference", "status": "current",
                      "subject": {"reference": "Patient/tx"},
                      "content": [{"attachment": {
                          "contentType": "image/jpeg",
                          "url": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a"}}]},
         "request": {"method": "POST", "url": "DocumentReference"}},
        {"resource": {"resourceType": "Binary", "contentType": "image/png",
                      "data": b64(service.blank)},
         "request": {"method": "POST", "url": "Binary"}},
    ]}
    response = finished(c, c.post("/fhir", json=bundle, headers={**FHIR_JSON, **ASYNC}))
    assert response.status_code == 200
    reply = response.json()
    assert reply["type"] == "transaction-response" and len(reply["entry"]) == 3
    first, second, third = reply["entry"]
    assert first["response"]["status"] == second["response"]["status"] == "201 Created"
    assert first["response"]["location"] == second["response"]["location"]  # one picture
    assert ecg_of(second["resource"])["subject"] == {"reference": "Patient/tx"}
    check_result(service, first["resource"])
    assert third["response"]["status"] == "422 Unprocessable Entity"
    assert third["response"]["outcome"]["issue"][0]["diagnostics"]


def test_a_document_with_two_pictures_answers_for_each(service: Service) -> None:
    c = service.client
    doc = {"resourceType": "DocumentReference", "status": "current",
           "subject": {"reference": "Patient/two"}, "content": [
               {"attachment": {"contentType": "image/jpeg", "data": b64(service.page)}},
               {"attachment": {"contentType": "image/png", "data": b64(service.blank)}}]}
    reply = finished(c, c.post("/fhir/DocumentReference", json=doc, headers=FHIR_JSON)).json()
    assert reply["type"] == "batch-response"
    assert [e["response"]["status"] for e in reply["entry"]] == [
        "201 Created", "422 Unprocessable Entity"]
    check_result(service, reply["entry"][0]["resource"])


def test_r5_output(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service.settings, "fhir_version", "R5")
    monkeypatch.setattr(service.ehr, "version", "R5")
    monkeypatch.setattr(service.ehr, "validator", service.validators.get("R5"))
    c = service.client
    assert c.get("/fhir/metadata").json()["fhirVersion"] == "5.0.0"
    params = {"resourceType": "Parameters", "parameter": [
        {"name": "attachment", "valueAttachment": {"contentType": "image/jpeg",
                                                   "data": b64(service.page)}},
        {"name": "subject", "valueReference": {"reference": "Patient/r5"}}]}
    result = finished(c, c.post("/fhir/$digitize", json=params, headers=FHIR_JSON)).json()
    check_result(service, result, "R5")
    [report] = resources(result, "DiagnosticReport")
    assert len(report["media"]) == 2 and "presentedForm" not in report
    media = {"resourceType": "Media", "status": "completed",
             "content": {"contentType": "image/jpeg", "data": b64(service.page)}}
    response = c.post("/fhir/Media", json=media, headers=FHIR_JSON)
    assert response.status_code == 404 and response.json()["resourceType"] == "OperationOutcome"


# ---------------------------------------------------------------- errors


def outcome(response: Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    return str(body["issue"][0]["diagnostics"])


def test_error_statuses(service: Service) -> None:
    c = service.client
    assert "JSON" in outcome(c.post("/fhir/DocumentReference", content=b"{nope",
                                    headers=FHIR_JSON), 400)
    no_status = {"resourceType": "DocumentReference",
                 "content": [{"attachment": {"contentType": "image/jpeg",
                                             "data": b64(service.page)}}]}
    assert "status" in outcome(c.post("/fhir/DocumentReference", json=no_status,
                                      headers=FHIR_JSON), 400)
    assert "unknown parameter" in outcome(c.post(
        "/fhir/$digitize", json={"resourceType": "Parameters",
                                 "parameter": [{"name": "x", "valueString": "y"}]},
        headers=FHIR_JSON), 400)
    assert "Binary on this server" in outcome(c.post("/fhir/$digitize", json={
        "resourceType": "Parameters", "parameter": [
            {"name": "reference", "valueReference": {"reference": "Binary/nope"}}]},
        headers=FHIR_JSON), 400)
    too_big = b"\xff\xd8\xff" + bytes(MAX_UPLOAD)
    assert "limit" in outcome(c.post("/fhir/Binary", content=too_big,
                                     headers={"Content-Type": "image/jpeg"}), 413)
    assert "limit" in outcome(c.post("/fhir/Binary", json={
        "resourceType": "Binary", "contentType": "image/jpeg", "data": b64(too_big)},
        headers=FHIR_JSON), 413)
    assert "not supported" in outcome(c.post("/fhir/Binary", content=b"hello",
                                             headers={"Content-Type": "text/plain"}), 415)
    gif = b"GIF89a" + bytes(64)
    assert "image/gif" in outcome(c.post("/fhir/Binary", content=gif,
                                         headers={"Content-Type": "image/gif"}), 415)
    assert "PNG, JPEG" in outcome(c.post("/fhir/Binary", content=gif,
                                         headers={"Content-Type": "image/png"}), 415)
    assert "fhir+json" in outcome(c.post("/fhir/DocumentReference", content=b"<x/>",
                                         headers={"Content-Type": "application/fhir+xml"}), 415)
    assert "not ECG" not in outcome(c.get("/fhir/Observation/nojob-ecg"), 404)
    outcome(c.get("/fhir/_async/nojob"), 404)
    outcome(c.get("/fhir/Patient/1"), 404)


def test_not_an_ecg_is_422_synchronously_and_when_polled(service: Service) -> None:
    c = service.client
    sync = c.post("/fhir/Binary", content=service.blank, headers={"Content-Type": "image/png"})
    reason = outcome(sync, 422)
    assert "grid" in reason or "ECG" in reason
    params = {"resourceType": "Parameters", "parameter": [
        {"name": "attachment", "valueAttachment": {"contentType": "image/png",
                                                   "data": b64(service.blank)}},
        {"name": "patient", "valueReference": {"reference": "Patient/blank"}}]}
    accepted = c.post("/fhir/$digitize", json=params, headers={**FHIR_JSON, **ASYNC})
    assert accepted.status_code == 202
    assert outcome(poll(c, accepted.headers["content-location"]), 422) == reason
