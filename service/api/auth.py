"""API keys for ``/api/v1`` and ``/fhir`` (``http.auth: api-key``).

A client sends one of ``http.api_keys`` as ``Authorization: Bearer <key>`` or
``X-API-Key: <key>``. Keys are compared in constant time; the key's *name* is what the
audit trail and the logs record, never the key. ``create_app`` adds :func:`require_api_key`
to the REST and FHIR routers only when auth is on, so OpenAPI documents the truth; health,
metrics, the viewer's page and ``/fhir/metadata`` stay open.
"""

from __future__ import annotations

import hmac
import logging
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.config import Settings

log = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
PUBLIC_PATHS = frozenset({"/fhir/metadata"})
"""Open even with auth on: FHIR clients read the CapabilityStatement before they log in."""
WWW_AUTHENTICATE = {"WWW-Authenticate": 'Bearer realm="cardioscan"'}

_bearer = HTTPBearer(auto_error=False, scheme_name="apiKeyBearer",
                     description="An API key from http.api_keys: `Authorization: Bearer <key>`.")
_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, scheme_name="apiKeyHeader",
                       description="An API key from http.api_keys, in the X-API-Key header.")


class AuthenticationError(Exception):
    """No key, or a key that is not configured; ``str()`` says which (never the key)."""


def key_name(settings: Settings, presented: str) -> str | None:
    """The name of the configured key equal to ``presented``; every key is compared, each in
    constant time, so the answer time does not say how much of a key was right."""
    given = presented.encode("utf-8")
    found: str | None = None
    for entry in settings.http.api_keys:
        if hmac.compare_digest(entry.key.get_secret_value().encode("utf-8"), given):
            found = entry.name
    return found


def require_api_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    header: Annotated[str | None, Security(_header)],
) -> None:
    """Let the request through with a configured key; ``request.state.api_key_name`` then
    names the caller (see :func:`service.api.deps.caller_of`)."""
    path, root = request.scope["path"], request.scope.get("root_path", "")
    if root and path.startswith(root + "/"):  # behind a proxy that mounts us under a prefix
        path = path[len(root):]
    if path in PUBLIC_PATHS:
        return
    settings: Settings = request.app.state.settings
    presented = bearer.credentials if bearer is not None else header
    if not presented:
        raise AuthenticationError(
            f"an API key is required: send 'Authorization: Bearer <key>' or '{API_KEY_HEADER}'")
    name = key_name(settings, presented)
    if name is None:
        client = request.client.host if request.client else "unknown"
        log.warning("HTTP request refused: unknown API key",
                    extra={"path": request.url.path, "peer": client})
        raise AuthenticationError("the API key is not valid")
    request.state.api_key_name = name
