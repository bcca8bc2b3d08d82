"""The HTTP application: REST, FHIR (when installed), health, metrics, the web viewer."""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Awaitable, Callable
from types import ModuleType

from fastapi import FastAPI, Request, Response, Security
from fastapi.responses import PlainTextResponse

from service.api import health, problems, rest
from service.api.auth import WWW_AUTHENTICATE, AuthenticationError, require_api_key
from service.config import Settings, load_settings
from service.store import JobStore

log = logging.getLogger("service.api.access")

FHIR_PREFIX = "/fhir"


def _optional(module: str) -> ModuleType | None:
    """Import a part another engineer ships, if it is installed."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            return None
        raise


def create_app(settings: Settings | None = None, store: JobStore | None = None) -> FastAPI:
    """The FastAPI app; opens (and migrates) the job store unless one is given."""
    settings = settings or load_settings()
    store = store or JobStore(settings)
    app = FastAPI(
        title="CardioScan",
        version=_version(),
        summary="Scanned and photographed 12-lead ECGs in; calibrated waveforms out, "
                "as DICOM, FHIR, WFDB and CSV.",
        docs_url="/docs",
    )
    app.state.settings = settings
    app.state.store = store
    problems.install(app)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.url.path,
                  exc_info=(type(exc), exc, exc.__traceback__))
        if request.url.path.startswith(FHIR_PREFIX):
            return PlainTextResponse("internal error", status_code=500)
        return problems.problem_response(500, detail="internal error",
                                         instance=request.url.path)

    @app.middleware("http")
    async def _access_log(request: Request,
                          call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        # Path only: a query string may carry identifiers such as a patient reference.
        start = time.perf_counter()
        response = await call_next(request)
        if request.url.path not in ("/healthz", "/readyz", "/metrics"):
            log.info("%s %s %d", request.method, request.url.path, response.status_code,
                     extra={"method": request.method, "path": request.url.path,
                            "status": response.status_code,
                            "duration_s": round(time.perf_counter() - start, 4)})
        return response

    @app.exception_handler(AuthenticationError)
    async def _unauthenticated(request: Request, exc: AuthenticationError) -> Response:
        return problems.problem_response(401, detail=str(exc), type_="unauthenticated",
                                         instance=request.url.path, headers=WWW_AUTHENTICATE)

    guarded = [Security(require_api_key)] if settings.http.auth == "api-key" else []
    app.include_router(health.router)
    app.include_router(rest.router, dependencies=guarded)
    fhir = _optional("service.fhir_api")
    if fhir is not None:
        router = fhir.router
        app.include_router(router, prefix="" if router.prefix.startswith(FHIR_PREFIX)
                           else FHIR_PREFIX, dependencies=guarded)
    web = _optional("service.web")
    if web is not None:
        app.include_router(web.router)
        app.mount("/static", web.static_files(), name="static")
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cardioscan")
    except PackageNotFoundError:
        return "0"
