"""The FHIR endpoint (mounted at ``/fhir`` by :func:`service.api.app.create_app`).

Pictures arrive as ``POST /fhir/Binary`` (raw image/PDF or a Binary resource),
``POST /fhir/DocumentReference``, ``POST /fhir/Media`` (R4), a transaction or batch
``POST /fhir`` and ``POST /fhir/$digitize``. Each picture is stored durably in the job
store before anything is answered, then digitized by the workers.

Answers follow FHIR's asynchronous request pattern: with ``Prefer: respond-async`` (and
for pictures over :data:`SYNC_MAX_BYTES`) the answer is ``202 Accepted`` at once, with
``Content-Location`` naming a status URL under ``/fhir/_async/``. That URL answers 202
while the job runs, then 200 with the results, or the failure's OperationOutcome with its
status (422 for a picture that is not an ECG or has no ECG grid). Without the header the
request waits up to ``http.digitize_wait_seconds`` and answers the same way, falling back
to 202 if the job is still running.

Results are served read-only from each job's ``fhir-bundle.json``: resources get the ids
``<job_id>-<kind>`` (``-p<n>`` inserted for page n > 1 of a PDF), e.g.
``Observation/<job_id>-ecg`` and ``DiagnosticReport/<job_id>-report``; the received picture
is ``Binary/<job_id>``. Every error is an OperationOutcome (``application/fhir+json``).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.fhir import (
    FhirInputError,
    Inbound,
    InboundParser,
    MalformedResourceError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
    capability_statement,
    local_resources,
    operation_definition,
    operation_outcome,
)
from adapters.fhir.codes import FHIR_JSON
from adapters.fhir.inbound import normalize_media_type
from adapters.fhir.results import collection_bundle, reference_type
from service.api.auth import WWW_AUTHENTICATE, AuthenticationError
from service.api.deps import caller_of, get_settings, get_store
from service.config import Settings
from service.db.models import JobState
from service.errors import StoreError, StoreFullError
from service.outputs import OUTPUT_FILES
from service.store import JobInfo, JobStore

log = logging.getLogger(__name__)

SYNC_MAX_BYTES = 8 * 1024 * 1024
"""Pictures up to this size are answered synchronously unless the client asks for async."""
RETRY_AFTER_S = 2
SEARCH_SCAN_LIMIT = 500
"""Newest FHIR jobs looked through for a ``derived-from`` naming an EHR resource."""
READABLE_TYPES = ("Observation", "DiagnosticReport", "DocumentReference", "Device",
                  "Provenance")
JSON_OVERHEAD_BYTES = 1024 * 1024
"""Room for the JSON around a base64 picture when bounding a resource body."""
_LOCAL_ID = re.compile(r"(?P<job>[A-Za-z0-9]+)(?:-p(?P<page>\d+))?-(?P<kind>[a-z]+)")
_STATUS = {200: "200 OK", 201: "201 Created", 202: "202 Accepted", 400: "400 Bad Request",
           404: "404 Not Found", 410: "410 Gone", 422: "422 Unprocessable Entity",
           500: "500 Internal Server Error"}


class FhirResponse(JSONResponse):
    media_type = FHIR_JSON

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode("utf-8")


def outcome_response(status: int, diagnostics: str, *, code: str = "invalid",
                     severity: str = "error", headers: dict[str, str] | None = None,
                     ) -> FhirResponse:
    return FhirResponse(operation_outcome(diagnostics, code=code, severity=severity),
                        status_code=status, headers=headers)


class FhirRoute(APIRoute):
    """Every error under /fhir leaves as an OperationOutcome with the right status."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except AuthenticationError as exc:
                return outcome_response(401, str(exc), code="login", headers=WWW_AUTHENTICATE)
            except FhirInputError as exc:
                return outcome_response(exc.status, str(exc), code=exc.issue_code)
            except StoreFullError as exc:
                log.error("store full: %s", exc)
                return outcome_response(507, "CardioScan is out of storage; try again later",
                                        code="transient")
            except StoreError as exc:
                log.error("store error: %s", exc)
                return outcome_response(503, "the picture could not be stored; try again",
                                        code="transient")
            except RequestValidationError as exc:
                return outcome_response(400, "; ".join(
                    f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}"
                    for e in exc.errors()), code="invalid")
            except StarletteHTTPException as exc:
                return outcome_response(exc.status_code, str(exc.detail), code="processing")
            except Exception:
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                return outcome_response(500, "internal error", code="exception")

        return route


router = APIRouter(route_class=FhirRoute, tags=["FHIR"])


# ---------------------------------------------------------------- helpers


def fhir_base(request: Request, settings: Settings) -> str:
    """The FHIR base clients reach us at: the configured public URL, else this request's."""
    if settings.http.public_base_url:
        return settings.http.public_base_url.rstrip("/") + "/fhir"
    return str(request.base_url).rstrip("/") + "/fhir"


def _wants_async(request: Request) -> bool:
    prefer = request.headers.get("prefer", "")
    return any(p.strip().lower() == "respond-async" for p in prefer.split(","))


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) past ``limit`` bytes without reading it all."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise PayloadTooLargeError(f"the request is {length} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"the request is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _resource_limit(settings: Settings) -> int:
    return settings.http.max_upload_bytes * 4 // 3 + JSON_OVERHEAD_BYTES


def _require_json(request: Request) -> None:
    media = normalize_media_type(request.headers.get("content-type"))
    if media not in ("application/fhir+json", "application/json"):
        raise UnsupportedMediaTypeError(
            f"send FHIR resources as application/fhir+json, not {media or 'no content type'}")


class _Resolver:
    """Finds the Binaries this server holds (the received pictures) by reference or URL."""

    def __init__(self, store: JobStore, bases: tuple[str, ...]) -> None:
        self.store = store
        self.bases = tuple(b.rstrip("/") for b in bases)

    def job_of(self, ref: str, rtype: str = "Binary") -> str | None:
        ref = ref.split("/_history/")[0].rstrip("/")
        for base in self.bases:
            if ref.startswith(base + "/"):
                ref = ref[len(base) + 1:]
                break
        parts = ref.split("/")
        if len(parts) == 2 and parts[0] == rtype:
            return parts[1]
        return None

    def __call__(self, ref: str) -> tuple[bytes, str] | None:
        job_id = self.job_of(ref)
        job = self.store.get_job(job_id) if job_id else None
        if job is None or job.purged_at is not None:
            return None
        try:
            return self.store.source_path(job.id).read_bytes(), job.media_type
        except OSError:
            return None


def _parser(request: Request, store: JobStore, settings: Settings) -> InboundParser:
    bases = (fhir_base(request, settings), settings.http.base_url + "/fhir")
    return InboundParser(max_bytes=settings.http.max_upload_bytes,
                         resolve=_Resolver(store, bases), caller=caller_of(request))


def _status_url(base: str, job_ids: list[str], bundle_type: str | None = None) -> str:
    url = f"{base}/_async/{','.join(job_ids)}"
    return f"{url}?bundle={bundle_type}" if bundle_type else url


def _job_bundles(store: JobStore, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    """(id prefix, transaction Bundle) for every digitized page of a done job."""
    root = store.result_dir(job_id)
    name = OUTPUT_FILES["fhir"]
    found: list[tuple[str, dict[str, Any]]] = []
    first = root / name
    if first.is_file():
        found.append((job_id, json.loads(first.read_text())))
    pages = sorted((p for p in root.glob("page-*") if p.name[5:].isdigit()),
                   key=lambda p: int(p.name[5:]))
    for page in pages:
        path = page / name
        if path.is_file():
            found.append((f"{job_id}-p{page.name[5:]}", json.loads(path.read_text())))
    return found


def _job_resources(store: JobStore, job_id: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for prefix, bundle in _job_bundles(store, job_id):
        out += local_resources(bundle, prefix)
    return out


def _failure(job: JobInfo) -> tuple[int, str, str]:
    """(HTTP status, issue code, diagnostics) of a job that ended without results."""
    if job.purged_at is not None:
        return 410, "deleted", "the results were purged under the retention policy"
    if job.state == JobState.FAILED:  # a property of the picture: not an ECG, no grid...
        return 422, "processing", job.error or "the picture could not be digitized"
    return 500, "exception", f"digitizing failed after {job.attempts} attempts: {job.error}"


def _result(store: JobStore, job: JobInfo, base: str, status_url: str,
            location: str | None) -> FhirResponse:
    """The answer for one job: 202 while pending, else the results or the failure."""
    headers = {"Content-Location": status_url}
    if location:
        headers["Location"] = location
    if not job.terminal:
        headers.update({"Retry-After": str(RETRY_AFTER_S), "X-Progress": job.state})
        return outcome_response(
            202, f"the picture is {job.state}; poll {status_url}", code="informational",
            severity="information", headers=headers)
    if job.state == JobState.DONE and job.purged_at is None:
        resources = _job_resources(store, job.id)
        if resources:
            return FhirResponse(collection_bundle(resources, base), status_code=200,
                                headers=headers)
        if "fhir" not in job.outputs:
            return outcome_response(
                500, "this server is configured without FHIR output", code="not-supported",
                headers=headers)
    status, code, text = _failure(job)
    return outcome_response(status, text, code=code, headers=headers)


# ---------------------------------------------------------------- intake


def _accept(store: JobStore, items: list[Inbound]) -> list[str]:
    """Store every picture durably; returns their job ids, in order."""
    return [store.accept(item.data, item.source).job_id for item in items]


async def _answer_one(request: Request, store: JobStore, settings: Settings, item: Inbound,
                      *, created: bool) -> Response:
    job_id = (await run_in_threadpool(_accept, store, [item]))[0]
    base = fhir_base(request, settings)
    status_url = _status_url(base, [job_id])
    location = f"{base}/Binary/{job_id}" if created else None
    wait = settings.http.digitize_wait_seconds
    if _wants_async(request) or len(item.data) > SYNC_MAX_BYTES:
        wait = 0.0
    job = await run_in_threadpool(store.wait_for_job, job_id, wait)
    return _result(store, job, base, status_url, location)


async def _json_resource(request: Request, store: JobStore,
                         settings: Settings) -> tuple[InboundParser, dict[str, Any]]:
    """The request's FHIR JSON body, read within the resource size limit, and the parser
    that takes the pictures out of it."""
    _require_json(request)
    body = await _read_body(request, _resource_limit(settings))
    parser = _parser(request, store, settings)
    return parser, await run_in_threadpool(parser.json_body, body)


async def _post_picture_resource(request: Request, store: JobStore, settings: Settings,
                                 expected: str) -> Response:
    parser, resource = await _json_resource(request, store, settings)
    items = await run_in_threadpool(parser.resource, resource, expected=expected)
    if len(items) != 1:  # several pictures in one DocumentReference: one entry each
        numbered = [(item, [k]) for k, (item, _) in enumerate(items)]
        return await _answer_bundle(request, store, settings, numbered, "batch",
                                    n_entries=len(numbered))
    return await _answer_one(request, store, settings, items[0][0], created=True)


@router.post("/Binary", summary="Digitize a picture: raw image/PDF body or a Binary resource")
async def post_binary(request: Request, store: JobStore = Depends(get_store),
                      settings: Settings = Depends(get_settings)) -> Response:
    media = normalize_media_type(request.headers.get("content-type"))
    limit = (_resource_limit(settings) if media in ("application/fhir+json", "application/json")
             else settings.http.max_upload_bytes)
    body = await _read_body(request, limit)
    parser = _parser(request, store, settings)
    item = await run_in_threadpool(
        parser.binary_body, body, request.headers.get("content-type"),
        security_context=request.headers.get("x-security-context"))
    return await _answer_one(request, store, settings, item, created=True)


@router.post("/DocumentReference", summary="Digitize the picture a DocumentReference holds")
async def post_document_reference(request: Request, store: JobStore = Depends(get_store),
                                  settings: Settings = Depends(get_settings)) -> Response:
    return await _post_picture_resource(request, store, settings, "DocumentReference")


@router.post("/Media", summary="Digitize the picture an R4 Media holds")
async def post_media(request: Request, store: JobStore = Depends(get_store),
                     settings: Settings = Depends(get_settings)) -> Response:
    if settings.fhir_version != "R4":
        return outcome_response(
            404, "Media is an R4 resource and this server speaks FHIR R5; "
                 "POST a DocumentReference", code="not-supported")
    return await _post_picture_resource(request, store, settings, "Media")


@router.post("/$digitize", summary="Digitize a picture given as Parameters")
async def digitize(request: Request, store: JobStore = Depends(get_store),
                   settings: Settings = Depends(get_settings)) -> Response:
    parser, resource = await _json_resource(request, store, settings)
    if resource.get("resourceType") != "Parameters":
        raise MalformedResourceError(
            f"$digitize takes a Parameters resource, not {resource.get('resourceType')}")
    item = await run_in_threadpool(parser.parameters, resource)
    return await _answer_one(request, store, settings, item, created=False)


@router.post("", summary="A transaction or batch Bundle of Binary/DocumentReference/Media")
async def post_bundle(request: Request, store: JobStore = Depends(get_store),
                      settings: Settings = Depends(get_settings)) -> Response:
    parser, resource = await _json_resource(request, store, settings)
    if resource.get("resourceType") != "Bundle":
        raise MalformedResourceError(
            f"POST /fhir takes a transaction or batch Bundle, not {resource.get('resourceType')}")
    items = await run_in_threadpool(parser.bundle, resource)
    return await _answer_bundle(request, store, settings, items, str(resource["type"]),
                                n_entries=len(resource["entry"]))


async def _answer_bundle(request: Request, store: JobStore, settings: Settings,
                         items: list[tuple[Inbound, list[int]]], bundle_type: str,
                         *, n_entries: int) -> Response:
    job_ids = await run_in_threadpool(_accept, store, [item for item, _ in items])
    per_entry = [""] * n_entries
    for job_id, (_, entries) in zip(job_ids, items, strict=True):
        for i in entries:
            per_entry[i] = job_id
    base = fhir_base(request, settings)
    status_url = _status_url(base, per_entry, bundle_type)
    wait = 0.0 if _wants_async(request) else settings.http.digitize_wait_seconds
    deadline = time.monotonic() + wait
    jobs = {}
    for job_id in dict.fromkeys(job_ids):
        jobs[job_id] = await run_in_threadpool(
            store.wait_for_job, job_id, max(0.0, deadline - time.monotonic()))
    return _bundle_result(store, [jobs[j] for j in per_entry], bundle_type, base, status_url)


def _bundle_result(store: JobStore, jobs: list[JobInfo], bundle_type: str, base: str,
                   status_url: str) -> FhirResponse:
    """202 until every job has ended, then a transaction-/batch-response Bundle."""
    headers = {"Content-Location": status_url}
    pending = [j for j in jobs if not j.terminal]
    if pending:
        headers.update({"Retry-After": str(RETRY_AFTER_S),
                        "X-Progress": f"{len(jobs) - len(pending)} of {len(jobs)} done"})
        return outcome_response(
            202, f"{len(pending)} of {len(jobs)} pictures still being digitized; poll "
                 f"{status_url}", code="informational", severity="information",
            headers=headers)
    entries = []
    for job in jobs:
        entry: dict[str, Any] = {}
        resources = _job_resources(store, job.id) if job.state == JobState.DONE else []
        if resources:
            entry["resource"] = collection_bundle(resources, base)
            entry["response"] = {"status": _STATUS[201], "location": f"Binary/{job.id}"}
        else:
            status, code, text = _failure(job)
            entry["response"] = {"status": _STATUS.get(status, str(status)),
                                 "location": f"Binary/{job.id}",
                                 "outcome": operation_outcome(text, code=code)}
        entries.append(entry)
    bundle = {"resourceType": "Bundle", "type": f"{bundle_type}-response", "entry": entries}
    return FhirResponse(bundle, status_code=200, headers=headers)


# ---------------------------------------------------------------- polling and reading


@router.get("/_async/{job_ids}", summary="Status of an asynchronous request")
def async_status(job_ids: str, request: Request, bundle: str | None = None,
                 store: JobStore = Depends(get_store),
                 settings: Settings = Depends(get_settings)) -> Response:
    ids = [j for j in job_ids.split(",") if j]
    if bundle is not None and bundle not in ("transaction", "batch"):
        raise MalformedResourceError("bundle must be transaction or batch")
    jobs = [store.get_job(j) for j in ids]
    if not ids or any(j is None for j in jobs):
        return outcome_response(404, "no such request", code="not-found")
    known = [j for j in jobs if j is not None]
    base = fhir_base(request, settings)
    status_url = str(request.url)
    if bundle is not None:
        return _bundle_result(store, known, bundle, base, status_url)
    if len(known) != 1:
        raise MalformedResourceError("several jobs need ?bundle=transaction or batch")
    return _result(store, known[0], base, status_url, None)


@router.get("/metadata", summary="CapabilityStatement")
def metadata(request: Request, settings: Settings = Depends(get_settings)) -> Response:
    return FhirResponse(capability_statement(
        fhir_base(request, settings), settings.fhir_version,
        max_upload_bytes=settings.http.max_upload_bytes,
        api_key_auth=settings.http.auth == "api-key"))


@router.get("/OperationDefinition/digitize", summary="The $digitize OperationDefinition")
def get_operation_definition(request: Request,
                             settings: Settings = Depends(get_settings)) -> Response:
    return FhirResponse(operation_definition(fhir_base(request, settings),
                                             settings.fhir_version))


@router.get("/Binary/{binary_id}", summary="A received picture")
def get_binary(binary_id: str, request: Request, store: JobStore = Depends(get_store)
               ) -> Response:
    job = store.get_job(binary_id)
    if job is None:
        return outcome_response(404, f"no Binary/{binary_id}", code="not-found")
    if job.purged_at is not None:
        return outcome_response(410, "the picture was purged under the retention policy",
                                code="deleted")
    try:
        data = store.source_path(job.id).read_bytes()
    except OSError:
        return outcome_response(410, "the picture is no longer stored", code="deleted")
    accept = request.headers.get("accept", "")
    if "fhir+json" in accept or accept.startswith("application/json"):
        return FhirResponse({"resourceType": "Binary", "id": job.id,
                             "contentType": job.media_type,
                             "data": base64.b64encode(data).decode("ascii")})
    return Response(data, media_type=job.media_type)


@router.get("/Observation", summary="Search Observations by derived-from")
def search_observations(request: Request, store: JobStore = Depends(get_store),
                        settings: Settings = Depends(get_settings)) -> Response:
    """``derived-from`` may name the source DocumentReference of a result, the received
    picture (``Binary/<job_id>``), the ECG Observation (its measurements derive from it),
    or the EHR's own DocumentReference/Media named when the picture was sent."""
    values = [v for raw in request.query_params.getlist("derived-from")
              for v in raw.split(",") if v]
    if not values:
        raise MalformedResourceError(
            "this server searches Observations by derived-from only")
    base = fhir_base(request, settings)
    resolver = _Resolver(store, (base, settings.http.base_url + "/fhir"))
    found: dict[str, dict[str, Any]] = {}
    for value in values:
        local = _strip_base(value, resolver.bases)
        for job_id in _jobs_for(store, resolver, value):
            for resource in _job_resources(store, job_id):
                if resource["resourceType"] == "Observation" and _derives_from(
                        resource, {value, local}, job_id):
                    found[resource["id"]] = resource
    return FhirResponse(collection_bundle(list(found.values()), base, bundle_type="searchset",
                                          self_url=str(request.url)))


def _derives_from(observation: dict[str, Any], wanted: set[str], job_id: str) -> bool:
    refs = {str(d.get("reference")) for d in observation.get("derivedFrom", [])}
    if refs & wanted:
        return True
    # The received picture stands for the DocumentReference CardioScan made for it.
    return f"Binary/{job_id}" in wanted and any(
        r.startswith(f"DocumentReference/{job_id}-") and r.endswith("-source") for r in refs)


def _strip_base(ref: str, bases: tuple[str, ...]) -> str:
    for base in bases:
        if ref.startswith(base + "/"):
            return ref[len(base) + 1:]
    return ref


def _jobs_for(store: JobStore, resolver: _Resolver, ref: str) -> list[str]:
    """Done jobs whose results may derive from ``ref``."""
    local = _strip_base(ref, resolver.bases)
    rtype = reference_type(local)
    parts = local.split("/")
    if len(parts) == 2 and rtype in (*READABLE_TYPES, "Binary"):
        match = _LOCAL_ID.fullmatch(parts[1])
        job_id = parts[1] if rtype == "Binary" else (match.group("job") if match else None)
        if job_id and (job := store.get_job(job_id)) is not None:
            return [job.id] if job.state == JobState.DONE else []
    # An EHR's own DocumentReference/Media, named when the picture was sent: look it up.
    out = []
    for job in store.list_jobs(state=JobState.DONE, route="fhir", limit=SEARCH_SCAN_LIMIT):
        if store.get_source(job.id).fhir_source in (ref, local):
            out.append(job.id)
    return out


@router.get("/{resource_type}/{resource_id}", summary="Read a result resource")
def read_resource(resource_type: str, resource_id: str, store: JobStore = Depends(get_store),
                  ) -> Response:
    if resource_type not in READABLE_TYPES:
        return outcome_response(404, f"{resource_type} is not served here",
                                code="not-supported")
    match = _LOCAL_ID.fullmatch(resource_id)
    job = store.get_job(match.group("job")) if match else None
    if job is not None and job.purged_at is not None:
        return outcome_response(410, "the results were purged under the retention policy",
                                code="deleted")
    if job is not None and job.state == JobState.DONE:
        for resource in _job_resources(store, job.id):
            if resource["resourceType"] == resource_type and resource["id"] == resource_id:
                return FhirResponse(resource)
    return outcome_response(404, f"no {resource_type}/{resource_id}", code="not-found")


@router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                  include_in_schema=False)
def unknown(path: str) -> Response:
    return outcome_response(404, f"this server does not serve /fhir/{path}",
                            code="not-supported")

