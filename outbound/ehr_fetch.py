"""Read one ECG's patient context from the hospital's FHIR R4 server (never raises).

The worker calls :func:`fetch_context` once per ECG when the route names an ``ehr``
source. Whatever goes wrong on the EHR side becomes an :class:`EhrContext` status and a
plain-language problem, so the ECG is still analysed (ECG-only) and says why:

* no identifier on the ECG, no Patient, or several Patients -> ``no_patient``;
* the Patient query fails (down, timeout, 401/403, token endpoint refusal) -> ``unavailable``;
* a later query fails (404 on MedicationStatement, an OperationOutcome, the overall time
  limit) -> ``partial``, with what the other queries gave;
* every query answered -> ``complete``.

Everything runs under ``total_timeout_s``. Logs (logger ``ecgbridge.ehr``) carry resource
types, statuses, counts and durations only; problems carry no identifiers or values.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from ecgbridge.core.settings import EhrSource
from ecgbridge.core.tls import connection_context
from ecgbridge.errors import ConfigError, DeliveryError
from ecgbridge.mapping.ecg import Patient
from ecgbridge.mapping.ehr_context import LOINC, EhrContext, context_from_resources, observation_loinc_codes
from ecgbridge.outbound.fhir_auth import build_auth
from ecgbridge.outbound.fhir_client import (
    FhirClient,
    FhirPermanentError,
    FhirTransientError,
    search_matches,
)

__all__ = ["fetch_context", "build_client", "EhrFetcher"]

log = logging.getLogger("ecgbridge.ehr")


def build_client(source: EhrSource) -> FhirClient:
    """A FhirClient for ``source`` with its auth; raises ConfigError when a secret is missing."""
    auth = build_auth(source.auth, source.base_url, timeout_s=source.timeout_s, what=f"EHR {source.name}")
    tls = connection_context(source.tls, f"EHR {source.name}")
    return FhirClient(source.base_url, auth=auth, timeout_s=source.timeout_s, tls=tls)


def _failure(what: str, exc: DeliveryError) -> str:
    """A problem line for a failed query: status and OperationOutcome codes, never diagnostics
    (servers echo query values, which can be identifiers)."""
    if exc.message.startswith("SMART"):
        return f"{what} not sent: {exc.message}"
    status = getattr(exc, "status", None)
    if status is None:
        reason = exc.message.partition(": ")[2] or "failed"
        return f"{what} failed: {reason}"
    why = {401: " (credentials refused)", 403: " (access forbidden)", 404: " (not found)"}.get(status, "")
    outcome = getattr(exc, "outcome", None) or {}
    codes = sorted({str(i.get("code")) for i in outcome.get("issue") or [] if isinstance(i, dict) and i.get("code")})
    return f"{what} failed: HTTP {status}{why}" + (f", OperationOutcome {', '.join(codes)}" if codes else "")


def _utc(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    if dt.tzinfo is None or dt.utcoffset() is None:
        return dt.astimezone().astimezone(UTC)
    return dt.astimezone(UTC)


def _stamp(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


class _Query:
    """One paged query's outcome: resources, or None and a problem."""

    def __init__(self, client: FhirClient, source: EhrSource, deadline: float) -> None:
        self.client, self.source, self.deadline = client, source, deadline
        self.problems: list[str] = []
        self.failed = False

    def run(self, resource_type: str, params: list[tuple[str, str]]) -> list[dict[str, Any]] | None:
        started = time.monotonic()
        results = self.client.search_all(
            resource_type,
            params,
            self.source.max_observation_pages,
            deadline=self.deadline,
            retries=self.source.retries,
        )
        try:
            resources = list(results)
        except (FhirTransientError, FhirPermanentError) as exc:
            log.info(
                "EHR %s search failed after %d page(s): %s (%.2fs)",
                resource_type,
                results.pages,
                getattr(exc, "status", None) or type(exc).__name__,
                time.monotonic() - started,
            )
            self.problems.append(_failure(f"{resource_type} search", exc))
            self.failed = True
            return None
        if results.truncated:
            self.problems.append(f"{resource_type} search: {results.why}; older results not read")
        log.info(
            "EHR %s search: %d resources in %d page(s) (%.2fs)",
            resource_type,
            len(resources),
            results.pages,
            time.monotonic() - started,
        )
        return resources


def _find_patient(
    client: FhirClient, source: EhrSource, patient: Patient, deadline: float
) -> dict[str, Any] | EhrContext:
    params = {"identifier": f"{source.patient_identifier_system}|{patient.id}"}
    try:
        bundle = client.search_page("Patient", params, deadline=deadline, retries=source.retries)
    except (FhirTransientError, FhirPermanentError) as exc:
        log.info("EHR Patient search failed: %s", getattr(exc, "status", None) or type(exc).__name__)
        return EhrContext.missing("unavailable", _failure("Patient search", exc), source=source.name)
    matches = search_matches(bundle, "Patient")
    log.info("EHR Patient search: %d match(es)", len(matches))
    if not matches:
        return EhrContext.missing(
            "no_patient",
            f"no Patient on the EHR has the ECG's identifier (system {source.patient_identifier_system})",
            source=source.name,
        )
    if len(matches) > 1 or not matches[0].get("id"):
        return EhrContext.missing(
            "no_patient",
            f"{len(matches)} Patients on the EHR share the ECG's identifier: ambiguous, none used",
            source=source.name,
        )
    return matches[0]


def _fetch(
    client: FhirClient, source: EhrSource, patient: Patient, acquired_at: datetime | None, deadline: float
) -> EhrContext:
    found = _find_patient(client, source, patient, deadline)
    if isinstance(found, EhrContext):
        return found
    ref = f"Patient/{found['id']}"
    end = _utc(acquired_at)
    start = (end or datetime.now(UTC)) - timedelta(days=source.observation_window_days)
    obs_params = [
        ("patient", ref),
        ("code", ",".join(f"{LOINC}|{c}" for c in observation_loinc_codes())),
        ("date", f"ge{_stamp(start)}"),
    ]
    if end is not None:
        obs_params.append(("date", f"le{_stamp(end)}"))
    obs_params += [("_sort", "-date"), ("_count", str(source.page_size))]
    query = _Query(client, source, deadline)
    observations = query.run("Observation", obs_params)
    conditions = query.run("Condition", [("patient", ref), ("_count", str(source.page_size))])
    medications = (
        query.run("MedicationStatement", [("patient", ref), ("_count", str(source.page_size))])
        if source.fetch_medications
        else None
    )
    return context_from_resources(
        found,
        observations,
        conditions,
        medications,
        acquired_at=acquired_at,
        window_days=source.observation_window_days,
        source=source.name,
        status="partial" if query.failed else "complete",
        problems=query.problems,
    )


def fetch_context(
    source: EhrSource,
    patient: Patient,
    acquired_at: datetime | None,
    *,
    client: FhirClient | None = None,
) -> EhrContext:
    """The patient's EHR context at ECG time from ``source``; never raises for EHR trouble.

    ``client`` lets a caller reuse connections (see :class:`EhrFetcher`); without it a
    client is built for this call and closed afterwards.
    """
    started = time.monotonic()
    deadline = started + source.total_timeout_s
    if patient is None or not patient.id:
        return EhrContext.missing("no_patient", "the ECG carries no patient identifier", source=source.name)
    own = client is None
    try:
        if client is None:
            client = build_client(source)
    except ConfigError as exc:
        log.warning("EHR %s: client not configured: %s", source.name, exc.message)
        return EhrContext.missing("unavailable", exc.message, source=source.name)
    try:
        context = _fetch(client, source, patient, acquired_at, deadline)
    except Exception as exc:
        log.warning("EHR %s: unexpected %s while reading context", source.name, type(exc).__name__)
        context = EhrContext.missing(
            "unavailable", f"unexpected error while reading the EHR ({type(exc).__name__})", source=source.name
        )
    finally:
        if own and client is not None:
            client.close()
    log.info(
        "EHR context from %s: %s, %d value(s), %d problem(s) (%.2fs)",
        source.name,
        context.status,
        len(context.values),
        len(context.problems),
        time.monotonic() - started,
    )
    return context


class EhrFetcher:
    """Keeps one FhirClient (and SMART token) per EHR source for a worker process's lifetime."""

    def __init__(self) -> None:
        self._clients: dict[str, tuple[EhrSource, FhirClient]] = {}
        self._lock = threading.Lock()

    def client(self, source: EhrSource) -> FhirClient:
        """The shared client for ``source`` (rebuilt when its settings changed)."""
        with self._lock:
            held = self._clients.get(source.name)
            if held is not None and held[0] == source:
                return held[1]
            if held is not None:
                held[1].close()
            client = build_client(source)
            self._clients[source.name] = (source, client)
            return client

    def fetch(self, source: EhrSource, patient: Patient, acquired_at: datetime | None) -> EhrContext:
        if patient is None or not patient.id:
            return fetch_context(source, patient, acquired_at)
        try:
            client = self.client(source)
        except ConfigError as exc:
            return EhrContext.missing("unavailable", exc.message, source=source.name)
        return fetch_context(source, patient, acquired_at, client=client)

    def close(self) -> None:
        with self._lock:
            for _, client in self._clients.values():
                client.close()
            self._clients.clear()

    def __enter__(self) -> EhrFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
