"""Liveness, readiness and metrics endpoints (for load balancers, Kubernetes, Prometheus)."""

from __future__ import annotations

import importlib.util
import os
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.deps import get_settings, get_store
from service.config import Settings
from service.db.migrate import is_current
from service.observability import render_metrics
from service.store import JobStore

router = APIRouter(tags=["Operations"])

def check_database(store: JobStore) -> str | None:
    try:
        store.ping()
        if not is_current(store.engine):
            return "database schema is not at the current revision"
    except Exception as exc:
        return f"database unreachable: {type(exc).__name__}"
    return None


def check_spool(store: JobStore) -> str | None:
    probe = store.spool.root / "tmp" / f".ready-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
        store.spool.check_free()
    except OSError as exc:
        return f"spool not writable: {exc.strerror}"
    except Exception as exc:  # StoreFullError
        return str(exc)
    if not os.access(store.results_root, os.W_OK):
        return "results directory not writable"
    return None


def check_digitizer(settings: Settings) -> str | None:
    module = settings.digitizer_target.partition(":")[0]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"digitizer module {module} not installed"


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: database, spool and digitizer are usable",
            responses={503: {"description": "Not ready"}})
def readyz(store: Annotated[JobStore, Depends(get_store)],
           settings: Annotated[Settings, Depends(get_settings)]) -> JSONResponse:
    problems = {
        "database": check_database(store),
        "spool": check_spool(store),
        "digitizer": check_digitizer(settings),
    }
    checks: dict[str, Any] = {k: (v or "ok") for k, v in problems.items()}
    ready = not any(problems.values())
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks},
                        status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(store: Annotated[JobStore, Depends(get_store)]) -> Response:
    return Response(render_metrics(store), media_type=CONTENT_TYPE_LATEST)
