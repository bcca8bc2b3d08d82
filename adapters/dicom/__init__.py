"""DICOM in and out: scanned ECG pages in, 12-lead ECG waveform objects out."""

from adapters.dicom.decode import (
    DicomContentError,
    DicomParseError,
    UnsupportedSOPClassError,
    parse_dicom,
    read_dicom,
    source_meta,
)
from adapters.dicom.iod_check import check_ecg_iod
from adapters.dicom.waveform import build_ecg_waveform, read_ecg_waveform

__all__ = [
    "DicomContentError",
    "DicomParseError",
    "UnsupportedSOPClassError",
    "build_ecg_waveform",
    "check_ecg_iod",
    "parse_dicom",
    "read_dicom",
    "read_ecg_waveform",
    "source_meta",
]
