"""The result Bundle: the ECG Observation, measurements, report, provenance, idempotency."""

from __future__ import annotations

import base64
import io
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import pytest

from adapters.fhir.capability import capability_statement, operation_definition
from adapters.fhir.codes import LOINC, MDC, SOURCE_SYSTEM, UCUM
from adapters.fhir.models import FhirValidationError, validate_resource
from adapters.fhir.results import (
    MAX_INLINE_PICTURE_BYTES,
    build_result_bundle,
    collection_bundle,
    local_resources,
    png_bytes,
    reference_type,
    sampled_data_string,
)
from adapters.source import SourceMeta
from pipeline.leads import LEADS
from pipeline.result import Box, Digitization, Metrics

BASE = "https://cardioscan.example/fhir"
WHEN = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)


def digitization(missing: str | None = None, metrics: Metrics | None = None) -> Digitization:
    n = 5000
    t = np.arange(n) / 500
    signals = np.stack([np.sin(2 * np.pi * 1.2 * t + i) * (0.1 * i + 0.2)
                        for i in range(12)], axis=1)
    signals[: n // 4, 6:] = np.nan
    if missing:
        signals[:, LEADS.index(missing)] = np.nan
    return Digitization(
        signals=signals, fs=500, layout="3x4+1", paper_speed_mm_s=25.0, gain_mm_mv=10.0,
        px_per_mm=8.0, grid_confidence=0.9, confidence={lead: 0.9 for lead in LEADS},
        lead_boxes={lead: Box(0, 0, 0.1, 0.1) for lead in LEADS},
        metrics=metrics or Metrics(hr_bpm=72.4, rr_ms=829.0, pr_ms=160.0, qrs_ms=90.0,
                                   qt_ms=380.0, qtc_bazett_ms=417.0, axis_deg=-30.0),
        engine="classic", qa_images={"overlay": np.zeros((8, 8, 3), np.uint8)})


FHIR_SOURCE = SourceMeta(route="fhir", source_id="sha256:" + "ab" * 32, media_type="image/png",
                         fhir_subject="Patient/p1", fhir_encounter="Encounter/e1")
DICOM_SOURCE = SourceMeta(route="dicom", source_id="1.2.826.0.1.3680043.2.1.1",
                          media_type="application/dicom", patient_id="MRN-1",
                          issuer_of_patient_id="1.2.3.4", study_date="20240131",
                          accession_number="ACC9")


def build(version: str = "R4", source: SourceMeta = FHIR_SOURCE, **kw: Any) -> dict[str, Any]:
    return build_result_bundle(kw.pop("dig", None) or digitization(), source,
                               version=version, job_id="job1", base_url=BASE,  # type: ignore[arg-type]
                               issued=WHEN, **kw)


def of_type(bundle: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def ecg_of(bundle: dict[str, Any]) -> dict[str, Any]:
    [ecg] = [o for o in of_type(bundle, "Observation") if "component" in o]
    return ecg


def by_url(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["fullUrl"]: e["resource"] for e in bundle["entry"]}


def references(value: Any) -> list[str]:
    if isinstance(value, dict):
        out = [value["reference"]] if isinstance(value.get("reference"), str) else []
        return out + [r for v in value.values() for r in references(v)]
    if isinstance(value, list):
        return [r for v in value for r in references(v)]
    return []


@pytest.mark.parametrize("version", ["R4", "R5"])
def test_one_ecg_observation_with_a_component_per_lead(version: str) -> None:
    dig = digitization()
    ecg = ecg_of(build(version, dig=dig))
    codes = {(c["system"], c["code"]) for c in ecg["code"]["coding"]}
    assert codes == {(LOINC, "11524-6"), (MDC, "131328")}
    assert ecg["category"][0]["coding"][0]["code"] == "procedure"
    assert [c["code"]["text"] for c in ecg["component"]] == list(LEADS)
    assert [c["code"]["coding"][0]["code"] for c in ecg["component"]] == [
        "131329", "131330", "131389", "131390", "131391", "131392",
        "131331", "131332", "131333", "131334", "131335", "131336"]
    for i, comp in enumerate(ecg["component"]):
        assert comp["code"]["coding"][0]["system"] == MDC
        sd = comp["valueSampledData"]
        assert sd["origin"] == {"value": 0, "unit": "mV", "system": UCUM, "code": "mV"}
        assert sd["dimensions"] == 1
        if version == "R4":
            assert sd["period"] == 2.0 and "interval" not in sd
        else:
            assert (sd["interval"], sd["intervalUnit"]) == (2.0, "ms") and "period" not in sd
        tokens = sd["data"].split(" ")
        assert len(tokens) == 5000
        column = dig.signals[:, i]
        assert [tok == "E" for tok in tokens] == list(np.isnan(column))
        decoded = np.array([float(tok) for tok in tokens if tok != "E"])
        np.testing.assert_allclose(decoded, column[~np.isnan(column)], atol=5e-5)


def test_a_lead_never_read_is_data_absent() -> None:
    ecg = ecg_of(build(dig=digitization(missing="V3")))
    comp = ecg["component"][LEADS.index("V3")]
    assert "valueSampledData" not in comp
    assert comp["dataAbsentReason"]["coding"][0]["code"] == "error"


def test_sampled_data_string() -> None:
    assert sampled_data_string(np.array([0.0, -0.0, 1.23456, np.nan, -2.5, 1e-6])) == \
        "0 0 1.2346 E -2.5 0"


@pytest.mark.parametrize("version", ["R4", "R5"])
def test_measurements_in_loinc_and_ucum(version: str) -> None:
    bundle = build(version)
    measured = {o["code"]["coding"][0]["code"]: o for o in of_type(bundle, "Observation")
                if "valueQuantity" in o}
    expected = {"8867-4": (72.4, "/min"), "8625-6": (160.0, "ms"), "8633-0": (90.0, "ms"),
                "8634-8": (380.0, "ms"), "8636-3": (417.0, "ms"), "8632-2": (-30.0, "deg")}
    assert {k: (o["valueQuantity"]["value"], o["valueQuantity"]["code"])
            for k, o in measured.items()} == expected
    ecg_url = next(e["fullUrl"] for e in bundle["entry"] if "component" in e["resource"])
    for obs in measured.values():
        assert obs["code"]["coding"][0]["system"] == LOINC
        assert obs["valueQuantity"]["system"] == UCUM
        assert obs["derivedFrom"] == [{"reference": ecg_url}]
        assert obs["subject"] == {"reference": "Patient/p1"}


def test_unmeasurable_metrics_are_left_out() -> None:
    bundle = build(dig=digitization(metrics=Metrics(hr_bpm=60.0)))
    codes = [o["code"]["coding"][0]["code"] for o in of_type(bundle, "Observation")]
    assert sorted(codes) == ["11524-6", "8867-4"]


def test_r4_report_presents_the_source_and_the_overlay() -> None:
    bundle = build("R4")
    [report] = of_type(bundle, "DiagnosticReport")
    observations = {e["fullUrl"] for e in bundle["entry"]
                    if e["resource"]["resourceType"] == "Observation"}
    assert {r["reference"] for r in report["result"]} == observations
    source, overlay = report["presentedForm"]
    assert source == {"contentType": "image/png", "url": f"{BASE}/Binary/job1",
                      "title": "Source ECG picture"}
    assert overlay["contentType"] == "image/png"
    assert base64.b64decode(overlay["data"]).startswith(b"\x89PNG")
    assert report["code"]["coding"][0]["code"] == "11524-6"


def test_r5_report_links_media_documents() -> None:
    bundle = build("R5")
    [report] = of_type(bundle, "DiagnosticReport")
    docs = by_url(bundle)
    linked = [docs[m["link"]["reference"]] for m in report["media"]]
    assert [d["resourceType"] for d in linked] == ["DocumentReference", "DocumentReference"]
    assert linked[0]["content"][0]["attachment"]["url"] == f"{BASE}/Binary/job1"
    assert base64.b64decode(linked[1]["content"][0]["attachment"]["data"]).startswith(b"\x89PNG")
    assert "presentedForm" not in report


@pytest.mark.parametrize("version", ["R4", "R5"])
def test_a_large_overlay_is_embedded_as_a_smaller_jpeg(version: str) -> None:
    """A full-page overlay is megabytes of PNG; FHIR strings (and EHRs) stop at 1 MB."""
    rng = np.random.default_rng(0)
    page = rng.integers(0, 256, (1700, 2200, 3), dtype=np.uint8)  # noise: PNG can't shrink it
    big = png_bytes(page)
    assert len(big) > 4 * MAX_INLINE_PICTURE_BYTES
    bundle = build(version, overlay_png=big)
    attachments = [f for r in of_type(bundle, "DiagnosticReport") for f in
                   r.get("presentedForm", [])] + [
        d["content"][0]["attachment"] for d in of_type(bundle, "DocumentReference")]
    [overlay] = [a for a in attachments if "data" in a]
    assert overlay["contentType"] == "image/jpeg" and len(overlay["data"]) < 1_000_000
    data = base64.b64decode(overlay["data"])
    assert int(overlay["size"]) == len(data) <= MAX_INLINE_PICTURE_BYTES
    from PIL import Image

    shown = Image.open(io.BytesIO(data))
    assert shown.format == "JPEG" and shown.width / shown.height == pytest.approx(2200 / 1700,
                                                                                   rel=0.01)


@pytest.mark.parametrize("version", ["R4", "R5"])
def test_provenance_and_device(version: str) -> None:
    bundle = build(version)
    [prov] = of_type(bundle, "Provenance")
    [device] = of_type(bundle, "Device")
    urls = by_url(bundle)
    agent = urls[prov["agent"][0]["who"]["reference"]]
    assert agent is device and device["manufacturer"] == "CardioScan"
    assert prov["entity"][0]["role"] == "source"
    ecg = ecg_of(bundle)
    assert prov["entity"][0]["what"] == ecg["derivedFrom"][0]
    assert "igitization" in prov["activity"]["text"]
    targets = {t["reference"] for t in prov["target"]}
    assert {u for u, r in urls.items() if r["resourceType"] in ("Observation",
                                                                "DiagnosticReport")} <= targets
    assert urls[ecg["device"]["reference"]] is device


@pytest.mark.parametrize("version", ["R4", "R5"])
def test_every_entry_is_a_conditional_create_on_a_source_identifier(version: str) -> None:
    bundle = build(version)
    assert bundle["type"] == "transaction"
    for entry in bundle["entry"]:
        resource, request = entry["resource"], entry["request"]
        assert request["method"] == "POST" and request["url"] == resource["resourceType"]
        [(param, token)] = parse_qsl(request["ifNoneExist"])
        system, _, value = token.partition("|")
        if param == "identifier":
            assert {"system": system, "value": value} in resource["identifier"]
        else:
            assert param == "_tag" and resource["resourceType"] == "Provenance"
            assert {"system": system, "code": value} in resource["meta"]["tag"]
        if resource["resourceType"] != "Device":
            assert system == SOURCE_SYSTEM and value.startswith(FHIR_SOURCE.source_id + "/")
    values = [e["request"]["ifNoneExist"] for e in bundle["entry"]]
    assert len(set(values)) == len(values)


@pytest.mark.parametrize("version", ["R4", "R5"])
def test_every_reference_inside_the_bundle_resolves(version: str) -> None:
    for source in (FHIR_SOURCE, DICOM_SOURCE):
        bundle = build(version, source)
        urls = set(by_url(bundle))
        internal = [r for e in bundle["entry"] for r in references(e["resource"])
                    if r.startswith("urn:uuid:")]
        assert internal and set(internal) <= urls


def test_a_retry_builds_the_same_identities() -> None:
    first = build("R4")
    again = build_result_bundle(digitization(), FHIR_SOURCE, version="R4", job_id="job2",
                                base_url=BASE)
    assert [e["fullUrl"] for e in first["entry"]] == [e["fullUrl"] for e in again["entry"]]
    assert [e["request"] for e in first["entry"]] == [e["request"] for e in again["entry"]]
    other = build("R4", SourceMeta(route="fhir", source_id="sha256:" + "cd" * 32))
    assert not {e["fullUrl"] for e in other["entry"]
                if e["resource"]["resourceType"] != "Device"} & set(by_url(first))


def test_callers_document_is_the_source() -> None:
    source = SourceMeta(route="fhir", source_id="sha256:" + "ef" * 32, media_type="image/jpeg",
                        fhir_subject="Patient/p1", fhir_source="DocumentReference/ehr-7")
    for version in ("R4", "R5"):
        bundle = build(version, source)
        assert ecg_of(bundle)["derivedFrom"] == [{"reference": "DocumentReference/ehr-7"}]
        docs = of_type(bundle, "DocumentReference")
        assert all("url" not in d["content"][0]["attachment"] for d in docs)  # no wrapper
    r4_media = SourceMeta(route="fhir", source_id="sha256:" + "01" * 32,
                          fhir_source="Media/m1")
    assert ecg_of(build("R4", r4_media))["derivedFrom"] == [{"reference": "Media/m1"}]
    r5 = build("R5", r4_media)  # R5 has no Media: CardioScan's own DocumentReference instead
    assert reference_type(ecg_of(r5)["derivedFrom"][0]["reference"]) is None
    assert by_url(r5)[ecg_of(r5)["derivedFrom"][0]["reference"]]["resourceType"] == \
        "DocumentReference"


def test_dicom_source_context() -> None:
    bundle = build("R4", DICOM_SOURCE)
    ecg = ecg_of(bundle)
    assert ecg["subject"] == {"type": "Patient", "identifier": {
        "value": "MRN-1", "system": "urn:oid:1.2.3.4"}}
    assert ecg["effectiveDateTime"] == "2024-01-31"
    assert ecg["basedOn"][0]["identifier"]["value"] == "ACC9"
    assert ecg["issued"] == "2025-03-04T05:06:07Z"


def test_resources_pass_their_own_version_only() -> None:
    r5_ecg = ecg_of(build("R5"))
    validate_resource(r5_ecg, "R5")
    with pytest.raises(FhirValidationError, match="interval"):
        validate_resource(r5_ecg, "R4")
    with pytest.raises(ValueError, match="R4 or R5"):
        build("DSTU2")


def test_local_view_assigns_ids_and_rewrites_references() -> None:
    bundle = build("R4")
    resources = local_resources(bundle, "job1")
    ids = {f"{r['resourceType']}/{r['id']}" for r in resources}
    assert "Observation/job1-ecg" in ids and "DiagnosticReport/job1-report" in ids
    refs = [r for res in resources for r in references(res)]
    assert not [r for r in refs if r.startswith("urn:uuid:")]
    local = [r for r in refs if r.split("/")[0] in ("Observation", "Device", "DocumentReference",
                                                     "DiagnosticReport")]
    assert set(local) <= ids | {"Patient/p1"}
    for resource in resources:
        validate_resource(resource, "R4")
    page = local_resources(bundle, "job1-p2")
    assert any(r["id"] == "job1-p2-ecg" for r in page)
    searchset = collection_bundle(resources, BASE, bundle_type="searchset")
    assert searchset["total"] == len(resources)
    assert searchset["entry"][0]["fullUrl"].startswith(BASE + "/")
    validate_resource(searchset, "R4")


@pytest.mark.parametrize("version", ["R4", "R5"])
def test_capability_statement_tells_what_is_served(version: str) -> None:
    cs = capability_statement(BASE, version, max_upload_bytes=1000)  # type: ignore[arg-type]
    assert cs["fhirVersion"] == ("4.0.1" if version == "R4" else "5.0.0")
    rest = cs["rest"][0]
    types = {r["type"]: {i["code"] for i in r["interaction"]} for r in rest["resource"]}
    assert types["Binary"] == {"create", "read"}
    assert types["Observation"] == {"read", "search-type"}
    assert ("Media" in types) == (version == "R4")
    assert rest["operation"][0]["definition"] == f"{BASE}/OperationDefinition/digitize"
    op = operation_definition(BASE, version)  # type: ignore[arg-type]
    assert op["url"] == rest["operation"][0]["definition"] and op["code"] == "digitize"
    names = {(p["name"], p["use"]) for p in op["parameter"]}
    assert {("attachment", "in"), ("reference", "in"), ("patient", "in"),
            ("encounter", "in"), ("subject", "in"), ("return", "out")} <= names
