"""Real DICOM peers for the integration tests: Orthanc as the PACS, dcmtk as the modality.

:class:`OrthancPeer` runs the Debian ``Orthanc`` binary on loopback with a throw-away
configuration (free ports, temporary storage, no authentication, AE ``ORTHANC``, CardioScan
registered as a modality) and can be stopped and started again on the same storage, the way
a PACS goes down for maintenance. The dcmtk helpers build Secondary Capture and Encapsulated
PDF objects from pictures (``img2dcm``, ``pdf2dcm``) and send them (``storescu``).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from pydicom import Dataset, dcmread
from service_support import free_port

ORTHANC_AET = "ORTHANC"
STARTUP_TIMEOUT_S = 30.0


def require(binary: str, package: str) -> str:
    """The system's ``binary`` (dcmtk's, Orthanc's), never a same-named console script in
    the virtual environment: pynetdicom 3 installs its own storescu and echoscu there."""
    venv_bin = Path(sys.prefix, "bin").resolve()
    search = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                             if p and Path(p).resolve() != venv_bin)
    path = shutil.which(binary, path=search)
    if path is None:
        pytest.skip(f"{binary} is not installed (Debian package {package}; `make system-deps`)")
    return path


@dataclass
class OrthancPeer:
    """One Orthanc on loopback; ``start()``/``stop()`` may be called repeatedly."""

    root: Path
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    lua_scripts: list[Path] = field(default_factory=list)
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _config(self) -> Path:
        config = {
            "Name": "cardioscan-test-pacs",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "storage"),
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": ORTHANC_AET,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomModalities": {name: list(v) for name, v in self.modalities.items()},
            "LuaScripts": [str(p) for p in self.lua_scripts],
            "StableAge": 1,
            "SaveJobs": False,
            "HttpThreadsCount": 4,
            "DicomThreadsCount": 2,
        }
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(config, indent=1))
        return path

    def start(self) -> None:
        binary = require("Orthanc", "orthanc")
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "orthanc.log", "ab")  # noqa: SIM115 (owned by the process)
        self.process = subprocess.Popen([binary, str(self._config())], stdout=log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.root / 'orthanc.log').read_text()}")
            try:
                if httpx.get(f"{self.url}/system", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("Orthanc did not start")

    def stop(self) -> None:
        """Kill it: an outage as abrupt as a crash (a graceful stop takes Orthanc 3 s, and its
        SQLite index comes back intact either way)."""
        if self.process is None:
            return
        self.process.kill()
        self.process.wait()
        self.process = None

    # REST ----------------------------------------------------------------------------------

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.url}{path}", timeout=10)
        response.raise_for_status()
        return response.json()

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """Every instance Orthanc holds in the study, with its main DICOM tags."""
        found = httpx.post(f"{self.url}/tools/find", timeout=10, json={
            "Level": "Study", "Query": {"StudyInstanceUID": study_uid}}).json()
        if not found:
            return []
        instances: list[dict[str, Any]] = self.get(f"/studies/{found[0]}/instances")
        for instance in instances:
            instance["Modality"] = self.get(
                f"/series/{instance['ParentSeries']}")["MainDicomTags"].get("Modality")
        return instances

    def instance_dataset(self, orthanc_id: str) -> Dataset:
        response = httpx.get(f"{self.url}/instances/{orthanc_id}/file", timeout=10)
        response.raise_for_status()
        return dcmread(io.BytesIO(response.content))

    def count_instances(self) -> int:
        return int(self.get("/statistics")["CountInstances"])


# dcmtk -------------------------------------------------------------------------------------


def img2dcm(image: Any, out: Path, *, jpeg: bool, keys: dict[str, str]) -> Path:
    """A Secondary Capture of ``image``: JPEG baseline (the JPEG stream kept as is, as a
    scanner station sends it) or uncompressed (from a BMP)."""
    binary = require("img2dcm", "dcmtk")
    picture = out.with_suffix(".jpg" if jpeg else ".bmp")
    Image.fromarray(image).save(picture, quality=92)  # quality: JPEG only
    args = [binary, "-i", "JPEG" if jpeg else "BMP", str(picture), str(out)]
    for key, value in keys.items():
        args += ["-k", f"{key}={value}"]
    subprocess.run(args, check=True, capture_output=True)
    return out


def pdf2dcm(document: bytes, out: Path, *, keys: dict[str, str]) -> Path:
    binary = require("pdf2dcm", "dcmtk")
    pdf = out.with_suffix(".pdf")
    pdf.write_bytes(document)
    args = [binary, str(pdf), str(out)]
    for key, value in keys.items():
        args += ["-k", f"{key}={value}"]
    subprocess.run(args, check=True, capture_output=True)
    return out


@dataclass(frozen=True)
class StoreOutcome:
    returncode: int
    output: str

    @property
    def success(self) -> bool:
        return self.returncode == 0 and "Received Store Response (Success)" in self.output

    @property
    def status(self) -> int | None:
        """The C-STORE status the SCP answered, as storescu printed it (by name or in hex)."""
        for line in self.output.splitlines():
            if "Received Store Response" not in line:
                continue
            for name, code in _DCMTK_STATUS_NAMES.items():
                if name in line:
                    return code
            if "0x" in line:
                return int(line.rsplit("0x", 1)[1].split()[0].strip(")"), 16)
        return None


_DCMTK_STATUS_NAMES = {
    "(Success)": 0x0000,
    "OutOfResources": 0xA700,
    "DataSetDoesNotMatchSOPClass": 0xA900,
    "CannotUnderstand": 0xC000,
    "SOPClassNotSupported": 0x0122,
}


def storescu(files: list[Path], port: int, *, calling: str, called: str = "CARDIOSCAN",
             extra: list[str] | None = None) -> StoreOutcome:
    binary = require("storescu", "dcmtk")
    result = subprocess.run(
        [binary, "-v", "-R", "-aet", calling, "-aec", called, *(extra or []), "127.0.0.1",
         str(port),
         *map(str, files)],
        capture_output=True, text=True, timeout=120, check=False)
    return StoreOutcome(result.returncode, result.stdout + result.stderr)


def echoscu(port: int, *, calling: str, called: str = "CARDIOSCAN") -> bool:
    binary = require("echoscu", "dcmtk")
    result = subprocess.run([binary, "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
                            capture_output=True, text=True, timeout=30, check=False)
    return result.returncode == 0
