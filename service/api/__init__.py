"""The HTTP side: REST (/api/v1), FHIR (/fhir), health, metrics and the web viewer."""
