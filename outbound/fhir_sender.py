"""FHIR destinations: the result written as a DiagnosticReport with its Observations, idempotently.

Every resource is a conditional create keyed by identifiers derived from the message
id, so a retried or redelivered task finishes the job without a duplicate report. A
re-analysis (result version 2, 3, ...) updates that same report and its Observations in
place (:func:`deliver_revision`).
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Mapping
from typing import Any, cast

import httpx

from ecgbridge.core.settings import DEFAULT_SMART_WRITE_SCOPE, DestinationConfig, FhirDestination
from ecgbridge.core.tls import connection_context
from ecgbridge.errors import MappingError, PermanentDeliveryError
from ecgbridge.mapping.ecg import Patient
from ecgbridge.mapping.fhir_report import ReportBundle, build_report, resolve_references
from ecgbridge.outbound.fhir_auth import build_auth
from ecgbridge.outbound.fhir_client import (
    FhirClient,
    FhirPermanentError,
    FhirTransientError,
    ref_from_location,
    search_matches,
)
from ecgbridge.outbound.sender import Outgoing, Sender, register_sender

__all__ = ["FhirSender", "deliver_report", "deliver_revision", "resolve_patient", "supports_transactions"]

log = logging.getLogger("ecgbridge.outbound")


@register_sender
class FhirSender(Sender):
    """A FHIR R4 server: patient looked up by identifier, then the report bundle written idempotently.

    One HTTP client per sender (per destination and worker process), shared by the delivery
    threads, so consecutive reports reuse its connections (and TLS sessions). With
    ``write_mode: auto`` the server's CapabilityStatement is read once: a server that lists
    the ``transaction`` interaction gets each report as one transaction Bundle.
    """

    type = "fhir"
    config_class = FhirDestination
    _auth_obj: httpx.Auth | None = None
    _tls_context: ssl.SSLContext | None = None
    _client: FhirClient | None = None
    #: What the CapabilityStatement said about transactions; None until it has been read.
    _transactions: bool | None = None

    def __init__(self, config: DestinationConfig) -> None:
        super().__init__(config)
        self._lock = threading.Lock()

    def _auth(self) -> httpx.Auth | None:
        """Bearer or SMART Backend Services; one per sender, so a SMART token is reused until it expires."""
        dest = cast(FhirDestination, self.config)
        if self._auth_obj is None and dest.auth.type != "none":
            self._auth_obj = build_auth(
                dest.auth,
                dest.base_url,
                timeout_s=dest.timeout_s,
                what=f"destination {dest.name}",
                scope=DEFAULT_SMART_WRITE_SCOPE,
            )
        return self._auth_obj

    def _tls(self) -> ssl.SSLContext | None:
        dest = cast(FhirDestination, self.config)
        if dest.tls is not None and self._tls_context is None:
            self._tls_context = connection_context(dest.tls, f"destination {dest.name}")
        return self._tls_context

    def client(self) -> FhirClient:
        """The sender's FHIR client, made on first use (httpx's client is safe to share between threads)."""
        with self._lock:
            if self._client is None:
                dest = cast(FhirDestination, self.config)
                self._client = FhirClient(dest.base_url, auth=self._auth(), timeout_s=dest.timeout_s, tls=self._tls())
            return self._client

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()  # closes the auth's own connection too
        else:
            closer = getattr(self._auth_obj, "close", None)
            if callable(closer):
                closer()

    def use_transaction(self, client: FhirClient) -> bool:
        """Whether this report goes as one transaction Bundle (``write_mode``, or the server's word for ``auto``)."""
        mode = cast(FhirDestination, self.config).write_mode
        if mode != "auto":
            return mode == "transaction"
        if self._transactions is None:
            try:
                said = supports_transactions(client.capabilities())
            except FhirTransientError as exc:  # not now: individual requests this time, ask again next time
                log.info("destination %s: CapabilityStatement not read (%s)", self.config.name, type(exc).__name__)
                return False
            except FhirPermanentError as exc:  # no usable /metadata: individual requests from now on
                log.info("destination %s: no CapabilityStatement (%s): one request per resource", self.config.name, exc)
                said = False
            self._transactions = said
            log.info(
                "destination %s: %s",
                self.config.name,
                "transaction Bundles (the server lists the transaction interaction)"
                if said
                else "one conditional create per resource (the server lists no transaction interaction)",
            )
        return self._transactions

    def send(self, outgoing: Outgoing) -> str:
        dest = cast(FhirDestination, self.config)
        version = outgoing.version
        client = self.client()
        patient_ref = resolve_patient(client, outgoing.ecg.patient, dest.patient_identifier_system)
        try:
            bundle = build_report(
                outgoing.result,
                patient=outgoing.ecg.patient,
                study=outgoing.ecg.study,
                message_id=outgoing.message_id,
                patient_reference=patient_ref,
                patient_identifier_system=dest.patient_identifier_system,
                attachments_data=outgoing.attachments if dest.presented_form else None,
                version=version,
                measurements_panel=dest.measurements == "panel",
            )
        except MappingError as exc:
            raise PermanentDeliveryError(str(exc)) from exc
        if version > 1:
            return deliver_revision(client, bundle)
        return deliver_report(client, bundle, transaction=self.use_transaction(client))


def supports_transactions(capability: Mapping[str, Any]) -> bool:
    """Whether a CapabilityStatement lists the system-level ``transaction`` interaction of a server."""
    for rest in capability.get("rest") or []:
        if isinstance(rest, Mapping) and rest.get("mode", "server") == "server":
            codes = {i.get("code") for i in rest.get("interaction") or [] if isinstance(i, Mapping)}
            if "transaction" in codes:
                return True
    return False


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


def deliver_revision(client: FhirClient, bundle: ReportBundle) -> str:
    """Write a re-analysis (``bundle.version`` >= 2) over the report it revises; returns "DiagnosticReport/<id>".

    The rule: the report and each Observation are found by their identifiers (the same as
    version 1's) and updated in place with ``PUT`` and ``If-Match`` on the version read
    (a 412, someone changed it meanwhile, is retried from the read); one not found is
    created as in :func:`deliver_report`, so a report that never arrived arrives now,
    amended. Observations the new version no longer has (a model changed version) are
    left as they are, no longer listed in the report's ``result``. Devices are conditional
    creates. Then one Provenance per version (activity UPDATE, tagged with the version),
    unless the server already has it. A repeat after a crash anywhere ends in the same
    state. Always resource by resource, also for ``write_mode: transaction`` destinations:
    each ``If-Match`` needs the read before it.
    """
    if bundle.version < 2:
        raise ValueError("deliver_revision writes result version 2 or later")
    refs: dict[str, str] = {}
    for planned in bundle.devices:
        refs[planned.placeholder], _ = client.conditional_create(planned.resource, planned.if_none_exist)
    for planned in [*bundle.observations, bundle.report]:
        resource = resolve_references(planned.resource, refs)
        _no_placeholders(resource)
        refs[planned.placeholder] = _update_or_create(client, resource, planned.if_none_exist)
    report_ref = refs[bundle.report.placeholder]
    found = client.search("Provenance", bundle.provenance_query(report_ref))
    if not any(bundle.is_provenance_of_version(p) for p in search_matches(found, "Provenance")):
        provenance = bundle.provenance_for(report_ref, refs)
        _no_placeholders(provenance)
        client.conditional_create(provenance, None)
    return report_ref


def _update_or_create(client: FhirClient, resource: Mapping[str, Any], query: str | None) -> str:
    """PUT over the one resource ``query`` finds (If-Match its version), or create it; "Type/id"."""
    rtype = str(resource["resourceType"])
    existing = client.find_one(rtype, query) if query else None
    if existing is None or not existing.get("id"):
        ref, _ = client.conditional_create(resource, query)
        return ref
    rid = str(existing["id"])
    body = {"resourceType": rtype, "id": rid, **{k: v for k, v in resource.items() if k not in ("resourceType", "id")}}
    version_id = (existing.get("meta") or {}).get("versionId")
    try:
        client.update(body, if_match=str(version_id) if version_id else None)
    except FhirPermanentError as exc:
        if exc.status == 412:
            raise FhirTransientError(
                f"FHIR PUT {rtype} -> 412: changed on the server since it was read; retried", status=412
            ) from exc
        raise
    return f"{rtype}/{rid}"


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
