"""DICOM objects for the DICOM adapter tests: Secondary Capture pages, PDFs, fake results.

Everything is made here, from a synthetic ECG page, with pydicom (and dcmtk's codecs for
the JPEG family, which pydicom cannot encode); nothing is read from outside the repo.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset, Sequence, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from pipeline.leads import LAYOUTS, LEADS, Layout, segment_span
from pipeline.result import Box, Digitization, Metrics

PATIENT = {
    "PatientName": "Doe^Jane^Q", "PatientID": "MRN-0042", "IssuerOfPatientID": "HOSP-A",
    "PatientBirthDate": "19600102", "PatientSex": "F", "AccessionNumber": "ACC-777",
    "ReferringPhysicianName": "House^Gregory", "StudyID": "S-9", "StudyDate": "20240305",
    "StudyTime": "101500", "StudyDescription": "Resting ECG",
}


def page_image(seed: int = 3, width: int = 400) -> np.ndarray:
    """A small synthetic scanned ECG page, RGB uint8."""
    from pipeline.synthetic import generate_page

    return generate_page(seed, "scan", width_px=width).image


def _identity(ds: Dataset, sop_class: str, **attrs: object) -> Dataset:
    for key, value in {**PATIENT, **attrs}.items():
        setattr(ds, key, value)
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = "RIS-A"
    ds.IssuerOfAccessionNumberSequence = Sequence([issuer])
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.ConversionType = "DI"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    return ds


def secondary_capture(pixels: np.ndarray, photometric: str = "RGB", bits: int = 8,
                      sop_class: str = SecondaryCaptureImageStorage,
                      **attrs: object) -> Dataset:
    """A native (uncompressed, explicit VR LE) SC object holding ``pixels``."""
    ds = _identity(Dataset(), sop_class, **attrs)
    ds.set_pixel_data(pixels, photometric, bits, generate_instance_uid=False)
    return ds


def multiframe_rgb(frames: list[np.ndarray]) -> Dataset:
    ds = secondary_capture(np.stack(frames), "RGB", 8,
                           sop_class=MultiFrameTrueColorSecondaryCaptureImageStorage)
    return ds


def pdf_bytes(images: list[np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    pages = [Image.fromarray(im) for im in images]
    pages[0].save(buffer, format="PDF", save_all=True, append_images=pages[1:], resolution=100)
    return buffer.getvalue()


def encapsulated_pdf(document: bytes, **attrs: object) -> Dataset:
    ds = _identity(Dataset(), EncapsulatedPDFStorage, **attrs)
    ds.Modality = "DOC"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = document + (b"\0" if len(document) % 2 else b"")
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = "ECG"
    ds.file_meta = _meta(ds)
    return ds


def _meta(ds: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dcmtk(tool: str, args: list[str], ds: Dataset, tmp_path: Path) -> Dataset:
    """Run a dcmtk converter (dcmcjpeg, dcmcjpls, dcmconv) on ``ds``."""
    if shutil.which(tool) is None:
        pytest.skip(f"dcmtk's {tool} is not installed (Debian package dcmtk)")
    src, dst = tmp_path / f"in-{tool}.dcm", tmp_path / f"out-{tool}.dcm"
    ds.save_as(src, enforce_file_format=True)
    subprocess.run([tool, *args, str(src), str(dst)], check=True, capture_output=True)
    return dcmread(dst)


def digitization(fs: float = 500.0, seconds: float = 10.0, layout: Layout = Layout.STANDARD,
                 amplitude_mv: float = 1.5, seed: int = 0) -> Digitization:
    """A plausible digitizer result: every lead has signal only where ``layout`` prints it."""
    rng = np.random.default_rng(seed)
    n = round(fs * seconds)
    t = np.arange(n) / fs
    beats = np.exp(-(((t % 0.8) - 0.4) / 0.02) ** 2)
    signals = np.stack([amplitude_mv * beats * (1 - 0.15 * i) + 0.05 * np.sin(t + i)
                        + rng.normal(0, 0.01, n) for i in range(len(LEADS))], axis=1)
    printed = np.zeros_like(signals, dtype=bool)
    for row in LAYOUTS[layout].rows:
        for column, lead in enumerate(row):
            start, end = segment_span(len(row), column, seconds)
            printed[round(start * fs):round(end * fs), LEADS.index(lead)] = True
    signals[~printed] = np.nan
    return Digitization(
        signals=signals, fs=fs, layout=str(layout), paper_speed_mm_s=25.0, gain_mm_mv=10.0,
        px_per_mm=10.0, grid_confidence=0.93, confidence={lead: 0.9 for lead in LEADS},
        lead_boxes={lead: Box(0.1, 0.1, 0.2, 0.2) for lead in LEADS},
        metrics=Metrics(hr_bpm=75.0, rr_ms=800.0, pr_ms=160.0, qrs_ms=92.0, qt_ms=380.0,
                        qtc_bazett_ms=425.0, qtc_fridericia_ms=409.0, axis_deg=42.0),
        engine="classic",
    )
