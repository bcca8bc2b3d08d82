"""FHIR in and out: parse what arrives over FHIR, build the result resources (R4 or R5).

Adapters only: nothing here talks to the network or the job store; service/fhir_api.py and
service/ehr_delivery.py do.
"""

from adapters.fhir.capability import capability_statement, operation_definition
from adapters.fhir.codes import FhirVersion
from adapters.fhir.inbound import (
    FhirInputError,
    Inbound,
    InboundParser,
    MalformedResourceError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from adapters.fhir.models import FhirValidationError, validate_resource
from adapters.fhir.outcome import operation_outcome
from adapters.fhir.results import build_result_bundle, local_resources

__all__ = [
    "FhirInputError",
    "FhirValidationError",
    "FhirVersion",
    "Inbound",
    "InboundParser",
    "MalformedResourceError",
    "PayloadTooLargeError",
    "UnsupportedMediaTypeError",
    "build_result_bundle",
    "capability_statement",
    "local_resources",
    "operation_definition",
    "operation_outcome",
    "validate_resource",
]
