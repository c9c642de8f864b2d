"""A small synchronous FHIR R4 REST client: the transport result delivery and EHR reads share.

Every failure leaves as one of the two delivery errors, so the caller's retry policy
needs no HTTP knowledge:

* connection errors, timeouts, 408, 429 and 5xx -> :class:`FhirTransientError`
  (a :class:`TransientDeliveryError`; ``retry_after_s`` from ``Retry-After``);
* any other 4xx, 412 on conditional create, malformed answers ->
  :class:`FhirPermanentError` (a :class:`PermanentDeliveryError`) whose message carries
  the server's OperationOutcome summary.

Reading (EHR context) adds :meth:`FhirClient.search_all`, which follows
``Bundle.link[next]`` up to a page cap under one deadline. Authentication is an
``httpx.Auth``: :class:`BearerAuth` here, SMART Backend Services in
:mod:`ecgbridge.outbound.fhir_auth`; the report delivery is :mod:`ecgbridge.outbound.fhir_sender`.

Logs name the method, resource type and status only (logger ``ecgbridge.fhir``):
bodies, query strings and identifiers can hold PHI and are never logged.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, cast
from urllib.parse import parse_qsl

import httpx

from ecgbridge.errors import PermanentDeliveryError, TransientDeliveryError
from ecgbridge.mapping.fhir_report import operation_outcome_text

__all__ = [
    "FHIR_JSON",
    "BearerAuth",
    "FhirClient",
    "SearchResults",
    "search_matches",
    "FhirTransientError",
    "FhirPermanentError",
]

FHIR_JSON = "application/fhir+json"

log = logging.getLogger("ecgbridge.fhir")

Params = Mapping[str, str] | Sequence[tuple[str, str]] | str | None


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
    def from_env(cls, variable: str) -> BearerAuth:
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
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def json_or_none(response: httpx.Response) -> dict[str, Any] | None:
    if not response.content:
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def ref_from_location(location: str, resource_type: str) -> str | None:
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
    if isinstance(params, Mapping):
        return list(params.items())
    return list(params)  # repeated parameters (date=ge..&date=le..) as pairs


class FhirClient:
    """Thin FHIR REST client over ``httpx.Client`` with delivery-error classification."""

    def __init__(
        self,
        base_url: str,
        *,
        auth: httpx.Auth | None = None,
        timeout_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.timeout_s = timeout_s
        self._auth = auth
        self._http = httpx.Client(
            base_url=self.base_url,
            auth=auth,
            timeout=timeout_s,
            transport=transport,
            verify=tls if tls is not None else True,
            headers={"Accept": FHIR_JSON},
            follow_redirects=False,
        )

    # -- lifecycle
    def close(self) -> None:
        self._http.close()
        closer = getattr(self._auth, "close", None)  # SmartBackendAuth keeps its own connection
        if callable(closer):
            closer()

    def __enter__(self) -> FhirClient:
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
        timeout_s: float | None = None,
    ) -> httpx.Response:
        """Send one request; raise the classified delivery error for any failure."""
        send_headers = dict(headers or {})
        if json is not None:
            send_headers["Content-Type"] = FHIR_JSON
        what = f"FHIR {method} {resource_type}"
        extra: dict[str, Any] = {} if timeout_s is None else {"timeout": timeout_s}
        try:
            response = self._http.request(
                method, path, json=json, params=cast(Any, _params(params) or None), headers=send_headers, **extra
            )
        except httpx.TimeoutException as exc:
            log.debug("%s -> timeout", what)
            raise FhirTransientError(f"{what}: timed out", detail=type(exc).__name__) from exc
        except httpx.TransportError as exc:
            log.debug("%s -> %s", what, type(exc).__name__)
            raise FhirTransientError(f"{what}: connection failed ({type(exc).__name__})", detail=str(exc)) from exc
        status = response.status_code
        log.debug("%s -> %d", what, status)
        if status < 400:
            return response
        outcome = json_or_none(response)
        summary = operation_outcome_text(outcome) or response.reason_phrase or "no details"
        message = f"{what} -> {status}: {summary}"
        if status in (408, 429) or status >= 500:
            raise FhirTransientError(
                message, status=status, retry_after_s=_retry_after(response.headers.get("Retry-After"))
            )
        raise FhirPermanentError(message, status=status, outcome=outcome)

    def _resource_body(self, response: httpx.Response, what: str) -> dict[str, Any]:
        body = json_or_none(response)
        if body is None:
            raise FhirPermanentError(
                f"{what}: the server's answer is not a FHIR JSON resource", status=response.status_code
            )
        return body

    # -- interactions
    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """GET ``Type/id``; a 404/410 raises :class:`FhirPermanentError` with ``status``."""
        response = self._request("GET", resource_type, f"{resource_type}/{resource_id}")
        return self._resource_body(response, f"FHIR GET {resource_type}")

    def search(self, resource_type: str, params: Params = None, *, timeout_s: float | None = None) -> dict[str, Any]:
        """GET ``Type?params``; returns the searchset Bundle."""
        return self._search_page(resource_type, resource_type, params, timeout_s)

    def _search_page(self, resource_type: str, path: str, params: Params, timeout_s: float | None) -> dict[str, Any]:
        response = self._request("GET", resource_type, path, params=params, timeout_s=timeout_s)
        body = self._resource_body(response, f"FHIR search {resource_type}")
        if body.get("resourceType") != "Bundle":
            raise FhirPermanentError(
                f"FHIR search {resource_type}: answer is not a Bundle", status=response.status_code
            )
        return body

    def search_all(
        self,
        resource_type: str,
        params: Params = None,
        max_pages: int = 20,
        *,
        deadline: float | None = None,
        retries: int = 0,
    ) -> SearchResults:
        """Every match of a search, following ``link[next]``, at most ``max_pages`` pages.

        Iterate the result for the resources; afterwards ``truncated`` says whether
        pages were left unread (cap reached, or a next link outside ``base_url``, which is
        not followed so a token never leaves this server). ``deadline`` is a
        ``time.monotonic()`` instant no request may outlast; transient failures are
        retried ``retries`` times within it.
        """
        return SearchResults(self, resource_type, params, max_pages, deadline, retries)

    def request_timeout(self, deadline: float | None, what: str) -> float | None:
        """The per-request timeout left before ``deadline`` (raises transient when none is)."""
        if deadline is None:
            return None
        remaining = deadline - time.monotonic()
        if remaining <= 0.01:
            raise FhirTransientError(f"{what}: the overall time limit was reached")
        return min(self.timeout_s, remaining)

    def search_page(
        self,
        resource_type: str,
        params: Params = None,
        *,
        url: str | None = None,
        deadline: float | None = None,
        retries: int = 0,
    ) -> dict[str, Any]:
        """One searchset page (``url``: a next link), retrying transient failures."""
        path = url or resource_type
        attempt = 0
        while True:
            timeout_s = self.request_timeout(deadline, f"FHIR search {resource_type}")
            try:
                return self._search_page(resource_type, path, None if url else params, timeout_s)
            except FhirTransientError as exc:
                if attempt >= retries:
                    raise
                attempt += 1
                pause = min(exc.retry_after_s if exc.retry_after_s is not None else 0.2 * 2 ** (attempt - 1), 2.0)
                if deadline is not None and time.monotonic() + pause >= deadline:
                    raise
                log.debug("FHIR search %s: retry %d after %s", resource_type, attempt, exc.status or "error")
                time.sleep(pause)

    def same_server(self, url: str) -> bool:
        """Whether ``url`` lies under this client's base URL (scheme, host, port and path)."""
        return url.startswith(self.base_url) or url.rstrip("/") + "/" == self.base_url

    def find_one(self, resource_type: str, params: Params = None) -> dict[str, Any] | None:
        """The single match of a search, ``None`` for none; several is an error."""
        bundle = self.search(resource_type, params)
        matches = search_matches(bundle, resource_type)
        if len(matches) > 1:
            raise FhirPermanentError(f"FHIR search {resource_type}: {len(matches)} matches where one was expected")
        return matches[0] if matches else None

    def create(self, resource: Mapping[str, Any]) -> tuple[str, bool]:
        """Plain POST (not idempotent); returns ("Type/id", True)."""
        return self.conditional_create(resource, None)

    def conditional_create(self, resource: Mapping[str, Any], if_none_exist: str | None) -> tuple[str, bool]:
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
            raise FhirPermanentError(f"FHIR POST {rtype} -> unexpected status {status}", status=status)
        body = json_or_none(response)
        if body and body.get("resourceType") == rtype and body.get("id"):
            return f"{rtype}/{body['id']}", created
        for header in ("Location", "Content-Location"):
            location = response.headers.get(header)
            ref = ref_from_location(location, rtype) if location else None
            if ref:
                return ref, created
        if not created and if_none_exist:
            existing = self.find_one(rtype, if_none_exist)
            if existing and existing.get("id"):
                return f"{rtype}/{existing['id']}", False
        raise FhirPermanentError(f"FHIR POST {rtype} -> {status} without a resource id", status=status)

    def capabilities(self) -> dict[str, Any]:
        """GET ``metadata``: the server's CapabilityStatement."""
        response = self._request("GET", "CapabilityStatement", "metadata")
        body = self._resource_body(response, "FHIR GET metadata")
        if body.get("resourceType") != "CapabilityStatement":
            raise FhirPermanentError(
                "FHIR GET metadata: the answer is not a CapabilityStatement", status=response.status_code
            )
        return body

    def transaction(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        """POST a transaction (or batch) Bundle to the base; returns the response Bundle."""
        response = self._request("POST", "Bundle", "", json=bundle)
        body = self._resource_body(response, "FHIR transaction")
        if body.get("resourceType") != "Bundle":
            raise FhirPermanentError("FHIR transaction: the answer is not a Bundle", status=response.status_code)
        return body

    def update(self, resource: Mapping[str, Any], *, if_match: str | None = None) -> dict[str, Any]:
        """PUT ``Type/id``; returns the stored resource. ``if_match``: the version read (optimistic locking)."""
        rtype = str(resource["resourceType"])
        rid = resource.get("id")
        if not rid:
            raise FhirPermanentError(f"FHIR PUT {rtype}: resource has no id")
        headers = {"If-Match": f'W/"{if_match}"'} if if_match else None
        response = self._request("PUT", rtype, f"{rtype}/{rid}", json=resource, headers=headers)
        body = json_or_none(response)
        return body if body is not None else dict(resource)


def search_matches(bundle: Mapping[str, Any], resource_type: str) -> list[dict[str, Any]]:
    """The ``search.mode=match`` resources of ``resource_type`` in a searchset (no includes, no outcomes)."""
    return [
        e["resource"]
        for e in bundle.get("entry") or []
        if isinstance(e, dict)
        and isinstance(e.get("resource"), dict)
        and e["resource"].get("resourceType") == resource_type
        and (e.get("search") or {}).get("mode", "match") == "match"
    ]


class SearchResults:
    """Lazily paged search matches; ``pages``, ``truncated`` and ``total`` fill in as it runs."""

    def __init__(
        self,
        client: FhirClient,
        resource_type: str,
        params: Params,
        max_pages: int,
        deadline: float | None,
        retries: int,
    ) -> None:
        if max_pages < 1:
            raise ValueError("max_pages must be at least 1")
        self._client = client
        self.resource_type = resource_type
        self._params = params
        self.max_pages = max_pages
        self._deadline = deadline
        self._retries = retries
        self.pages = 0
        self.count = 0
        self.total: int | None = None
        #: Pages were left unread; ``why`` says why (page cap, foreign next link).
        self.truncated = False
        self.why: str | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        url: str | None = None
        while True:
            bundle = self._client.search_page(
                self.resource_type, self._params, url=url, deadline=self._deadline, retries=self._retries
            )
            self.pages += 1
            if self.pages == 1 and isinstance(bundle.get("total"), int):
                self.total = bundle["total"]
            for resource in search_matches(bundle, self.resource_type):
                self.count += 1
                yield resource
            url = _next_link(bundle)
            if url is None:
                return
            if self.pages >= self.max_pages:
                self._stop(f"stopped after {self.pages} page(s), the configured maximum")
                return
            if not self._client.same_server(url):
                self._stop("the next-page link points outside the server's base URL; not followed")
                return

    def _stop(self, why: str) -> None:
        self.truncated, self.why = True, why
        log.info("FHIR search %s: %s (%d resources read)", self.resource_type, why, self.count)


def _next_link(bundle: Mapping[str, Any]) -> str | None:
    for link in bundle.get("link") or []:
        url = link.get("url") if isinstance(link, dict) else None
        if isinstance(url, str) and link.get("relation") == "next":
            return url
    return None
