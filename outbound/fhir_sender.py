"""FHIR destinations: the result written as a DiagnosticReport with its Observations, idempotently.

Every resource is a conditional create keyed by identifiers derived from the message
id, so a retried or redelivered task finishes the job without a duplicate report.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from ecgbridge.core.settings import FhirDestination
from ecgbridge.errors import MappingError, PermanentDeliveryError
from ecgbridge.mapping.ecg import Patient
from ecgbridge.mapping.fhir_report import ReportBundle, build_report, resolve_references
from ecgbridge.outbound.fhir_client import BearerAuth, FhirClient, FhirPermanentError, ref_from_location
from ecgbridge.outbound.sender import Outgoing, Sender, register_sender

__all__ = ["FhirSender", "deliver_report", "resolve_patient"]


@register_sender
class FhirSender(Sender):
    """A FHIR R4 server: patient looked up by identifier, then the report bundle written idempotently."""

    type = "fhir"
    config_class = FhirDestination

    def send(self, outgoing: Outgoing) -> str:
        dest = cast(FhirDestination, self.config)
        token = dest.auth.token()
        with FhirClient(dest.base_url, auth=BearerAuth(token) if token else None, timeout_s=dest.timeout_s) as client:
            patient_ref = resolve_patient(client, outgoing.ecg.patient, dest.patient_identifier_system)
            try:
                bundle = build_report(
                    outgoing.result,
                    patient=outgoing.ecg.patient,
                    study=outgoing.ecg.study,
                    message_id=outgoing.message_id,
                    patient_reference=patient_ref,
                    patient_identifier_system=dest.patient_identifier_system,
                    attachments_data=outgoing.attachments,
                )
            except MappingError as exc:
                raise PermanentDeliveryError(str(exc)) from exc
            return deliver_report(client, bundle, transaction=dest.write_mode == "transaction")


def deliver_report(client: FhirClient, bundle: ReportBundle, *, transaction: bool = False) -> str:
    """Write ``bundle`` to the server idempotently; returns "DiagnosticReport/<id>".

    ``transaction``: Devices, Observations and the report go in one FHIR transaction (one
    POST, atomic, each entry a conditional create), then the Provenance as below; for
    servers that support transactions. Otherwise one request per resource:

    Order follows the references: Devices, Observations (device -> server id), the
    report (results -> server ids), then a Provenance unless one already targets the
    report. Each step is a conditional create, so a retry after a crash anywhere
    finishes the job without duplicates (two workers racing on one message can still
    both create; delivery runs once per message id).
    """
    if transaction:
        return _provenance(client, bundle, _transaction(client, bundle))
    refs: dict[str, str] = {}
    for planned in bundle.all_planned():
        resource = resolve_references(planned.resource, refs)
        _no_placeholders(resource)
        ref, _ = client.conditional_create(resource, planned.if_none_exist)
        refs[planned.placeholder] = ref
    return _provenance(client, bundle, refs)


def _provenance(client: FhirClient, bundle: ReportBundle, refs: Mapping[str, str]) -> str:
    """Create the report's Provenance unless one already targets it; returns the report's reference."""
    report_ref = refs[bundle.report.placeholder]
    if client.find_one("Provenance", bundle.provenance_query(report_ref)) is None:
        provenance = bundle.provenance_for(report_ref, refs)
        _no_placeholders(provenance)
        client.conditional_create(provenance, None)
    return report_ref


def _transaction(client: FhirClient, bundle: ReportBundle) -> dict[str, str]:
    """POST the planned resources as one transaction Bundle; placeholder -> "Type/id" from the response.

    The entries keep their ``urn:uuid:`` references and ``fullUrl``s: the server resolves
    them, to the existing resource when a conditional create matched one (FHIR R4 transaction
    processing rules).
    """
    planned = bundle.all_planned()
    body = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": p.placeholder,
                "resource": p.resource,
                "request": {
                    "method": "POST",
                    "url": p.resource_type,
                    **({"ifNoneExist": p.if_none_exist} if p.if_none_exist else {}),
                },
            }
            for p in planned
        ],
    }
    response = client.transaction(body)
    answers = response.get("entry") or []
    if response.get("type") != "transaction-response" or len(answers) != len(planned):
        raise FhirPermanentError(
            f"FHIR transaction: expected a transaction-response with {len(planned)} entries, got "
            f"{response.get('type')!r} with {len(answers)}"
        )
    refs: dict[str, str] = {}
    for p, answer in zip(planned, answers):
        result = answer.get("response") or {}
        status = str(result.get("status", "")).split(" ", 1)[0]
        ref = ref_from_location(result["location"], p.resource_type) if result.get("location") else None
        if ref is None and isinstance(answer.get("resource"), dict) and answer["resource"].get("id"):
            ref = f"{p.resource_type}/{answer['resource']['id']}"
        if status not in ("200", "201") or ref is None:
            raise FhirPermanentError(
                f"FHIR transaction: the {p.resource_type} entry answered {status or '?'} without a resource id"
            )
        refs[p.placeholder] = ref
    return refs


def _no_placeholders(resource: Mapping[str, Any]) -> None:
    """A ``urn:uuid:`` left in a resource sent alone would dangle on the server."""

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            ref = node.get("reference")
            if isinstance(ref, str) and ref.startswith("urn:uuid:"):
                raise PermanentDeliveryError(f"{resource.get('resourceType')} still refers to an unresolved {ref}")
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(resource)


def resolve_patient(client: FhirClient, patient: Patient, identifier_system: str) -> str | None:
    """``Patient/<id>`` of the EHR's patient with this identifier, or None to use a logical reference.

    Exactly one match is required: none means the EHR does not know the patient yet
    (the report then carries the identifier), several is ambiguous and refused.
    """
    if not patient.id:
        return None
    found = client.find_one("Patient", {"identifier": f"{identifier_system}|{patient.id}"})
    if found is None or not found.get("id"):
        return None
    return f"Patient/{found['id']}"
