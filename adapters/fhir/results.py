"""The FHIR resources CardioScan answers with: one transaction Bundle per digitized picture.

What the Bundle holds (R4 through the R4B models, or R5):

* a Device describing CardioScan (software version and engine);
* a DocumentReference for the source picture, unless the caller named the EHR's own
  DocumentReference (or, in R4, Media) that the picture belongs to;
* one Observation for the 12-lead ECG (LOINC 11524-6 + MDC 131328), a component per
  lead whose valueSampledData holds the trace in mV, ``E`` where the page printed nothing;
* one Observation per measurement (HR, PR, QRS, QT, QTc, frontal QRS axis) in UCUM units;
* a DiagnosticReport listing them, with the source picture and the QA overlay
  (``presentedForm`` in R4; ``media`` -> DocumentReference in R5); the overlay is embedded,
  as a smaller JPEG when its PNG would pass FHIR's 1 MB string limit;
* a Provenance: CardioScan (the Device) as agent, the source as entity, digitization as
  the activity.

Every entry is a conditional create (``ifNoneExist``) on an identifier
``urn:cardioscan:source|<source_id>/<kind>`` (on a ``_tag`` for the Provenance, which has
no identifier), so posting the Bundle again, after a timeout or a crash, creates nothing
twice. Every resource is checked with the fhir.resources model of the output version
before the Bundle is returned.
"""

from __future__ import annotations

import base64
import io
import math
import uuid
from datetime import UTC, datetime
from importlib import metadata
from typing import Any
from urllib.parse import urlencode

import numpy as np

from adapters.fhir.codes import (
    CATEGORY_PROCEDURE,
    DATA_ABSENT_REASON,
    DATA_OPERATION,
    DEVICE_SYSTEM,
    ECG_STUDY,
    ECG_STUDY_MDC,
    IDENTIFIER_TYPE,
    LEAD_MDC,
    MEASUREMENTS,
    MV,
    PROVENANCE_PARTICIPANT,
    SERVICE_ECG,
    SOFTWARE_NAME,
    SOURCE_SYSTEM,
    UCUM,
    UNIT_DISPLAY,
    FhirVersion,
)
from adapters.fhir.models import FhirValidationError, validate_resource
from adapters.source import SourceMeta
from pipeline.leads import LEADS
from pipeline.result import Digitization

_NAMESPACE = uuid.UUID("6f1c2b0e-5d4a-4c33-9a57-0c9d7e3a8b21")
"""Namespace of the deterministic entry UUIDs (fullUrl ``urn:uuid:...``)."""
DERIVED_FROM_TYPES: dict[FhirVersion, tuple[str, ...]] = {
    "R4": ("DocumentReference", "Media"),
    "R5": ("DocumentReference",),
}
"""Source resource types an Observation may be ``derivedFrom`` in each version."""
SAMPLE_DECIMALS = 4
"""mV written with 0.1 µV resolution: far below what a printed trace carries."""


def software_version() -> str:
    try:
        return metadata.version("cardioscan")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def source_identifier(source_id: str, kind: str) -> dict[str, str]:
    """The identifier of the ``kind`` resource made from ``source_id``."""
    return {"system": SOURCE_SYSTEM, "value": f"{source_id}/{kind}"}


def kind_of(resource: dict[str, Any]) -> str | None:
    """Which part of a result a resource is (``ecg``, ``hr``, ``report``...), read back
    from its CardioScan identifier or tag; None for a resource CardioScan did not make."""
    tokens = [(i.get("system"), i.get("value")) for i in resource.get("identifier") or []]
    tags = (resource.get("meta") or {}).get("tag") or []
    tokens += [(t.get("system"), t.get("code")) for t in tags]
    for system, value in tokens:
        if system == SOURCE_SYSTEM and isinstance(value, str) and "/" in value:
            return value.rsplit("/", 1)[1]
        if system == DEVICE_SYSTEM:
            return "device"
    return None


def reference_type(ref: str) -> str | None:
    """``DocumentReference`` for ``DocumentReference/1``, ``https://x/fhir/Media/2`` or
    ``Binary/3/_history/1``; None for ``urn:uuid:...`` and anything else without a type."""
    parts = ref.split("/_history/")[0].rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 and parts[-2][:1].isupper() else None


def _full_url(key: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_NAMESPACE, key)}"


def sampled_data_string(values: np.ndarray) -> str:
    """mV samples as SampledData.data: decimals separated by spaces, ``E`` for NaN."""
    out = []
    for v in np.asarray(values, dtype=float):
        if math.isnan(v) or math.isinf(v):
            out.append("E")
            continue
        text = f"{v:.{SAMPLE_DECIMALS}f}".rstrip("0").rstrip(".")
        out.append("0" if text in ("-0", "") else text)
    return " ".join(out)


MAX_INLINE_PICTURE_BYTES = 700 * 1024
"""Largest picture embedded in a resource: base64 makes it 4/3 larger, and FHIR strings
(validators, EHRs) stop at 1 MB."""


def inline_picture(png: bytes, max_bytes: int = MAX_INLINE_PICTURE_BYTES) -> tuple[bytes, str]:
    """``(data, media type)`` of a QA picture small enough to embed: the PNG itself when it
    fits, else a JPEG of it, scaled down until it fits (a full-page overlay is megabytes)."""
    if len(png) <= max_bytes:
        return png, "image/png"
    from PIL import Image

    picture = Image.open(io.BytesIO(png)).convert("RGB")
    while True:
        buf = io.BytesIO()
        picture.save(buf, format="JPEG", quality=85, optimize=True)
        if buf.tell() <= max_bytes or min(picture.size) <= 64:
            return buf.getvalue(), "image/jpeg"
        picture = picture.resize((picture.width * 3 // 4, picture.height * 3 // 4),
                                 Image.Resampling.LANCZOS)


def png_bytes(rgb: np.ndarray) -> bytes:
    """An RGB uint8 picture as PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _fhir_date(dicom_date: str | None) -> str | None:
    """DICOM ``YYYYMMDD`` -> FHIR date; no time, since a paper ECG's time zone is unknown."""
    if dicom_date and len(dicom_date) == 8 and dicom_date.isdigit():
        return f"{dicom_date[:4]}-{dicom_date[4:6]}-{dicom_date[6:]}"
    return None


def _instant(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class _Builder:
    """Holds what every resource of one Bundle shares."""

    def __init__(self, dig: Digitization, source: SourceMeta, *, version: FhirVersion,
                 job_id: str, base_url: str, issued: datetime) -> None:
        self.dig = dig
        self.source = source
        self.version = version
        self.job_id = job_id
        self.base_url = base_url.rstrip("/")
        self.issued = _instant(issued)
        self.entries: list[dict[str, Any]] = []
        self.sw_version = software_version()

    # -- shared pieces

    def device_token(self) -> str:
        """``system|value`` of the Device: one per CardioScan version and engine."""
        return f"{DEVICE_SYSTEM}|cardioscan/{self.sw_version}/{self.dig.engine or 'unknown'}"

    def url(self, kind: str) -> str:
        if kind == "device":
            return _full_url(self.device_token())
        return _full_url(f"{self.source.source_id}/{kind}")

    def ref(self, kind: str, display: str | None = None) -> dict[str, str]:
        out = {"reference": self.url(kind)}
        if display:
            out["display"] = display
        return out

    def add(self, kind: str, resource: dict[str, Any]) -> None:
        """Append a conditional-create entry for ``resource``."""
        rtype = resource["resourceType"]
        if kind == "device":
            query = urlencode({"identifier": self.device_token()})
            full_url = self.url(kind)
        elif rtype == "Provenance":
            resource.setdefault("meta", {})["tag"] = [
                {"system": SOURCE_SYSTEM, "code": f"{self.source.source_id}/{kind}"}]
            query = urlencode({"_tag": f"{SOURCE_SYSTEM}|{self.source.source_id}/{kind}"})
            full_url = self.url(kind)
        else:
            resource["identifier"] = [source_identifier(self.source.source_id, kind)]
            query = urlencode({"identifier": f"{SOURCE_SYSTEM}|{self.source.source_id}/{kind}"})
            full_url = self.url(kind)
        head = ("resourceType", "meta", "identifier")
        ordered = {k: resource[k] for k in head if k in resource} | {
            k: v for k, v in resource.items() if k not in head}
        self.entries.append({
            "fullUrl": full_url, "resource": ordered,
            "request": {"method": "POST", "url": rtype, "ifNoneExist": query},
        })

    def subject(self) -> dict[str, Any] | None:
        s = self.source
        if s.fhir_subject:
            return {"reference": s.fhir_subject}
        if s.patient_id:  # a DICOM source: a logical reference the EHR can match
            ident: dict[str, Any] = {"value": s.patient_id}
            issuer = s.issuer_of_patient_id
            if issuer and all(part.isdigit() for part in issuer.split(".")):
                ident["system"] = f"urn:oid:{issuer}"
            elif issuer:
                ident["assigner"] = {"display": issuer}
            return {"type": "Patient", "identifier": ident}
        return None

    def encounter(self) -> dict[str, str] | None:
        return {"reference": self.source.fhir_encounter} if self.source.fhir_encounter else None

    def based_on(self) -> list[dict[str, Any]] | None:
        if not self.source.accession_number:
            return None
        return [{"type": "ServiceRequest", "identifier": {
            "type": {"coding": [{"system": IDENTIFIER_TYPE, "code": "ACSN"}]},
            "value": self.source.accession_number}}]

    def context(self, resource: dict[str, Any], *, effective: bool = True) -> dict[str, Any]:
        """Add subject, encounter, basedOn and effective date where known."""
        for key, value in (("basedOn", self.based_on()), ("subject", self.subject()),
                           ("encounter", self.encounter())):
            if value:
                resource[key] = value
        date = _fhir_date(self.source.study_date)
        if effective and date:
            resource["effectiveDateTime"] = date
        return resource

    def source_reference(self) -> dict[str, str] | None:
        """The caller's own source resource, when it can be ``derivedFrom``."""
        ref = self.source.fhir_source
        if ref and reference_type(ref) in DERIVED_FROM_TYPES[self.version]:
            return {"reference": ref}
        return None

    def picture_url(self) -> str:
        return f"{self.base_url}/Binary/{self.job_id}"

    # -- resources

    def device(self) -> None:
        engine = self.dig.engine or "unknown"
        ident = dict(zip(("system", "value"), self.device_token().split("|", 1), strict=True))
        kind_text = "Software that digitizes pictures of printed 12-lead ECGs"
        versions = [{"type": {"text": "software"}, "value": self.sw_version},
                    {"type": {"text": "digitizer engine"}, "value": engine}]
        device: dict[str, Any] = {
            "resourceType": "Device", "identifier": [ident], "status": "active",
            "manufacturer": SOFTWARE_NAME, "version": versions,
        }
        if self.version == "R4":
            device["deviceName"] = [{"name": f"{SOFTWARE_NAME} ECG digitizer",
                                     "type": "manufacturer-name"}]
            device["type"] = {"text": kind_text}
        else:
            device["name"] = [{"value": f"{SOFTWARE_NAME} ECG digitizer",
                               "type": "registered-name"}]
            device["type"] = [{"text": kind_text}]
        self.add("device", device)

    def document(self, kind: str, attachment: dict[str, Any], description: str,
                 relates_to: dict[str, str] | None = None) -> None:
        doc: dict[str, Any] = {
            "resourceType": "DocumentReference", "status": "current",
            "type": {"coding": [ECG_STUDY], "text": description},
            "description": description, "content": [{"attachment": attachment}],
        }
        subject = self.subject()
        if subject:
            doc["subject"] = subject
        enc = self.encounter()
        if enc:
            doc["context"] = {"encounter": [enc]} if self.version == "R4" else [enc]
        if relates_to:
            doc["relatesTo"] = [{"target": relates_to} | (
                {"code": "transforms"} if self.version == "R4" else {"code": {"coding": [{
                    "system": "http://hl7.org/fhir/document-relationship-type",
                    "code": "transforms"}]}})]
        self.add(kind, doc)

    def source_attachment(self) -> dict[str, Any]:
        return {"contentType": self.source.media_type, "url": self.picture_url(),
                "title": "Source ECG picture"}

    def overlay_attachment(self, png: bytes) -> dict[str, Any]:
        data, media_type = inline_picture(png)
        # Attachment.size is unsignedInt in R4 and integer64 (a JSON string) in R5.
        size: int | str = len(data) if self.version == "R4" else str(len(data))
        return {"contentType": media_type, "data": base64.b64encode(data).decode("ascii"),
                "title": "CardioScan QA overlay: traces found on the rectified page",
                "size": size}

    def method_text(self) -> str:
        d = self.dig
        return (f"Digitized by {SOFTWARE_NAME} {self.sw_version} ({d.engine} engine) from a "
                f"picture of a printed ECG: layout {d.layout}, {d.paper_speed_mm_s:g} mm/s, "
                f"{d.gain_mm_mv:g} mm/mV, grid confidence {d.grid_confidence:.2f}")

    def ecg(self, derived_from: dict[str, str]) -> None:
        period_ms = round(1000.0 / float(self.dig.fs), 6)
        components = []
        for i, lead in enumerate(LEADS):
            code, display = LEAD_MDC[lead]
            comp: dict[str, Any] = {
                "code": {"coding": [{"system": ECG_STUDY_MDC["system"], "code": code,
                                     "display": display}], "text": lead}}
            column = self.dig.signals[:, i]
            if np.isnan(column).all():
                comp["dataAbsentReason"] = {
                    "coding": [{"system": DATA_ABSENT_REASON, "code": "error",
                                "display": "Error"}],
                    "text": "the lead could not be read from the picture"}
            else:
                sd: dict[str, Any] = {"origin": {"value": 0, **MV}, "dimensions": 1,
                                      "data": sampled_data_string(column)}
                if self.version == "R4":
                    sd["period"] = period_ms
                else:
                    sd["interval"] = period_ms
                    sd["intervalUnit"] = "ms"
                comp["valueSampledData"] = sd
            components.append(comp)
        obs = self.context({
            "resourceType": "Observation", "status": "final",
            "category": [{"coding": [CATEGORY_PROCEDURE]}],
            "code": {"coding": [ECG_STUDY, ECG_STUDY_MDC],
                     "text": "12-lead ECG digitized from a picture"},
        })
        obs["issued"] = self.issued
        obs["method"] = {"text": self.method_text()}
        obs["device"] = self.ref("device", SOFTWARE_NAME)
        obs["derivedFrom"] = [derived_from]
        if self.dig.warnings:
            obs["note"] = [{"text": w} for w in self.dig.warnings]
        obs["component"] = components
        self.add("ecg", obs)

    def measurements(self) -> list[str]:
        made = []
        for m in MEASUREMENTS:
            value = getattr(self.dig.metrics, m.attr)
            if value is None or not math.isfinite(float(value)):
                continue
            obs = self.context({
                "resourceType": "Observation", "status": "final",
                "category": [{"coding": [CATEGORY_PROCEDURE]}],
                "code": {"coding": [m.coding], "text": m.display},
            })
            obs["issued"] = self.issued
            obs["valueQuantity"] = {"value": round(float(value), 1),
                                    "unit": UNIT_DISPLAY.get(m.unit, m.unit),
                                    "system": UCUM, "code": m.unit}
            if m.kind == "qtc":
                obs["method"] = {"text": "Bazett: QT / sqrt(RR in s)"}
            obs["device"] = self.ref("device", SOFTWARE_NAME)
            obs["derivedFrom"] = [self.ref("ecg")]
            self.add(m.kind, obs)
            made.append(m.kind)
        return made

    def conclusion(self) -> str:
        parts = [f"12 leads digitized from a {self.dig.layout} page"]
        for m in MEASUREMENTS:
            value = getattr(self.dig.metrics, m.attr)
            if value is not None and math.isfinite(float(value)):
                parts.append(f"{m.display} {float(value):.0f} {m.unit}")
        return "; ".join(parts) + ". Machine-digitized; not a clinical interpretation."

    def report(self, results: list[str], source_doc: dict[str, str] | None,
               overlay_png: bytes | None) -> None:
        rep = self.context({
            "resourceType": "DiagnosticReport", "status": "final",
            "category": [{"coding": [SERVICE_ECG]}],
            "code": {"coding": [ECG_STUDY], "text": "12-lead ECG digitized from a picture"},
        })
        rep["issued"] = self.issued
        rep["result"] = [self.ref(kind) for kind in results]
        rep["conclusion"] = self.conclusion()
        if self.version == "R4":
            forms = [self.source_attachment()]
            if overlay_png is not None:
                forms.append(self.overlay_attachment(overlay_png))
            rep["presentedForm"] = forms
        else:
            media = []
            if source_doc:
                media.append({"comment": "Source ECG picture", "link": source_doc})
            if overlay_png is not None:
                media.append({"comment": "CardioScan QA overlay", "link": self.ref("overlay")})
            if media:
                rep["media"] = media
        self.add("report", rep)

    def provenance(self, targets: list[str], entity: dict[str, str]) -> None:
        self.add("provenance", {
            "resourceType": "Provenance",
            "target": [self.ref(kind) for kind in targets],
            "recorded": self.issued,
            "activity": {"coding": [{"system": DATA_OPERATION, "code": "CREATE",
                                     "display": "create"}],
                         "text": "Digitization of a printed ECG picture into 12-lead waveforms"},
            "agent": [{"type": {"coding": [{"system": PROVENANCE_PARTICIPANT,
                                            "code": "assembler", "display": "Assembler"}]},
                       "who": self.ref("device", SOFTWARE_NAME)}],
            "entity": [{"role": "source", "what": entity}],
        })


def build_result_bundle(
    dig: Digitization, source: SourceMeta, *, version: FhirVersion = "R4", job_id: str,
    base_url: str, overlay_png: bytes | None = None, issued: datetime | None = None,
) -> dict[str, Any]:
    """The transaction Bundle for one digitized picture (see the module docstring).

    ``base_url`` is this server's FHIR base: the source picture is referenced as
    ``{base_url}/Binary/{job_id}``. ``overlay_png`` defaults to the digitizer's QA
    overlay (``dig.qa_images["overlay"]``), if it made one. ``issued`` defaults to now. Raises
    :class:`FhirValidationError` if a resource fails its fhir.resources model (a bug).
    """
    if version not in DERIVED_FROM_TYPES:
        raise ValueError(f"FHIR version must be R4 or R5, not {version!r}")
    if dig.signals.ndim != 2 or dig.signals.shape[1] != len(LEADS):
        raise ValueError(f"expected (n, 12) signals, got {dig.signals.shape}")
    if overlay_png is None and dig.qa_images.get("overlay") is not None:
        overlay_png = png_bytes(dig.qa_images["overlay"])
    b = _Builder(dig, source, version=version, job_id=job_id, base_url=base_url,
                 issued=issued or datetime.now(UTC))
    b.device()
    own = b.source_reference()
    if own is None:
        b.document("source", b.source_attachment(), "ECG picture digitized by CardioScan")
        source_doc: dict[str, str] | None = b.ref("source")
    else:
        source_doc = own if reference_type(own["reference"]) == "DocumentReference" else None
    derived_from = own or b.ref("source")
    if version == "R5" and overlay_png is not None:
        b.document("overlay", b.overlay_attachment(overlay_png),
                   "CardioScan QA overlay of the digitized ECG", relates_to=source_doc)
    b.ecg(derived_from)
    results = ["ecg", *b.measurements()]
    b.report(results, source_doc, overlay_png)
    targets = [*results, "report"] + (["overlay"] if version == "R5" and overlay_png else [])
    b.provenance(targets, derived_from)
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "identifier": source_identifier(source.source_id, "bundle"),
        "type": "transaction", "timestamp": b.issued, "entry": b.entries,
    }
    for entry in b.entries:
        validate_resource(entry["resource"], version)
    validate_resource(bundle, version)
    return bundle


def local_resources(bundle: dict[str, Any], id_prefix: str) -> list[dict[str, Any]]:
    """The Bundle's resources as this server serves them: each with id
    ``<id_prefix>-<kind>`` (the prefix is the job id, plus ``-p<n>`` for page n > 1 of a
    PDF) and every ``urn:uuid`` reference rewritten to ``Type/<id>``."""
    ids: dict[str, str] = {}
    resources = []
    for entry in bundle.get("entry") or []:
        resource = entry["resource"]
        kind = kind_of(resource)
        if kind is None:
            raise FhirValidationError(f"not a CardioScan resource: {entry.get('fullUrl')}")
        ids[entry["fullUrl"]] = f"{resource['resourceType']}/{id_prefix}-{kind}"
        resources.append({"resourceType": resource["resourceType"], "id": f"{id_prefix}-{kind}",
                          **{k: v for k, v in resource.items() if k != "resourceType"}})
    return [_rewrite(r, ids) for r in resources]


def _rewrite(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, dict):
        out = {k: _rewrite(v, ids) for k, v in value.items()}
        ref = out.get("reference")
        if isinstance(ref, str) and ref in ids:
            out["reference"] = ids[ref]
        return out
    if isinstance(value, list):
        return [_rewrite(v, ids) for v in value]
    return value


def collection_bundle(resources: list[dict[str, Any]], base_url: str,
                      *, bundle_type: str = "collection", self_url: str | None = None,
                      ) -> dict[str, Any]:
    """Resources served by this server wrapped in a ``collection`` (or a ``searchset``,
    whose ``self`` link is ``self_url``, default the base URL)."""
    base = base_url.rstrip("/")
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": bundle_type}
    if bundle_type == "searchset":
        bundle["link"] = [{"relation": "self", "url": self_url or base}]
        bundle["total"] = len(resources)
    bundle["entry"] = [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r}
                       | ({"search": {"mode": "match"}} if bundle_type == "searchset" else {})
                       for r in resources]
    return bundle
