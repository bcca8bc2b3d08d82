"""Decode a received DICOM object into RGB pages and the context CardioScan keeps about it.

Secondary Capture (single and multi-frame), VL Photographic, DX/CR and Encapsulated PDF
objects are accepted, in every transfer syntax pydicom and the pylibjpeg plugins decode.
Every frame of a multi-frame object and every page of a PDF is a page. The patient and study
attributes are kept so the ECG waveform object lands in the same patient and study.

Errors say what is wrong with the data set in one line and never quote its values (PHI):
:class:`DicomParseError` for bytes that are not a readable data set (the listener answers
0xC000), :class:`DicomContentError` for a data set that does not hold what its SOP class
promises (0xA900), :class:`UnsupportedSOPClassError` for a SOP class CardioScan does not
digitize (0x0122).
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_voi_lut, get_decoder
from pydicom.pixels.utils import as_pixel_options, get_expected_length
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from adapters.dicom.codes import ENCAPSULATED_PDF, IMAGE_CLASSES
from adapters.images import MAX_PIXELS, load_pages
from adapters.source import SourceMeta
from pipeline.errors import UnreadableImageError

DICOM_MEDIA_TYPE = "application/dicom"

PATIENT_STUDY_KEYWORDS: tuple[str, ...] = (
    # Patient module
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex",
    "OtherPatientIDsSequence", "PatientComments", "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence", "ResponsiblePerson", "ResponsibleOrganization",
    # General Study module
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "StudyDescription", "ProcedureCodeSequence",
    "RequestingService", "ReferencedStudySequence",
    # Patient Study module
    "AdmittingDiagnosesDescription", "PatientAge", "PatientSize", "PatientWeight",
    "AdmissionID", "IssuerOfAdmissionIDSequence",
)
"""Attributes copied verbatim from the scanned page into the ECG waveform object."""
DICOM_JSON_KEY = "dicom_json"
"""``SourceMeta.extra`` key holding the attributes above as DICOM JSON (PHI: never log)."""


class DicomParseError(UnreadableImageError):
    """The bytes are not a readable DICOM data set (empty, truncated, malformed)."""


class DicomContentError(UnreadableImageError):
    """The data set does not hold what its SOP class needs (pixel data, PDF), or it cannot be
    decoded (wrong pixel data length, undecodable JPEG)."""


class UnsupportedSOPClassError(UnreadableImageError):
    """A SOP class that cannot hold a picture of an ECG page."""


def parse_dicom(data: bytes | os.PathLike[str]) -> Dataset:
    """Read a DICOM object (Part 10 file, or a bare data set) and check that it parses whole.

    pydicom converts values lazily, so every element is touched here: a truncated or
    malformed data set fails now, with a reason, rather than deep inside the digitizer.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        if len(data) == 0:
            raise DicomParseError("empty DICOM object (0 bytes)")
        source: Any = io.BytesIO(bytes(data))
    else:
        if os.path.getsize(data) == 0:
            raise DicomParseError("empty DICOM object (0 bytes)")
        source = data
    try:
        with _quiet():
            ds = dcmread(source, force=True)
            _check_value_lengths(ds)
            _touch(ds)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OverflowError,
            struct.error, NotImplementedError, OSError) as exc:
        raise DicomParseError(f"malformed or truncated DICOM data set ({type(exc).__name__})"
                              ) from exc
    if len(ds) == 0:
        raise DicomParseError("DICOM object holds no data set")
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        if not ds.get(keyword):
            raise DicomContentError(f"data set has no {keyword}")
    _infer_transfer_syntax(ds)
    return ds


def _infer_transfer_syntax(ds: Dataset) -> None:
    """A bare data set (no Part 10 header) is native: its encoding is the one pydicom read."""
    if "TransferSyntaxUID" in ds.file_meta:
        return
    implicit, little = ds.original_encoding
    if implicit is None:  # not read from bytes
        return
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


_QUIET_LOCK = threading.Lock()


@contextmanager
def _quiet() -> Iterator[None]:
    """pydicom warns with attribute values in the message (PHI): keep them out of the logs.

    ``warnings.catch_warnings`` is process-global, so concurrent associations take turns.
    """
    with _QUIET_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _check_value_lengths(ds: Dataset) -> None:
    """A data set cut short inside an element parses without error in pydicom; the last
    element's value is then shorter than its declared length."""
    for tag in ds.keys():  # noqa: SIM118 (iterating a Dataset converts its elements)
        raw = ds.get_item(tag)
        if (isinstance(raw, RawDataElement) and raw.length != 0xFFFFFFFF
                and raw.value is not None and len(raw.value) < raw.length):
            raise DicomParseError("truncated DICOM data set (an element ends early)")


def _touch(ds: Dataset) -> None:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _touch(item)


def read_dicom(
    data: bytes | Dataset, *, max_pages: int | None = None, caller: str | None = None
) -> tuple[list[np.ndarray], SourceMeta]:
    """Decode ``data`` into RGB uint8 pages and the :class:`SourceMeta` of the object
    (``caller``: who sent it, e.g. the calling AE title).

    Raises :class:`DicomParseError`, :class:`DicomContentError` or
    :class:`UnsupportedSOPClassError` (all :class:`UnreadableImageError`).
    """
    ds = data if isinstance(data, Dataset) else parse_dicom(data)
    meta = source_meta(ds, caller=caller)
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class == ENCAPSULATED_PDF:
        pages = _pdf_pages(ds, max_pages)
    elif sop_class in IMAGE_CLASSES:
        pages = list(_image_pages(ds, max_pages))
    else:
        raise UnsupportedSOPClassError(f"unsupported SOP class {_sop_name(sop_class)}")
    if not pages:
        raise DicomContentError("DICOM object holds no pages")
    return pages, meta


def _sop_name(sop_class: str) -> str:
    name = UID(sop_class).name if sop_class else "(none)"
    return f"{name} ({sop_class})" if name != sop_class else sop_class


def source_meta(ds: Dataset, *, caller: str | None = None) -> SourceMeta:
    """What CardioScan keeps about the object: identity, patient and study (PHI)."""
    sop_instance = _text(ds, "SOPInstanceUID")
    keep = Dataset()
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in ds:
            keep[keyword] = ds[keyword]
    if "SpecificCharacterSet" in ds:
        keep.SpecificCharacterSet = ds.SpecificCharacterSet
    return SourceMeta(
        route="dicom",
        source_id=sop_instance or _content_id(ds),
        media_type=DICOM_MEDIA_TYPE,
        caller=caller,
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        patient_birth_date=_text(ds, "PatientBirthDate"),
        patient_sex=_text(ds, "PatientSex"),
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        study_id=_text(ds, "StudyID"),
        study_date=_text(ds, "StudyDate"),
        study_time=_text(ds, "StudyTime"),
        accession_number=_text(ds, "AccessionNumber"),
        referring_physician_name=_text(ds, "ReferringPhysicianName"),
        sop_class_uid=_text(ds, "SOPClassUID"),
        sop_instance_uid=sop_instance,
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        extra={DICOM_JSON_KEY: keep.to_json_dict()},
    )


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value)


def _content_id(ds: Dataset) -> str:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    return "sha256:" + hashlib.sha256(buffer.getvalue()).hexdigest()


# --- Encapsulated PDF ----------------------------------------------------------------------


def _pdf_pages(ds: Dataset, max_pages: int | None) -> list[np.ndarray]:
    document = ds.get("EncapsulatedDocument")
    if not document:
        raise DicomContentError("Encapsulated PDF object holds no document")
    mime = str(ds.get("MIMETypeOfEncapsulatedDocument", "application/pdf")).strip()
    if mime and mime.lower() != "application/pdf":
        raise DicomContentError(f"encapsulated document is {mime}, not application/pdf")
    # The value may carry one byte of padding; PDF readers ignore trailing bytes.
    try:
        return load_pages(bytes(document), media_type="application/pdf", max_pages=max_pages)
    except UnreadableImageError as exc:
        raise DicomContentError(f"encapsulated PDF: {exc}") from exc


# --- Images --------------------------------------------------------------------------------

_REQUIRED_PIXEL_KEYWORDS = ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel",
                            "PhotometricInterpretation")


def _image_pages(ds: Dataset, max_pages: int | None) -> Iterator[np.ndarray]:
    if "PixelData" not in ds:
        raise DicomContentError("image object holds no pixel data")
    missing = [k for k in _REQUIRED_PIXEL_KEYWORDS if k not in ds]
    if missing:
        raise DicomContentError(f"image pixel module incomplete: no {', '.join(missing)}")
    rows, cols = int(ds.Rows), int(ds.Columns)
    if rows < 1 or cols < 1 or rows * cols > MAX_PIXELS:
        raise DicomContentError(f"image size {cols}x{rows} outside 1..{MAX_PIXELS} pixels")
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        raise DicomParseError("data set has no transfer syntax")
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    if not syntax.is_compressed:
        _check_native_length(ds)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise DicomContentError(f"transfer syntax {syntax} cannot be decoded") from exc
    frames = int(ds.get("NumberOfFrames") or 1)
    indices = range(min(frames, max_pages)) if max_pages is not None else None
    try:
        with _quiet():
            options = as_pixel_options(ds)
            for array, overrides in decoder.iter_array(
                ds, indices=indices, validate=True, raw=False, **options
            ):
                photometric = str(overrides.get("photometric_interpretation",
                                                ds.PhotometricInterpretation))
                yield _to_rgb(array, photometric, ds)
    except DicomContentError:
        raise
    except Exception as exc:  # decoders raise RuntimeError/ValueError/struct.error/...
        kind = "compressed" if syntax.is_compressed else "native"
        raise DicomContentError(
            f"cannot decode {kind} pixel data ({syntax.name}): {type(exc).__name__}"
        ) from exc


def _check_native_length(ds: Dataset) -> None:
    """pydicom warns and trims over-long pixel data; a wrong length means wrong attributes
    (or a damaged object), so it is refused either way."""
    try:
        expected = get_expected_length(ds, "bytes")
    except (AttributeError, ValueError, TypeError) as exc:
        raise DicomContentError("image pixel module attributes are inconsistent") from exc
    actual = len(ds.PixelData)
    if actual != expected and actual != expected + (expected % 2):
        raise DicomContentError(
            f"pixel data length {actual} bytes does not match the image attributes "
            f"({expected} bytes expected)"
        )


def _to_rgb(array: np.ndarray, photometric: str, ds: Dataset) -> np.ndarray:
    """One decoded frame -> (H, W, 3) uint8 as it would be displayed."""
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(array, ds)
        return _to_uint8(rgb, _lut_bits(ds))
    if array.ndim == 3 and array.shape[2] == 3:
        # RGB, or YBR already converted by the decoder (JPEG/J2K colour transforms).
        bits = int(ds.get("BitsStored") or ds.BitsAllocated)
        return np.ascontiguousarray(_to_uint8(array, bits))
    if array.ndim == 3:
        array = array[:, :, 0]
    grey = _grey_to_uint8(array, ds)
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))


def _grey_to_uint8(array: np.ndarray, ds: Dataset) -> np.ndarray:
    bits = int(ds.get("BitsStored") or ds.BitsAllocated)
    if bits <= 8 and int(ds.get("PixelRepresentation", 0)) == 0:
        return _to_uint8(array.astype(np.uint8), bits)  # 1-bit: 0/1 -> 0/255
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        values = apply_voi_lut(array, ds).astype(np.float64)
    else:
        values = array.astype(np.float64)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.full(array.shape, 255 if lo > 0 else 0, dtype=np.uint8)
    return np.clip((values - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)


def _to_uint8(array: np.ndarray, bits: int) -> np.ndarray:
    if array.dtype == np.uint8 and bits >= 8:
        return array
    top = float(2**bits - 1) if bits > 0 else float(array.max() or 1)
    return np.clip(array.astype(np.float64) * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)


def _lut_bits(ds: Dataset) -> int:
    descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
    return int(descriptor[2]) if descriptor else 8
