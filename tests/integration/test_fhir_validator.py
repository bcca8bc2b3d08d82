"""Every resource CardioScan emits passes a real FHIR validator (Medplum's, over the official
R4 and R5 definitions, plus required bindings), and the validator does catch mistakes."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fhir_support import (
    NodeValidator,
    errors_of,
    make_digitization,
    node_skip_reason,
    node_validators,
)

from adapters.fhir.capability import capability_statement, operation_definition
from adapters.fhir.results import build_result_bundle, collection_bundle, local_resources
from adapters.source import SourceMeta

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(node_skip_reason() is not None, reason=str(node_skip_reason()))]

BASE = "http://127.0.0.1:8000/fhir"
SOURCES = {
    "fhir-upload": SourceMeta(route="fhir", source_id="sha256:" + "1" * 64,
                              media_type="image/png", fhir_subject="Patient/p1",
                              fhir_encounter="Encounter/e1"),
    "ehr-document": SourceMeta(route="fhir", source_id="sha256:" + "2" * 64,
                               media_type="image/jpeg", fhir_subject="Patient/p1",
                               fhir_source="DocumentReference/d1"),
    "r4-media": SourceMeta(route="fhir", source_id="sha256:" + "3" * 64,
                           media_type="image/jpeg", fhir_source="Media/m1"),
    "dicom": SourceMeta(route="dicom", source_id="1.2.826.0.1.3680043.2.1.1",
                        media_type="application/dicom", patient_id="MRN-1",
                        issuer_of_patient_id="1.2.3.4", study_date="20240131",
                        accession_number="ACC9"),
    "rest": SourceMeta(route="rest", source_id="sha256:" + "4" * 64, media_type="image/png"),
}


@pytest.fixture(scope="module")
def validator() -> Iterator[dict[str, NodeValidator]]:
    """The R4 and R5 validators, started once (loading the definitions takes a second)."""
    with node_validators() as started:
        yield started


def everything(version: str) -> list[dict[str, Any]]:
    """Every kind of resource CardioScan emits in ``version``."""
    out: list[dict[str, Any]] = [
        capability_statement(BASE, version, max_upload_bytes=64 << 20),  # type: ignore[arg-type]
        capability_statement(BASE, version, max_upload_bytes=64 << 20,  # type: ignore[arg-type]
                             api_key_auth=True),
        operation_definition(BASE, version),  # type: ignore[arg-type]
    ]
    for i, source in enumerate(SOURCES.values()):
        dig = make_digitization(seed=i, missing_lead="V4" if i == 1 else None)
        if i == 2:  # a full-page QA overlay: megabytes as PNG, embedded as a smaller JPEG
            rng = np.random.default_rng(i)
            dig.qa_images["overlay"] = rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8)
        bundle = build_result_bundle(dig, source, version=version,  # type: ignore[arg-type]
                                     job_id=f"job{i}", base_url=BASE)
        local = local_resources(bundle, f"job{i}")
        out += [bundle, *(e["resource"] for e in bundle["entry"]),
                collection_bundle(local, BASE),
                collection_bundle(local, BASE, bundle_type="searchset")]
    return out


@pytest.mark.parametrize("version", ["R4", "R5"])
def test_everything_cardioscan_emits_is_valid(
    validator: dict[str, NodeValidator], version: str
) -> None:
    resources = everything(version)
    reports = validator[version].validate_all(resources)
    assert len(reports) == len(resources)
    assert errors_of(reports) == []
    kinds = {r["resourceType"] for r in reports}
    assert {"Bundle", "Observation", "DiagnosticReport", "Provenance", "Device",
            "DocumentReference", "CapabilityStatement", "OperationDefinition"} <= kinds


@pytest.mark.parametrize("version", ["R4", "R5"])
def test_served_resources_have_no_warnings_either(
    validator: dict[str, NodeValidator], version: str
) -> None:
    """Resources read back from this server reference each other by local ids: not even the
    reference-type warnings that urn:uuid references in a transaction draw."""
    bundle = build_result_bundle(make_digitization(), SOURCES["fhir-upload"],
                                 version=version, job_id="j", base_url=BASE)  # type: ignore[arg-type]
    reports = validator[version].validate_all(local_resources(bundle, "j"))
    assert [i for r in reports for i in r["issues"]] == []


def test_the_validator_catches_mistakes(validator: dict[str, NodeValidator]) -> None:
    r4 = build_result_bundle(make_digitization(), SOURCES["fhir-upload"], version="R4",
                             job_id="j", base_url=BASE)
    r5 = build_result_bundle(make_digitization(), SOURCES["fhir-upload"], version="R5",
                             job_id="j", base_url=BASE)
    ecg_r5 = next(e["resource"] for e in r5["entry"] if "component" in e["resource"])
    ecg_r4 = next(e["resource"] for e in r4["entry"] if "component" in e["resource"])
    bad_status = copy.deepcopy(ecg_r4) | {"status": "done"}
    no_request = copy.deepcopy(r4)
    del no_request["entry"][0]["request"]
    both = copy.deepcopy(ecg_r4) | {"dataAbsentReason": {"text": "x"}, "valueString": "y"}
    reports = validator["R4"].validate_all([ecg_r5, bad_status, no_request, both])
    assert [r["ok"] for r in reports] == [False, False, False, False]
    text = " ".join(errors_of(reports))
    assert "interval" in text and "observation-status" in text
    assert "bdl-3" in text and "obs-6" in text
    [r4_in_r5] = validator["R5"].validate_all([ecg_r4])
    assert not r4_in_r5["ok"] and "period" in " ".join(errors_of([r4_in_r5]))
