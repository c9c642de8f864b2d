"""A small synchronous FHIR R4 REST client and the idempotent report delivery.

Every failure leaves as one of the two delivery errors, so the caller's retry policy
needs no HTTP knowledge:

* connection errors, timeouts, 408, 429 and 5xx -> :class:`FhirTransientError`
  (a :class:`TransientDeliveryError`; ``retry_after_s`` from ``Retry-After``);
* any other 4xx, 412 on conditional create, malformed answers ->
  :class:`FhirPermanentError` (a :class:`PermanentDeliveryError`) whose message carries
  the server's OperationOutcome summary.

Logs name the method, resource type and status only (logger ``ecgbridge.fhir``):
bodies, query strings and identifiers can hold PHI and are never logged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Generator
from urllib.parse import parse_qsl

import httpx

from ecgbridge.errors import PermanentDeliveryError, TransientDeliveryError
from mapping.ecg import Patient
from mapping.fhir_report import ReportBundle, operation_outcome_text, resolve_references

__all__ = [
    "FHIR_JSON",
    "BearerAuth",
    "FhirClient",
    "FhirTransientError",
    "FhirPermanentError",
    "deliver_report",
    "resolve_patient",
]

FHIR_JSON = "application/fhir+json"

log = logging.getLogger("ecgbridge.fhir")

Params = Mapping[str, str] | str | None


class FhirTransientError(TransientDeliveryError):
    """Worth retrying; ``retry_after_s`` is the server's wish when it said one."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message, detail=detail)
        self.status = status
        self.retry_after_s = retry_after_s


class FhirPermanentError(PermanentDeliveryError):
    """Retrying the same request cannot help; ``outcome`` is the server's answer."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        outcome: dict[str, Any] | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message, detail=detail)
        self.status = status
        self.outcome = outcome


class BearerAuth(httpx.Auth):
    """``Authorization: Bearer <token>``; the token never appears in ``repr``."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("bearer token is empty")
        self._token = token

    @classmethod
    def from_env(cls, variable: str) -> "BearerAuth":
        """Read the token from an environment variable (secrets stay out of config)."""
        token = os.environ.get(variable, "")
        if not token:
            raise ValueError(f"environment variable {variable} holding the FHIR token is unset")
        return cls(token)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request

    def __repr__(self) -> str:
        return "BearerAuth(token=***)"


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _json_or_none(response: httpx.Response) -> dict[str, Any] | None:
    if not response.content:
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _ref_from_location(location: str, resource_type: str) -> str | None:
    """``Type/id`` from a Location like ``.../Type/id/_history/3``."""
    segments = [s for s in httpx.URL(location).path.split("/") if s]
    if len(segments) >= 4 and segments[-2] == "_history":
        segments = segments[:-2]
    if len(segments) >= 2 and segments[-2] == resource_type:
        return f"{resource_type}/{segments[-1]}"
    return None


def _params(params: Params) -> list[tuple[str, str]]:
    if params is None:
        return []
    if isinstance(params, str):
        return parse_qsl(params.lstrip("?"), keep_blank_values=True)
    return list(params.items())


class FhirClient:
    """Thin FHIR REST client over ``httpx.Client`` with delivery-error classification."""

    def __init__(
        self,
        base_url: str,
        *,
        auth: BearerAuth | None = None,
        timeout_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self._http = httpx.Client(
            base_url=self.base_url,
            auth=auth,
            timeout=timeout_s,
            transport=transport,
            headers={"Accept": FHIR_JSON},
            follow_redirects=False,
        )

    # -- lifecycle
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "FhirClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport
    def _request(
        self,
        method: str,
        resource_type: str,
        path: str,
        *,
        json: Mapping[str, Any] | None = None,
        params: Params = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """Send one request; raise the classified delivery error for any failure."""
        send_headers = dict(headers or {})
        if json is not None:
            send_headers["Content-Type"] = FHIR_JSON
        what = f"FHIR {method} {resource_type}"
        try:
            response = self._http.request(
                method, path, json=json, params=_params(params) or None, headers=send_headers
            )
        except httpx.TimeoutException as exc:
            log.debug("%s -> timeout", what)
            raise FhirTransientError(f"{what}: timed out", detail=type(exc).__name__) from exc
        except httpx.TransportError as exc:
            log.debug("%s -> %s", what, type(exc).__name__)
            raise FhirTransientError(
                f"{what}: connection failed ({type(exc).__name__})", detail=str(exc)
            ) from exc
        status = response.status_code
        log.debug("%s -> %d", what, status)
        if status < 400:
            return response
        outcome = _json_or_none(response)
        summary = operation_outcome_text(outcome) or response.reason_phrase or "no details"
        message = f"{what} -> {status}: {summary}"
        if status in (408, 429) or status >= 500:
            raise FhirTransientError(
                message, status=status, retry_after_s=_retry_after(response.headers.get("Retry-After"))
            )
        raise FhirPermanentError(message, status=status, outcome=outcome)

    def _resource_body(self, response: httpx.Response, what: str) -> dict[str, Any]:
        body = _json_or_none(response)
        if body is None:
            raise FhirPermanentError(f"{what}: the server's answer is not a FHIR JSON resource",
                                     status=response.status_code)
        return body

    # -- interactions
    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """GET ``Type/id``; a 404/410 raises :class:`FhirPermanentError` with ``status``."""
        response = self._request("GET", resource_type, f"{resource_type}/{resource_id}")
        return self._resource_body(response, f"FHIR GET {resource_type}")

    def search(self, resource_type: str, params: Params = None) -> dict[str, Any]:
        """GET ``Type?params``; returns the searchset Bundle."""
        response = self._request("GET", resource_type, resource_type, params=params)
        body = self._resource_body(response, f"FHIR search {resource_type}")
        if body.get("resourceType") != "Bundle":
            raise FhirPermanentError(f"FHIR search {resource_type}: answer is not a Bundle",
                                     status=response.status_code)
        return body

    def find_one(self, resource_type: str, params: Params = None) -> dict[str, Any] | None:
        """The single match of a search, ``None`` for none; several is an error."""
        bundle = self.search(resource_type, params)
        matches = [
            e["resource"]
            for e in bundle.get("entry") or []
            if isinstance(e, dict)
            and isinstance(e.get("resource"), dict)
            and e["resource"].get("resourceType") == resource_type
            and (e.get("search") or {}).get("mode", "match") == "match"
        ]
        if len(matches) > 1:
            raise FhirPermanentError(
                f"FHIR search {resource_type}: {len(matches)} matches where one was expected"
            )
        return matches[0] if matches else None

    def create(self, resource: Mapping[str, Any]) -> tuple[str, bool]:
        """Plain POST (not idempotent); returns ("Type/id", True)."""
        return self.conditional_create(resource, None)

    def conditional_create(
        self, resource: Mapping[str, Any], if_none_exist: str | None
    ) -> tuple[str, bool]:
        """POST with ``If-None-Exist``; returns ("Type/id", created).

        201 -> created (id from Location, else the body); 200 -> an existing match (id
        from the body, Location, or a search with the same query); 412 -> several
        matches, which only a person can untangle, so permanent.
        """
        rtype = str(resource["resourceType"])
        headers = {"If-None-Exist": if_none_exist} if if_none_exist else None
        try:
            response = self._request("POST", rtype, rtype, json=resource, headers=headers)
        except FhirPermanentError as exc:
            if exc.status == 412:
                raise FhirPermanentError(
                    f"FHIR POST {rtype} -> 412: several existing resources match the "
                    "conditional create; resolve the duplicates on the server",
                    status=412,
                    outcome=exc.outcome,
                ) from exc
            raise
        status = response.status_code
        created = status == 201
        if status not in (200, 201):
            raise FhirPermanentError(f"FHIR POST {rtype} -> unexpected status {status}",
                                     status=status)
        body = _json_or_none(response)
        if body and body.get("resourceType") == rtype and body.get("id"):
            return f"{rtype}/{body['id']}", created
        for header in ("Location", "Content-Location"):
            location = response.headers.get(header)
            ref = _ref_from_location(location, rtype) if location else None
            if ref:
                return ref, created
        if not created and if_none_exist:
            existing = self.find_one(rtype, if_none_exist)
            if existing and existing.get("id"):
                return f"{rtype}/{existing['id']}", False
        raise FhirPermanentError(f"FHIR POST {rtype} -> {status} without a resource id",
                                 status=status)

    def update(self, resource: Mapping[str, Any]) -> dict[str, Any]:
        """PUT ``Type/id``; returns the stored resource."""
        rtype = str(resource["resourceType"])
        rid = resource.get("id")
        if not rid:
            raise FhirPermanentError(f"FHIR PUT {rtype}: resource has no id")
        response = self._request("PUT", rtype, f"{rtype}/{rid}", json=resource)
        body = _json_or_none(response)
        return body if body is not None else dict(resource)


def deliver_report(client: FhirClient, bundle: ReportBundle) -> str:
    """Write ``bundle`` to the server idempotently; returns "DiagnosticReport/<id>".

    Order follows the references: Devices, Observations (device -> server id), the
    report (results -> server ids), then a Provenance unless one already targets the
    report. Each step is a conditional create, so a retry after a crash anywhere
    finishes the job without duplicates (two workers racing on one message can still
    both create; delivery runs once per message id).
    """
    refs: dict[str, str] = {}
    for planned in bundle.all_planned():
        resource = resolve_references(planned.resource, refs)
        _no_placeholders(resource)
        ref, _ = client.conditional_create(resource, planned.if_none_exist)
        refs[planned.placeholder] = ref
    report_ref = refs[bundle.report.placeholder]
    if client.find_one("Provenance", bundle.provenance_query(report_ref)) is None:
        provenance = bundle.provenance_for(report_ref, refs)
        _no_placeholders(provenance)
        client.conditional_create(provenance, None)
    return report_ref


def _no_placeholders(resource: Mapping[str, Any]) -> None:
    """A ``urn:uuid:`` left in a resource sent alone would dangle on the server."""

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            ref = node.get("reference")
            if isinstance(ref, str) and ref.startswith("urn:uuid:"):
                raise PermanentDeliveryError(
                    f"{resource.get('resourceType')} still refers to an unresolved {ref}"
                )
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
