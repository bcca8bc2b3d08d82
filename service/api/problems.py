"""RFC 9457 problem details for the REST API (``application/problem+json``).

Only paths outside ``/fhir`` are rewritten: the FHIR router answers errors with an
OperationOutcome, FastAPI's default handlers stay in charge there.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import (
    http_exception_handler,
    request_validation_exception_handler,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "https://cardioscan.dev/problems/"
FHIR_PREFIX = "/fhir"


class ProblemError(Exception):
    """Raise in a REST handler to answer with a problem document."""

    def __init__(self, status: int, detail: str | None = None, *, type_: str | None = None,
                 title: str | None = None, headers: dict[str, str] | None = None,
                 **extensions: Any) -> None:
        super().__init__(detail or title or "")
        self.status = status
        self.detail = detail
        self.type = type_
        self.title = title or HTTPStatus(status).phrase
        self.headers = headers
        self.extensions = extensions


def problem_response(status: int, *, title: str | None = None, detail: str | None = None,
                     type_: str | None = None, instance: str | None = None,
                     headers: dict[str, str] | None = None, **extensions: Any) -> JSONResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + type_ if type_ else "about:blank",
        "title": title or HTTPStatus(status).phrase,
        "status": status,
    }
    if detail:
        body["detail"] = detail
    if instance:
        body["instance"] = instance
    body.update({k: v for k, v in extensions.items() if v is not None})
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _is_fhir(request: Request) -> bool:
    return request.url.path == FHIR_PREFIX or request.url.path.startswith(FHIR_PREFIX + "/")


def install(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> Response:
        return problem_response(exc.status, title=exc.title, detail=exc.detail, type_=exc.type,
                                instance=request.url.path, headers=exc.headers,
                                **exc.extensions)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if _is_fhir(request):
            return await http_exception_handler(request, exc)
        detail = exc.detail if isinstance(exc.detail, str) else None
        return problem_response(exc.status_code, detail=detail, instance=request.url.path,
                                headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        if _is_fhir(request):
            return await request_validation_exception_handler(request, exc)
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()]
        return problem_response(422, title="Invalid request", type_="invalid-request",
                                detail="; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                                 for e in errors),
                                instance=request.url.path, errors=errors)
