"""Test kit for the FHIR tests: the Node validator, a stand-in EHR, the running service.

* :class:`NodeValidator` runs ``tests/node/validate.mjs`` (long-lived) — Medplum's
  validator over the official R4 / R5 StructureDefinitions plus required bindings.
* :class:`FakeEhr` is a FHIR server on loopback standing in for the EHR (none installs
  here): it checks the bearer token, serves an OAuth2 token endpoint (client secret or
  SMART Backend Services JWT assertion), validates every Bundle it receives with
  fhir.resources and the Node validator, honours conditional create, and can be told to fail.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from service_support import free_port

from adapters.fhir.models import FhirValidationError, validate_resource
from pipeline.leads import LEADS
from pipeline.result import Box, Digitization, Metrics

REPO = Path(__file__).resolve().parents[2]
NODE_DIR = REPO / "tests" / "node"
VALIDATOR = NODE_DIR / "validate.mjs"


def node_skip_reason() -> str | None:
    """Why the Node validator cannot run here, or None when it can."""
    if shutil.which("node") is None:
        return "node is not installed (apt-get install nodejs npm); FHIR validator skipped"
    if not (NODE_DIR / "node_modules" / "@medplum" / "core").is_dir():
        return "validator packages missing: run `cd tests/node && npm ci` (make test does)"
    return None


def errors_of(reports: list[dict[str, Any]]) -> list[str]:
    return [f"{r['resourceType']}: {i.get('expression')}: {i['text']}" for r in reports
            for i in r["issues"] if i["severity"] in ("error", "fatal")]


class NodeValidator:
    """A long-lived ``validate.mjs --lines`` process (definitions loaded once)."""

    def __init__(self, version: str) -> None:
        self.proc = subprocess.Popen(
            ["node", str(VALIDATOR), version, "--lines"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, bufsize=1)
        self.lock = threading.Lock()

    def validate(self, resource: dict[str, Any]) -> dict[str, Any]:
        """The report on ``resource``: ``{resourceType, ok, issues: [{severity, text, ...}]}``."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self.lock:
            self.proc.stdin.write(json.dumps(resource) + "\n")
            self.proc.stdin.flush()
            report: dict[str, Any] = json.loads(self.proc.stdout.readline())
            return report

    def validate_all(self, resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [self.validate(resource) for resource in resources]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def node_validators() -> Iterator[dict[str, NodeValidator]]:
    """Long-lived R4 and R5 validators; empty where node cannot run (see node_skip_reason)."""
    if node_skip_reason() is not None:
        yield {}
        return
    started = {v: NodeValidator(v) for v in ("R4", "R5")}
    try:
        yield started
    finally:
        for validator in started.values():
            validator.close()


# ---------------------------------------------------------------- digitizations by hand


def make_digitization(*, fs: int = 500, seconds: float = 10.0, seed: int = 0,
                      engine: str = "classic", missing_lead: str | None = None) -> Digitization:
    """A plausible 12-lead result: 3x4+1 page, limb leads printed first, chest leads later."""
    rng = np.random.default_rng(seed)
    n = int(seconds * fs)
    t = np.arange(n) / fs
    beat = np.exp(-(((t % 0.8) - 0.3) ** 2) / 0.0004)
    signals = np.stack([(0.5 + 0.1 * i) * beat + 0.01 * rng.standard_normal(n)
                        for i in range(len(LEADS))], axis=1)
    quarter = n // 4
    signals[quarter:, [0, 2, 3, 4, 5]] = np.nan  # column 1 only
    signals[:quarter, 6:] = np.nan
    if missing_lead:
        signals[:, LEADS.index(missing_lead)] = np.nan
    return Digitization(
        signals=signals, fs=fs, layout="3x4+1", paper_speed_mm_s=25.0, gain_mm_mv=10.0,
        px_per_mm=8.0, grid_confidence=0.93, confidence={lead: 0.9 for lead in LEADS},
        lead_boxes={lead: Box(0.1, 0.05 * i, 0.3, 0.05 * i + 0.05)
                    for i, lead in enumerate(LEADS)},
        metrics=Metrics(hr_bpm=75.0, rr_ms=800.0, pr_ms=160.0, qrs_ms=92.0, qt_ms=380.0,
                        qtc_bazett_ms=425.0, qtc_fridericia_ms=409.0, axis_deg=60.0),
        engine=engine, qa_images={"overlay": np.full((40, 60, 3), 200, np.uint8)},
        warnings=[] if missing_lead is None else [f"lead {missing_lead} could not be read"])


# ---------------------------------------------------------------- the stand-in EHR


@dataclass
class FakeEhr:
    """A FHIR server standing in for the EHR (see the module docstring)."""

    version: str = "R4"
    token: str | None = None
    """Bearer token every FHIR request must carry (None: no auth)."""
    client_id: str = "cardioscan"
    client_secret: str | None = None
    public_key: Any = None
    """Verifies SMART Backend Services assertions when set."""
    token_lifetime_s: int = 3600
    validator: NodeValidator | None = None
    fail_next: list[int | float] = field(default_factory=list)
    """Answers for the next FHIR POSTs: an int status (answered with an OperationOutcome),
    or a float: seconds to stall before answering (past the client's timeout)."""
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    issued_tokens: set[str] = field(default_factory=set)
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def count(self, resource_type: str) -> int:
        return sum(1 for key in self.resources if key.startswith(resource_type + "/"))

    # -- the app

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/token")
        async def token(request: Request) -> Response:
            form = dict(parse_qsl((await request.body()).decode()))
            self.token_requests.append(form)
            if form.get("grant_type") != "client_credentials":
                return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
            if not self._client_ok(request, form):
                return JSONResponse({"error": "invalid_client"}, status_code=401)
            issued = uuid.uuid4().hex
            self.issued_tokens.add(issued)
            return JSONResponse({"access_token": issued, "token_type": "bearer",
                                 "expires_in": self.token_lifetime_s,
                                 "scope": form.get("scope", "")})

        @app.post("/fhir")
        async def transaction(request: Request) -> Response:
            auth = request.headers.get("authorization", "")
            self.requests.append({"auth": auth, "headers": dict(request.headers)})
            if self.fail_next:
                failure = self.fail_next.pop(0)
                if isinstance(failure, float):
                    await asyncio.sleep(failure)
                    return self._outcome(503, "stalled")
                return self._outcome(failure, f"EHR says no ({failure})")
            if self.token is not None or self.issued_tokens:
                presented = auth.removeprefix("Bearer ")
                if not auth.startswith("Bearer ") or not (
                        presented == self.token or presented in self.issued_tokens):
                    return self._outcome(401, "bad or missing bearer token", code="login")
            try:
                bundle = json.loads(await request.body())
                validate_resource(bundle, self.version)  # type: ignore[arg-type]
            except (ValueError, FhirValidationError) as exc:
                return self._outcome(400, f"invalid Bundle: {exc}", code="structure")
            if self.validator is not None:
                report = self.validator.validate(bundle)
                if not report["ok"]:
                    return self._outcome(400, "; ".join(errors_of([report]))[:2000],
                                         code="structure")
            if bundle.get("type") != "transaction":
                return self._outcome(400, "expected a transaction Bundle")
            return JSONResponse(self._apply(bundle), media_type="application/fhir+json")

        return app

    def _client_ok(self, request: Request, form: dict[str, str]) -> bool:
        import jwt

        if self.client_secret is not None:
            expected = base64.b64encode(f"{self.client_id}:{self.client_secret}".encode())
            return request.headers.get("authorization", "") == f"Basic {expected.decode()}"
        if self.public_key is not None:
            if form.get("client_assertion_type") != \
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
                return False
            try:
                claims = jwt.decode(form.get("client_assertion", ""), self.public_key,
                                    algorithms=["RS384", "ES384"], audience=self.token_url,
                                    options={"require": ["exp", "iss", "sub", "jti"]})
            except (jwt.PyJWTError, TypeError, ValueError):  # bad token, or key of another kind
                return False
            return bool(claims["iss"] == claims["sub"] == self.client_id)
        return False

    @staticmethod
    def _outcome(status: int, text: str, code: str = "processing") -> Response:
        return JSONResponse({"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": code, "diagnostics": text}]}, status_code=status,
            media_type="application/fhir+json")

    def _find(self, rtype: str, query: str) -> str | None:
        """The stored resource matching a conditional create's ``ifNoneExist``."""
        params = dict(parse_qsl(query))
        for key, resource in self.resources.items():
            if not key.startswith(rtype + "/"):
                continue
            if "identifier" in params:
                system, _, value = params["identifier"].partition("|")
                if any(i.get("system") == system and i.get("value") == value
                       for i in resource.get("identifier", [])):
                    return key
            if "_tag" in params:
                system, _, code = params["_tag"].partition("|")
                if any(t.get("system") == system and t.get("code") == code
                       for t in resource.get("meta", {}).get("tag", [])):
                    return key
        return None

    def _apply(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """Transaction semantics: conditional creates, then urn:uuid references resolved."""
        ids: dict[str, str] = {}
        answers = []
        created: list[str] = []
        for entry in bundle["entry"]:
            resource, request = entry["resource"], entry["request"]
            existing = self._find(resource["resourceType"], request.get("ifNoneExist", ""))
            if existing:
                ids[entry["fullUrl"]] = existing
                answers.append({"response": {"status": "200 OK", "location": existing}})
                continue
            key = f"{resource['resourceType']}/{uuid.uuid4().hex[:12]}"
            ids[entry["fullUrl"]] = key
            created.append(key)
            self.resources[key] = {**resource, "id": key.split("/")[1]}
            answers.append({"response": {"status": "201 Created", "location": key}})
        for key in created:
            self.resources[key] = _resolve(self.resources[key], ids)
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": answers}


def _resolve(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, dict):
        out = {k: _resolve(v, ids) for k, v in value.items()}
        if isinstance(out.get("reference"), str) and out["reference"] in ids:
            out["reference"] = ids[out["reference"]]
        return out
    if isinstance(value, list):
        return [_resolve(v, ids) for v in value]
    return value


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # runs in a thread
        pass


@contextlib.contextmanager
def serve(app: FastAPI, port: int) -> Iterator[None]:
    """Run ``app`` on 127.0.0.1:``port`` in a thread for the duration of the block."""
    server = _Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the stand-in EHR did not start")
        time.sleep(0.02)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def fake_ehr(**kwargs: Any) -> Iterator[FakeEhr]:
    ehr = FakeEhr(port=free_port(), **kwargs)
    with serve(ehr.app(), ehr.port):
        yield ehr
