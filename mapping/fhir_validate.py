"""Check a FHIR resource dict against its ``fhir.resources.R4B`` model (one place for every mapping)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ecgbridge.errors import MappingError

__all__ = ["validate_resource"]

_MODELS: dict[str, Any] | None = None


def _model_classes() -> dict[str, Any]:
    global _MODELS
    if _MODELS is None:
        from fhir.resources.R4B.device import Device
        from fhir.resources.R4B.diagnosticreport import DiagnosticReport
        from fhir.resources.R4B.observation import Observation
        from fhir.resources.R4B.provenance import Provenance

        _MODELS = {
            "Device": Device,
            "DiagnosticReport": DiagnosticReport,
            "Observation": Observation,
            "Provenance": Provenance,
        }
    return _MODELS


def validate_resource(resource: dict[str, Any]) -> dict[str, Any]:
    """Check ``resource`` against its ``fhir.resources.R4B`` model; return it unchanged.

    A failure is a bug in the mapping or the input, not in the network: it raises
    :class:`MappingError` so the delivery is dead-lettered, not retried.
    """
    rtype = resource.get("resourceType")
    model = _model_classes().get(str(rtype))
    if model is None:
        raise MappingError(f"no R4B model for resourceType {rtype!r}")
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        raise MappingError(f"{rtype} failed FHIR R4 validation", detail=str(exc)) from exc
    return resource
