"""Delivery to a real PACS: Orthanc on loopback receives CardioScan's ECG waveform object.

The study in Orthanc must end up holding the scanned page plus a 12-lead ECG waveform
instance whose samples are the digitized millivolts; a PACS that is down is retried until
it is back, dead-lettered after the configured attempts, and an operator retry delivers.
The digitizer here is a stand-in (``dicom_fake_engine``) so that these tests are about the
DICOM path; ``test_dicom_e2e`` runs the real one.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dicom_fake_engine import digitize as fake_digitize
from dicom_peers import OrthancPeer, free_port, img2dcm, pdf2dcm, storescu
from PIL import Image
from pydicom import dcmread
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    TwelveLeadECGWaveformStorage,
    generate_uid,
)

from adapters.dicom import build_ecg_waveform, check_ecg_iod, read_dicom, read_ecg_waveform
from adapters.dicom.codes import INBOUND_CLASSES
from adapters.dicom.iod_check import dciodvfy_path, validate_ecg_object
from pipeline.leads import LEADS
from service.config import Destination, PacsDestination, Settings, load_settings
from service.delivery import RetryableDeliveryError
from service.dicom_listener import start_listener
from service.pacs_delivery import PacsSender, create_sender
from service.store import DeliveryTask, JobStore

pytestmark = pytest.mark.integration

CARDIOSCAN_AET = "CARDIOSCAN"
MODALITY = "SCANNER1"


@pytest.fixture(scope="module")
def page() -> np.ndarray:
    from pipeline.synthetic import generate_page

    return generate_page(21, "scan", width_px=1000).image


@pytest.fixture
def cardioscan_port() -> int:
    return free_port()


@pytest.fixture
def orthanc(tmp_path: Path, cardioscan_port: int) -> Iterator[OrthancPeer]:
    peer = OrthancPeer(tmp_path / "orthanc",
                       modalities={"cardioscan": (CARDIOSCAN_AET, "127.0.0.1", cardioscan_port)})
    peer.start()
    yield peer
    peer.stop()


def _keys() -> dict[str, str]:
    return {"PatientName": "Poe^Edgar", "PatientID": "MRN-1849", "AccessionNumber": "A-1",
            "StudyInstanceUID": generate_uid(), "Modality": "OT"}


def _settings(root: Path, orthanc: OrthancPeer, port: int, **overrides: Any) -> Settings:
    return load_settings(
        None, data_dir=root,
        dicom={"ae_title": CARDIOSCAN_AET, "port": port},
        pacs=[{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1",
               "port": orthanc.dicom_port}],
        engine="dicom_fake_engine:digitize", outputs=["json", "dicom"], batch_size=1,
        backoff_base_seconds=0.2, backoff_max_seconds=0.4, **overrides)


def _task(job_id: str = "job") -> DeliveryTask:
    return DeliveryTask(id="d", job_id=job_id, destination="orthanc", kind="pacs", attempt=1,
                        source_id="s", lease_token="t")


def _ecg_instances(orthanc: OrthancPeer, study_uid: str) -> list[dict[str, Any]]:
    return [i for i in orthanc.study_instances(study_uid) if i["Modality"] == "ECG"]


# --- the sender on its own -----------------------------------------------------------------


def test_the_waveform_lands_beside_the_scan(orthanc: OrthancPeer, page: np.ndarray,
                                           tmp_path: Path, cardioscan_port: int) -> None:
    scan = img2dcm(page, tmp_path / "scan.dcm", jpeg=True, keys=_keys())
    assert storescu([scan], orthanc.dicom_port, calling=MODALITY, called="ORTHANC",
                    extra=["-xy"]).success
    _, source = read_dicom(scan.read_bytes())
    dig = fake_digitize(page)
    result_dir = tmp_path / "result"
    result_dir.mkdir()
    build_ecg_waveform(dig, source).save_as(result_dir / "ecg.dcm", enforce_file_format=True)

    settings = _settings(tmp_path / "svc", orthanc, cardioscan_port)
    sender = create_sender(settings, Destination(name="orthanc", kind="pacs",
                                                 config=settings.pacs[0]))
    remote = sender.send(_task(), result_dir)

    study = orthanc.study_instances(source.study_instance_uid or "")
    assert sorted(i["Modality"] for i in study) == ["ECG", "OT"]
    (ecg,) = _ecg_instances(orthanc, source.study_instance_uid or "")
    assert ecg["MainDicomTags"]["SOPInstanceUID"] == remote
    stored = orthanc.instance_dataset(ecg["ID"])
    assert stored.SOPClassUID == TwelveLeadECGWaveformStorage
    assert stored.PatientID == "MRN-1849"
    signals, fs = read_ecg_waveform(stored)
    step = float(stored.WaveformSequence[0].ChannelDefinitionSequence[0].ChannelSensitivity)
    assert fs == 500 and np.array_equal(np.isnan(signals), np.isnan(dig.signals))
    assert np.nanmax(np.abs(signals - dig.signals)) <= step / 2000 + 1e-9
    assert check_ecg_iod(stored) == []
    if dciodvfy_path() is not None:
        assert validate_ecg_object(stored) == []

    # A redelivery (crash after sending, operator retry) stores the same instance again.
    sender.send(_task(), result_dir)
    assert len(orthanc.study_instances(source.study_instance_uid or "")) == 2


@pytest.fixture
def result_dir(tmp_path: Path, page: np.ndarray) -> Path:
    scan = img2dcm(page, tmp_path / "scan2.dcm", jpeg=True, keys=_keys())
    _, source = read_dicom(scan.read_bytes())
    out = tmp_path / "result2"
    out.mkdir()
    build_ecg_waveform(fake_digitize(page), source).save_as(out / "ecg.dcm",
                                                            enforce_file_format=True)
    return out


def test_unreachable_or_refusing_pacs_is_retryable(orthanc: OrthancPeer, result_dir: Path,
                                                   tmp_path: Path, cardioscan_port: int
                                                   ) -> None:
    settings = _settings(tmp_path / "svc", orthanc, cardioscan_port)
    wrong_aet = PacsDestination(name="orthanc", ae_title="NOT_ORTHANC", host="127.0.0.1",
                                port=orthanc.dicom_port)
    with pytest.raises(RetryableDeliveryError, match="rejected the association"):
        PacsSender(settings, wrong_aet).send(_task(), result_dir)
    orthanc.stop()
    with pytest.raises(RetryableDeliveryError, match="not reachable"):
        PacsSender(settings, settings.pacs[0]).send(_task(), result_dir)
    assert orthanc.process is None


# --- the whole DICOM path: listener -> store -> worker -> outbox -> Orthanc ------------------


class Service:
    """The listener and one worker, in this process, on a fresh store."""

    def __init__(self, settings: Settings) -> None:
        from service.workers import Worker

        self.settings = settings
        self.store = JobStore(settings)
        self.listener = start_listener(settings, self.store)
        self.worker = Worker(settings, self.store)

    def work(self, timeout_s: float = 120.0) -> None:
        """Process every queued job."""
        deadline = time.monotonic() + timeout_s
        while self.store.count_jobs(state="queued") and time.monotonic() < deadline:
            self.worker.run_jobs_once()

    def deliver_until(self, job_id: str, states: set[str], *, min_attempts: int = 0,
                      timeout_s: float = 30.0) -> list[Any]:
        """Run the outbox until the job's deliveries are all in ``states`` (after at least
        ``min_attempts`` attempts each)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.worker.run_deliveries_once()
            deliveries = self.store.require_job(job_id).deliveries
            if ({d.state for d in deliveries} <= states
                    and all(d.attempts >= min_attempts for d in deliveries)):
                return deliveries
            if time.monotonic() > deadline:
                raise AssertionError(f"deliveries still {deliveries}")
            time.sleep(0.05)

    def close(self) -> None:
        self.listener.shutdown()
        self.worker.digitizer.close()
        self.store.close()


@pytest.fixture
def service(tmp_path: Path, orthanc: OrthancPeer, cardioscan_port: int,
            request: pytest.FixtureRequest) -> Iterator[Service]:
    overrides = getattr(request, "param", {})
    svc = Service(_settings(tmp_path / "svc", orthanc, cardioscan_port, **overrides))
    yield svc
    svc.close()


def _send_scans(page: np.ndarray, tmp_path: Path, port: int, orthanc: OrthancPeer
                ) -> dict[str, Any]:
    """A JPEG and an uncompressed scan and a PDF, to CardioScan; the JPEG one (the scan the
    modality files in the PACS) to Orthanc as well."""
    jpeg = img2dcm(page, tmp_path / "jpeg.dcm", jpeg=True, keys=_keys())
    plain = img2dcm(page[::-1].copy(), tmp_path / "plain.dcm", jpeg=False, keys=_keys())
    buffer = io.BytesIO()
    Image.fromarray(page).save(buffer, format="PDF", resolution=100)
    pdf = pdf2dcm(buffer.getvalue(), tmp_path / "pdf.dcm", keys=_keys())
    assert storescu([jpeg, plain, pdf], port, calling=MODALITY, extra=["-xy"]).success
    assert storescu([jpeg], orthanc.dicom_port, calling=MODALITY, called="ORTHANC",
                    extra=["-xy"]).success
    return {name: dcmread(path) for name, path in
            (("jpeg", jpeg), ("plain", plain), ("pdf", pdf))}


def test_delivery_waits_for_the_pacs_and_reaches_it_when_back(
    service: Service, orthanc: OrthancPeer, page: np.ndarray, tmp_path: Path,
    cardioscan_port: int,
) -> None:
    sent = _send_scans(page, tmp_path, cardioscan_port, orthanc)
    orthanc.stop()  # the PACS goes down before the results are ready
    service.work()
    jobs = {j.source_id: j for j in service.store.list_jobs()}
    assert {j.state for j in jobs.values()} == {"done"}
    job = jobs[str(sent["jpeg"].SOPInstanceUID)]

    first = service.deliver_until(job.id, {"failed"}, min_attempts=1)
    assert [(d.state, d.attempts) for d in first] == [("failed", 1)]
    assert "not reachable" in (first[0].last_error or "")
    assert first[0].next_try_at > first[0].updated_at  # backing off, not spinning
    # it keeps trying, with backoff, while the PACS is down
    assert service.deliver_until(job.id, {"failed"}, min_attempts=3)[0].state == "failed"

    orthanc.start()
    done = service.deliver_until(job.id, {"done"})
    assert [d.state for d in done] == ["done"]
    for other in jobs.values():
        assert [d.state for d in service.deliver_until(other.id, {"done"})] == ["done"]

    # The scan's study now holds the scan and the waveform, which decodes to the result.
    study_uid = str(sent["jpeg"].StudyInstanceUID)
    assert sorted(i["Modality"] for i in orthanc.study_instances(study_uid)) == ["ECG", "OT"]
    (ecg,) = _ecg_instances(orthanc, study_uid)
    stored = orthanc.instance_dataset(ecg["ID"])
    signals, _ = read_ecg_waveform(stored)
    result = json.loads((service.store.result_dir(job.id) / "result.json").read_text())
    digitized = np.array([[np.nan if v is None else v for v in result["leads"][lead]]
                          for lead in LEADS]).T
    step_mv = float(stored.WaveformSequence[0].ChannelDefinitionSequence[0]
                    .ChannelSensitivity) / 1000
    assert signals.shape == digitized.shape
    assert np.array_equal(np.isnan(signals), np.isnan(digitized))
    assert np.nanmax(np.abs(signals - digitized)) <= step_mv / 2 + 1e-6
    assert stored.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
        sent["jpeg"].SOPInstanceUID
    assert check_ecg_iod(stored) == []
    if dciodvfy_path() is not None:
        assert validate_ecg_object(stored) == []
    # the PDF and the uncompressed scan went to their own studies
    for name in ("plain", "pdf"):
        assert len(_ecg_instances(orthanc, str(sent[name].StudyInstanceUID))) == 1


@pytest.mark.parametrize("service", [{"delivery_max_attempts": 2}], indirect=True)
def test_dead_letter_after_n_attempts_and_operator_retry(
    service: Service, orthanc: OrthancPeer, page: np.ndarray, tmp_path: Path,
    cardioscan_port: int,
) -> None:
    scan = img2dcm(page, tmp_path / "scan.dcm", jpeg=True, keys=_keys())
    assert storescu([scan], cardioscan_port, calling=MODALITY, extra=["-xy"]).success
    orthanc.stop()
    service.work()
    (job,) = service.store.list_jobs()
    dead = service.deliver_until(job.id, {"dead"}, min_attempts=2)
    assert [(d.state, d.attempts) for d in dead] == [("dead", 2)]
    assert service.store.queue_stats().deliveries[("orthanc", "pacs", "dead")] == 1

    orthanc.start()
    service.store.retry_delivery(dead[0].id, actor="operator")
    assert [d.state for d in service.deliver_until(job.id, {"done"})] == ["done"]
    assert len(_ecg_instances(orthanc, str(dcmread(scan).StudyInstanceUID))) == 1


def test_an_image_with_no_ecg_fails_with_the_reason_and_is_not_delivered(
    service: Service, orthanc: OrthancPeer, tmp_path: Path, cardioscan_port: int
) -> None:
    blank = np.full((700, 1000, 3), 248, dtype=np.uint8)
    scan = img2dcm(blank, tmp_path / "blank.dcm", jpeg=False, keys=_keys())
    assert storescu([scan], cardioscan_port, calling=MODALITY).success  # stored first
    service.work()
    (job,) = service.store.list_jobs()
    assert job.state == "failed"
    assert "no ECG grid found" in (job.error or "")
    assert job.deliveries == []
    assert orthanc.count_instances() == 0


# --- the PACS routes scans to CardioScan (the README's Orthanc example) --------------------

ROUTING_LUA = Path(__file__).parents[2] / "deploy" / "orthanc" / "cardioscan-routing.lua"


def test_orthanc_routes_scans_to_cardioscan_and_files_the_waveform(
    tmp_path: Path, page: np.ndarray, cardioscan_port: int
) -> None:
    """The modality sends to the PACS only; the PACS's routing rule sends the scan on to
    CardioScan, and the waveform comes back into the scan's study."""
    routed = set(re.findall(r"\['([0-9.]+)'\] = true", ROUTING_LUA.read_text()))
    assert routed == INBOUND_CLASSES  # the rule and the listener agree on what to digitize

    pacs = OrthancPeer(tmp_path / "routing-orthanc", lua_scripts=[ROUTING_LUA],
                       modalities={"cardioscan": (CARDIOSCAN_AET, "127.0.0.1", cardioscan_port)})
    pacs.start()
    svc = Service(_settings(tmp_path / "svc", pacs, cardioscan_port))
    try:
        ecg_scan = img2dcm(page, tmp_path / "scan.dcm", jpeg=True, keys=_keys())
        chest = img2dcm(page, tmp_path / "chest.dcm", jpeg=False, keys=_keys())
        assert storescu([ecg_scan], pacs.dicom_port, calling=MODALITY, called="ORTHANC",
                        extra=["-xy"]).success
        # A CR that is not described as an ECG stays in the PACS.
        cr = dcmread(chest)
        cr.SOPClassUID = cr.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
        cr.Modality, cr.StudyDescription = "CR", "Chest PA"
        cr.save_as(chest, enforce_file_format=True)
        assert storescu([chest], pacs.dicom_port, calling=MODALITY, called="ORTHANC").success

        deadline = time.monotonic() + 30
        while not svc.store.list_jobs() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # time for a (wrong) second routing, which must not come
        (job,) = svc.store.list_jobs()
        assert job.caller == "ORTHANC" and job.source_id == str(dcmread(ecg_scan).SOPInstanceUID)
        svc.work()
        assert [d.state for d in svc.deliver_until(job.id, {"done"})] == ["done"]
        study = pacs.study_instances(str(dcmread(ecg_scan).StudyInstanceUID))
        assert sorted(i["Modality"] for i in study) == ["ECG", "OT"]
        time.sleep(1.0)
        assert len(svc.store.list_jobs()) == 1  # the waveform was not routed back
    finally:
        svc.close()
        pacs.stop()
