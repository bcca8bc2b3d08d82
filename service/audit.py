"""The audit trail: who sent what and when, what was produced, where it went.

Events are rows in ``audit_events``, written in the same transaction as the state change
they describe, so the trail never disagrees with the job store. They carry identifiers
(job id, source UID or digest, calling AE / client, destination, remote id), not patient
data. :func:`to_fhir` renders one as a FHIR AuditEvent (R4 through the R4B models, or R5),
validated by fhir.resources.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from service.db.models import AuditEvent, where_given

SYSTEM_ACTOR = "cardioscan"


class Action:
    RECEIVED = "received"
    DIGITIZED = "digitized"
    FAILED = "failed"
    RETRY_SCHEDULED = "retry-scheduled"
    DEAD = "dead"
    RETRIED = "retried"
    DELIVERED = "delivered"
    DELIVERY_FAILED = "delivery-failed"
    DELIVERY_DEAD = "delivery-dead"
    DELIVERY_RETRIED = "delivery-retried"
    PURGED = "purged"


@dataclass(frozen=True)
class AuditRecord:
    id: int
    recorded_at: datetime
    action: str
    outcome: str
    actor: str
    route: str | None
    job_id: str | None
    source_id: str | None
    destination: str | None
    detail: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "recorded_at": self.recorded_at.isoformat(),
            "action": self.action,
            "outcome": self.outcome,
            "actor": self.actor,
            "route": self.route,
            "job_id": self.job_id,
            "source_id": self.source_id,
            "destination": self.destination,
            "detail": self.detail,
        }


def record(
    session: Session,
    action: str,
    *,
    actor: str | None,
    outcome: Literal["success", "failure"] = "success",
    route: str | None = None,
    job_id: str | None = None,
    source_id: str | None = None,
    destination: str | None = None,
    detail: dict[str, Any] | None = None,
    at: datetime | None = None,
) -> None:
    """Add an event to ``session``'s transaction. ``detail`` must hold no PHI."""
    session.add(
        AuditEvent(
            recorded_at=at or datetime.now(UTC),
            action=action,
            outcome=outcome,
            actor=actor or "unknown",
            route=route,
            job_id=job_id,
            source_id=source_id,
            destination=destination,
            detail=detail or {},
        )
    )


def query(
    *,
    job_id: str | None = None,
    action: str | None = None,
    actor: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Select[AuditEvent]:
    q = where_given(select(AuditEvent), job_id=job_id, action=action, actor=actor)
    if since:
        q = q.where(AuditEvent.recorded_at >= since)
    if until:
        q = q.where(AuditEvent.recorded_at < until)
    return q


def to_record(row: AuditEvent) -> AuditRecord:
    return AuditRecord(
        id=row.id, recorded_at=row.recorded_at, action=row.action, outcome=row.outcome,
        actor=row.actor, route=row.route, job_id=row.job_id, source_id=row.source_id,
        destination=row.destination, detail=dict(row.detail or {}),
    )


# FHIR AuditEvent ---------------------------------------------------------------------

_DCM = "http://dicom.nema.org/resources/ontology/DCM"
_LIFECYCLE = "http://terminology.hl7.org/CodeSystem/iso-21089-lifecycle"
_ACTION_CODING: dict[str, tuple[str, str, str, str]] = {
    # action -> (system, code, display, FHIR action C/R/U/D/E)
    Action.RECEIVED: (_DCM, "110107", "Import", "C"),
    Action.DIGITIZED: (_LIFECYCLE, "transform", "Transform/Translate Record Lifecycle Event",
                       "C"),
    Action.FAILED: (_LIFECYCLE, "transform", "Transform/Translate Record Lifecycle Event", "E"),
    Action.RETRY_SCHEDULED: (_LIFECYCLE, "transform",
                             "Transform/Translate Record Lifecycle Event", "E"),
    Action.DEAD: (_LIFECYCLE, "transform", "Transform/Translate Record Lifecycle Event", "E"),
    Action.RETRIED: (_DCM, "110100", "Application Activity", "U"),
    Action.DELIVERED: (_DCM, "110106", "Export", "E"),
    Action.DELIVERY_FAILED: (_DCM, "110106", "Export", "E"),
    Action.DELIVERY_DEAD: (_DCM, "110106", "Export", "E"),
    Action.DELIVERY_RETRIED: (_DCM, "110100", "Application Activity", "U"),
    Action.PURGED: (_LIFECYCLE, "destroy", "Destroy/Delete Record Lifecycle Event", "D"),
}
_DEFAULT_CODING = (_DCM, "110100", "Application Activity", "E")


def source_uri(source_id: str) -> str:
    """A URI for a source identity: ``urn:oid:`` for a UID, RFC 6920 ``ni:`` for a digest."""
    digest = source_id.removeprefix("sha256:")
    if digest != source_id and re.fullmatch(r"[0-9a-f]{64}", digest):
        raw = bytes.fromhex(digest)
        return "ni:///sha-256;" + base64.urlsafe_b64encode(raw).decode().rstrip("=")
    if re.fullmatch(r"[0-2](\.(0|[1-9][0-9]*))+", source_id):
        return f"urn:oid:{source_id}"
    return "urn:cardioscan:source:" + quote(source_id, safe="")


def to_fhir(rec: AuditRecord, *, version: Literal["R4", "R5"] = "R4",
            base_url: str = "") -> dict[str, Any]:
    """The event as a FHIR AuditEvent resource (validated JSON dict)."""
    system, code, display, fhir_action = _ACTION_CODING.get(rec.action, _DEFAULT_CODING)
    coding = {"system": system, "code": code, "display": display}
    ok = rec.outcome == "success"
    text = rec.detail.get("error") or rec.action
    agent_who = {"identifier": {"value": rec.actor}, "display": rec.actor}
    observer = {"display": "CardioScan"}
    entities: list[dict[str, Any]] = []
    if rec.source_id:
        entities.append({"what": {"identifier": {"system": "urn:ietf:rfc:3986",
                                                 "value": source_uri(rec.source_id)}}})
    if rec.job_id:
        entities.append({"what": {"identifier": {"system": f"{base_url}/api/v1/jobs",
                                                 "value": rec.job_id}}})
    if rec.destination:
        entities.append({"what": {"display": f"destination {rec.destination}"}})
    recorded = rec.recorded_at.astimezone(UTC).isoformat()
    requestor = rec.action == Action.RECEIVED or rec.action.endswith("retried")
    if version == "R4":
        from fhir.resources.R4B.auditevent import AuditEvent as AuditEventR4

        r4: dict[str, Any] = {
            "resourceType": "AuditEvent",
            "id": f"audit-{rec.id}",
            "type": coding,
            "subtype": [{"system": "urn:cardioscan:audit-action", "code": rec.action}],
            "action": fhir_action,
            "recorded": recorded,
            "outcome": "0" if ok else "8",
            "outcomeDesc": text,
            "agent": [{"who": agent_who, "requestor": requestor}],
            "source": {"observer": observer,
                       "type": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                           "security-source-type", "code": "4"}]},
        }
        if entities:
            r4["entity"] = entities
        return AuditEventR4.model_validate(r4).model_dump(mode="json", exclude_none=True)
    from fhir.resources.auditevent import AuditEvent as AuditEventR5

    r5: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": f"audit-{rec.id}",
        "category": [{"coding": [coding]}],
        "code": {"coding": [{"system": "urn:cardioscan:audit-action", "code": rec.action}]},
        "action": fhir_action,
        "recorded": recorded,
        "outcome": {"code": {"system": "http://terminology.hl7.org/CodeSystem/"
                                       "audit-event-outcome",
                             "code": "0" if ok else "8"},
                    "detail": [{"text": text}]},
        "agent": [{"who": agent_who, "requestor": requestor}],
        "source": {"observer": observer},
    }
    if entities:
        r5["entity"] = entities
    return AuditEventR5.model_validate(r5).model_dump(mode="json", exclude_none=True)
