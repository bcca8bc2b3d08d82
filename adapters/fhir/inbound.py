"""Turn what arrives over FHIR into (picture bytes, media type, SourceMeta).

Accepted forms: a raw ``image/*`` or ``application/pdf`` body (``POST /fhir/Binary``), a
FHIR Binary in JSON, a DocumentReference (R4 or R5) whose attachment holds the picture inline
or points at a Binary on this server, an R4 Media, a transaction/batch Bundle of these, and
the Parameters of ``$digitize``. Every refusal is a :class:`FhirInputError` carrying the HTTP
status and OperationOutcome issue code to answer with, so the API never guesses.

The source identity (``SourceMeta.source_id``) is ``sha256:<hex>`` over the picture bytes
and, when one is given, the FHIR subject: the same picture filed again for the same patient
is the same job (idempotent retry), the same picture filed for another patient is not.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from adapters.fhir.codes import FHIR_JSON, SUPPORTED_MEDIA_TYPES, FhirVersion
from adapters.fhir.models import FhirValidationError, valid_in
from adapters.source import SourceMeta

Resolver = Callable[[str], "tuple[bytes, str] | None"]
"""Fetch a Binary on this server by reference (``Binary/<id>``) or absolute URL;
``None`` when it is not one of ours."""

PICTURE_TYPES = ("Binary", "DocumentReference", "Media")
BUNDLE_TYPES = ("transaction", "batch")
JSON_TYPES = (FHIR_JSON, "application/json")
_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "image/tif": "image/tiff",
            "image/x-ms-bmp": "image/bmp", "image/x-bmp": "image/bmp", "image/x-png": "image/png"}
DIGITIZE_PARAMETERS = ("attachment", "reference", "resource", "patient", "subject", "encounter")


class FhirInputError(Exception):
    """Why a FHIR request cannot be taken; ``str()`` is the diagnostics for the outcome."""

    status = 400
    issue_code = "invalid"


class MalformedResourceError(FhirInputError):
    """Not valid FHIR, or valid FHIR that does not say where the picture is."""

    status = 400
    issue_code = "structure"


class UnresolvedReferenceError(FhirInputError):
    """A reference or url that is not a Binary on this server."""

    status = 400
    issue_code = "not-found"


class UnsupportedMediaTypeError(FhirInputError):
    """The picture (or the request body) is of a type CardioScan cannot read."""

    status = 415
    issue_code = "not-supported"


class PayloadTooLargeError(FhirInputError):
    """The picture is larger than the configured limit."""

    status = 413
    issue_code = "too-costly"


class Inbound(NamedTuple):
    """One picture to digitize."""

    data: bytes
    media_type: str
    source: SourceMeta


@dataclass
class _Context:
    """What the caller tells about the picture besides its bytes."""

    subject: str | None = None
    encounter: str | None = None
    fhir_source: str | None = None
    fhir_type: str = "Binary"
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- media types and bytes


def normalize_media_type(value: str | None) -> str:
    """``"Image/JPG; q=1"`` -> ``"image/jpeg"``; ``""`` when absent."""
    base = (value or "").split(";", 1)[0].strip().lower()
    return _ALIASES.get(base, base)


def sniff_media_type(data: bytes) -> str | None:
    """The picture format from its first bytes, or None if it is none that CardioScan reads."""
    head = data[:16]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    if head.startswith(b"BM"):
        return "image/bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if data[:1024].lstrip().startswith(b"%PDF-"):
        return "application/pdf"
    return None


def check_picture(data: bytes, declared: str | None, *, max_bytes: int) -> str:
    """The media type to digitize ``data`` as, or the reason it cannot be.

    The declared type must be an image or PDF the digitizer reads (415 otherwise); the
    bytes decide between those, so a PNG labelled ``image/jpeg`` is still read.
    """
    if len(data) > max_bytes:
        raise PayloadTooLargeError(f"picture is {len(data)} bytes; the limit is {max_bytes}")
    if not data:
        raise MalformedResourceError("the picture is empty (0 bytes)")
    media = normalize_media_type(declared)
    if media and media not in SUPPORTED_MEDIA_TYPES:
        raise UnsupportedMediaTypeError(
            f"content type {media!r} is not supported; send one of "
            + ", ".join(SUPPORTED_MEDIA_TYPES))
    sniffed = sniff_media_type(data)
    if sniffed is None:
        raise UnsupportedMediaTypeError(
            f"the content is not a PNG, JPEG, TIFF, BMP, WebP or PDF file"
            f"{f' (declared {media})' if media else ''}")
    return sniffed


def decode_base64(text: Any, *, where: str, max_bytes: int) -> bytes:
    """Strict base64 (whitespace allowed, as base64Binary permits); 413 before decoding a
    payload that is already too large."""
    if not isinstance(text, str):
        raise MalformedResourceError(f"{where} must be a base64 string")
    compact = "".join(text.split())
    if len(compact) * 3 // 4 > max_bytes + 2:
        raise PayloadTooLargeError(
            f"picture is about {len(compact) * 3 // 4} bytes; the limit is {max_bytes}")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedResourceError(f"{where} is not valid base64: {exc}") from None


def source_id_for(data: bytes, subject: str | None) -> str:
    """``sha256:<hex>`` of the bytes, with the subject mixed in when one is given."""
    digest = hashlib.sha256(data)
    if subject:
        digest.update(b"\x00subject=" + subject.encode())
    return "sha256:" + digest.hexdigest()


def _inbound(data: bytes, media_type: str, ctx: _Context, caller: str | None) -> Inbound:
    source = SourceMeta(
        route="fhir", source_id=source_id_for(data, ctx.subject), media_type=media_type,
        caller=caller, fhir_subject=ctx.subject, fhir_encounter=ctx.encounter,
        fhir_source=ctx.fhir_source, extra={"fhir_type": ctx.fhir_type, **ctx.extra},
    )
    return Inbound(data, media_type, source)


# ---------------------------------------------------------------- helpers on JSON


def _validate(resource: dict[str, Any], where: str) -> FhirVersion:
    """Check ``resource`` against the R4 (R4B) models, then R5; 400 if neither fits."""
    versions: tuple[FhirVersion, ...] = (
        ("R4",) if resource.get("resourceType") == "Media" else ("R4", "R5"))
    try:
        return valid_in(resource, versions)
    except FhirValidationError as exc:
        raise MalformedResourceError(f"{where}: {exc}") from None


def _reference(value: Any, where: str) -> str | None:
    """The ``reference`` string of a Reference, or None when absent."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise MalformedResourceError(f"{where} must be a Reference")
    ref = value.get("reference")
    if ref is None:
        return None
    if not isinstance(ref, str) or not ref.strip():
        raise MalformedResourceError(f"{where}.reference must be a non-empty string")
    return ref.strip()


def _encounter_of(context: Any) -> str | None:
    """DocumentReference.context: R4 ``{encounter: [Reference]}``, R5 ``[Reference]``."""
    if isinstance(context, dict):
        refs = context.get("encounter") or []
    elif isinstance(context, list):
        refs = context
    else:
        return None
    for ref in refs:
        value = (ref or {}).get("reference") if isinstance(ref, dict) else None
        if isinstance(value, str) and value.split("/")[-2:-1] == ["Encounter"]:
            return value
    return None


def _patient_of(ref: str | None) -> str | None:
    """A Binary.securityContext counts as the subject only when it is a Patient."""
    if ref and ref.rsplit("/", 2)[-2:-1] == ["Patient"]:
        return ref
    return None


def _check_attachment_integrity(att: dict[str, Any], data: bytes, where: str) -> None:
    size = att.get("size")
    if isinstance(size, int | str) and str(size).isdigit() and int(size) != len(data):
        raise MalformedResourceError(
            f"{where}.size says {size} bytes but the data holds {len(data)}")
    digest = att.get("hash")
    if isinstance(digest, str) and digest:
        sha1 = base64.b64encode(hashlib.sha1(data).digest()).decode()
        if digest.strip() != sha1:
            raise MalformedResourceError(f"{where}.hash does not match the data (SHA-1)")


# ---------------------------------------------------------------- the parser


class InboundParser:
    """Parses one request. ``resolve`` fetches Binaries on this server (for attachment
    urls and references); ``max_bytes`` bounds every picture; ``caller`` is recorded."""

    def __init__(self, *, max_bytes: int, resolve: Resolver | None = None,
                 caller: str | None = None) -> None:
        self.max_bytes = max_bytes
        self.caller = caller
        self._resolve_external = resolve
        self._bundle_binaries: dict[str, tuple[bytes, str]] = {}

    # -- entry points

    def binary_body(self, body: bytes, content_type: str | None, *,
                    security_context: str | None = None) -> Inbound:
        """``POST /fhir/Binary``: raw picture bytes, or a Binary resource in JSON."""
        media = normalize_media_type(content_type)
        if media in JSON_TYPES:
            resource = self.json_body(body)
            items = self.resource(resource, expected="Binary")
            return items[0][0]
        if not media:
            raise UnsupportedMediaTypeError(
                "a Binary needs a Content-Type: image/*, application/pdf or application/fhir+json")
        mtype = check_picture(body, media, max_bytes=self.max_bytes)
        ctx = _Context(subject=_patient_of(security_context), fhir_type="Binary")
        return _inbound(body, mtype, ctx, self.caller)

    @staticmethod
    def json_body(body: bytes) -> dict[str, Any]:
        """Parse a JSON request body into a resource dict (400 when it is not one)."""
        try:
            resource = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MalformedResourceError(f"the body is not valid JSON: {exc}") from None
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise MalformedResourceError("the body is not a FHIR resource (no resourceType)")
        return resource

    def resource(self, resource: dict[str, Any], *, expected: str | None = None,
                 ) -> list[tuple[Inbound, list[int]]]:
        """Any accepted resource -> the pictures in it, each with the indices of the Bundle
        entries it answers for (``[0]`` outside a Bundle)."""
        rtype = resource.get("resourceType")
        if expected and rtype != expected:
            raise MalformedResourceError(f"expected a {expected} resource, got {rtype}")
        if rtype == "Bundle":
            return self.bundle(resource)
        if rtype == "Parameters":
            return [(self.parameters(resource), [0])]
        if rtype in PICTURE_TYPES:
            return [(item, [0]) for item in self.picture_resource(resource, where=str(rtype))]
        raise MalformedResourceError(
            f"{rtype} is not accepted; send Binary, DocumentReference, Media, a transaction "
            "Bundle of these, or Parameters to $digitize")

    def picture_resource(self, resource: dict[str, Any], *, where: str,
                         ctx: _Context | None = None) -> list[Inbound]:
        """A Binary, DocumentReference or Media -> its pictures."""
        rtype = resource.get("resourceType")
        _validate(resource, where)
        ctx = ctx or _Context()
        ctx.fhir_type = str(rtype)
        if rtype == "Binary":
            ctx.subject = ctx.subject or _patient_of(
                _reference(resource.get("securityContext"), f"{where}.securityContext"))
            data = decode_base64(resource.get("data"), where=f"{where}.data",
                                 max_bytes=self.max_bytes) if "data" in resource else b""
            if not data:
                raise MalformedResourceError(f"{where} has no data")
            media = check_picture(data, resource.get("contentType"), max_bytes=self.max_bytes)
            return [_inbound(data, media, ctx, self.caller)]
        ctx.subject = ctx.subject or _reference(resource.get("subject"), f"{where}.subject")
        if rtype == "Media":
            ctx.encounter = ctx.encounter or _reference(
                resource.get("encounter"), f"{where}.encounter")
            attachments = [(resource.get("content"), f"{where}.content")]
        else:
            ctx.encounter = ctx.encounter or _encounter_of(resource.get("context"))
            attachments = [((c or {}).get("attachment"), f"{where}.content[{i}].attachment")
                           for i, c in enumerate(resource.get("content") or [])]
        pictures: list[Inbound] = []
        refused: FhirInputError | None = None
        for att, att_where in attachments:
            try:
                data, media = self.attachment(att, where=att_where)
            except UnsupportedMediaTypeError as exc:  # e.g. a text/plain rendition beside it
                refused = refused or exc
                continue
            pictures.append(_inbound(data, media, ctx, self.caller))
        if not pictures:
            raise refused or MalformedResourceError(f"{where} has no attachment")
        return pictures

    def attachment(self, att: Any, *, where: str) -> tuple[bytes, str]:
        """An Attachment with inline ``data`` or a ``url`` to a Binary on this server."""
        if not isinstance(att, dict):
            raise MalformedResourceError(f"{where} is missing")
        declared = att.get("contentType")
        media = normalize_media_type(declared)
        if media and media not in SUPPORTED_MEDIA_TYPES:
            raise UnsupportedMediaTypeError(
                f"{where}.contentType {media!r} is not supported; send one of "
                + ", ".join(SUPPORTED_MEDIA_TYPES))
        if att.get("data"):
            data = decode_base64(att["data"], where=f"{where}.data", max_bytes=self.max_bytes)
        elif isinstance(att.get("url"), str) and att["url"]:
            data, fetched_type = self._fetch(att["url"], where=f"{where}.url")
            declared = declared or fetched_type
        else:
            raise MalformedResourceError(f"{where} has neither data nor url")
        _check_attachment_integrity(att, data, where)
        return data, check_picture(data, declared, max_bytes=self.max_bytes)

    def _fetch(self, url: str, *, where: str) -> tuple[bytes, str]:
        if url in self._bundle_binaries:
            return self._bundle_binaries[url]
        found = self._resolve_external(url) if self._resolve_external else None
        if found is None:
            raise UnresolvedReferenceError(
                f"{where} {url!r} is not a Binary on this server; send the picture inline "
                "(attachment.data) or POST it to /fhir/Binary first")
        data, media = found
        if len(data) > self.max_bytes:
            raise PayloadTooLargeError(
                f"picture is {len(data)} bytes; the limit is {self.max_bytes}")
        return data, media

    # -- Bundle

    def bundle(self, bundle: dict[str, Any]) -> list[tuple[Inbound, list[int]]]:
        """A transaction or batch Bundle of Binary, DocumentReference and Media entries.

        All entries are checked before anything is accepted, so a bad entry refuses the
        whole Bundle. A Binary that a DocumentReference or Media of the same Bundle points
        to (by its ``fullUrl``) is that entry's picture, not a picture of its own.
        """
        if bundle.get("type") not in BUNDLE_TYPES:
            raise MalformedResourceError(
                f"Bundle.type must be transaction or batch, not {bundle.get('type')!r}")
        entries = bundle.get("entry")
        if not isinstance(entries, list) or not entries:
            raise MalformedResourceError("the Bundle has no entries")
        binaries: dict[int, Inbound] = {}
        by_url: dict[str, int] = {}
        for i, entry in enumerate(entries):
            where = f"Bundle.entry[{i}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
                raise MalformedResourceError(f"{where} has no resource")
            request = entry.get("request")
            if not isinstance(request, dict) or request.get("method") not in ("POST", "PUT"):
                raise MalformedResourceError(f"{where}.request must be a POST (or PUT)")
            rtype = entry["resource"].get("resourceType")
            if rtype not in PICTURE_TYPES:
                raise MalformedResourceError(
                    f"{where}: {rtype} is not accepted; a Bundle may hold Binary, "
                    "DocumentReference and Media")
            if rtype == "Binary":
                inbound = self.picture_resource(entry["resource"], where=where)[0]
                binaries[i] = inbound
                full_url = entry.get("fullUrl")
                if isinstance(full_url, str) and full_url:
                    self._bundle_binaries[full_url] = (inbound.data, inbound.media_type)
                    by_url[full_url] = i
        out: list[tuple[Inbound, list[int]]] = []
        used: set[int] = set()
        for i, entry in enumerate(entries):
            resource = entry["resource"]
            if resource["resourceType"] == "Binary":
                continue
            linked = [by_url[u] for u in _attachment_urls(resource) if u in by_url]
            used.update(linked)
            for inbound in self.picture_resource(resource, where=f"Bundle.entry[{i}]"):
                out.append((inbound, sorted({i, *linked})))
        out.extend((inbound, [i]) for i, inbound in binaries.items() if i not in used)
        return sorted(out, key=lambda item: item[1][0])

    # -- $digitize

    def parameters(self, params: dict[str, Any]) -> Inbound:
        """The Parameters of ``$digitize``: one picture, as ``attachment``, as ``reference``
        (a Binary on this server), or as ``resource`` (Binary, DocumentReference, Media);
        ``patient``/``subject`` and ``encounter`` references set the context, and a
        ``reference`` to a DocumentReference or Media beside an ``attachment`` becomes
        the source the results are derived from."""
        _validate(params, "Parameters")
        values: dict[str, Any] = {}
        for i, p in enumerate(params.get("parameter") or []):
            name = p.get("name")
            if name not in DIGITIZE_PARAMETERS:
                raise MalformedResourceError(
                    f"Parameters.parameter[{i}]: unknown parameter {name!r}; $digitize takes "
                    + ", ".join(DIGITIZE_PARAMETERS))
            if name in values:
                raise MalformedResourceError(f"parameter {name!r} is given more than once")
            values[name] = p
        subject = _param_ref(values, "subject")
        patient = _param_ref(values, "patient")
        if subject and patient and subject != patient:
            raise MalformedResourceError("parameters 'patient' and 'subject' disagree")
        ctx = _Context(subject=subject or patient, encounter=_param_ref(values, "encounter"),
                       fhir_type="Parameters")
        reference = _param_ref(values, "reference")
        given = [n for n in ("attachment", "resource") if n in values]
        if len(given) > 1:
            raise MalformedResourceError("give the picture once: attachment or resource")
        if "resource" in values:
            resource = values["resource"].get("resource")
            if not isinstance(resource, dict) or resource.get("resourceType") not in PICTURE_TYPES:
                raise MalformedResourceError(
                    "parameter 'resource' must hold a Binary, DocumentReference or Media")
            ctx.fhir_source = reference if _is_document(reference) else None
            pictures = self.picture_resource(resource, where="parameter 'resource'", ctx=ctx)
            if len(pictures) != 1:
                raise MalformedResourceError(
                    f"$digitize takes one picture; the resource holds {len(pictures)}")
            return pictures[0]
        if "attachment" in values:
            att = values["attachment"].get("valueAttachment")
            if att is None:
                raise MalformedResourceError("parameter 'attachment' needs a valueAttachment")
            data, media = self.attachment(att, where="parameter 'attachment'")
            if reference and not _is_document(reference):
                raise MalformedResourceError(
                    "beside an attachment, 'reference' names the DocumentReference or Media "
                    f"it belongs to, not {reference!r}")
            ctx.fhir_source = reference
            ctx.fhir_type = "Attachment"
            return _inbound(data, media, ctx, self.caller)
        if reference:
            data, declared = self._fetch(reference, where="parameter 'reference'")
            ctx.fhir_type = "Binary"
            return _inbound(data, check_picture(data, declared, max_bytes=self.max_bytes),
                            ctx, self.caller)
        raise MalformedResourceError(
            "$digitize needs the picture: parameter 'attachment', 'reference' or 'resource'")


def _is_document(ref: str | None) -> bool:
    return bool(ref) and str(ref).rsplit("/", 2)[-2:-1] in (["DocumentReference"], ["Media"])


def _param_ref(values: dict[str, Any], name: str) -> str | None:
    if name not in values:
        return None
    ref = _reference(values[name].get("valueReference"), f"parameter {name!r}.valueReference")
    if ref is None:
        raise MalformedResourceError(f"parameter {name!r} needs a valueReference.reference")
    return ref


def _attachment_urls(resource: dict[str, Any]) -> list[str]:
    atts = ([resource.get("content")] if resource.get("resourceType") == "Media"
            else [(c or {}).get("attachment") for c in resource.get("content") or []])
    return [a["url"] for a in atts if isinstance(a, dict) and isinstance(a.get("url"), str)]
