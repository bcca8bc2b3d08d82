"""fhir.resources model classes per FHIR version, and validation of resources built as dicts.

CardioScan builds resources as plain JSON dicts (what goes on the wire) and checks each one
against the fhir.resources model of the output version: R4B models for R4 output, the
top-level (R5) models for R5.
"""

from __future__ import annotations

from typing import Any

from fhir.resources import get_fhir_model_class as _r5_class
from fhir.resources.R4B import get_fhir_model_class as _r4_class
from pydantic import ValidationError

from adapters.fhir.codes import FhirVersion


class FhirValidationError(ValueError):
    """A resource does not conform to the FHIR model; ``str()`` names the failing paths."""


def model_class(resource_type: str, version: FhirVersion) -> Any:
    """The fhir.resources class of ``resource_type`` in ``version``; KeyError if it has none."""
    try:
        return _r4_class(resource_type) if version == "R4" else _r5_class(resource_type)
    except (KeyError, ValueError, AttributeError, ModuleNotFoundError) as exc:
        raise KeyError(f"{resource_type} is not a FHIR {version} resource") from exc


def _brief(exc: ValidationError, limit: int = 5) -> str:
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc}: {err['msg']}")
    more = len(exc.errors()) - limit
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def validate_resource(resource: dict[str, Any], version: FhirVersion) -> None:
    """Raise :class:`FhirValidationError` unless ``resource`` is valid in ``version``."""
    rtype = resource.get("resourceType") if isinstance(resource, dict) else None
    if not isinstance(rtype, str):
        raise FhirValidationError("not a FHIR resource: no resourceType")
    try:
        cls = model_class(rtype, version)
    except KeyError as exc:
        raise FhirValidationError(str(exc.args[0])) from None
    try:
        cls.model_validate(resource)
    except ValidationError as exc:
        raise FhirValidationError(f"{rtype} ({version}): {_brief(exc)}") from None


def valid_in(resource: dict[str, Any], versions: tuple[FhirVersion, ...]) -> FhirVersion:
    """The first of ``versions`` in which ``resource`` is valid; else the first one's error."""
    first: FhirValidationError | None = None
    for version in versions:
        try:
            validate_resource(resource, version)
            return version
        except FhirValidationError as exc:
            first = first or exc
    assert first is not None
    raise first
