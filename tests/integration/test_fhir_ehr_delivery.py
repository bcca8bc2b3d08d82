"""Delivery to the EHR: a stand-in FHIR server on loopback that validates what it gets,
enforces the auth, honours conditional create and fails on demand."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fhir_support import (
    FakeEhr,
    NodeValidator,
    fake_ehr,
    free_port,
    make_digitization,
    node_validators,
)

from adapters.fhir.results import build_result_bundle
from adapters.source import SourceMeta
from service.config import EhrSettings, load_settings
from service.delivery import Outbox, PermanentDeliveryError, RetryableDeliveryError
from service.ehr_delivery import EhrSender, TokenSource, create_sender, signing_algorithm
from service.outputs import OUTPUT_FILES
from service.store import DeliveryTask, JobStore

pytestmark = pytest.mark.integration

BASE = "http://cardioscan.test/fhir"


def source(n: int, subject: str = "Patient/p1") -> SourceMeta:
    return SourceMeta(route="fhir", source_id=f"sha256:{n:064x}", media_type="image/png",
                      fhir_subject=subject)


def write_result(result_dir: Path, n: int, version: str = "R4") -> dict[str, Any]:
    result_dir.mkdir(parents=True, exist_ok=True)
    bundle = build_result_bundle(make_digitization(seed=n), source(n), version=version,  # type: ignore[arg-type]
                                 job_id=f"job{n}", base_url=BASE)
    (result_dir / OUTPUT_FILES["fhir"]).write_text(json.dumps(bundle))
    return bundle


def task(n: int = 1) -> DeliveryTask:
    return DeliveryTask(id=f"d{n}", job_id=f"job{n}", destination="ehr", kind="ehr", attempt=1,
                        source_id=f"sha256:{n:064x}", lease_token="t")


@pytest.fixture(scope="module")
def validators() -> Iterator[dict[str, NodeValidator]]:
    """Node validators for the stand-in EHR (none where node is missing: then the EHR
    checks with fhir.resources alone)."""
    with node_validators() as started:
        yield started


def ehr_config(ehr: FakeEhr, **kw: Any) -> EhrSettings:
    return EhrSettings(base_url=ehr.base_url, timeout_seconds=kw.pop("timeout_seconds", 5),
                       **kw)


def test_delivery_creates_once_and_a_retry_duplicates_nothing(
        tmp_path: Path, validators: dict[str, NodeValidator]) -> None:
    with fake_ehr(token="s3cret", validator=validators.get("R4")) as ehr:
        sender = EhrSender(ehr_config(ehr, auth="bearer", token="s3cret"))
        write_result(tmp_path / "r1", 1)
        remote = sender.send(task(1), tmp_path / "r1")
        assert remote is not None and remote.startswith("DiagnosticReport/")
        counts = {t: ehr.count(t) for t in ("Observation", "DiagnosticReport", "Provenance",
                                            "Device", "DocumentReference")}
        assert counts == {"Observation": 7, "DiagnosticReport": 1, "Provenance": 1,
                          "Device": 1, "DocumentReference": 1}
        # The EHR resolved every reference of the transaction to its own ids.
        report = ehr.resources[remote]
        assert all(r["reference"] in ehr.resources for r in report["result"])
        ecg = ehr.resources[report["result"][0]["reference"]]
        assert ecg["device"]["reference"].startswith("Device/")
        assert ecg["derivedFrom"][0]["reference"].startswith("DocumentReference/")
        # Sent again (a retry after a lost answer): found, not duplicated.
        assert sender.send(task(1), tmp_path / "r1") == remote
        assert {t: ehr.count(t) for t in counts} == counts
        # Another ECG: new results, the same Device.
        write_result(tmp_path / "r2", 2)
        sender.send(task(2), tmp_path / "r2")
        assert ehr.count("Observation") == 14 and ehr.count("Device") == 1
        assert all(r["auth"] == "Bearer s3cret" for r in ehr.requests)
        assert ehr.requests[0]["headers"]["x-request-id"] == "d1"


def test_r5_bundles_are_accepted_by_an_r5_ehr(tmp_path: Path,
                                              validators: dict[str, NodeValidator]) -> None:
    with fake_ehr(version="R5", validator=validators.get("R5")) as ehr:
        write_result(tmp_path, 3, version="R5")
        assert EhrSender(ehr_config(ehr)).send(task(3), tmp_path)
        assert ehr.count("Observation") == 7 and ehr.count("DocumentReference") == 2


def test_a_bundle_the_ehr_finds_invalid_is_dead_lettered_with_its_reason(
        tmp_path: Path, validators: dict[str, NodeValidator]) -> None:
    with fake_ehr(version="R5", validator=validators.get("R5")) as ehr:
        write_result(tmp_path, 4, version="R4")  # an R4 bundle to an R5 server
        with pytest.raises(PermanentDeliveryError, match=r"HTTP 400.*invalid Bundle"):
            EhrSender(ehr_config(ehr)).send(task(4), tmp_path)
        assert ehr.resources == {}


def test_client_credentials_token_is_cached(tmp_path: Path) -> None:
    with fake_ehr(client_secret="pw") as ehr:
        sender = EhrSender(ehr_config(ehr, auth="client_credentials", token_url=ehr.token_url,
                                      client_id="cardioscan", client_secret="pw",
                                      scope="system/*.write"))
        for n in (5, 6):
            write_result(tmp_path / str(n), n)
            sender.send(task(n), tmp_path / str(n))
        assert len(ehr.token_requests) == 1
        assert ehr.token_requests[0]["scope"] == "system/*.write"
        # The EHR revokes the token: one 401, a fresh token, and the send goes through.
        ehr.issued_tokens.clear()
        ehr.issued_tokens.add("nothing-valid")
        write_result(tmp_path / "7", 7)
        sender.send(task(7), tmp_path / "7")
        assert len(ehr.token_requests) == 2 and ehr.count("DiagnosticReport") == 3
        wrong = EhrSender(ehr_config(ehr, auth="client_credentials", token_url=ehr.token_url,
                                     client_id="cardioscan", client_secret="nope"))
        with pytest.raises(PermanentDeliveryError, match="token request refused: HTTP 401"):
            wrong.send(task(5), tmp_path / "5")


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_smart_backend_services_jwt(tmp_path: Path, kind: str) -> None:
    key: Any = (rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "rsa"
                else ec.generate_private_key(ec.SECP384R1()))
    assert signing_algorithm(key) == ("RS384" if kind == "rsa" else "ES384")
    pem = tmp_path / "key.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    with fake_ehr(public_key=key.public_key(), token_lifetime_s=300) as ehr:
        config = ehr_config(ehr, auth="smart-backend", token_url=ehr.token_url,
                            client_id="cardioscan", private_key_path=pem, key_id="k1",
                            scope="system/Observation.write")
        sender = EhrSender(config)
        write_result(tmp_path / "r", 8)
        sender.send(task(8), tmp_path / "r")
        sender.send(task(8), tmp_path / "r")
        assert len(ehr.token_requests) == 1
        form = ehr.token_requests[0]
        assert form["client_assertion_type"].endswith("jwt-bearer")
        import jwt
        header = jwt.get_unverified_header(form["client_assertion"])
        assert header["kid"] == "k1" and header["alg"] == signing_algorithm(key)
        # Cached until shortly before expiry, then fetched again.
        now = [0.0]
        tokens = TokenSource(config, sender.client, clock=lambda: now[0])
        first = tokens.token()
        now[0] = 250.0
        assert tokens.token() == first
        now[0] = 290.0
        assert tokens.token() != first
        # A key the EHR does not know is refused for good.
        other = ec.generate_private_key(ec.SECP384R1())
        pem.write_bytes(other.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
        with pytest.raises(PermanentDeliveryError, match="invalid_client"):
            EhrSender(config).send(task(8), tmp_path / "r")


def test_server_errors_and_timeouts_are_retried_client_errors_are_not(tmp_path: Path) -> None:
    write_result(tmp_path, 9)
    with fake_ehr() as ehr:
        sender = EhrSender(ehr_config(ehr, timeout_seconds=0.5))
        ehr.fail_next = [503, 500, 1.0, 429]  # 1.0: a stall past the 0.5 s timeout
        for _ in range(4):
            with pytest.raises(RetryableDeliveryError):
                sender.send(task(9), tmp_path)
        assert ehr.resources == {}
        sender.send(task(9), tmp_path)
        created = dict(ehr.resources)
        ehr.fail_next = [422]
        with pytest.raises(PermanentDeliveryError, match=r"HTTP 422: error processing: EHR says"):
            sender.send(task(9), tmp_path)
        sender.send(task(9), tmp_path)
        assert ehr.resources == created
    with pytest.raises(RetryableDeliveryError, match="unreachable"):
        EhrSender(EhrSettings(base_url=f"http://127.0.0.1:{free_port()}/fhir",
                              timeout_seconds=1)).send(task(9), tmp_path)


def test_a_job_without_fhir_output_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PermanentDeliveryError, match="no FHIR result"):
        EhrSender(EhrSettings(base_url="http://127.0.0.1:9/fhir")).send(task(), tmp_path)


# ---------------------------------------------------------------- through the outbox


def done_job(store: JobStore, n: int) -> str:
    """A job accepted, digitized and completed as a worker would, with its FHIR output."""
    accepted = store.accept(f"picture {n}".encode(), source(n))
    [claim] = store.claim_jobs("test-worker", 1, 60)
    staging = store.results_root / ".staging" / claim.id
    write_result(staging, n)
    assert store.complete_job(claim, staging_dir=staging, outputs=["fhir"], pages=1,
                              engine="classic")
    return accepted.job_id


def deliver_all(settings: Any, store: JobStore, owner: str = "w") -> None:
    outbox = Outbox(settings, store, owner=owner)
    for t in store.claim_deliveries(owner, 10, 30):
        outbox.deliver(t)


def test_outbox_retries_dead_letters_and_survives_a_restart(tmp_path: Path) -> None:
    with fake_ehr(token="tok") as ehr:
        settings = load_settings(None, data_dir=tmp_path, spool_min_free_bytes=0,
                                 backoff_base_seconds=0.05, backoff_max_seconds=0.1,
                                 delivery_max_attempts=5,
                                 ehr={"base_url": ehr.base_url, "auth": "bearer",
                                      "token": "tok"})
        assert isinstance(create_sender(settings, settings.destinations()[0]), EhrSender)
        store = JobStore(settings)
        job = done_job(store, 10)
        ehr.fail_next = [503]
        deliver_all(settings, store)
        [d] = store.require_job(job).deliveries
        assert d.state == "failed" and "HTTP 503" in (d.last_error or "")
        store.close()

        # A restart: a new store and outbox on the same database pick the delivery up.
        store = JobStore(settings)
        time.sleep(0.15)
        deliver_all(settings, store, owner="w2")
        [d] = store.require_job(job).deliveries
        assert d.state == "done" and d.remote_id and d.remote_id.startswith("DiagnosticReport/")
        assert ehr.count("DiagnosticReport") == 1

        # An EHR that refuses: dead letter at once, with the EHR's OperationOutcome kept.
        job2 = done_job(store, 11)
        ehr.fail_next = [403]
        deliver_all(settings, store)
        [d2] = store.require_job(job2).deliveries
        assert d2.state == "dead" and "EHR says no (403)" in (d2.last_error or "")
        store.retry_delivery(d2.id, actor="operator")
        deliver_all(settings, store)
        assert store.require_job(job2).deliveries[0].state == "done"
        assert ehr.count("DiagnosticReport") == 2
        store.close()
