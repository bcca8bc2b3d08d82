"""Every coded value and SOP class CardioScan reads or writes in DICOM, named once.

Lead codes are CID 3001 "ECG Lead" in the ISO/IEEE 11073-10101 (MDC) scheme; older carts
(and pydicom's bundled example) still use the retired SCP-ECG codes ``5.6.3-9-<n>``,
whose ``n`` is the MDC code's number, so both are read. Measurement codes are those of
TID 3713 "ECG Global Measurements" (CID 3689 durations, CID 3227 QTc, CID 3229 axes).
"""

from __future__ import annotations

from typing import NamedTuple

from pydicom import uid

from pipeline.leads import LEADS


class Code(NamedTuple):
    """A DICOM coded concept (Code Value, Coding Scheme Designator, Code Meaning)."""

    value: str
    scheme: str
    meaning: str


# --- SOP classes ---------------------------------------------------------------------------

TWELVE_LEAD_ECG = uid.TwelveLeadECGWaveformStorage
GENERAL_ECG = uid.GeneralECGWaveformStorage
ENCAPSULATED_PDF = uid.EncapsulatedPDFStorage

SECONDARY_CAPTURE_CLASSES: frozenset[str] = frozenset({
    uid.SecondaryCaptureImageStorage,
    uid.MultiFrameSingleBitSecondaryCaptureImageStorage,
    uid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    uid.MultiFrameTrueColorSecondaryCaptureImageStorage,
})
IMAGE_CLASSES: frozenset[str] = SECONDARY_CAPTURE_CLASSES | {
    uid.VLPhotographicImageStorage,
    uid.VLEndoscopicImageStorage,
    # A scanned ECG routed through an X-ray workstation or a film digitizer.
    uid.DigitalXRayImageStorageForPresentation,
    uid.DigitalXRayImageStorageForProcessing,
    uid.ComputedRadiographyImageStorage,
}
"""Image storage classes whose pixel data may be a picture of an ECG page."""
INBOUND_CLASSES: frozenset[str] = IMAGE_CLASSES | {ENCAPSULATED_PDF}
"""Every SOP class the listener accepts for digitization."""

INBOUND_TRANSFER_SYNTAXES: tuple[str, ...] = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.RLELossless,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
)
"""Transfer syntaxes the listener accepts; pydicom + the pylibjpeg plugins decode them all."""

# --- Leads: CID 3001 -----------------------------------------------------------------------

MDC = "MDC"
SCPECG = "SCPECG"
_MDC_LEAD_NUMBER: dict[str, int] = {
    "I": 1, "II": 2, "III": 61, "aVR": 62, "aVL": 63, "aVF": 64,
    "V1": 3, "V2": 4, "V3": 5, "V4": 6, "V5": 7, "V6": 8,
}
_LEAD_MEANING: dict[str, str] = {
    "I": "Lead I", "II": "Lead II", "III": "Lead III",
    "aVR": "aVR, augmented voltage, right", "aVL": "aVL, augmented voltage, left",
    "aVF": "aVF, augmented voltage, foot",
    **{f"V{i}": f"Lead V{i}" for i in range(1, 7)},
}
LEAD_CODES: dict[str, Code] = {
    lead: Code(f"2:{_MDC_LEAD_NUMBER[lead]}", MDC, _LEAD_MEANING[lead]) for lead in LEADS
}
"""The Channel Source code CardioScan writes for each lead."""
LEAD_BY_CODE: dict[tuple[str, str], str] = {
    **{(MDC, f"2:{n}"): lead for lead, n in _MDC_LEAD_NUMBER.items()},
    **{(SCPECG, f"5.6.3-9-{n}"): lead for lead, n in _MDC_LEAD_NUMBER.items()},
}
"""(scheme, code value) -> lead name, for reading MDC and legacy SCP-ECG objects."""

# --- Units (UCUM) --------------------------------------------------------------------------

UCUM = "UCUM"
MICROVOLT = Code("uV", UCUM, "microvolt")
UNIT_SCALE_TO_MV: dict[str, float] = {"uV": 1e-3, "mV": 1.0, "V": 1e3, "nV": 1e-6}
MILLISECOND = Code("ms", UCUM, "millisecond")
DEGREE = Code("deg", UCUM, "degree")
BEATS_PER_MINUTE = Code("{H.B.}/min", UCUM, "heart beats per minute")

# --- Acquisition context (TID 3401) --------------------------------------------------------

LEAD_SYSTEM = Code("10:11345", MDC, "Lead System")
STANDARD_12_LEAD = Code("10:11265", MDC,
                        "Standard 12-lead positions, electrodes placed individually")

# --- Global measurements (TID 3713) --------------------------------------------------------

VENTRICULAR_RATE = Code("2:16016", MDC, "Ventricular Heart Rate")
RR_INTERVAL = Code("2:16000", MDC, "RR time period, global")
PR_INTERVAL = Code("2:15872", MDC, "PR interval global")
QRS_DURATION = Code("2:16156", MDC, "QRS duration global")
QT_INTERVAL = Code("2:16160", MDC, "QT interval global")
QTC_BAZETT = Code("2:15880", MDC, "QTc global using Bazett formula")
QTC_FRIDERICIA = Code("2:15892", MDC, "QTc global using Fredericia formula")
QRS_AXIS = Code("2:16132", MDC, "QRS axis")

MEASUREMENTS: tuple[tuple[str, Code, Code], ...] = (
    ("hr_bpm", VENTRICULAR_RATE, BEATS_PER_MINUTE),
    ("rr_ms", RR_INTERVAL, MILLISECOND),
    ("pr_ms", PR_INTERVAL, MILLISECOND),
    ("qrs_ms", QRS_DURATION, MILLISECOND),
    ("qt_ms", QT_INTERVAL, MILLISECOND),
    ("qtc_bazett_ms", QTC_BAZETT, MILLISECOND),
    ("qtc_fridericia_ms", QTC_FRIDERICIA, MILLISECOND),
    ("axis_deg", QRS_AXIS, DEGREE),
)
"""(Metrics field, concept name, unit) for each measurement carried as an annotation."""

# --- References ----------------------------------------------------------------------------

SOURCE_IMAGE_PURPOSE = Code("121322", "DCM", "Source image for image processing operation")
"""Purpose of Reference of the scanned page in the waveform's Referenced Instance Sequence."""
