"""Code systems, codes and units that CardioScan's FHIR resources use, each named once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.leads import LEADS

FhirVersion = Literal["R4", "R5"]
FHIR_VERSIONS: tuple[FhirVersion, ...] = ("R4", "R5")
FHIR_RELEASE: dict[FhirVersion, str] = {"R4": "4.0.1", "R5": "5.0.0"}
"""The ``fhirVersion`` each output flavour declares (R4 output is built with the R4B
models, whose resources used here are wire-compatible with R4 4.0.1)."""

FHIR_JSON = "application/fhir+json"

LOINC = "http://loinc.org"
MDC = "urn:oid:2.16.840.1.113883.6.24"
UCUM = "http://unitsofmeasure.org"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DIAGNOSTIC_SERVICE = "http://terminology.hl7.org/CodeSystem/v2-0074"
DATA_ABSENT_REASON = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
PROVENANCE_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
ISSUE_TYPE = "http://terminology.hl7.org/CodeSystem/operation-outcome"

SOURCE_SYSTEM = "urn:cardioscan:source"
"""Identifier system of every resource CardioScan emits; the value is
``<source_id>/<kind>``, so a retried delivery finds what the first one created."""
DEVICE_SYSTEM = "urn:cardioscan:device"
SOFTWARE_NAME = "CardioScan"

ECG_STUDY = {"system": LOINC, "code": "11524-6", "display": "EKG study"}
ECG_STUDY_MDC = {"system": MDC, "code": "131328", "display": "MDC_ECG_ELEC_POTL"}
CATEGORY_PROCEDURE = {
    "system": OBSERVATION_CATEGORY, "code": "procedure", "display": "Procedure",
}
SERVICE_ECG = {
    "system": DIAGNOSTIC_SERVICE, "code": "EC",
    "display": "Electrocardiac (e.g., EKG, EEC, Holter)",
}

LEAD_MDC: dict[str, tuple[str, str]] = {
    "I": ("131329", "MDC_ECG_LEAD_I"),
    "II": ("131330", "MDC_ECG_LEAD_II"),
    "III": ("131389", "MDC_ECG_LEAD_III"),
    "aVR": ("131390", "MDC_ECG_LEAD_AVR"),
    "aVL": ("131391", "MDC_ECG_LEAD_AVL"),
    "aVF": ("131392", "MDC_ECG_LEAD_AVF"),
    "V1": ("131331", "MDC_ECG_LEAD_V1"),
    "V2": ("131332", "MDC_ECG_LEAD_V2"),
    "V3": ("131333", "MDC_ECG_LEAD_V3"),
    "V4": ("131334", "MDC_ECG_LEAD_V4"),
    "V5": ("131335", "MDC_ECG_LEAD_V5"),
    "V6": ("131336", "MDC_ECG_LEAD_V6"),
}
assert tuple(LEAD_MDC) == LEADS

MV = {"unit": "mV", "system": UCUM, "code": "mV"}


@dataclass(frozen=True)
class Measurement:
    """One interval or rate read from the ECG, coded in LOINC with a UCUM unit."""

    kind: str
    """Suffix of the resource identifier (``<source_id>/<kind>``)."""
    attr: str
    """Field of :class:`pipeline.result.Metrics`."""
    loinc: str
    display: str
    unit: str

    @property
    def coding(self) -> dict[str, str]:
        return {"system": LOINC, "code": self.loinc, "display": self.display}


MEASUREMENTS: tuple[Measurement, ...] = (
    Measurement("hr", "hr_bpm", "8867-4", "Heart rate", "/min"),
    Measurement("pr", "pr_ms", "8625-6", "P-R Interval", "ms"),
    Measurement("qrs", "qrs_ms", "8633-0", "QRS duration", "ms"),
    Measurement("qt", "qt_ms", "8634-8", "Q-T Interval", "ms"),
    Measurement("qtc", "qtc_bazett_ms", "8636-3", "Q-T Interval corrected", "ms"),
    Measurement("axis", "axis_deg", "8632-2", "QRS axis", "deg"),
)
UNIT_DISPLAY = {"/min": "beats/minute", "ms": "ms", "deg": "deg"}

SUPPORTED_MEDIA_TYPES: tuple[str, ...] = (
    "image/png", "image/jpeg", "image/tiff", "image/bmp", "image/webp", "application/pdf",
)
"""What the digitizer can read (adapters.images); anything else is refused with 415."""
