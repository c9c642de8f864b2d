"""FHIR destinations: the result written as a DiagnosticReport with its Observations, idempotently.

Every resource is a conditional create keyed by identifiers derived from the message
id, so a retried or redelivered task finishes the job without a duplicate report. A
re-analysis (result version 2, 3, ...) updates that same report and its Observations in
place (:func:`deliver_revision`). The report's ``basedOn`` names the order the ECG was
recorded for, found by one ServiceRequest search per report (:meth:`FhirSender.find_order`).
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Mapping
from typing import Any, Literal, cast

import httpx

from ecgbridge.core.settings import DEFAULT_SMART_WRITE_SCOPE, DestinationConfig, FhirDestination
from ecgbridge.core.tls import connection_context
from ecgbridge.errors import MappingError, PermanentDeliveryError
from ecgbridge.mapping.ecg import Patient
from ecgbridge.mapping.fhir_report import (
    OrderLink,
    ReportBundle,
    build_report,
    link_order,
    operation_outcome_text,
    order_identifiers,
    order_search_query,
    resolve_references,
)
from ecgbridge.outbound.fhir_auth import build_auth
from ecgbridge.outbound.fhir_client import (
    FhirClient,
    FhirPermanentError,
    FhirTransientError,
    ref_from_location,
    search_matches,
)
from ecgbridge.outbound.sender import Outgoing, Sender, register_sender

__all__ = ["FhirSender", "deliver_report", "deliver_revision", "resolve_patient", "system_interactions"]

log = logging.getLogger("ecgbridge.outbound")


class FhirBundleRefused(FhirPermanentError):
    """The server refused a whole transaction or batch Bundle (a 4xx to its POST): nothing of it was written."""


def _post_bundle(client: FhirClient, body: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return client.transaction(body)
    except FhirBundleRefused:
        raise
    except FhirPermanentError as exc:
        raise FhirBundleRefused(str(exc), status=exc.status, outcome=exc.outcome) from exc


#: How a report is written to a FHIR server (``destinations[].write_mode`` less ``auto``).
WriteMode = Literal["individual", "batch", "transaction"]


@register_sender
class FhirSender(Sender):
    """A FHIR R4 server: patient looked up by identifier, then the report bundle written idempotently.

    One HTTP client per sender (per destination and worker process), shared by the delivery
    threads, so consecutive reports reuse its connections (and TLS sessions). With
    ``write_mode: auto`` the server's CapabilityStatement is read once: a server that lists
    the ``transaction`` interaction gets each report as one transaction Bundle, one that
    lists ``batch`` a batch Bundle per layer of references (Devices, Observations, the report).
    """

    type = "fhir"
    config_class = FhirDestination
    _auth_obj: httpx.Auth | None = None
    _tls_context: ssl.SSLContext | None = None
    _client: FhirClient | None = None
    #: The write modes the server offers, best first (from its CapabilityStatement); None until read.
    _modes: list[str] | None = None
    #: The server refused a ServiceRequest search as unsupported or not allowed: not asked again.
    _no_order_search: bool = False

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

    def write_mode(self, client: FhirClient) -> WriteMode:
        """How this report is written: ``write_mode``, or for ``auto`` what the server's CapabilityStatement lists.

        ``auto`` takes ``transaction`` when the statement lists it, else ``batch``, else
        ``individual``; it is read once per sender (asked again after a transient failure).
        """
        mode = cast(FhirDestination, self.config).write_mode
        if mode != "auto":
            return mode
        if self._modes is None:
            try:
                capability = client.capabilities()
            except FhirTransientError as exc:  # not now: one by one this time, ask again next time
                log.info("destination %s: CapabilityStatement not read (%s)", self.config.name, type(exc).__name__)
                return "individual"
            except FhirPermanentError as exc:  # no usable /metadata: one by one from now on
                log.info("destination %s: no CapabilityStatement (%s)", self.config.name, exc)
                capability = {}
            self._modes = [m for m in ("transaction", "batch") if m in system_interactions(capability)] + ["individual"]
            log.info("destination %s: reports written as %s", self.config.name, " or ".join(self._modes))
        return cast(WriteMode, self._modes[0])

    def _refused(self, mode: str, exc: FhirBundleRefused) -> bool:
        """In ``auto``, a server that refuses a whole transaction or batch (4xx) gets the next mode from now on.

        Safe to fall back at once: a refused transaction wrote nothing, and a batch's entries
        are conditional creates the next mode finds. Medplum, for one, lists transactions
        but refuses those of more than 8 conditional entries.
        """
        if cast(FhirDestination, self.config).write_mode != "auto" or self._modes is None:
            return False
        with self._lock:
            if mode in self._modes:  # else another thread's report was refused first and dropped it
                self._modes = [m for m in self._modes if m != mode]
                log.warning(
                    "destination %s refused a %s (%s): reports are written as %s from now on",
                    self.config.name,
                    mode,
                    exc.status or "?",
                    self._modes[0],
                )
        return True

    def send(self, outgoing: Outgoing) -> str:
        dest = cast(FhirDestination, self.config)
        version = outgoing.version
        client = self.client()
        patient_ref = resolve_patient(client, outgoing.ecg.patient, dest.patient_identifier_system)
        order = self.find_order(client, outgoing, patient_ref)
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
                order=order,
            )
        except MappingError as exc:
            raise PermanentDeliveryError(str(exc)) from exc
        if version > 1:
            return deliver_revision(client, bundle)
        while True:
            mode = self.write_mode(client)
            try:
                return deliver_report(client, bundle, mode=mode)
            except FhirBundleRefused as exc:
                if not self._refused(mode, exc):
                    raise

    def find_order(self, client: FhirClient, outgoing: Outgoing, patient_ref: str | None) -> OrderLink | None:
        """The order the report is ``basedOn``: one ServiceRequest search by all its identifiers; None without one.

        A transient failure (network, 5xx, 429) fails the delivery to be retried like any FHIR
        error. A server that refuses the search (any other 4xx, or 501) gets a reference by
        identifier: the order link must not cost the report. 403 / 404 / 405 / 501 say the server
        has no ServiceRequest search for us (no such type, or no scope), so this sender (one per
        destination and worker process) does not ask again. Logs name the status only: order
        numbers are PHI-bearing, and a server's OperationOutcome may quote the query.
        """
        systems = cast(FhirDestination, self.config).order_identifier_systems
        identifiers = order_identifiers(
            outgoing.order,
            outgoing.ecg.study,
            placer_system=systems.placer,
            filler_system=systems.filler,
            accession_system=systems.accession,
        )
        if not identifiers:
            return None
        if self._no_order_search:
            return link_order(identifiers, None)
        try:
            found = client.search("ServiceRequest", order_search_query(identifiers))
        except (FhirPermanentError, FhirTransientError) as exc:
            if isinstance(exc, FhirTransientError) and exc.status != 501:
                raise
            if exc.status in _ORDER_SEARCH_UNSUPPORTED:
                self._no_order_search = True
                log.warning(
                    "destination %s: ServiceRequest search refused (%s); reports name their order by identifier "
                    "from now on",
                    self.config.name,
                    exc.status,
                )
            else:
                log.info(
                    "destination %s: ServiceRequest search refused (%s); this report names its order by identifier",
                    self.config.name,
                    exc.status or "?",
                )
            return link_order(identifiers, None)
        more = any(isinstance(link, Mapping) and link.get("relation") == "next" for link in found.get("link") or [])
        return link_order(
            identifiers,
            search_matches(found, "ServiceRequest"),
            patient_reference=patient_ref,
            complete=not more,
        )


#: Answers to the ServiceRequest search that mean the server will not search orders for this sender.
_ORDER_SEARCH_UNSUPPORTED = frozenset({403, 404, 405, 501})


def system_interactions(capability: Mapping[str, Any]) -> set[str]:
    """The system-level interactions (transaction, batch, ...) a CapabilityStatement lists for the server."""
    codes: set[str] = set()
    for rest in capability.get("rest") or []:
        if isinstance(rest, Mapping) and rest.get("mode", "server") == "server":
            codes |= {str(i.get("code")) for i in rest.get("interaction") or [] if isinstance(i, Mapping)}
    return codes


def deliver_report(client: FhirClient, bundle: ReportBundle, *, mode: WriteMode = "individual") -> str:
    """Write ``bundle`` to the server idempotently; returns "DiagnosticReport/<id>".

    ``mode``:

    * ``transaction``: Devices, Observations and the report in one FHIR transaction (one
      POST, atomic, each entry a conditional create), then the Provenance as below;
    * ``batch``: one batch Bundle per layer of references (the Devices, then the
      Observations that point at them, then the report), each entry a conditional create:
      3 requests instead of one per resource (4 when predicted abnormalities refer to the
      findings), on servers without (large) transactions;
    * ``individual``: one conditional create per resource.

    Order follows the references: Devices, Observations (device -> server id), the
    report (results -> server ids), then a Provenance unless one already targets the
    report. Each step is a conditional create, so a retry after a crash anywhere
    finishes the job without duplicates (delivery claims keep two tasks from racing).
    """
    if mode == "transaction":
        return _provenance(client, bundle, _transaction(client, bundle))
    if mode == "batch":
        return _provenance(client, bundle, _batches(client, bundle))
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
    response = _post_bundle(client, body)
    answers = response.get("entry") or []
    if response.get("type") != "transaction-response" or len(answers) != len(planned):
        raise FhirPermanentError(
            f"FHIR transaction: expected a transaction-response with {len(planned)} entries, got "
            f"{response.get('type')!r} with {len(answers)}"
        )
    return {p.placeholder: _entry_ref(p.resource_type, answer, "transaction") for p, answer in zip(planned, answers)}


def _batches(client: FhirClient, bundle: ReportBundle) -> dict[str, str]:
    """POST the planned resources as batch Bundles, one per layer of references; placeholder -> "Type/id".

    A batch does not resolve ``urn:uuid:`` references between its entries (FHIR R4 batch
    rules), so each layer goes once the ids it refers to are known. An entry the server
    refused fails the delivery like a single request would (retried for 408 / 429 / 5xx);
    the entries it took are found again by their conditional creates on the retry.
    """
    pending = list(bundle.all_planned())
    refs: dict[str, str] = {}
    while pending:
        layer = [p for p in pending if _placeholders_in(p.resource) <= refs.keys()]
        if not layer:
            raise FhirPermanentError("FHIR batch: the report's resources refer to each other in a circle")
        resources = [resolve_references(p.resource, refs) for p in layer]
        body = {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [
                {
                    "resource": resource,
                    "request": {
                        "method": "POST",
                        "url": p.resource_type,
                        **({"ifNoneExist": p.if_none_exist} if p.if_none_exist else {}),
                    },
                }
                for p, resource in zip(layer, resources)
            ],
        }
        response = _post_bundle(client, body)
        answers = response.get("entry") or []
        if response.get("type") != "batch-response" or len(answers) != len(layer):
            raise FhirPermanentError(
                f"FHIR batch: expected a batch-response with {len(layer)} entries, got "
                f"{response.get('type')!r} with {len(answers)}"
            )
        for p, answer in zip(layer, answers):
            refs[p.placeholder] = _entry_ref(p.resource_type, answer, "batch")
        pending = [p for p in pending if p.placeholder not in refs]
    return refs


def _entry_ref(resource_type: str, answer: Mapping[str, Any], kind: str) -> str:
    """ "Type/id" from one entry of a batch-response; a refused entry raises as its status says."""
    result = answer.get("response") or {}
    status = str(result.get("status", "")).split(" ", 1)[0]
    ref = ref_from_location(result["location"], resource_type) if result.get("location") else None
    if ref is None and isinstance(answer.get("resource"), Mapping) and answer["resource"].get("id"):
        ref = f"{resource_type}/{answer['resource']['id']}"
    if status in ("200", "201") and ref is not None:
        return ref
    outcome = result.get("outcome") if isinstance(result.get("outcome"), Mapping) else None
    detail = operation_outcome_text(outcome) if outcome else None
    message = f"FHIR {kind}: the {resource_type} entry answered {status or '?'}" + (
        f": {detail}" if detail else " without a resource id"
    )
    code = int(status) if status.isdigit() else None
    if code is not None and (code in (408, 429) or code >= 500):
        raise FhirTransientError(message, status=code)
    raise FhirPermanentError(message, status=code)


def _placeholders_in(resource: Mapping[str, Any]) -> set[str]:
    """The ``urn:uuid:`` references a planned resource makes to others of its bundle."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            ref = node.get("reference")
            if isinstance(ref, str) and ref.startswith("urn:uuid:"):
                found.add(ref)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(resource)
    return found


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
