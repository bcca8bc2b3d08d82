"""API keys on the HTTP API: 401s on both routers, success with a key, the audit's "who"."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from service_support import ENGINE, page_png

from service.api.app import create_app
from service.config import Settings, load_settings
from service.runtime import _warn_if_open, is_loopback
from service.store import JobStore

MIRTH_KEY = "mirth-0123456789-abcdefghij"
VIEWER_KEY = "viewer-9876543210-zyxwvutsrq"
KEYS = [{"name": "mirth", "key": MIRTH_KEY}, {"name": "viewer", "key": VIEWER_KEY}]
PROBLEM = "application/problem+json"
FHIR_JSON = "application/fhir+json"


def settings_for(root: Path, **http: object) -> Settings:
    return load_settings(data_dir=root / "var", engine=ENGINE, spool_min_free_bytes=0,
                         http=http)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = settings_for(tmp_path_factory.mktemp("auth"), api_keys=KEYS)
    store = JobStore(settings)
    with TestClient(create_app(settings, store)) as c:
        yield c
    store.close()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("headers", [
    {},
    bearer("not-a-configured-key-at-all"),
    {"X-API-Key": MIRTH_KEY[:-1]},
    {"Authorization": f"Basic {MIRTH_KEY}"},
])
def test_rest_without_a_valid_key_is_a_401_problem(client: TestClient,
                                                   headers: dict[str, str]) -> None:
    for resp in (client.get("/api/v1/jobs", headers=headers),
                 client.post("/api/v1/digitize", headers=headers,
                             files={"file": ("ecg.png", page_png(1), "image/png")})):
        assert resp.status_code == 401, resp.text
        assert resp.headers["content-type"] == PROBLEM
        assert resp.headers["www-authenticate"].startswith("Bearer")
        body = resp.json()
        assert body["status"] == 401 and body["type"].endswith("/unauthenticated")
        assert MIRTH_KEY not in resp.text


@pytest.mark.parametrize("headers", [{}, bearer("wrong-key-wrong-key-wrong")])
def test_fhir_without_a_valid_key_is_a_401_operation_outcome(
        client: TestClient, headers: dict[str, str]) -> None:
    for resp in (client.post("/fhir/Binary", content=page_png(2),
                              headers={**headers, "Content-Type": "image/png"}),
                 client.get("/fhir/Observation/abc-ecg", headers=headers),
                 client.get("/fhir/NoSuchThing", headers=headers)):
        assert resp.status_code == 401, resp.text
        assert resp.headers["content-type"].startswith(FHIR_JSON)
        assert resp.headers["www-authenticate"].startswith("Bearer")
        body = resp.json()
        assert body["resourceType"] == "OperationOutcome"
        assert body["issue"][0]["code"] == "login"


def test_a_key_lets_requests_through_and_the_audit_names_it(
        client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    resp = client.post("/api/v1/digitize", params={"wait": "false"}, headers=bearer(MIRTH_KEY),
                       files={"file": ("ecg.png", page_png(3), "image/png")})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    resp = client.post("/fhir/Binary", content=page_png(4), headers={
        "X-API-Key": VIEWER_KEY, "Content-Type": "image/png", "Prefer": "respond-async"})
    assert resp.status_code == 202, resp.text
    fhir_job = resp.headers["content-location"].rsplit("/", 1)[1]

    audit = client.get("/api/v1/audit", params={"action": "received"},
                       headers=bearer(VIEWER_KEY))
    assert audit.status_code == 200
    actors = {e["job_id"]: e["actor"] for e in audit.json()["items"]}
    assert actors[job_id] == "api-key:mirth" and actors[fhir_job] == "api-key:viewer"
    assert client.get(f"/api/v1/jobs/{job_id}", headers=bearer(MIRTH_KEY)).json()["id"] == job_id
    assert MIRTH_KEY not in audit.text and VIEWER_KEY not in audit.text
    assert not any(k in r.getMessage() or k in str(r.__dict__)
                   for r in caplog.records for k in (MIRTH_KEY, VIEWER_KEY))


def test_health_viewer_and_capability_statement_stay_open(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code in (200, 503)  # open; ready or not
    assert client.get("/").status_code == 200
    assert client.get("/static/viewer.js").status_code == 200
    meta = client.get("/fhir/metadata")
    assert meta.status_code == 200
    security = meta.json()["rest"][0]["security"]
    assert "API key" in security["description"] and "Bearer" in security["description"]


def test_openapi_documents_the_key_schemes(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert {"apiKeyBearer", "apiKeyHeader"} <= spec["components"]["securitySchemes"].keys()
    assert spec["paths"]["/api/v1/jobs"]["get"]["security"]
    assert "security" not in spec["paths"]["/healthz"]["get"]


def test_without_keys_the_api_is_open_and_says_so(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    assert settings.http.auth == "none"
    store = JobStore(settings)
    try:
        with TestClient(create_app(settings, store)) as c:
            assert c.get("/api/v1/jobs").status_code == 200
            security = c.get("/fhir/metadata").json()["rest"][0]["security"]
            assert security["description"].startswith("No authentication")
            assert "security" not in c.get("/openapi.json").json()["paths"]["/api/v1/jobs"]["get"]
    finally:
        store.close()


@pytest.mark.parametrize("http", [
    {"auth": "api-key"},  # no keys
    {"api_keys": [{"name": "a", "key": "short"}]},
    {"api_keys": [{"name": "a", "key": MIRTH_KEY}, {"name": "a", "key": VIEWER_KEY}]},
    {"api_keys": [{"name": "a", "key": MIRTH_KEY}, {"name": "b", "key": MIRTH_KEY}]},
    {"api_keys": [{"name": "has space", "key": MIRTH_KEY}]},
    {"auth": "basic"},
])
def test_bad_auth_configuration_is_refused(tmp_path: Path, http: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        settings_for(tmp_path, **http)


def test_keys_turn_auth_on_and_are_masked(tmp_path: Path) -> None:
    s = settings_for(tmp_path, api_keys=KEYS)
    assert s.http.auth == "api-key"
    shown = s.masked()["http"]
    assert shown["auth"] == "api-key"
    assert shown["api_keys"] == [{"name": "mirth", "key": "**********"},
                                 {"name": "viewer", "key": "**********"}]
    assert settings_for(tmp_path, api_keys=KEYS, auth="none").http.auth == "none"


def test_serve_warns_when_open_beyond_loopback(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    caplog.set_level(logging.WARNING, logger="service.runtime")
    _warn_if_open(settings_for(tmp_path))
    _warn_if_open(settings_for(tmp_path, host="0.0.0.0", api_keys=KEYS))
    assert not caplog.records
    _warn_if_open(settings_for(tmp_path, host="0.0.0.0"))
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "NO authentication" in record.getMessage() and "http.api_keys" in record.getMessage()
