"""The DICOM listener: a C-STORE SCP for scanned ECG pages, and C-ECHO.

Store first, then answer: an object is parsed, its pixels (or PDF) decoded once to prove
they can be, written durably to the spool and queued in the job store — and only then does
the sender hear 0x0000. When that cannot happen the answer says why:

=======  ==========================================================================
0xA700   out of resources: disk full, spool under its free-space floor, store down
0xA900   data set does not match its SOP class (no pixel data, wrong pixel data
         length, undecodable JPEG, broken PDF, UIDs differing from the request)
0xC000   cannot understand: empty (0 bytes), truncated or malformed data set
0x0122   SOP class not supported (CardioScan digitizes images and PDFs only)
=======  ==========================================================================

Calling AE titles not on ``dicom.allowed_callers`` (optionally pinned to a host) are
rejected at association. A SOP Instance UID received before is answered 0x0000 and not
queued again. An image with no ECG in it is stored; its job fails later with the reason.
Each object gets one log line with the caller, the SOP Instance UID and the status — no
patient data. Large objects are received straight to disk (pynetdicom's chunked mode), into
the spool's ``tmp/`` folder, so handing one to the spool is a rename on one file system.
"""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

from pynetdicom import AE, AllStoragePresentationContexts, _config, dimse_messages, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from adapters.dicom import (
    DicomContentError,
    DicomParseError,
    UnsupportedSOPClassError,
    parse_dicom,
    read_dicom,
)
from adapters.dicom.codes import INBOUND_CLASSES, INBOUND_TRANSFER_SYNTAXES
from pipeline.errors import UnreadableImageError
from service.config import AllowedCaller, Settings, TlsSettings
from service.errors import StoreError, StoreFullError
from service.spool import TMP_DIR
from service.store import JobStore

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122

VALIDATE_PAGES = 8
"""Pages (frames, PDF pages) decoded before answering: enough to prove the object is
readable without making the sender wait on a 300-page archive scan."""

MAX_ASSOCIATIONS = 32
"""Concurrent senders; one more is rejected as transient (local limit exceeded)."""

# A-ASSOCIATE-RJ: rejected-permanent, by the service user, calling AE title not recognised.
_REJECT_CALLER = (0x01, 0x01, 0x03)


class StoreRefusedError(Exception):
    """A C-STORE failure status and its one-line reason (no PHI)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class StoreSCP:
    """The event handlers of the listener, bound to one job store."""

    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        self.allowed = list(settings.dicom.allowed_callers)

    # Association ---------------------------------------------------------------------------

    def on_requested(self, event: evt.Event) -> None:
        """Reject callers not on the allow-list before any negotiation."""
        if not self.allowed:
            return
        assoc = event.assoc
        request = assoc.requestor.primitive  # requestor.ae_title is set later, in negotiation
        calling = _ae(request.calling_ae_title) if request is not None else ""
        address = str(assoc.requestor.address)
        if any(_caller_matches(c, calling, address) for c in self.allowed):
            return
        log.warning("association rejected: calling AE not allowed",
                    extra={"caller": calling, "peer": address})
        assoc.acse.send_reject(*_REJECT_CALLER)
        assoc.kill()

    def on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    # C-STORE -------------------------------------------------------------------------------

    def on_store(self, event: evt.Event) -> int:
        request = cast(C_STORE, event.request)
        caller = _ae(event.assoc.requestor.ae_title)
        sop_uid = str(request.AffectedSOPInstanceUID or "")
        extra: dict[str, Any] = {"caller": caller, "source_uid": sop_uid}
        try:
            job_id, duplicate = self._store(event, caller)
        except StoreRefusedError as refusal:
            log.warning("C-STORE refused 0x%04X: %s", refusal.status, refusal.reason,
                        extra={**extra, "status": f"0x{refusal.status:04X}"})
            return refusal.status
        except Exception as exc:  # never let one object take the listener down
            log.exception("C-STORE failed: %s", type(exc).__name__, extra=extra)
            return OUT_OF_RESOURCES
        log.info("C-STORE %s", "duplicate, already queued" if duplicate else "stored",
                 extra={**extra, "job_id": job_id, "status": "0x0000"})
        return SUCCESS

    def _store(self, event: evt.Event, caller: str) -> tuple[str, bool]:
        request = cast(C_STORE, event.request)
        sop_class = str(request.AffectedSOPClassUID or "")
        if sop_class not in INBOUND_CLASSES:
            raise StoreRefusedError(SOP_CLASS_NOT_SUPPORTED,
                                    f"SOP class {sop_class} is not digitized")
        try:
            known = self.store.get_job_by_source(str(request.AffectedSOPInstanceUID))
        except Exception as exc:  # the database is down: the sender should retry later
            raise StoreRefusedError(OUT_OF_RESOURCES,
                                    f"job store unavailable ({type(exc).__name__})") from exc
        if known is not None:  # stored before: answer as then, without decoding it again
            return known.id, True
        path = Path(event.dataset_path)
        try:
            ds = parse_dicom(path)
            if (str(ds.SOPClassUID) != sop_class
                    or str(ds.SOPInstanceUID) != str(request.AffectedSOPInstanceUID)):
                raise StoreRefusedError(
                    DATASET_DOES_NOT_MATCH, "SOP Class/Instance UID differ from the request")
            meta = read_dicom(ds, max_pages=VALIDATE_PAGES, caller=caller)[1]
        except UnsupportedSOPClassError as exc:
            raise StoreRefusedError(SOP_CLASS_NOT_SUPPORTED, str(exc)) from exc
        except DicomParseError as exc:
            raise StoreRefusedError(CANNOT_UNDERSTAND, str(exc)) from exc
        except DicomContentError as exc:
            raise StoreRefusedError(DATASET_DOES_NOT_MATCH, str(exc)) from exc
        except UnreadableImageError as exc:
            raise StoreRefusedError(CANNOT_UNDERSTAND, str(exc)) from exc
        del ds
        spooled: Path | None = None
        try:
            spooled = self.store.spool_tempfile()
            shutil.move(path, spooled)  # a rename: pynetdicom received it into the spool's tmp/
            result = self.store.accept_path(spooled, meta)
        except (StoreError, OSError) as exc:
            if spooled is not None:
                spooled.unlink(missing_ok=True)  # gone already once the spool adopted it
            if isinstance(exc, StoreFullError):
                reason = str(exc)
            elif isinstance(exc, OSError):
                reason = f"not stored: {exc.strerror or exc}"
            else:
                reason = f"not stored: {exc}"
            raise StoreRefusedError(OUT_OF_RESOURCES, reason) from exc
        return result.job_id, result.duplicate


def _ae(value: Any) -> str:
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    return text.strip()


def _caller_matches(allowed: AllowedCaller, calling: str, address: str) -> bool:
    if allowed.ae_title.strip() != calling:
        return False
    return allowed.host is None or address in _addresses(allowed.host)


@lru_cache(maxsize=256)
def _addresses(host: str) -> frozenset[str]:
    """IP addresses of an allow-list host (a name or a literal address)."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return frozenset({host})
    return frozenset({host} | {str(info[4][0]) for info in infos})


def build_ae(settings: Settings) -> AE:
    """The application entity: every storage SOP class is negotiated (so an unsupported one
    gets a clear 0x0122 rather than a silently rejected context), in every transfer syntax
    CardioScan decodes, plus Verification."""
    ae = AE(ae_title=settings.dicom.ae_title)
    ae.maximum_pdu_size = settings.dicom.max_pdu
    ae.maximum_associations = MAX_ASSOCIATIONS
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(cast(str, context.abstract_syntax),
                                 list(INBOUND_TRANSFER_SYNTAXES))
    ae.add_supported_context(Verification)
    return ae


def _ssl_context(tls: TlsSettings) -> ssl.SSLContext | None:
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.ca_file is not None:  # mutual TLS: only callers with a certificate from this CA
        context.load_verify_locations(str(tls.ca_file))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _quiet_libraries() -> None:
    """pydicom logs attribute values (PHI) with its warnings and a traceback per plugin for
    an undecodable frame; the listener's own line says what went wrong. pynetdicom narrates
    every PDU at INFO."""
    for name, level in (("pydicom", logging.CRITICAL), ("pynetdicom", logging.WARNING)):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level < level:
            logger.setLevel(level)


CHUNK_PREFIX = "dicom-"
"""Name prefix of the files pynetdicom receives data sets into (in the spool's ``tmp/``)."""


def receive_chunks_into(directory: Path) -> None:
    """Make pynetdicom write received data sets into ``directory``.

    With ``_config.STORE_RECV_CHUNKED_DATASET`` pynetdicom streams each C-STORE data set
    into ``tempfile.NamedTemporaryFile(delete=False, suffix=".dcm")``, i.e. the system temp
    dir (often another disk, or RAM). It has no setting for the folder, so its module-level
    name is pointed at one that fills in ``dir``; the rest of the process keeps its temp dir.
    Process-wide: the last listener started decides (one per process in production).
    """
    def named_temporary_file(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("dir", directory)
        kwargs.setdefault("prefix", CHUNK_PREFIX)
        return tempfile.NamedTemporaryFile(*args, **kwargs)

    dimse_messages.NamedTemporaryFile = named_temporary_file
    _config.STORE_RECV_CHUNKED_DATASET = True


def start_listener(settings: Settings, store: JobStore) -> ThreadedAssociationServer:
    """Start the C-STORE/C-ECHO listener in background threads; ``.shutdown()`` stops it."""
    _quiet_libraries()
    store.spool.ensure()
    receive_chunks_into(store.spool.root / TMP_DIR)
    scp = StoreSCP(settings, store)
    ae = build_ae(settings)
    handlers: list[Any] = [
        (evt.EVT_REQUESTED, scp.on_requested),
        (evt.EVT_C_ECHO, scp.on_echo),
        (evt.EVT_C_STORE, scp.on_store),
    ]
    server = ae.start_server(
        (settings.dicom.host, settings.dicom.port),
        block=False,
        evt_handlers=handlers,
        ssl_context=_ssl_context(settings.dicom.tls),
    )
    assert server is not None  # block=False returns the server
    log.info("DICOM listener %s on %s:%d", settings.dicom.ae_title, settings.dicom.host,
             server.server_address[1])
    return server
