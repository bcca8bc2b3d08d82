"""What CardioScan's FHIR endpoint says about itself: CapabilityStatement and $digitize.

Both are built for the configured output version and checked against its models, and both
list only what service/fhir_api.py really serves.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from adapters.fhir.codes import FHIR_JSON, FHIR_RELEASE, SOFTWARE_NAME, FhirVersion
from adapters.fhir.models import validate_resource
from adapters.fhir.results import software_version

OPERATION_NAME = "digitize"
ASYNC_NOTE = (
    "Pictures are digitized asynchronously. Send `Prefer: respond-async` to get "
    "`202 Accepted` at once with `Content-Location` naming a status URL: it answers 202 "
    "while the job runs, then 200 with the result Bundle, or the OperationOutcome of the "
    "failure (422 for a picture that is not an ECG). Without the header, small pictures "
    "are answered synchronously (200 with the result Bundle) when digitizing finishes "
    "within the wait limit, else 202 as above."
)
PICTURE_NOTE = ("The picture: image/png, image/jpeg, image/tiff, image/bmp, image/webp or "
                "application/pdf (first page).")


def operation_definition(base_url: str, version: FhirVersion) -> dict[str, Any]:
    """The OperationDefinition of ``$digitize`` (system level)."""
    def param(name: str, use: str, type_: str, doc: str, *, min_: int = 0,
              target: list[str] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"name": name, "use": use, "min": min_, "max": "1",
                               "documentation": doc, "type": type_}
        if target:
            out["targetProfile"] = [f"http://hl7.org/fhir/StructureDefinition/{t}"
                                    for t in target]
        return out

    sources = ["DocumentReference"] + (["Media"] if version == "R4" else [])
    op: dict[str, Any] = {
        "resourceType": "OperationDefinition",
        "id": OPERATION_NAME,
        "url": f"{base_url.rstrip('/')}/OperationDefinition/{OPERATION_NAME}",
        "version": software_version(),
        "name": "Digitize",
        "title": "Digitize a picture of a printed 12-lead ECG",
        "status": "active",
        "kind": "operation",
        "publisher": SOFTWARE_NAME,
        "description": (
            "Digitizes a scanned or photographed 12-lead ECG into calibrated waveforms (mV, "
            "500 Hz) and returns them as FHIR resources: an Observation with one "
            "SampledData component per lead, measurement Observations (heart rate, PR, QRS, "
            "QT, QTc, QRS axis), a DiagnosticReport and a Provenance. Give the picture once: "
            "as `attachment` (inline data, or url of a Binary on this server), as "
            "`reference` to a Binary on this server, or as `resource`. " + ASYNC_NOTE),
        "affectsState": True,
        "code": OPERATION_NAME,
        "system": True,
        "type": False,
        "instance": False,
        "parameter": [
            param("attachment", "in", "Attachment", PICTURE_NOTE),
            param("reference", "in", "Reference",
                  "A Binary on this server holding the picture; or, beside `attachment`, "
                  "the DocumentReference or Media the picture belongs to (the results are "
                  "derivedFrom it).", target=["Binary", *sources]),
            param("resource", "in", "Resource",
                  "A Binary, DocumentReference or Media resource holding the picture."),
            param("patient", "in", "Reference", "The patient the ECG belongs to.",
                  target=["Patient"]),
            param("subject", "in", "Reference",
                  "Same as `patient` (give either; they must agree).", target=["Patient"]),
            param("encounter", "in", "Reference", "The encounter the ECG was taken in.",
                  target=["Encounter"]),
            param("return", "out", "Bundle",
                  "The results: Device, DocumentReference of the source, the 12-lead "
                  "Observation, measurement Observations, DiagnosticReport and Provenance.",
                  min_=1),
        ],
    }
    validate_resource(op, version)
    return op


SECURITY_API_KEY = (
    "Every interaction except reading this CapabilityStatement needs an API key issued by "
    "the operator: send it as `Authorization: Bearer <key>` (or `X-API-Key: <key>`). "
    "Missing or unknown keys get 401 with an OperationOutcome. No OAuth2 or SMART: the "
    "keys are static, and the audit trail records each key's name.")
SECURITY_NONE = (
    "No authentication: anyone who can reach this endpoint can send pictures and read "
    "results. Reach it only from a trusted network, or have the operator turn on API keys.")


def capability_statement(base_url: str, version: FhirVersion, *, max_upload_bytes: int,
                         api_key_auth: bool = False) -> dict[str, Any]:
    """The CapabilityStatement served at ``/fhir/metadata``; ``api_key_auth`` says whether
    the server asks for API keys (``rest.security`` states it either way)."""
    base = base_url.rstrip("/")

    def resource(rtype: str, interactions: list[str], doc: str,
                 search: list[dict[str, str]] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": rtype, "documentation": doc,
            "interaction": [{"code": code} for code in interactions],
        }
        if "create" in interactions:
            out["conditionalCreate"] = False
        if search:
            out["searchParam"] = search
        return out

    inbound = f"{PICTURE_NOTE} Largest accepted picture: {max_upload_bytes} bytes. "
    resources = [
        resource("Binary", ["create", "read"],
                 "create: the raw picture as the request body (Content-Type image/* or "
                 "application/pdf), or a Binary resource in JSON; it is digitized. " + inbound
                 + "read: a received picture, by job id."),
        resource("DocumentReference", ["create", "read"],
                 "create: the picture in content.attachment (inline data, or url of a "
                 "Binary on this server); it is digitized. read: the source and overlay "
                 "DocumentReferences of a result."),
    ]
    if version == "R4":
        resources.append(resource(
            "Media", ["create"], "create: the picture in content; it is digitized."))
    resources += [
        resource("Observation", ["read", "search-type"],
                 "The 12-lead ECG (LOINC 11524-6) and its measurements.",
                 [{"name": "derived-from", "type": "reference",
                   "documentation": "The source DocumentReference, Media or Binary."}]),
        resource("DiagnosticReport", ["read"], "The report of one digitized ECG."),
        resource("Device", ["read"], "CardioScan, the software that digitized the ECG."),
        resource("Provenance", ["read"], "How each result was made."),
        resource("OperationDefinition", ["read"], "The $digitize operation."),
    ]
    statement: dict[str, Any] = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": datetime.now(UTC).date().isoformat(),
        "publisher": SOFTWARE_NAME,
        "kind": "instance",
        "software": {"name": SOFTWARE_NAME, "version": software_version()},
        "implementation": {
            "description": "CardioScan: digitizes pictures of printed 12-lead ECGs", "url": base},
        "fhirVersion": FHIR_RELEASE[version],
        "format": [FHIR_JSON, "json"],
        "rest": [{
            "mode": "server",
            "documentation": ASYNC_NOTE,
            "security": {"cors": False,
                         "description": SECURITY_API_KEY if api_key_auth else SECURITY_NONE},
            "resource": resources,
            "interaction": [{"code": "transaction",
                             "documentation": "A Bundle of Binary, DocumentReference and "
                                              "Media entries; each picture is digitized."},
                            {"code": "batch", "documentation": "As transaction."}],
            "operation": [{"name": OPERATION_NAME,
                           "definition": f"{base}/OperationDefinition/{OPERATION_NAME}"}],
        }],
    }
    validate_resource(statement, version)
    return statement
