"""The REST API, ``/api/v1``: upload a picture, follow its job, fetch its outputs, retry.

``POST /api/v1/digitize`` answers in the seed API's shape (``steps``, ``leads``,
``lead_boxes``, ``metrics``, ``sampling_hz`` ...) plus ``job_id`` once the job is done,
waiting up to ``http.digitize_wait_seconds``; with ``?wait=false``, or when the wait runs
out, it answers 202 with the job and a ``Location`` to poll. Errors are RFC 9457 problems.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response

from adapters.source import SourceMeta
from service import audit
from service.api.deps import caller_of, get_settings, get_store
from service.api.problems import PROBLEM_JSON, ProblemError
from service.config import Settings
from service.db.models import JobState
from service.errors import JobNotFoundError, JobStateError, StoreError, StoreFullError
from service.outputs import OUTPUT_FILES, WFDB_STEM
from service.store import JobInfo, JobStore

router = APIRouter(prefix="/api/v1", tags=["CardioScan REST"])

PREFIX = "/api/v1"
_READ_CHUNK = 1024 * 1024
_PROBLEM: dict[str, Any] = {"content": {PROBLEM_JSON: {}}}

OutputKind = Literal["dicom", "fhir", "wfdb", "csv", "json", "overlay.png"]
_OUTPUT_MEDIA = {
    "dicom": ("dicom", "application/dicom", "ecg.dcm"),
    "fhir": ("fhir", "application/fhir+json", "fhir-bundle.json"),
    "csv": ("csv", "text/csv", "record.csv"),
    "json": ("json", "application/json", "result.json"),
    "overlay.png": ("overlay", "image/png", "overlay.png"),
}


def media_type_of(data: bytes) -> str | None:
    """What the bytes are, by content: a DICOM Part 10 file or a picture adapters decode."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "application/dicom"
    from adapters.images import sniff

    kind = sniff(data)
    if kind is None:
        return None
    return "application/pdf" if kind == "pdf" else f"image/{kind}"


def job_links(job_id: str, outputs: list[str]) -> dict[str, str]:
    links = {"self": f"{PREFIX}/jobs/{job_id}", "retry": f"{PREFIX}/jobs/{job_id}/retry"}
    names = {"overlay": "overlay.png"}
    for kind in outputs:
        name = names.get(kind, kind)
        links[name] = f"{PREFIX}/jobs/{job_id}/outputs/{name}"
    return links


def job_body(info: JobInfo) -> dict[str, Any]:
    body = info.to_dict()
    body["links"] = job_links(info.id, info.outputs)
    return body


def _pending(info: JobInfo) -> JSONResponse:
    return JSONResponse(job_body(info), status_code=202,
                        headers={"Location": f"{PREFIX}/jobs/{info.id}", "Retry-After": "2"})


def _job_problem(info: JobInfo) -> ProblemError:
    if info.state == JobState.FAILED:
        return ProblemError(422, info.error or "the picture could not be digitized",
                       type_="not-digitized", title="Not digitized", job_id=info.id)
    return ProblemError(500, f"digitization failed after {info.attempts} attempts: {info.error}",
                   type_="job-dead", title="Digitization failed", job_id=info.id)


def _read_upload(request: Request, file: UploadFile, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit + 64 * 1024:
        raise ProblemError(413, f"upload larger than {limit} bytes", type_="too-large")
    buf = bytearray()
    while chunk := file.file.read(_READ_CHUNK):
        buf += chunk
        if len(buf) > limit:
            raise ProblemError(413, f"upload larger than {limit} bytes", type_="too-large")
    return bytes(buf)


@router.post(
    "/digitize",
    summary="Digitize an ECG picture",
    responses={202: {"description": "Accepted; still being digitized"},
               413: _PROBLEM, 415: _PROBLEM, 422: _PROBLEM, 507: _PROBLEM},
)
def digitize(
    request: Request,
    file: Annotated[UploadFile, File(description="PNG, JPEG, TIFF, BMP, WebP, PDF or DICOM")],
    store: Annotated[JobStore, Depends(get_store)],
    settings: Annotated[Settings, Depends(get_settings)],
    wait: Annotated[bool, Query(description="Wait for the result (else answer 202)")] = True,
    timeout: Annotated[float | None, Query(ge=0, description="Seconds to wait at most")] = None,
) -> Response:
    """Store the upload durably, queue it, and (by default) wait for the result."""
    data = _read_upload(request, file, settings.http.max_upload_bytes)
    if not data:
        raise ProblemError(400, "empty upload", type_="empty")
    media_type = media_type_of(data)
    if media_type is None:
        raise ProblemError(415, "not a PNG, JPEG, TIFF, BMP, WebP, PDF or DICOM file",
                      type_="unsupported-media-type")
    source = SourceMeta(route="rest", source_id=f"sha256:{hashlib.sha256(data).hexdigest()}",
                        media_type=media_type, caller=caller_of(request))
    try:
        accepted = store.accept(data, source)
    except StoreFullError as exc:
        raise ProblemError(507, str(exc), type_="store-full") from exc
    except StoreError as exc:
        raise ProblemError(503, str(exc), type_="store-unavailable",
                      headers={"Retry-After": "30"}) from exc
    info = store.require_job(accepted.job_id)
    if wait:
        limit = settings.http.digitize_wait_seconds
        info = store.wait_for_job(accepted.job_id, min(timeout, limit) if timeout else limit)
    if not info.terminal:
        return _pending(info)
    if info.state != JobState.DONE:
        raise _job_problem(info)
    result = store.output_path(info.id, "json")
    if result is None:
        return JSONResponse(job_body(info))
    body = json.loads(result.read_bytes())
    body["job_id"] = info.id
    body["links"] = job_links(info.id, info.outputs)
    return JSONResponse(body)


@router.get("/jobs", summary="List jobs, newest first")
def list_jobs(
    store: Annotated[JobStore, Depends(get_store)],
    state: Annotated[Literal["queued", "running", "done", "failed", "dead"] | None,
                     Query()] = None,
    route: Annotated[str | None, Query(max_length=16)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    items = store.list_jobs(state=state, route=route, limit=limit, offset=offset)
    return {"items": [job_body(i) for i in items],
            "total": store.count_jobs(state=state, route=route),
            "limit": limit, "offset": offset}


def _job_or_404(store: JobStore, job_id: str) -> JobInfo:
    info = store.get_job(job_id)
    if info is None:
        raise ProblemError(404, f"no job {job_id}", type_="job-not-found")
    return info


@router.get("/jobs/{job_id}", summary="A job, its deliveries and output links",
            responses={404: _PROBLEM})
def get_job(job_id: str, store: Annotated[JobStore, Depends(get_store)]) -> dict[str, Any]:
    return job_body(_job_or_404(store, job_id))


@router.get(
    "/jobs/{job_id}/outputs/{kind}",
    summary="A result file: DICOM waveform, FHIR Bundle, WFDB (zip), CSV, JSON or overlay",
    responses={404: _PROBLEM, 200: {"content": {
        "application/dicom": {}, "application/fhir+json": {}, "application/zip": {},
        "text/csv": {}, "application/json": {}, "image/png": {}}}},
)
def get_output(job_id: str, kind: OutputKind,
               store: Annotated[JobStore, Depends(get_store)]) -> Response:
    info = _job_or_404(store, job_id)
    if info.state != JobState.DONE:
        raise ProblemError(404, f"job is {info.state}; no outputs", type_="output-not-found")
    if kind == "wfdb":
        hea, dat = store.output_path(job_id, "hea"), store.output_path(job_id, "dat")
        if hea is None or dat is None:
            raise ProblemError(404, "no WFDB record for this job", type_="output-not-found")
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            z.write(hea, f"{WFDB_STEM}.hea")
            z.write(dat, f"{WFDB_STEM}.dat")
        return Response(buf.getvalue(), media_type="application/zip", headers={
            "Content-Disposition": f'attachment; filename="{job_id}-wfdb.zip"'})
    output_kind, media, name = _OUTPUT_MEDIA[kind]
    path = store.output_path(job_id, output_kind)
    if path is None:
        raise ProblemError(404, f"no {kind} output for this job", type_="output-not-found")
    assert OUTPUT_FILES[output_kind] == name
    return FileResponse(path, media_type=media, filename=f"{job_id}-{name}")


@router.post("/jobs/{job_id}/retry", summary="Re-queue a failed or dead job or its deliveries",
             responses={404: _PROBLEM, 409: _PROBLEM})
def retry_job(job_id: str, request: Request,
              store: Annotated[JobStore, Depends(get_store)]) -> dict[str, Any]:
    try:
        info = store.retry_job(job_id, actor=caller_of(request))
    except JobNotFoundError as exc:
        raise ProblemError(404, str(exc), type_="job-not-found") from exc
    except JobStateError as exc:
        raise ProblemError(409, str(exc), type_="nothing-to-retry") from exc
    return job_body(info)


@router.post("/deliveries/{delivery_id}/retry", summary="Re-queue a failed or dead delivery",
             responses={404: _PROBLEM, 409: _PROBLEM})
def retry_delivery(delivery_id: str, request: Request,
                   store: Annotated[JobStore, Depends(get_store)]) -> dict[str, Any]:
    try:
        return store.retry_delivery(delivery_id, actor=caller_of(request)).to_dict()
    except JobNotFoundError as exc:
        raise ProblemError(404, str(exc), type_="delivery-not-found") from exc
    except JobStateError as exc:
        raise ProblemError(409, str(exc), type_="nothing-to-retry") from exc


@router.get("/audit", summary="The audit trail; format=fhir gives a Bundle of AuditEvents")
def get_audit(
    store: Annotated[JobStore, Depends(get_store)],
    settings: Annotated[Settings, Depends(get_settings)],
    job_id: Annotated[str | None, Query()] = None,
    action: Annotated[str | None, Query()] = None,
    actor: Annotated[str | None, Query()] = None,
    since: Annotated[datetime | None, Query()] = None,
    until: Annotated[datetime | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
    format: Annotated[Literal["json", "fhir"], Query()] = "json",
) -> Response:
    for t in (since, until):
        if t is not None and t.tzinfo is None:
            raise ProblemError(422, "since/until need a time zone (e.g. ...Z)",
                               type_="invalid-request")
    records = store.audit_events(job_id=job_id, action=action, actor=actor, since=since,
                                 until=until, limit=limit, offset=offset)
    if format == "json":
        return JSONResponse({"items": [r.to_dict() for r in records],
                             "limit": limit, "offset": offset})
    base = settings.http.base_url
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(records),
        "entry": [{"fullUrl": f"{base}{PREFIX}/audit/audit-{r.id}",
                   "resource": audit.to_fhir(r, version=settings.fhir_version, base_url=base)}
                  for r in records],
    }
    return JSONResponse(bundle, media_type="application/fhir+json")
