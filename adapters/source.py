"""What CardioScan keeps about where an ECG picture came from.

Inbound adapters fill it (DICOM attributes, FHIR references, upload details); the
outbound adapters copy it into the DICOM waveform object and the FHIR resources so the
result lands in the same patient and study as the source. It holds PHI: store it, never
log it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class SourceMeta:
    """Identity and context of one received object."""

    route: str
    """How it arrived: ``dicom``, ``fhir``, ``rest`` or ``cli``."""
    source_id: str
    """Stable identity used for idempotency: the SOP Instance UID, or ``sha256:<hex>`` of
    the bytes for objects without one."""
    media_type: str = "application/octet-stream"
    caller: str | None = None
    """Calling AE title or authenticated client; not PHI."""
    # DICOM patient / study module attributes, copied verbatim (strings as in DICOM).
    patient_id: str | None = None
    patient_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    issuer_of_patient_id: str | None = None
    study_instance_uid: str | None = None
    study_id: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    accession_number: str | None = None
    referring_physician_name: str | None = None
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None
    # FHIR context, as references ("Patient/123").
    fhir_subject: str | None = None
    fhir_encounter: str | None = None
    fhir_source: str | None = None
    """The resource the picture came from: ``DocumentReference/x``, ``Media/x``, ``Binary/x``."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SourceMeta:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})
