"""Deliver a job's FHIR results to the EHR: a transaction Bundle POSTed to its FHIR base.

Idempotent by construction: every entry of the Bundle is a conditional create on an
identifier derived from the source (see :mod:`adapters.fhir.results`), so a retry after a
timeout or a crash finds what the first attempt created instead of duplicating it.

Authentication (``ehr.auth``):

* ``bearer`` — a static token;
* ``client_credentials`` — OAuth2 client credentials, the secret sent with HTTP Basic;
* ``smart-backend`` — SMART Backend Services: a JWT assertion signed with the private key
  (RS384 for an RSA key, ES384 for an EC key), ``kid`` from ``ehr.key_id``.

Tokens are cached until shortly before they expire; a 401 drops the cached token and tries
once more with a fresh one. Failures: network errors, 5xx, 408 and 429 are retryable (the
outbox backs off and tries again); any other 4xx is permanent and goes to the dead letters
with the EHR's OperationOutcome text, for an operator to read and retry.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from adapters.fhir.codes import FHIR_JSON
from adapters.fhir.outcome import outcome_text
from service.config import Destination, EhrSettings, Settings
from service.delivery import PermanentDeliveryError, RetryableDeliveryError, Sender
from service.outputs import OUTPUT_FILES
from service.store import DeliveryTask

log = logging.getLogger(__name__)

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME_S = 300
"""SMART Backend Services: the assertion's ``exp`` is at most five minutes ahead."""
TOKEN_EXPIRY_MARGIN_S = 30.0
DEFAULT_TOKEN_LIFETIME_S = 300.0
RETRYABLE_STATUS = frozenset({408, 425, 429})
REASON_LIMIT = 1000


def _retryable(status: int) -> bool:
    return status >= 500 or status in RETRYABLE_STATUS


def _response_text(response: httpx.Response) -> str:
    """The OperationOutcome's diagnostics, or the start of whatever else came back."""
    try:
        body = response.json()
    except ValueError:
        body = None
    text = outcome_text(body) if isinstance(body, dict) else response.text.strip()
    return " ".join(f"HTTP {response.status_code}: {text}".split())[:REASON_LIMIT]


def signing_algorithm(key: Any) -> str:
    """RS384 for RSA keys and ES384 for EC keys, as SMART Backend Services requires."""
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS384"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ES384"
    raise PermanentDeliveryError(
        f"ehr.private_key_path must hold an RSA or EC private key, not {type(key).__name__}")


class TokenSource:
    """Bearer tokens for the EHR, fetched and cached per the configured auth."""

    def __init__(self, config: EhrSettings, client: httpx.Client,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.client = client
        self.clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = 0.0
        self._key: Any = None

    def headers(self) -> dict[str, str]:
        token = self.token()
        return {"Authorization": f"Bearer {token}"} if token else {}

    def invalidate(self) -> None:
        with self._lock:
            self._token = None

    def token(self) -> str | None:
        auth = self.config.auth
        if auth == "none":
            return None
        if auth == "bearer":
            assert self.config.token is not None
            return self.config.token.get_secret_value()
        with self._lock:
            if self._token is None or self.clock() >= self._expires_at:
                self._token, lifetime = self._fetch()
                margin = min(TOKEN_EXPIRY_MARGIN_S, lifetime / 10)
                self._expires_at = self.clock() + lifetime - margin
            return self._token

    def _fetch(self) -> tuple[str, float]:
        cfg = self.config
        assert cfg.token_url and cfg.client_id
        form = {"grant_type": "client_credentials"}
        if cfg.scope:
            form["scope"] = cfg.scope
        auth: tuple[str, str] | None = None
        if cfg.auth == "client_credentials":
            assert cfg.client_secret is not None
            auth = (cfg.client_id, cfg.client_secret.get_secret_value())
        else:
            form["client_assertion_type"] = JWT_BEARER
            form["client_assertion"] = self.assertion()
        try:
            response = self.client.post(
                cfg.token_url, data=form, auth=auth or httpx.USE_CLIENT_DEFAULT,
                headers={"Accept": "application/json"})
        except httpx.TransportError as exc:
            raise RetryableDeliveryError(f"token endpoint unreachable: {exc!r}") from exc
        if response.status_code != 200:
            text = f"token request refused: HTTP {response.status_code}: {response.text[:300]}"
            if _retryable(response.status_code):
                raise RetryableDeliveryError(text)
            raise PermanentDeliveryError(text)
        try:
            body = response.json()
            token = str(body["access_token"])
            lifetime = float(body.get("expires_in") or DEFAULT_TOKEN_LIFETIME_S)
        except (ValueError, KeyError, TypeError) as exc:
            raise PermanentDeliveryError("the token endpoint answered without access_token") \
                from exc
        return token, lifetime

    def _private_key(self) -> Any:
        if self._key is None:
            path = self.config.private_key_path
            assert path is not None
            try:
                self._key = serialization.load_pem_private_key(Path(path).read_bytes(), None)
            except (OSError, ValueError, TypeError) as exc:
                raise PermanentDeliveryError(
                    f"cannot load ehr.private_key_path: {type(exc).__name__}") from exc
        return self._key

    def assertion(self) -> str:
        """The signed JWT that authenticates this client (SMART Backend Services)."""
        cfg = self.config
        key = self._private_key()
        now = int(time.time())
        claims = {"iss": cfg.client_id, "sub": cfg.client_id, "aud": cfg.token_url,
                  "iat": now, "exp": now + ASSERTION_LIFETIME_S, "jti": uuid.uuid4().hex}
        headers = {"typ": "JWT", **({"kid": cfg.key_id} if cfg.key_id else {})}
        return jwt.encode(claims, key, algorithm=signing_algorithm(key), headers=headers)


def result_bundles(result_dir: Path) -> list[Path]:
    """The job's FHIR Bundles: the first digitized page's, then ``page-<n>/``'s."""
    name = OUTPUT_FILES["fhir"]
    paths = [result_dir / name] if (result_dir / name).is_file() else []
    pages = sorted((p for p in result_dir.glob("page-*") if p.name[5:].isdigit()),
                   key=lambda p: int(p.name[5:]))
    paths += [p / name for p in pages if (p / name).is_file()]
    return paths


class EhrSender:
    """The ``ehr`` destination kind (see the module docstring)."""

    def __init__(self, config: EhrSettings, *, client: httpx.Client | None = None) -> None:
        if not config.base_url:
            raise PermanentDeliveryError("ehr.base_url is not configured")
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        self.client = client or httpx.Client(timeout=config.timeout_seconds)
        self.tokens = TokenSource(config, self.client)

    def send(self, delivery: DeliveryTask, result_dir: Path) -> str | None:
        paths = result_bundles(result_dir)
        if not paths:
            raise PermanentDeliveryError(
                f"job {delivery.job_id} has no FHIR result (is 'fhir' in outputs?)")
        remote: str | None = None
        for path in paths:
            bundle = json.loads(path.read_text())
            location = self.post_bundle(bundle, request_id=delivery.id)
            remote = remote or location
        return remote

    def post_bundle(self, bundle: dict[str, Any], *, request_id: str | None = None) -> str | None:
        """POST one transaction Bundle; returns where the EHR put the DiagnosticReport."""
        body = json.dumps(bundle, separators=(",", ":")).encode()
        response = self._post(body, request_id)
        if response.status_code == 401:
            self.tokens.invalidate()  # expired or revoked early: one fresh try
            response = self._post(body, request_id)
        if response.status_code >= 300:
            reason = f"EHR refused the bundle: {_response_text(response)}"
            if _retryable(response.status_code):
                raise RetryableDeliveryError(reason)
            raise PermanentDeliveryError(reason)
        return self._check_response(bundle, response)

    def _post(self, body: bytes, request_id: str | None) -> httpx.Response:
        headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON, "Prefer": "return=minimal",
                   **self.tokens.headers()}
        if request_id:
            headers["X-Request-Id"] = request_id
        try:
            return self.client.post(self.base_url, content=body, headers=headers)
        except httpx.TransportError as exc:
            raise RetryableDeliveryError(f"EHR unreachable: {exc!r}") from exc

    @staticmethod
    def _check_response(bundle: dict[str, Any], response: httpx.Response) -> str | None:
        try:
            reply = response.json()
        except ValueError:
            return None  # a 2xx without a body: the transaction was applied
        entries = reply.get("entry") if isinstance(reply, dict) else None
        if not isinstance(entries, list):
            return None
        remote = None
        sent = bundle.get("entry") or []
        for i, entry in enumerate(entries):
            answer = (entry or {}).get("response") or {}
            status = str(answer.get("status", "")).split(" ", 1)[0]
            if status and not status.startswith("2"):
                text = outcome_text(answer.get("outcome")) if answer.get("outcome") else status
                raise PermanentDeliveryError(f"EHR refused entry {i}: {status} {text}"[
                    :REASON_LIMIT])
            rtype = ((sent[i] if i < len(sent) else {}).get("resource") or {}).get(
                "resourceType")
            if rtype == "DiagnosticReport" and answer.get("location"):
                remote = str(answer["location"])
        return remote


def create_sender(settings: Settings, destination: Destination) -> Sender:
    """Factory for destinations of kind ``ehr`` (see :mod:`service.delivery`)."""
    assert isinstance(destination.config, EhrSettings)
    return EhrSender(destination.config)
