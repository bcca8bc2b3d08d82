"""The DICOM listener against real peers: dcmtk's storescu/echoscu as the modality, and
pynetdicom where a broken object has to be put on the wire byte for byte.

Store first, then answer: every success is a durable job in the job store; every failure
gets its status, one log line without patient data, and the listener stays up.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dicom_peers import echoscu, free_port, img2dcm, pdf2dcm, require, storescu
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config

from adapters.dicom import read_dicom
from service.config import Settings, load_settings
from service.dicom_listener import start_listener
from service.store import JobStore

pytestmark = pytest.mark.integration

MODALITY = "MODALITY"
PHI = {"PatientName": "Roe^Richard", "PatientID": "MRN-5150", "PatientBirthDate": "19551105",
       "AccessionNumber": "ACC-31337"}


@pytest.fixture(scope="module")
def page() -> np.ndarray:
    from pipeline.synthetic import generate_page

    return generate_page(11, "scan", width_px=900).image


class Listener:
    def __init__(self, root: Path, **overrides: Any) -> None:
        self.port = free_port()
        dicom = {"port": self.port, "ae_title": "CARDIOSCAN", **overrides.pop("dicom", {})}
        self.settings: Settings = load_settings(None, data_dir=root, dicom=dicom, **overrides)
        self.store = JobStore(self.settings)
        self.server = start_listener(self.settings, self.store)

    def close(self) -> None:
        self.server.shutdown()
        self.store.close()

    def jobs(self) -> list[Any]:
        return self.store.list_jobs(limit=1000)


@pytest.fixture
def make_listener(tmp_path: Path) -> Iterator[Callable[..., Listener]]:
    made: list[Listener] = []

    def make(**overrides: Any) -> Listener:
        listener = Listener(tmp_path / f"svc{len(made)}", **overrides)
        made.append(listener)
        return listener

    yield make
    for listener in made:
        listener.close()


@pytest.fixture
def listener(make_listener: Callable[..., Listener]) -> Listener:
    return make_listener()


def _keys(**extra: str) -> dict[str, str]:
    return {**PHI, "StudyInstanceUID": generate_uid(), "Modality": "OT", **extra}


# --- what a modality sends -----------------------------------------------------------------


def test_storescu_sends_jpeg_and_uncompressed_scans_and_a_pdf(
    listener: Listener, page: np.ndarray, tmp_path: Path
) -> None:
    jpeg = img2dcm(page, tmp_path / "scan-jpeg.dcm", jpeg=True, keys=_keys())
    plain = img2dcm(page, tmp_path / "scan-plain.dcm", jpeg=False, keys=_keys())
    pdf_buffer = io.BytesIO()
    Image.fromarray(page).save(pdf_buffer, format="PDF", resolution=100)
    pdf = pdf2dcm(pdf_buffer.getvalue(), tmp_path / "scan-pdf.dcm", keys=_keys())
    assert dcmread(jpeg).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"

    outcome = storescu([jpeg, plain, pdf], listener.port, calling=MODALITY, extra=["-xy"])
    assert outcome.success, outcome.output
    assert outcome.output.count("Received Store Response (Success)") == 3

    jobs = {job.source_id: job for job in listener.jobs()}
    assert len(jobs) == 3
    for path in (jpeg, plain, pdf):
        sent = dcmread(path)
        job = jobs[str(sent.SOPInstanceUID)]
        assert job.route == "dicom"
        source = listener.store.get_source(job.id)
        assert source.caller == MODALITY
        assert source.patient_id == PHI["PatientID"]
        assert source.study_instance_uid == sent.StudyInstanceUID
        # what was spooled is the object that was sent, and it decodes to the page
        pages, _ = read_dicom(listener.store.source_path(job.id).read_bytes())
        assert pages[0].shape[2] == 3
    pages, _ = read_dicom(listener.store.source_path(
        jobs[str(dcmread(plain).SOPInstanceUID)].id).read_bytes())
    assert np.array_equal(pages[0], page)


def test_a_duplicate_is_answered_success_and_not_queued_again(
    listener: Listener, page: np.ndarray, tmp_path: Path
) -> None:
    scan = img2dcm(page, tmp_path / "scan.dcm", jpeg=True, keys=_keys())
    assert storescu([scan], listener.port, calling=MODALITY, extra=["-xy"]).success
    first = listener.jobs()
    assert storescu([scan], listener.port, calling=MODALITY, extra=["-xy"]).success
    assert [j.id for j in listener.jobs()] == [j.id for j in first]


def test_an_image_with_no_ecg_is_stored(listener: Listener, tmp_path: Path) -> None:
    """Whether there is an ECG on the page is the digitizer's call, later: the job fails
    with the reason. The listener only refuses what it cannot read."""
    blank = np.full((600, 800, 3), 250, dtype=np.uint8)
    scan = img2dcm(blank, tmp_path / "blank.dcm", jpeg=False, keys=_keys())
    assert storescu([scan], listener.port, calling=MODALITY).success
    assert len(listener.jobs()) == 1


def test_a_large_object_is_received_chunked_to_disk(
    listener: Listener, page: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Received into the spool's tmp/ folder, then renamed into place: never copied."""
    from pipeline.synthetic import generate_page
    from service.dicom_listener import StoreSCP

    received: list[tuple[Path, os.stat_result]] = []
    original = StoreSCP._store

    def spy(self: StoreSCP, event: Any, caller: str) -> tuple[str, bool]:
        path = Path(event.dataset_path)
        received.append((path, path.stat()))
        return original(self, event, caller)

    monkeypatch.setattr(StoreSCP, "_store", spy)

    big = generate_page(12, "scan", width_px=2400).image
    frames = np.stack([big, big[::-1], 255 - big, big])
    ds = _sc(frames, MultiFrameTrueColorSecondaryCaptureImageStorage)
    path = tmp_path / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size > 40_000_000

    assert storescu([path], listener.port, calling=MODALITY).success
    assert _config.STORE_RECV_CHUNKED_DATASET is True
    (job,) = listener.jobs()
    spooled = listener.store.source_path(job.id)
    assert dcmread(spooled).PixelData == ds.PixelData
    [(temp, temp_stat)] = received
    assert temp.parent == listener.store.spool.root / "tmp"
    final = spooled.stat()
    assert (final.st_dev, final.st_ino) == (temp_stat.st_dev, temp_stat.st_ino)  # a rename
    assert not temp.exists() and list(temp.parent.iterdir()) == []


@pytest.mark.parametrize(
    ("converter", "propose", "syntax"),
    [
        (["dcmconv", "+ti"], "-xi", "1.2.840.10008.1.2"),
        (["dcmconv", "+tb"], "-xb", "1.2.840.10008.1.2.2"),
        (["dcmconv", "+td"], "-xd", "1.2.840.10008.1.2.1.99"),
        (["dcmcrle"], "-xr", "1.2.840.10008.1.2.5"),
        (["dcmcjpeg", "+ee"], "-xx", "1.2.840.10008.1.2.4.51"),
        (["dcmcjpeg", "+e1"], "-xs", "1.2.840.10008.1.2.4.70"),
        (["dcmcjpls", "+el"], "-xt", "1.2.840.10008.1.2.4.80"),
        (["dcmcjpls", "+en"], "-xu", "1.2.840.10008.1.2.4.81"),
        (["pydicom"], "-xv", "1.2.840.10008.1.2.4.90"),
        (["pydicom"], "-xw", "1.2.840.10008.1.2.4.91"),
    ],
)
def test_every_transfer_syntax_arrives_and_decodes(
    listener: Listener, page: np.ndarray, tmp_path: Path, converter: list[str], propose: str,
    syntax: str,
) -> None:
    plain = img2dcm(page, tmp_path / "plain.dcm", jpeg=False, keys=_keys())
    sent = tmp_path / "sent.dcm"
    if converter == ["pydicom"]:
        ds = dcmread(plain)
        ds.compress(syntax, j2k_psnr=[50.0] if syntax.endswith(".91") else None)
        ds.save_as(sent, enforce_file_format=True)
    else:
        subprocess.run([require(converter[0], "dcmtk"), *converter[1:], str(plain), str(sent)],
                       check=True, capture_output=True)
    assert dcmread(sent).file_meta.TransferSyntaxUID == syntax

    outcome = storescu([sent], listener.port, calling=MODALITY, extra=[propose])
    assert outcome.success, outcome.output
    (job,) = listener.jobs()
    spooled = listener.store.source_path(job.id).read_bytes()
    assert dcmread(io.BytesIO(spooled)).file_meta.TransferSyntaxUID == syntax  # as sent
    pages, _ = read_dicom(spooled)
    assert np.abs(pages[0].astype(int) - page.astype(int)).mean() < 4.0


# --- bad input -----------------------------------------------------------------------------


def _send(port: int, path: Path, sop_class: str, syntax: str = ExplicitVRLittleEndian) -> int:
    """C-STORE the file's bytes as they are (pynetdicom's chunked send never re-encodes)."""
    ae = AE(ae_title=MODALITY)
    ae.add_requested_context(sop_class, syntax)
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="CARDIOSCAN")
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    return int(status.Status)


def _sc(page: np.ndarray, sop_class: str = SecondaryCaptureImageStorage) -> Dataset:
    ds = Dataset()
    for key, value in _keys().items():
        setattr(ds, key, value)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.set_pixel_data(page, "RGB", 8, generate_instance_uid=False)
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _truncated(page: np.ndarray, path: Path) -> tuple[Path, str]:
    ds = _sc(page)
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, SecondaryCaptureImageStorage


def _zero_bytes(page: np.ndarray, path: Path) -> tuple[Path, str]:
    ds = _sc(page)
    buffer = DicomBytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, ds.file_meta)
    path.write_bytes(buffer.getvalue())  # the header only: a C-STORE with 0 data set bytes
    return path, SecondaryCaptureImageStorage


def _wrong_length(page: np.ndarray, path: Path) -> tuple[Path, str]:
    ds = _sc(page)
    ds.PixelData = ds.PixelData[: -ds.Columns * 3 * 7]  # seven rows short
    ds.save_as(path, enforce_file_format=True)
    return path, SecondaryCaptureImageStorage


def _bad_jpeg(page: np.ndarray, path: Path) -> tuple[Path, str]:
    ds = _sc(page)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xdb" + bytes(range(256)) * 8])
    ds["PixelData"].VR = "OB"
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.save_as(path, enforce_file_format=True)
    return path, SecondaryCaptureImageStorage


def _ct(page: np.ndarray, path: Path) -> tuple[Path, str]:
    _sc(page, CTImageStorage).save_as(path, enforce_file_format=True)
    return path, CTImageStorage


@pytest.mark.parametrize(
    ("make", "status"),
    [
        (_truncated, 0xC000),
        (_zero_bytes, 0xC000),
        (_wrong_length, 0xA900),
        (_bad_jpeg, 0xA900),
        (_ct, 0x0122),
    ],
    ids=["truncated", "0-byte", "pixel-data-wrong-length", "undecodable-jpeg",
         "unsupported-sop-class"],
)
def test_bad_input_gets_a_failure_status_and_the_listener_stays_up(
    listener: Listener, page: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    make: Callable[[np.ndarray, Path], tuple[Path, str]], status: int,
) -> None:
    path, sop_class = make(page[:300, :400].copy(), tmp_path / "bad.dcm")
    syntax = JPEGBaseline8Bit if make is _bad_jpeg else ExplicitVRLittleEndian
    with caplog.at_level(logging.INFO, logger="service.dicom_listener"):
        assert _send(listener.port, path, sop_class, syntax) == status
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1
    assert f"0x{status:04X}" in refusals[0].getMessage()
    logged = "\n".join(r.getMessage() + str(r.__dict__) for r in caplog.records)
    assert not any(value in logged for value in PHI.values())
    assert listener.jobs() == []
    assert echoscu(listener.port, calling=MODALITY)
    # and it still stores a good object
    good = img2dcm(page, tmp_path / "good.dcm", jpeg=True, keys=_keys())
    assert storescu([good], listener.port, calling=MODALITY, extra=["-xy"]).success


def test_bad_input_sent_by_storescu(listener: Listener, page: np.ndarray, tmp_path: Path
                                    ) -> None:
    """The same refusals as a dcmtk modality sees them."""
    path, _ = _bad_jpeg(page[:300, :400].copy(), tmp_path / "bad-jpeg.dcm")
    outcome = storescu([path], listener.port, calling=MODALITY, extra=["-xy"])
    assert outcome.status == 0xA900, outcome.output
    path, _ = _wrong_length(page[:300, :400].copy(), tmp_path / "short.dcm")
    assert storescu([path], listener.port, calling=MODALITY).status == 0xA900
    assert listener.jobs() == []


def test_out_of_disk_is_out_of_resources(make_listener: Callable[..., Listener],
                                         page: np.ndarray, tmp_path: Path) -> None:
    full = make_listener(spool_min_free_bytes=10**18)  # more free space than any disk has
    scan = img2dcm(page, tmp_path / "scan.dcm", jpeg=True, keys=_keys())
    outcome = storescu([scan], full.port, calling=MODALITY, extra=["-xy"])
    assert outcome.status == 0xA700, outcome.output
    assert full.jobs() == []
    assert echoscu(full.port, calling=MODALITY)


# --- who may call --------------------------------------------------------------------------


def test_callers_not_on_the_allow_list_are_rejected_at_association(
    make_listener: Callable[..., Listener], page: np.ndarray, tmp_path: Path
) -> None:
    guarded = make_listener(dicom={"allowed_callers": [
        {"ae_title": MODALITY}, {"ae_title": "ROUTER", "host": "127.0.0.1"},
        {"ae_title": "FARAWAY", "host": "192.0.2.10"},
    ]})
    scan = img2dcm(page, tmp_path / "scan.dcm", jpeg=True, keys=_keys())
    stranger = storescu([scan], guarded.port, calling="STRANGER", extra=["-xy"])
    assert not stranger.success
    assert "Calling AE Title Not Recognized" in stranger.output
    assert not echoscu(guarded.port, calling="FARAWAY")  # right AE title, wrong host
    assert echoscu(guarded.port, calling="ROUTER")
    assert storescu([scan], guarded.port, calling=MODALITY, extra=["-xy"]).success
    assert len(guarded.jobs()) == 1
