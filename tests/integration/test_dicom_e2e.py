"""End to end, as a hospital runs it: ``cardioscan serve`` with the real digitizer, a dcmtk
modality sending scans, and Orthanc as the PACS.

A scanned synthetic ECG page (JPEG baseline and uncompressed Secondary Capture, and a PDF)
goes to CardioScan's listener while the PACS is down; the jobs finish, delivery waits and
retries, and once Orthanc is back the scan's study holds the scan plus a 12-lead ECG waveform
that decodes to the digitized signal. A page with no ECG fails with the reason and nothing
is delivered for it.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dicom_peers import OrthancPeer, echoscu, img2dcm, pdf2dcm, storescu
from PIL import Image
from pydicom.uid import generate_uid
from service_support import ServeProcess, free_port, wait_for

from adapters.dicom import check_ecg_iod, read_ecg_waveform
from adapters.dicom.iod_check import dciodvfy_path, validate_ecg_object
from pipeline.leads import LEADS

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

ENGINE_ENV = "CARDIOSCAN_ENGINE"
if importlib.util.find_spec("pipeline.digitizer") is None and not os.environ.get(ENGINE_ENV):
    pytest.skip("pipeline.digitizer (the digitizer) is not in this checkout yet",
                allow_module_level=True)

CARDIOSCAN_AET = "CARDIOSCAN"
MODALITY = "SCANNER1"
STARTUP_TIMEOUT_S = 120.0
DIGITIZE_TIMEOUT_S = 240.0
PAGE_WIDTH_PX = 1200
"""A scan of about 100 dpi: read as well as a larger one, in a third of the time."""


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[tuple[OrthancPeer, int]]:
    dicom_port = free_port()
    peer = OrthancPeer(tmp_path / "orthanc",
                       modalities={"cardioscan": (CARDIOSCAN_AET, "127.0.0.1", dicom_port)})
    peer.start()
    yield peer, dicom_port
    peer.stop()


@pytest.fixture
def serve(serve_process: Callable[..., ServeProcess], tmp_path: Path,
          orthanc: tuple[OrthancPeer, int]) -> ServeProcess:
    """``cardioscan serve`` with the real digitizer, configured by a YAML file as in a
    hospital, Orthanc as its PACS, and quick retries (the PACS outage outlasts many)."""
    peer, dicom_port = orthanc
    config = tmp_path / "cardioscan.yaml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "dicom": {"ae_title": CARDIOSCAN_AET, "host": "127.0.0.1"},
        "pacs": [{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1",
                  "port": peer.dicom_port}],
        "workers": 1, "outputs": ["json", "dicom"],
        "backoff_max_seconds": 1.0, "delivery_max_attempts": 1000,
    }))
    return serve_process(engine=None, config=config, dicom_port=dicom_port,
                         timeout=STARTUP_TIMEOUT_S,
                         ready=lambda: echoscu(dicom_port, calling=MODALITY))


def _keys() -> dict[str, str]:
    return {"PatientName": "Bell^Alexander", "PatientID": "MRN-1876", "Modality": "OT",
            "AccessionNumber": "ACC-42", "StudyInstanceUID": generate_uid()}


def test_scans_are_digitized_and_the_waveform_reaches_the_pacs_when_it_is_back(
    serve: ServeProcess, orthanc: tuple[OrthancPeer, int], tmp_path: Path
) -> None:
    from pipeline.synthetic import generate_page

    peer, dicom_port = orthanc
    page = generate_page(7, "scan", width_px=PAGE_WIDTH_PX).image
    jpeg = img2dcm(page, tmp_path / "scan.dcm", jpeg=True, keys=_keys())
    plain = img2dcm(page, tmp_path / "plain.dcm", jpeg=False, keys=_keys())
    buffer = io.BytesIO()
    Image.fromarray(page).save(buffer, format="PDF", resolution=200)
    pdf = pdf2dcm(buffer.getvalue(), tmp_path / "page.dcm", keys=_keys())
    blank = img2dcm(np.full((1200, 1700, 3), 246, dtype=np.uint8), tmp_path / "blank.dcm",
                    jpeg=True, keys=_keys())
    # The modality files the scan in the PACS; the router sends it to CardioScan too.
    assert storescu([jpeg], peer.dicom_port, calling=MODALITY, called="ORTHANC",
                    extra=["-xy"]).success
    peer.stop()  # the PACS is down for maintenance
    outcome = storescu([jpeg, plain, pdf, blank], dicom_port, calling=MODALITY, extra=["-xy"])
    assert outcome.output.count("Received Store Response (Success)") == 4, outcome.output

    from pydicom import dcmread

    uids = {name: dcmread(p) for name, p in
            (("jpeg", jpeg), ("plain", plain), ("pdf", pdf), ("blank", blank))}
    store = serve.store()
    try:
        def finished() -> dict[str, Any] | None:
            jobs = {name: store.get_job_by_source(str(ds.SOPInstanceUID))
                    for name, ds in uids.items()}
            if all(j is not None and j.terminal for j in jobs.values()):
                return jobs
            return None

        jobs = wait_for(finished, DIGITIZE_TIMEOUT_S, "the jobs to finish", 0.5,
                        context=serve.output)
        assert jobs["blank"].state == "failed"
        assert jobs["blank"].error  # the digitizer's one-line reason, e.g. no ECG grid found
        assert jobs["blank"].deliveries == []
        scanned = [name for name in ("jpeg", "plain", "pdf") if jobs[name].state == "done"]
        assert "jpeg" in scanned, {n: (j.state, j.error) for n, j in jobs.items()}

        job = jobs["jpeg"]
        wait_for(lambda: all(d.attempts >= 1 and d.last_error and d.state != "dead"
                             for d in store.require_job(job.id).deliveries),
                 60, "a failed delivery attempt while the PACS is down", 0.5,
                 context=serve.output)
        peer.start()
        wait_for(lambda: all(d.state == "done" for d in store.require_job(job.id).deliveries),
                 90, "the delivery once the PACS is back", 0.5, context=serve.output)

        study_uid = str(uids["jpeg"].StudyInstanceUID)
        instances = peer.study_instances(study_uid)
        assert sorted(i["Modality"] for i in instances) == ["ECG", "OT"]
        (ecg,) = [i for i in instances if i["Modality"] == "ECG"]
        stored = peer.instance_dataset(ecg["ID"])
        signals, fs = read_ecg_waveform(stored)
        result = json.loads((store.result_dir(job.id) / "result.json").read_text())
        digitized = np.array([[np.nan if v is None else v for v in result["leads"][lead]]
                              for lead in LEADS]).T
        step_mv = float(stored.WaveformSequence[0].ChannelDefinitionSequence[0]
                        .ChannelSensitivity) / 1000
        assert fs == result["sampling_hz"]
        assert np.array_equal(np.isnan(signals), np.isnan(digitized))
        assert np.nanmax(np.abs(signals - digitized)) <= step_mv / 2 + 1e-6
        assert np.isfinite(signals).any(axis=0).sum() >= 6  # most leads were read
        assert stored.PatientID == "MRN-1876" and stored.AccessionNumber == "ACC-42"
        assert check_ecg_iod(stored) == []
        if dciodvfy_path() is not None:
            assert validate_ecg_object(stored) == []
        # nothing was delivered for the blank page
        assert peer.study_instances(str(uids["blank"].StudyInstanceUID)) == []
    finally:
        store.close()
