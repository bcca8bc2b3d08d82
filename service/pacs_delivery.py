"""Delivery to a PACS: C-STORE of a job's ECG waveform object(s) to a configured AE.

One association per delivery sends ``ecg.dcm`` and, for a multi-page source, each
``page-<n>/ecg.dcm``. The objects' UIDs are derived from the source, so a resend after a
crash (or an operator retry) stores the same instances again rather than new ones.

A PACS that cannot be reached, aborts, or answers a failure status is retried with backoff
by the outbox (:mod:`service.delivery`), and dead-lettered after ``delivery_max_attempts``.
A PACS that does not support the ECG waveform SOP class at all is a permanent failure: it
will not change its mind until someone reconfigures it.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

from service.config import Destination, PacsDestination, Settings
from service.delivery import PermanentDeliveryError, RetryableDeliveryError, Sender
from service.outputs import OUTPUT_FILES
from service.store import DeliveryTask

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 30.0
"""Connection, association and DIMSE response limit; a PACS slower than this is retried."""
_WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})
"""Stored, with coercion or elements discarded: delivered."""
_SOP_CLASS_NOT_SUPPORTED = 0x0122


class PacsSender:
    """Sends a job's waveform objects to one PACS destination."""

    def __init__(self, settings: Settings, destination: PacsDestination) -> None:
        self.destination = destination
        self.calling_ae = settings.dicom.ae_title
        self.tls = settings.dicom.tls

    def send(self, delivery: DeliveryTask, result_dir: Path) -> str | None:
        paths = waveform_files(result_dir)
        if not paths:
            raise PermanentDeliveryError(f"job {delivery.job_id} has no ECG waveform object")
        datasets = [dcmread(p) for p in paths]
        assoc = self._associate({str(ds.SOPClassUID) for ds in datasets})
        try:
            for ds in datasets:
                self._store(assoc, ds)
        finally:
            if assoc.is_established:
                assoc.release()
        return ",".join(str(ds.SOPInstanceUID) for ds in datasets)

    def _associate(self, sop_classes: set[str]) -> Association:
        dest = self.destination
        ae = AE(ae_title=self.calling_ae)
        ae.connection_timeout = TIMEOUT_SECONDS
        ae.acse_timeout = TIMEOUT_SECONDS
        ae.dimse_timeout = TIMEOUT_SECONDS
        ae.network_timeout = TIMEOUT_SECONDS
        for sop_class in sorted(sop_classes):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                             tls_args=self._tls_args())
        if assoc.is_established:
            return assoc
        if assoc.is_rejected:
            raise RetryableDeliveryError(
                f"PACS {dest.name} ({dest.ae_title}@{dest.host}:{dest.port}) rejected the "
                "association (is CardioScan's AE title registered there?)")
        raise RetryableDeliveryError(
            f"PACS {dest.name} at {dest.host}:{dest.port} not reachable or aborted")

    def _tls_args(self) -> tuple[ssl.SSLContext, str] | None:
        if not self.destination.tls:
            return None
        context = ssl.create_default_context(
            cafile=str(self.tls.ca_file) if self.tls.ca_file else None)
        if self.tls.enabled:  # client certificate for mutual TLS
            context.load_cert_chain(str(self.tls.cert_file), str(self.tls.key_file))
        return context, self.destination.host

    def _store(self, assoc: Association, ds: Dataset) -> None:
        dest = self.destination
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        if str(ds.SOPClassUID) not in accepted:
            raise PermanentDeliveryError(
                f"PACS {dest.name} does not accept {ds.SOPClassUID.name} objects")
        status = assoc.send_c_store(ds)
        code = int(status.get("Status", -1)) if status else -1
        if code == -1:
            raise RetryableDeliveryError(f"no C-STORE response from PACS {dest.name}")
        if code == _SOP_CLASS_NOT_SUPPORTED:
            raise PermanentDeliveryError(
                f"PACS {dest.name} answered 0x0122: SOP class not supported")
        if code != 0x0000 and code not in _WARNING_STATUSES:
            raise RetryableDeliveryError(f"PACS {dest.name} answered C-STORE status 0x{code:04X}")
        log.info("C-STORE to %s: 0x%04X", dest.name, code,
                 extra={"destination": dest.name, "sop_instance_uid": str(ds.SOPInstanceUID)})


def waveform_files(result_dir: Path) -> list[Path]:
    """``ecg.dcm`` of the first page, then each further page's, in page order."""
    name = OUTPUT_FILES["dicom"]
    first = result_dir / name
    pages = sorted(result_dir.glob(f"page-*/{name}"),
                   key=lambda p: int(p.parent.name.removeprefix("page-") or 0))
    return ([first] if first.is_file() else []) + pages


def create_sender(settings: Settings, destination: Destination) -> Sender:
    """Factory the outbox calls for destinations of kind ``pacs``."""
    if not isinstance(destination.config, PacsDestination):
        raise PermanentDeliveryError(f"destination {destination.name} is not a PACS")
    return PacsSender(settings, destination.config)
