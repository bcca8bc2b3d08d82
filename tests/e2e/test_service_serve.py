"""``cardioscan serve`` as a hospital runs it: kill -9 after an accept, and a graceful stop.

The service runs as a real process group (HTTP API, DICOM listener, worker process,
digitizer child) on the embedded SQLite store, with a folder destination standing in for
the archive; the stand-in digitizer (tests/unit/service_support.py) makes jobs slow enough
to be caught mid-flight.
"""

from __future__ import annotations

import io
import json
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_support import SLOW, ServeProcess, log_counts, page_png, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def service(serve_process: Callable[..., ServeProcess], tmp_path: Path) -> ServeProcess:
    """Delivering to ``tmp_path/archive``; the stand-in logs to ``tmp_path/fake.log``."""
    archive = json.dumps([{"name": "archive", "path": str(tmp_path / "archive")}])
    return serve_process(lease_seconds=2, shutdown_grace_seconds=20, folders=archive,
                         fake_log=tmp_path / "fake.log", fake_sleep=1)


def job(svc: ServeProcess, job_id: str) -> dict:
    return httpx.get(f"{svc.url}/api/v1/jobs/{job_id}", timeout=5).json()


def upload(svc: ServeProcess, ident: int, behaviour: int = 0) -> httpx.Response:
    return httpx.post(f"{svc.url}/api/v1/digitize", params={"wait": "false"}, timeout=10,
                      files={"file": ("ecg.png", page_png(ident, behaviour), "image/png")})


def c_store(svc: ServeProcess, ident: int, behaviour: int = 0) -> tuple[int, str]:
    """C-STORE a Secondary Capture of a marked picture to the listener; (status, SOP UID)."""
    from dicom_samples import secondary_capture
    from PIL import Image
    from pynetdicom import AE
    from pynetdicom.sop_class import SecondaryCaptureImageStorage

    pixels = np.asarray(Image.open(io.BytesIO(page_png(ident, behaviour))).convert("RGB"))
    ds = secondary_capture(pixels)
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(SecondaryCaptureImageStorage)
    assoc = ae.associate("127.0.0.1", svc.dicom_port, ae_title="CARDIOSCAN")
    assert assoc.is_established, svc.output()
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    return int(status.Status), str(ds.SOPInstanceUID)


def test_kill_9_right_after_accept_loses_nothing(service: ServeProcess, tmp_path: Path) -> None:
    fake_log, archive = tmp_path / "fake.log", tmp_path / "archive"
    resp = upload(service, 1, SLOW)
    assert resp.status_code == 202
    rest_job = resp.json()["id"]
    status, sop_uid = c_store(service, 2, SLOW)
    assert status == 0x0000
    service.kill()  # the instant both senders were told "stored"
    wait_for(service.group_gone, 10, "every process of the service to die")

    service.start()
    jobs = httpx.get(f"{service.url}/api/v1/jobs", params={"route": "dicom"}).json()["items"]
    assert [j["source_id"] for j in jobs] == [sop_uid]
    dicom_job = jobs[0]["id"]
    for job_id in (rest_job, dicom_job):
        wait_for(lambda j=job_id: (found := job(service, j))["state"] == "done"
                 and found["deliveries"] and found["deliveries"][0]["state"] == "done",
                 60, "the job to be digitized and delivered after the restart",
                 context=service.output)
        assert (archive / job_id / "result.json").exists()
        audit = httpx.get(f"{service.url}/api/v1/audit",
                          params={"job_id": job_id}).json()["items"]
        actions = [e["action"] for e in audit]
        assert actions.count("received") == 1 and actions.count("digitized") == 1
        assert actions.count("delivered") == 1
    assert log_counts(fake_log, "end") == {1: 1, 2: 1}
    received = httpx.get(f"{service.url}/api/v1/audit",
                         params={"job_id": dicom_job, "action": "received"}).json()["items"]
    assert received[0]["actor"] == "TEST_SCU"


def test_sigterm_stops_accepting_and_finishes_the_job_in_hand(
    service: ServeProcess, tmp_path: Path
) -> None:
    fake_log = tmp_path / "fake.log"
    job_id = upload(service, 2, SLOW).json()["id"]
    wait_for(lambda: log_counts(fake_log, "start").get(2), 30, "the job to start")
    assert service.proc is not None
    service.proc.send_signal(signal.SIGTERM)  # the main process only, as `kill PID` does
    assert service.proc.wait(40) == 0, service.output()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{service.url}/healthz", timeout=1)
    wait_for(service.group_gone, 10, "every process of the service to exit")
    assert log_counts(fake_log, "end") == {2: 1}  # finished, not abandoned
    store = service.store()
    try:
        job_info = store.get_job(job_id)
    finally:
        store.close()
    assert job_info is not None and (job_info.state, job_info.attempts) == ("done", 1)
