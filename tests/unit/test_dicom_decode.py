"""adapters.dicom.decode: every SOP class, transfer syntax and photometric interpretation the
listener accepts decodes to the RGB page that was encoded; bad objects fail with a reason."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from dicom_samples import (
    PATIENT,
    dcmtk,
    encapsulated_pdf,
    multiframe_rgb,
    page_image,
    pdf_bytes,
    secondary_capture,
    to_bytes,
)
from pydicom import Dataset, dcmread, dcmwrite
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space, pixel_array
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MultiFrameSingleBitSecondaryCaptureImageStorage,
    RLELossless,
    VLPhotographicImageStorage,
)

from adapters.dicom import (
    DicomContentError,
    DicomParseError,
    UnsupportedSOPClassError,
    read_dicom,
)
from adapters.dicom.codes import INBOUND_TRANSFER_SYNTAXES
from adapters.dicom.decode import DICOM_JSON_KEY


def _testdata(name: str) -> str:
    """A file bundled with pydicom (they are in its wheel; nothing is downloaded)."""
    path = get_testdata_file(name)
    assert isinstance(path, str), name
    return path


@pytest.fixture(scope="module")
def page() -> np.ndarray:
    return page_image()


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


def _one_page(ds: Dataset | bytes) -> np.ndarray:
    pages, _ = read_dicom(ds)
    assert len(pages) == 1
    assert pages[0].dtype == np.uint8 and pages[0].ndim == 3 and pages[0].shape[2] == 3
    return pages[0]


# --- transfer syntaxes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "args", "syntax", "tolerance"),
    [
        (None, [], "1.2.840.10008.1.2.1", 0.0),  # explicit VR little endian
        ("dcmconv", ["+ti"], ImplicitVRLittleEndian, 0.0),
        ("dcmconv", ["+tb"], ExplicitVRBigEndian, 0.0),
        ("dcmconv", ["+td"], "1.2.840.10008.1.2.1.99", 0.0),  # deflated
        ("pydicom", [], RLELossless, 0.0),
        ("dcmcjpeg", ["+eb"], "1.2.840.10008.1.2.4.50", 4.0),  # baseline
        ("dcmcjpeg", ["+ee"], "1.2.840.10008.1.2.4.51", 4.0),  # extended
        ("dcmcjpeg", ["+el"], "1.2.840.10008.1.2.4.57", 0.0),  # lossless
        ("dcmcjpeg", ["+e1"], "1.2.840.10008.1.2.4.70", 0.0),  # lossless SV1
        ("dcmcjpls", ["+el"], "1.2.840.10008.1.2.4.80", 0.0),  # JPEG-LS lossless
        ("dcmcjpls", ["+en"], "1.2.840.10008.1.2.4.81", 2.5),  # JPEG-LS near-lossless
        ("pydicom", [], JPEG2000Lossless, 0.0),
        ("pydicom", [], JPEG2000, 4.0),
    ],
)
def test_transfer_syntaxes_decode_to_the_page(
    page: np.ndarray, tmp_path: Path, tool: str | None, args: list[str], syntax: str,
    tolerance: float,
) -> None:
    ds = secondary_capture(page)
    if tool == "pydicom":
        ds.compress(syntax, j2k_psnr=[45.0] if syntax == JPEG2000 else None)
    elif tool is not None:
        ds = dcmtk(tool, args, ds, tmp_path)
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert syntax in INBOUND_TRANSFER_SYNTAXES
    decoded = _one_page(to_bytes(ds))
    assert decoded.shape == page.shape
    assert _diff(decoded, page) <= tolerance


# --- photometric interpretations -----------------------------------------------------------


def test_ybr_full_is_converted_to_rgb(page: np.ndarray) -> None:
    ybr = convert_color_space(page, "RGB", "YBR_FULL")
    decoded = _one_page(secondary_capture(ybr, "YBR_FULL"))
    assert _diff(decoded, page) < 1.0


def test_ybr_full_422_native_and_jpeg(page: np.ndarray, tmp_path: Path) -> None:
    # Native 4:2:2 (pydicom's reference object): the page equals pydicom's own RGB decoding.
    ref = dcmread(_testdata("SC_ybr_full_422_uncompressed.dcm"))
    assert ref.PhotometricInterpretation == "YBR_FULL_422"
    expected = pixel_array(ref, as_rgb=True)
    assert np.array_equal(_one_page(ref), expected)
    # JPEG baseline as scanners write it: YBR_FULL_422 with chroma subsampling.
    jpeg = dcmtk("dcmcjpeg", ["+eb"], secondary_capture(page), tmp_path)
    assert jpeg.PhotometricInterpretation == "YBR_FULL_422"
    assert _diff(_one_page(jpeg), page) < 4.0


def test_monochrome2_and_monochrome1(page: np.ndarray) -> None:
    grey = page.mean(axis=2).round().astype(np.uint8)
    decoded = _one_page(secondary_capture(grey, "MONOCHROME2"))
    assert np.array_equal(decoded[:, :, 0], grey) and np.array_equal(decoded[:, :, 2], grey)
    # MONOCHROME1 stores white paper as 0: displayed, it is the same page.
    decoded = _one_page(secondary_capture(255 - grey, "MONOCHROME1"))
    assert np.array_equal(decoded[:, :, 1], grey)


def test_monochrome_16_bit_is_scaled_to_8_bit(page: np.ndarray) -> None:
    grey = page.mean(axis=2)
    wide = (grey * 16).round().astype(np.uint16)  # a 12-bit film digitizer
    decoded = _one_page(secondary_capture(wide, "MONOCHROME2", bits=12))
    stretched = (grey - grey.min()) * 255 / (grey.max() - grey.min())
    assert _diff(decoded[:, :, 0], stretched) < 1.0


def test_palette_color(page: np.ndarray) -> None:
    from PIL import Image

    quantized = Image.fromarray(page).quantize(64)
    indices = np.asarray(quantized, dtype=np.uint8)
    palette = np.asarray((quantized.getpalette() or [])[: 64 * 3],
                         dtype=np.uint16).reshape(64, 3)
    ds = secondary_capture(indices, "PALETTE COLOR")
    for i, colour in enumerate(("Red", "Green", "Blue")):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [64, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData",
                (palette[:, i] * 257).astype("<u2").tobytes())
    decoded = _one_page(ds)
    assert np.array_equal(decoded, palette[indices].astype(np.uint8))
    assert _diff(decoded, page) < 8.0  # 64 colours of a page are close to the page


# --- multi-frame, single bit, VL photographic, PDF -----------------------------------------


def test_every_frame_is_a_page(page: np.ndarray) -> None:
    frames = [page, page[::-1].copy(), 255 - page]
    pages, meta = read_dicom(to_bytes(multiframe_rgb(frames)))
    assert len(pages) == 3
    for got, want in zip(pages, frames, strict=True):
        assert np.array_equal(got, want)
    assert meta.route == "dicom"


def test_single_bit_multiframe(page: np.ndarray) -> None:
    ink = (page.mean(axis=2) > 128).astype(np.uint8)
    ds = secondary_capture(np.stack([ink, 1 - ink]), "MONOCHROME2", bits=1,
                           sop_class=MultiFrameSingleBitSecondaryCaptureImageStorage)
    pages, _ = read_dicom(ds)
    assert len(pages) == 2
    assert np.array_equal(pages[0][:, :, 0], ink * 255)


def test_vl_photographic_rle(page: np.ndarray) -> None:
    ds = secondary_capture(page, sop_class=VLPhotographicImageStorage)
    ds.compress(RLELossless)
    assert np.array_equal(_one_page(ds), page)


def test_encapsulated_pdf_renders_every_page(page: np.ndarray) -> None:
    ds = encapsulated_pdf(pdf_bytes([page, 255 - page]))
    pages, meta = read_dicom(to_bytes(ds))
    assert len(pages) == 2
    # Rendered at 200 dpi from a 100 dpi page: twice the pixels, the same picture.
    assert abs(pages[0].shape[1] - 2 * page.shape[1]) <= 2
    small = pages[0][::2, ::2][: page.shape[0], : page.shape[1]]
    assert _diff(small, page) < 25.0
    assert pages[1].mean() < pages[0].mean()  # the inverted page is darker
    assert meta.sop_class_uid == ds.SOPClassUID


# --- what is kept about the source ---------------------------------------------------------


def test_patient_study_and_issuer_are_kept(page: np.ndarray) -> None:
    ds = secondary_capture(page)
    _, meta = read_dicom(to_bytes(ds))
    assert meta.source_id == ds.SOPInstanceUID == meta.sop_instance_uid
    assert meta.media_type == "application/dicom"
    assert meta.patient_name == PATIENT["PatientName"]
    assert meta.patient_id == PATIENT["PatientID"]
    assert meta.issuer_of_patient_id == PATIENT["IssuerOfPatientID"]
    assert meta.accession_number == PATIENT["AccessionNumber"]
    assert meta.referring_physician_name == PATIENT["ReferringPhysicianName"]
    assert meta.study_instance_uid == ds.StudyInstanceUID
    assert meta.series_instance_uid == ds.SeriesInstanceUID
    kept = Dataset.from_json(meta.extra[DICOM_JSON_KEY])
    assert kept.IssuerOfAccessionNumberSequence[0].LocalNamespaceEntityID == "RIS-A"
    assert kept.StudyDescription == PATIENT["StudyDescription"]
    assert "PixelData" not in kept
    # It survives the store's JSON round trip.
    from adapters.source import SourceMeta

    assert SourceMeta.from_dict(meta.to_dict()) == meta


# --- bad objects ---------------------------------------------------------------------------


def test_empty_object() -> None:
    with pytest.raises(DicomParseError, match="0 bytes"):
        read_dicom(b"")


def test_truncated_object(page: np.ndarray) -> None:
    data = to_bytes(secondary_capture(page))
    with pytest.raises(DicomParseError, match="truncated"):
        read_dicom(data[: len(data) - 5000])


def test_not_dicom() -> None:
    with pytest.raises((DicomParseError, DicomContentError)):
        read_dicom(b"\x89PNG\r\n\x1a\n" + bytes(300))


def test_pixel_data_of_the_wrong_length(page: np.ndarray) -> None:
    ds = secondary_capture(page)
    ds.PixelData = ds.PixelData[:-300]
    with pytest.raises(DicomContentError, match="pixel data length"):
        read_dicom(to_bytes(ds))
    ds.PixelData = ds.PixelData + bytes(1000)
    with pytest.raises(DicomContentError, match="pixel data length"):
        read_dicom(to_bytes(ds))


def test_undecodable_jpeg(page: np.ndarray, tmp_path: Path) -> None:
    ds = dcmtk("dcmcjpeg", ["+eb"], secondary_capture(page), tmp_path)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + b"not a jpeg at all" * 20])
    with pytest.raises(DicomContentError, match="cannot decode compressed pixel data"):
        read_dicom(to_bytes(ds))


def test_image_without_pixel_data(page: np.ndarray) -> None:
    ds = secondary_capture(page)
    del ds.PixelData
    with pytest.raises(DicomContentError, match="no pixel data"):
        read_dicom(to_bytes(ds))


def test_unsupported_sop_class(page: np.ndarray) -> None:
    ds = secondary_capture(page, sop_class=CTImageStorage)
    with pytest.raises(UnsupportedSOPClassError, match="CT Image Storage"):
        read_dicom(ds)


def test_errors_name_no_patient_data(page: np.ndarray) -> None:
    ds = secondary_capture(page)
    ds.PixelData = ds.PixelData[:-300]
    with pytest.raises(DicomContentError) as info:
        read_dicom(to_bytes(ds))
    assert not any(str(v) in str(info.value) for v in PATIENT.values())


def test_a_bare_data_set_without_file_meta(page: np.ndarray) -> None:
    ds = secondary_capture(page)
    ds.file_meta = FileMetaDataset()
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, implicit_vr=True, little_endian=True)
    raw = buffer.getvalue()
    assert b"DICM" not in raw[:132]
    assert np.array_equal(_one_page(raw), page)
