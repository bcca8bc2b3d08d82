"""The 12-lead ECG Waveform Storage object CardioScan sends to the PACS, and its reader.

One multiplex group holds the 12 leads at the digitized rate, 16-bit signed, interleaved.
A lead is printed for only part of the page (2.5 s of a 10 s 3x4 page); the samples it
does not print carry the Waveform Padding Value, so a viewer shows gaps, never invented
signal. The object goes into the source's patient and study, in a series of its own, with
UIDs derived from the source's identity: a redelivery replaces, never duplicates.
"""

from __future__ import annotations

import math
import re
import uuid
from datetime import datetime
from importlib import metadata

import numpy as np
from pydicom import Dataset, Sequence
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian
from pydicom.waveforms import multiplex_array

from adapters.dicom import codes
from adapters.dicom.codes import Code
from adapters.dicom.decode import DICOM_JSON_KEY
from adapters.source import SourceMeta
from pipeline.leads import LEAD_INDEX, LEADS
from pipeline.result import Digitization

MIN_FS = 200.0
MAX_FS = 1000.0
"""Sampling rates both ECG waveform IODs allow (PS3.3 A.34.3.4, A.34.4.4)."""
TWELVE_LEAD_MAX_SAMPLES = 16384
"""Longest multiplex group the 12-lead IOD allows; longer records go to General ECG."""
PADDING_VALUE = -32768
"""Waveform Padding Value: a sample the page did not print. Real samples stay within
+-32767, so the value is never a signal."""
SENSITIVITIES_UV: tuple[float, ...] = (1.0, 2.0, 2.5, 5.0, 10.0, 20.0, 50.0, 100.0)
"""Quantization steps tried in turn: the finest whose range holds the signal wins (1 uV
covers +-32.7 mV, far beyond any ECG)."""
SERIES_NUMBER = 9401
MULTIPLEX_GROUP_LABEL = "RHYTHM"
MANUFACTURER = "CardioScan"
MODEL_NAME = "CardioScan ECG image digitizer"
SERIES_DESCRIPTION = "ECG digitized from image"
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:cardioscan:dicom")
_PAGE_SUFFIX = re.compile(r"^(.+)/page-([0-9]+)$")


def software_version() -> str:
    try:
        return metadata.version("cardioscan")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def source_page(source: SourceMeta) -> tuple[str, int]:
    """(identity of the whole source, 0-based page): the service names page ``n`` > 1 of a
    multi-page source ``<source_id>/page-<n>`` (see :func:`service.outputs.page_source`)."""
    match = _PAGE_SUFFIX.match(source.source_id)
    if match:
        return match.group(1), int(match.group(2)) - 1
    return source.source_id, 0


def derived_uid(*names: str) -> str:
    """A UID that is a function of ``names``: ``2.25.`` and a name-based (SHA-1) UUID.

    (pydicom's ``generate_uid(prefix=None, ...)`` ignores its entropy sources and draws a
    random UUID, so it cannot give a stable identity.)
    """
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '/'.join(names)).int}"


def waveform_uids(source: SourceMeta) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the waveform made from ``source``.

    Derived from the source's identity, so every rebuild of the same result, on any node,
    carries the same identity and a PACS stores it once. The pages of one source share the
    series.
    """
    base, page = source_page(source)
    return derived_uid("series", base), derived_uid("instance", base, str(page))


def build_ecg_waveform(
    dig: Digitization,
    source: SourceMeta,
    *,
    created: datetime | None = None,
) -> Dataset:
    """The DICOM ECG waveform object for ``dig``, ready for ``save_as`` or C-STORE.

    12-lead ECG Waveform Storage when the record fits its limits, General ECG Waveform
    Storage when it is longer than 16384 samples. Each page of a multi-page source is its
    own instance in the one series.
    """
    signals = np.asarray(dig.signals, dtype=np.float64)
    if signals.ndim != 2 or signals.shape[1] != len(LEADS) or signals.shape[0] == 0:
        raise ValueError(f"signals must be (n, {len(LEADS)}) with n > 0, not {signals.shape}")
    fs = float(dig.fs)
    if not MIN_FS <= fs <= MAX_FS:
        raise ValueError(f"sampling rate {fs:g} Hz outside the {MIN_FS:g}-{MAX_FS:g} Hz the "
                         "ECG waveform IODs allow")
    n_samples = signals.shape[0]
    sop_class = (codes.TWELVE_LEAD_ECG if n_samples <= TWELVE_LEAD_MAX_SAMPLES
                 else codes.GENERAL_ECG)
    created = created or datetime.now().astimezone()
    series_uid, instance_uid = waveform_uids(source)
    page = source_page(source)[1]

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    _patient_and_study(ds, source)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = instance_uid
    ds.InstanceCreationDate = created.strftime("%Y%m%d")
    ds.InstanceCreationTime = created.strftime("%H%M%S")
    # General Series
    ds.Modality = "ECG"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = SERIES_NUMBER
    ds.SeriesDate = ds.InstanceCreationDate
    ds.SeriesTime = ds.InstanceCreationTime
    ds.SeriesDescription = SERIES_DESCRIPTION
    # General Equipment
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL_NAME
    ds.SoftwareVersions = [software_version(), f"engine {dig.engine}"[:64]]
    # Waveform Identification
    ds.InstanceNumber = page + 1
    ds.ContentDate = ds.InstanceCreationDate
    ds.ContentTime = ds.InstanceCreationTime
    ds.AcquisitionDateTime = _acquisition_datetime(source, created)
    if source.sop_class_uid and source.sop_instance_uid:
        ds.ReferencedInstanceSequence = Sequence([_reference(source)])
    # Acquisition Context (TID 3401)
    ds.AcquisitionContextSequence = Sequence([_context_item()])
    ds.AcquisitionContextDescription = _provenance(dig)
    # Waveform
    ds.WaveformSequence = Sequence([_multiplex_group(dig, signals, fs)])
    annotations = _annotations(dig)
    if annotations:
        ds.WaveformAnnotationSequence = Sequence(annotations)

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "CARDIOSCAN"
    ds.set_original_encoding(False, True)
    return ds


def _patient_and_study(ds: Dataset, source: SourceMeta) -> None:
    """Copy the source's patient and study verbatim; fill the Type 2 attributes it lacks."""
    kept = source.extra.get(DICOM_JSON_KEY)
    if kept:
        copied = Dataset.from_json(kept)
        for elem in copied:
            if elem.keyword != "SpecificCharacterSet":
                ds[elem.tag] = elem
    defaults = {
        "PatientName": source.patient_name, "PatientID": source.patient_id,
        "IssuerOfPatientID": source.issuer_of_patient_id,
        "PatientBirthDate": source.patient_birth_date, "PatientSex": source.patient_sex,
        "StudyDate": source.study_date, "StudyTime": source.study_time,
        "ReferringPhysicianName": source.referring_physician_name,
        "StudyID": source.study_id, "AccessionNumber": source.accession_number,
    }
    for keyword, value in defaults.items():
        if keyword not in ds and (value is not None or keyword != "IssuerOfPatientID"):
            setattr(ds, keyword, value or "")
    if not ds.get("StudyInstanceUID"):
        ds.StudyInstanceUID = (source.study_instance_uid
                               or derived_uid("study", source_page(source)[0]))


def _acquisition_datetime(source: SourceMeta, created: datetime) -> str:
    """When the ECG was recorded is not on the page; the study's date and time is the best
    available, the digitization time the fallback."""
    if source.study_date:
        return source.study_date + (source.study_time or "")
    return created.strftime("%Y%m%d%H%M%S")


def _reference(source: SourceMeta) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.sop_class_uid
    item.ReferencedSOPInstanceUID = source.sop_instance_uid
    item.PurposeOfReferenceCodeSequence = Sequence([_code(codes.SOURCE_IMAGE_PURPOSE)])
    return item


def _code(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme
    item.CodeMeaning = code.meaning
    return item


def _context_item() -> Dataset:
    item = Dataset()
    item.ValueType = "CODE"
    item.ConceptNameCodeSequence = Sequence([_code(codes.LEAD_SYSTEM)])
    item.ConceptCodeSequence = Sequence([_code(codes.STANDARD_12_LEAD)])
    return item


def _provenance(dig: Digitization) -> str:
    return (
        f"Signal digitized from an image of a printed ECG by CardioScan {software_version()} "
        f"(engine {dig.engine}); not an original acquisition. Page layout {dig.layout}, "
        f"{dig.paper_speed_mm_s:g} mm/s, {dig.gain_mm_mv:g} mm/mV, grid confidence "
        f"{dig.grid_confidence:.2f}. Samples a lead did not print carry the Waveform "
        "Padding Value."
    )


def _sensitivity_uv(signals: np.ndarray) -> float:
    peak_uv = float(np.nanmax(np.abs(signals))) * 1000.0 if np.isfinite(signals).any() else 0.0
    for step in SENSITIVITIES_UV:
        if peak_uv / step <= 32767:
            return step
    return SENSITIVITIES_UV[-1]  # beyond +-3.2 V: clipped, and not an ECG anyway


def _multiplex_group(dig: Digitization, signals: np.ndarray, fs: float) -> Dataset:
    sensitivity = _sensitivity_uv(signals)
    printed = np.isfinite(signals)
    quantized = np.zeros(signals.shape, dtype=np.int16)
    quantized[printed] = np.clip(np.rint(signals[printed] * 1000.0 / sensitivity),
                                 -32767, 32767).astype(np.int16)
    quantized[~printed] = PADDING_VALUE
    high_hz = _bandwidth_hz(dig, fs)

    group = Dataset()
    group.MultiplexGroupLabel = MULTIPLEX_GROUP_LABEL
    group.WaveformOriginality = "DERIVED"
    group.NumberOfWaveformChannels = len(LEADS)
    group.NumberOfWaveformSamples = signals.shape[0]
    group.SamplingFrequency = _ds(fs)
    channels = []
    for i, lead in enumerate(LEADS):
        ch = Dataset()
        ch.ChannelLabel = lead
        ch.ChannelSourceSequence = Sequence([_code(codes.LEAD_CODES[lead])])
        if not printed[:, i].any():
            ch.ChannelStatus = "INVALID"  # the page did not print this lead at all
        ch.ChannelSensitivity = _ds(sensitivity)
        ch.ChannelSensitivityUnitsSequence = Sequence([_code(codes.MICROVOLT)])
        ch.ChannelSensitivityCorrectionFactor = "1"
        ch.ChannelBaseline = "0"
        ch.ChannelSampleSkew = "0"
        ch.WaveformBitsStored = 16
        ch.FilterLowFrequency = "0"
        ch.FilterHighFrequency = _ds(high_hz)
        channels.append(ch)
    group.ChannelDefinitionSequence = Sequence(channels)
    group.WaveformBitsAllocated = 16
    group.WaveformSampleInterpretation = "SS"
    group.add(DataElement(0x5400100A, "OW", np.int16(PADDING_VALUE).astype("<i2").tobytes()))
    group.add(DataElement(0x54001010, "OW", quantized.astype("<i2").tobytes()))
    return group


def _bandwidth_hz(dig: Digitization, fs: float) -> float:
    """The highest frequency the picture can hold: half the trace's pixels per second
    (0.1 mm of ink at 25 mm/s is 4 ms), and never above half the sampling rate."""
    nyquist = fs / 2.0
    if dig.px_per_mm > 0 and dig.paper_speed_mm_s > 0:
        return round(min(nyquist, dig.px_per_mm * dig.paper_speed_mm_s / 2.0), 1)
    return nyquist


def _ds(value: float) -> str:
    text = f"{value:.6g}"
    return text if len(text) <= 16 else f"{value:.10g}"[:16]


def _annotations(dig: Digitization) -> list[Dataset]:
    items = []
    note = Dataset()
    note.UnformattedTextValue = "Digitized from an ECG image by CardioScan"
    note.ReferencedWaveformChannels = [1, 0]
    note.AnnotationGroupNumber = 0
    items.append(note)
    for field, concept, unit in codes.MEASUREMENTS:
        value = getattr(dig.metrics, field)
        if value is None or not math.isfinite(value):
            continue
        item = Dataset()
        item.ConceptNameCodeSequence = Sequence([_code(concept)])
        item.NumericValue = _ds(round(float(value), 1))
        item.MeasurementUnitsCodeSequence = Sequence([_code(unit)])
        item.ReferencedWaveformChannels = [1, 0]  # group 1, channel 0: all channels
        item.AnnotationGroupNumber = 1
        items.append(item)
    return items


# --- Reading --------------------------------------------------------------------------------


def read_ecg_waveform(ds: Dataset) -> tuple[np.ndarray, float]:
    """(signals (n, 12) mV in LEADS order with NaN at padding or missing leads, fs).

    Reads CardioScan's own objects and real ECG carts' (MDC or legacy SCP-ECG lead codes).
    Of several multiplex groups, the one holding the most standard leads for the longest
    time is read (the rhythm, not the median beat).
    """
    groups = list(ds.get("WaveformSequence") or [])
    if not groups:
        raise ValueError("data set holds no Waveform Sequence")
    scored = []
    for index, group in enumerate(groups):
        leads = _channel_leads(group)
        found = sum(lead is not None for lead in leads)
        scored.append((found, int(group.get("NumberOfWaveformSamples", 0)), -index))
    found, _, neg_index = max(scored)
    if found == 0:
        raise ValueError("no multiplex group holds a standard ECG lead")
    index = -neg_index
    group = groups[index]
    raw = multiplex_array(ds, index, as_raw=True)
    padding = _padding_value(group, raw.dtype)
    out = np.full((raw.shape[0], len(LEADS)), np.nan)
    for channel, (lead, ch) in enumerate(zip(_channel_leads(group),
                                             group.ChannelDefinitionSequence, strict=True)):
        if lead is None:
            continue
        column = raw[:, channel].astype(np.float64)
        scale = (float(ch.get("ChannelSensitivity", 1.0))
                 * float(ch.get("ChannelSensitivityCorrectionFactor", 1.0)))
        mv = (column * scale + float(ch.get("ChannelBaseline", 0.0))) * _unit_to_mv(ch)
        if padding is not None:
            mv[raw[:, channel] == padding] = np.nan
        out[:, LEAD_INDEX[lead]] = mv
    return out, float(group.SamplingFrequency)


def _channel_leads(group: Dataset) -> list[str | None]:
    leads: list[str | None] = []
    for ch in group.get("ChannelDefinitionSequence") or []:
        lead = None
        for code in ch.get("ChannelSourceSequence") or []:
            key = (str(code.get("CodingSchemeDesignator", "")), str(code.get("CodeValue", "")))
            lead = codes.LEAD_BY_CODE.get(key)
        leads.append(lead)
    return leads


def _padding_value(group: Dataset, dtype: np.dtype) -> int | None:
    value = group.get("WaveformPaddingValue")
    if not value:
        return None
    return int(np.frombuffer(bytes(value)[: dtype.itemsize], dtype=dtype.newbyteorder("<"))[0])


def _unit_to_mv(ch: Dataset) -> float:
    units = ch.get("ChannelSensitivityUnitsSequence") or []
    unit = str(units[0].get("CodeValue", "uV")) if units else "uV"
    if unit not in codes.UNIT_SCALE_TO_MV:
        raise ValueError(f"channel sensitivity unit {unit!r} is not a voltage")
    return codes.UNIT_SCALE_TO_MV[unit]
