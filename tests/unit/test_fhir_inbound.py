"""Parsing what arrives over FHIR: every accepted form, and a clear refusal for the rest."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from typing import Any

import numpy as np
import pytest
from PIL import Image

from adapters.fhir.inbound import (
    InboundParser,
    MalformedResourceError,
    PayloadTooLargeError,
    UnresolvedReferenceError,
    UnsupportedMediaTypeError,
    check_picture,
    sniff_media_type,
)

MAX = 2_000_000


def picture(fmt: str = "PNG", size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), 230, np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


PNG = picture()
JPEG = picture("JPEG")
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def parser(store: dict[str, tuple[bytes, str]] | None = None, max_bytes: int = MAX,
           ) -> InboundParser:
    known = store or {}
    return InboundParser(max_bytes=max_bytes, resolve=known.get, caller="http:test")


def doc_ref(attachment: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"resourceType": "DocumentReference", "status": "current",
            "content": [{"attachment": attachment}], **extra}


# ---------------------------------------------------------------- media types


@pytest.mark.parametrize(("fmt", "media"), [
    ("PNG", "image/png"), ("JPEG", "image/jpeg"), ("TIFF", "image/tiff"), ("BMP", "image/bmp"),
    ("WEBP", "image/webp")])
def test_sniffs_every_format_the_digitizer_reads(fmt: str, media: str) -> None:
    assert sniff_media_type(picture(fmt)) == media
    assert sniff_media_type(PDF) == "application/pdf"
    assert sniff_media_type(b"GIF89a....") is None


def test_the_bytes_decide_between_supported_types() -> None:
    assert check_picture(PNG, "image/jpeg", max_bytes=MAX) == "image/png"
    assert check_picture(JPEG, "image/jpg", max_bytes=MAX) == "image/jpeg"


@pytest.mark.parametrize(("data", "declared", "error"), [
    (PNG, "text/plain", UnsupportedMediaTypeError),
    (b"GIF89a" + bytes(40), "image/gif", UnsupportedMediaTypeError),
    (b"not a picture at all", "image/png", UnsupportedMediaTypeError),
    (b"", "image/png", MalformedResourceError),
    (PNG, "image/png; charset=x", None),
])
def test_check_picture_refusals(data: bytes, declared: str, error: type | None) -> None:
    if error is None:
        assert check_picture(data, declared, max_bytes=MAX) == "image/png"
    else:
        with pytest.raises(error):
            check_picture(data, declared, max_bytes=MAX)


def test_error_classes_carry_http_status_and_issue_code() -> None:
    assert (UnsupportedMediaTypeError.status, UnsupportedMediaTypeError.issue_code) == (
        415, "not-supported")
    assert (PayloadTooLargeError.status, PayloadTooLargeError.issue_code) == (413, "too-costly")
    assert MalformedResourceError.status == 400
    assert UnresolvedReferenceError.status == 400


# ---------------------------------------------------------------- Binary


def test_raw_binary_body() -> None:
    item = parser().binary_body(PNG, "image/png")
    assert item.data == PNG and item.media_type == "image/png"
    assert item.source.route == "fhir" and item.source.caller == "http:test"
    assert item.source.source_id == "sha256:" + hashlib.sha256(PNG).hexdigest()
    assert item.source.fhir_subject is None and item.source.extra["fhir_type"] == "Binary"


def test_security_context_names_the_patient_and_splits_the_identity() -> None:
    plain = parser().binary_body(PNG, "image/png")
    item = parser().binary_body(PNG, "image/png", security_context="Patient/42")
    other = parser().binary_body(PNG, "image/png", security_context="Patient/43")
    assert item.source.fhir_subject == "Patient/42"
    assert len({plain.source.source_id, item.source.source_id, other.source.source_id}) == 3
    assert parser().binary_body(PNG, "image/png", security_context="Group/1"
                                ).source.fhir_subject is None


def test_raw_binary_limits() -> None:
    with pytest.raises(PayloadTooLargeError):
        parser(max_bytes=len(PNG) - 1).binary_body(PNG, "image/png")
    with pytest.raises(UnsupportedMediaTypeError):
        parser().binary_body(PNG, None)
    with pytest.raises(UnsupportedMediaTypeError):
        parser().binary_body(b"%!PS-Adobe", "application/postscript")


def test_binary_resource_in_json() -> None:
    body = json.dumps({"resourceType": "Binary", "contentType": "application/pdf",
                       "data": b64(PDF), "securityContext": {"reference": "Patient/7"}}).encode()
    item = parser().binary_body(body, "application/fhir+json")
    assert item.data == PDF and item.media_type == "application/pdf"
    assert item.source.fhir_subject == "Patient/7"


@pytest.mark.parametrize(("body", "error"), [
    (b"{not json", MalformedResourceError),
    (b'{"resourceType": "Binary", "contentType": "image/png"}', MalformedResourceError),
    (b'{"resourceType": "Binary", "contentType": "image/png", "data": "@@@@"}',
     MalformedResourceError),
    (b'{"resourceType": "Patient"}', MalformedResourceError),
    (b'{"resourceType": "Binary", "data": "AAAA"}', MalformedResourceError),  # no contentType
    (b"[1, 2]", MalformedResourceError),
])
def test_malformed_binary_json(body: bytes, error: type) -> None:
    with pytest.raises(error):
        parser().binary_body(body, "application/fhir+json")


def test_base64_too_large_is_refused_before_decoding() -> None:
    body = json.dumps({"resourceType": "Binary", "contentType": "image/png",
                       "data": "A" * 4000}).encode()
    with pytest.raises(PayloadTooLargeError):
        parser(max_bytes=1000).binary_body(body, "application/fhir+json")


# ---------------------------------------------------------------- DocumentReference, Media


def test_document_reference_r4_with_inline_data() -> None:
    resource = doc_ref({"contentType": "image/png", "data": b64(PNG),
                        "size": len(PNG),
                        "hash": b64(hashlib.sha1(PNG).digest())},
                       subject={"reference": "Patient/1"},
                       context={"encounter": [{"reference": "Encounter/9"}]})
    [(item, entries)] = parser().resource(resource)
    assert entries == [0] and item.data == PNG
    assert (item.source.fhir_subject, item.source.fhir_encounter) == ("Patient/1", "Encounter/9")
    assert item.source.extra["fhir_type"] == "DocumentReference"


def test_document_reference_r5_context_shape() -> None:
    resource = doc_ref({"contentType": "image/jpeg", "data": b64(JPEG)},
                       subject={"reference": "Patient/1"},
                       context=[{"reference": "Encounter/5"}])
    [(item, _)] = parser().resource(resource)
    assert item.source.fhir_encounter == "Encounter/5" and item.media_type == "image/jpeg"


def test_document_reference_url_to_a_binary_on_this_server() -> None:
    store = {"Binary/abc": (PNG, "image/png")}
    [(item, _)] = parser(store).resource(doc_ref({"url": "Binary/abc"}))
    assert item.data == PNG
    with pytest.raises(UnresolvedReferenceError, match="not a Binary on this server"):
        parser(store).resource(doc_ref({"url": "https://elsewhere.example/Binary/1"}))


def test_attachment_integrity_is_checked() -> None:
    bad_hash = doc_ref({"contentType": "image/png", "data": b64(PNG), "hash": b64(b"x" * 20)})
    with pytest.raises(MalformedResourceError, match="hash"):
        parser().resource(bad_hash)
    bad_size = doc_ref({"contentType": "image/png", "data": b64(PNG), "size": 3})
    with pytest.raises(MalformedResourceError, match="size"):
        parser().resource(bad_size)


def test_only_the_picture_attachments_are_taken() -> None:
    resource = {"resourceType": "DocumentReference", "status": "current", "content": [
        {"attachment": {"contentType": "text/plain", "data": b64(b"report text")}},
        {"attachment": {"contentType": "image/png", "data": b64(PNG)}}]}
    [(item, _)] = parser().resource(resource)
    assert item.media_type == "image/png"
    text_only = doc_ref({"contentType": "text/plain", "data": b64(b"report")})
    with pytest.raises(UnsupportedMediaTypeError):
        parser().resource(text_only)


@pytest.mark.parametrize("resource", [
    {"resourceType": "DocumentReference", "content": [{"attachment": {"data": "AAAA"}}]},
    {"resourceType": "DocumentReference", "status": "current"},
    {"resourceType": "DocumentReference", "status": "current", "content": [{"attachment": {}}]},
    {"resourceType": "DocumentReference", "status": "current", "bogus": 1,
     "content": [{"attachment": {"contentType": "image/png", "data": b64(PNG)}}]},
])
def test_malformed_document_reference(resource: dict[str, Any]) -> None:
    with pytest.raises(MalformedResourceError):
        parser().resource(resource)


def test_expected_type_is_enforced() -> None:
    with pytest.raises(MalformedResourceError, match="expected a DocumentReference"):
        parser().resource({"resourceType": "Media", "status": "completed",
                           "content": {"contentType": "image/png", "data": b64(PNG)}},
                          expected="DocumentReference")


def test_media_r4() -> None:
    media = {"resourceType": "Media", "status": "completed",
             "subject": {"reference": "Patient/3"}, "encounter": {"reference": "Encounter/4"},
             "content": {"contentType": "image/png", "data": b64(PNG)}}
    [(item, _)] = parser().resource(media)
    assert item.source.fhir_subject == "Patient/3" and item.source.fhir_encounter == "Encounter/4"
    assert item.source.extra["fhir_type"] == "Media"


# ---------------------------------------------------------------- Bundle


def binary_entry(full_url: str, data: bytes = PNG) -> dict[str, Any]:
    return {"fullUrl": full_url, "resource": {"resourceType": "Binary",
                                              "contentType": "image/png", "data": b64(data)},
            "request": {"method": "POST", "url": "Binary"}}


def test_bundle_links_a_document_to_its_binary() -> None:
    other = picture(size=40)
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        binary_entry("urn:uuid:bin-1"),
        {"fullUrl": "urn:uuid:doc-1",
         "resource": doc_ref({"contentType": "image/png", "url": "urn:uuid:bin-1"},
                             subject={"reference": "Patient/8"}),
         "request": {"method": "POST", "url": "DocumentReference"}},
        binary_entry("urn:uuid:bin-2", other),
    ]}
    items = parser().bundle(bundle)
    assert [entries for _, entries in items] == [[0, 1], [2]]
    (doc, _), (lone, _) = items
    assert doc.data == PNG and doc.source.fhir_subject == "Patient/8"
    assert lone.data == other and lone.source.fhir_subject is None


@pytest.mark.parametrize(("change", "match"), [
    ({"type": "collection"}, "transaction or batch"),
    ({"entry": []}, "no entries"),
    ({"entry": [{"resource": {"resourceType": "Patient"},
                 "request": {"method": "POST", "url": "Patient"}}]}, "not accepted"),
    ({"entry": [{"resource": {"resourceType": "Binary", "contentType": "image/png",
                              "data": b64(PNG)}}]}, "request"),
])
def test_bad_bundles_are_refused_whole(change: dict[str, Any], match: str) -> None:
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [binary_entry("urn:uuid:a")], **change}
    with pytest.raises(MalformedResourceError, match=match):
        parser().bundle(bundle)


def test_one_bad_entry_refuses_the_bundle() -> None:
    bad = binary_entry("urn:uuid:b", b"not a picture")
    with pytest.raises(UnsupportedMediaTypeError):
        parser().bundle({"resourceType": "Bundle", "type": "batch",
                         "entry": [binary_entry("urn:uuid:a"), bad]})


# ---------------------------------------------------------------- $digitize Parameters


def params(*parameters: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": list(parameters)}


def test_parameters_with_attachment_and_context() -> None:
    item = parser().parameters(params(
        {"name": "attachment", "valueAttachment": {"contentType": "image/png", "data": b64(PNG)}},
        {"name": "patient", "valueReference": {"reference": "Patient/1"}},
        {"name": "encounter", "valueReference": {"reference": "Encounter/2"}},
        {"name": "reference", "valueReference": {"reference": "DocumentReference/77"}}))
    s = item.source
    assert (s.fhir_subject, s.fhir_encounter, s.fhir_source) == (
        "Patient/1", "Encounter/2", "DocumentReference/77")


def test_parameters_with_a_reference_to_a_binary_here() -> None:
    store = {"Binary/j1": (JPEG, "image/jpeg")}
    item = parser(store).parameters(params(
        {"name": "reference", "valueReference": {"reference": "Binary/j1"}},
        {"name": "subject", "valueReference": {"reference": "Patient/5"}}))
    assert item.data == JPEG and item.source.fhir_subject == "Patient/5"
    with pytest.raises(UnresolvedReferenceError):
        parser(store).parameters(params(
            {"name": "reference", "valueReference": {"reference": "Binary/none"}}))


def test_parameters_with_a_resource() -> None:
    item = parser().parameters(params(
        {"name": "resource", "resource": doc_ref({"contentType": "image/png", "data": b64(PNG)},
                                                 subject={"reference": "Patient/1"})},
        {"name": "encounter", "valueReference": {"reference": "Encounter/3"}}))
    assert item.source.fhir_subject == "Patient/1" and item.source.fhir_encounter == "Encounter/3"


@pytest.mark.parametrize(("parameters", "match"), [
    ((), "needs the picture"),
    (({"name": "image", "valueAttachment": {}},), "unknown parameter"),
    (({"name": "patient", "valueReference": {"reference": "Patient/1"}},
      {"name": "subject", "valueReference": {"reference": "Patient/2"}},
      {"name": "attachment", "valueAttachment": {"contentType": "image/png", "data": b64(PNG)}}),
     "disagree"),
    (({"name": "attachment", "valueAttachment": {"contentType": "image/png", "data": b64(PNG)}},
      {"name": "attachment", "valueAttachment": {"contentType": "image/png", "data": b64(PNG)}}),
     "more than once"),
    (({"name": "attachment", "valueString": "x"},), "valueAttachment"),
    (({"name": "attachment", "valueAttachment": {"contentType": "image/png", "data": b64(PNG)}},
      {"name": "reference", "valueReference": {"reference": "Patient/1"}}), "belongs to"),
])
def test_bad_parameters(parameters: tuple[dict[str, Any], ...], match: str) -> None:
    with pytest.raises(MalformedResourceError, match=match):
        parser().parameters(params(*parameters))
