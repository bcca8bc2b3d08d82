"""FastAPI dependencies shared by the routers (REST, FHIR): the settings and the job store.

``create_app`` puts both on ``app.state``; a router reads them with
``store: JobStore = Depends(get_store)`` / ``settings: Settings = Depends(get_settings)``.
"""

from __future__ import annotations

from fastapi import Request

from service.config import Settings
from service.store import JobStore


def get_store(request: Request) -> JobStore:
    store: JobStore = request.app.state.store
    return store


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def caller_of(request: Request) -> str:
    """Who sent a request, for the audit trail (no PHI): the name of the API key it carried
    (``api-key:<name>``) when auth is on, else the client's address (``http:<address>``)."""
    name = getattr(request.state, "api_key_name", None)
    if name:
        return f"api-key:{name}"
    host = request.client.host if request.client else "unknown"
    return f"http:{host}"
