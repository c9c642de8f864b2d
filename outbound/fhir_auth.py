"""SMART Backend Services authentication for FHIR servers (EHR context reads and result delivery).

Client credentials with a signed JWT assertion; the private key stays in a file on the
worker. Token endpoint failures are the transport's delivery errors, so callers retry
or give up exactly as for the FHIR call itself.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Generator, Mapping
from pathlib import Path
from typing import Any

import httpx

from ecgbridge.core.settings import EhrAuth
from ecgbridge.errors import ConfigError
from ecgbridge.outbound.fhir_client import BearerAuth, FhirPermanentError, FhirTransientError, json_or_none

__all__ = ["SmartBackendAuth", "build_auth"]

log = logging.getLogger("ecgbridge.fhir")

_JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class SmartBackendAuth(httpx.Auth):
    """SMART Backend Services: a client_credentials token got with a signed JWT assertion.

    The assertion (iss = sub = client id, aud = token URL, exp within 5 minutes, unique
    jti, ``kid`` header) is signed RS384 (RSA key) or ES384 (EC P-384 key). The token is
    cached until shortly before ``expires_in`` and fetched again once when the FHIR server
    answers 401 (revoked or expired early). With no ``token_url`` it is discovered from
    ``{fhir_base_url}/.well-known/smart-configuration``. Token endpoint failures raise
    :class:`FhirPermanentError` (4xx: the registration or key is wrong) or
    :class:`FhirTransientError` (unreachable, 5xx).
    """

    requires_response_body = False

    def __init__(
        self,
        *,
        client_id: str,
        private_key_pem: bytes,
        key_id: str,
        scope: str,
        token_url: str | None = None,
        fhir_base_url: str | None = None,
        timeout_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        import jwt  # noqa: F401  (fail here, at configuration time, when PyJWT is missing)
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        if token_url is None and fhir_base_url is None:
            raise ValueError("SMART backend auth needs token_url or fhir_base_url (for discovery)")
        key = load_pem_private_key(private_key_pem, password=None)
        if isinstance(key, rsa.RSAPrivateKey):
            self.algorithm = "RS384"
        elif isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1":
            self.algorithm = "ES384"
        else:
            raise ValueError("the SMART private key must be RSA (RS384) or EC P-384 (ES384)")
        self._key = key
        self.client_id = client_id
        self.key_id = key_id
        self.scope = scope
        self.token_url = token_url
        self._fhir_base = fhir_base_url.rstrip("/") if fhir_base_url else None
        self._http = httpx.Client(timeout=timeout_s, transport=transport, follow_redirects=False)
        self._lock = threading.Lock()
        self._token: str | None = None
        self._renew_at = 0.0
        #: Tokens fetched so far (for metrics and tests).
        self.tokens_fetched = 0

    def close(self) -> None:
        self._http.close()

    def __repr__(self) -> str:
        return f"SmartBackendAuth(client_id={self.client_id!r}, alg={self.algorithm}, token=***)"

    # -- the flow
    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        timeout = request.extensions.get("timeout")
        token = self.access_token(timeout)
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            log.debug("FHIR answered 401 with a cached SMART token; fetching a new one")
            self.invalidate(token)
            request.headers["Authorization"] = f"Bearer {self.access_token(timeout)}"
            yield request

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        raise NotImplementedError("SmartBackendAuth is for the synchronous httpx.Client")
        yield request  # pragma: no cover

    def invalidate(self, token: str | None = None) -> None:
        with self._lock:
            if token is None or token == self._token:
                self._token, self._renew_at = None, 0.0

    def access_token(self, timeout: Any = None) -> str:
        """The cached token, or a new one from the token endpoint."""
        with self._lock:
            if self._token is not None and time.monotonic() < self._renew_at:
                return self._token
            token, expires_in = self._fetch(_as_timeout(timeout))
            self._token = token
            self._renew_at = time.monotonic() + expires_in - min(30.0, expires_in * 0.1)
            self.tokens_fetched += 1
            return token

    # -- helpers
    def client_assertion(self, token_url: str) -> str:
        import jwt

        now = int(time.time())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": token_url,
            "iat": now,
            "exp": now + 240,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._key, algorithm=self.algorithm, headers={"kid": self.key_id, "typ": "JWT"})

    def _discover(self, timeout: httpx.Timeout | None) -> str:
        if self.token_url:
            return self.token_url
        url = f"{self._fhir_base}/.well-known/smart-configuration"
        response = self._post_or_get("GET", url, "SMART configuration", timeout)
        body = json_or_none(response)
        endpoint = body.get("token_endpoint") if body else None
        if response.status_code != 200 or not isinstance(endpoint, str):
            raise FhirPermanentError(
                f"SMART configuration -> {response.status_code}: no token_endpoint in "
                ".well-known/smart-configuration (set token_url)",
                status=response.status_code,
            )
        self.token_url = endpoint
        return endpoint

    def _fetch(self, timeout: httpx.Timeout | None) -> tuple[str, float]:
        token_url = self._discover(timeout)
        form = {
            "grant_type": "client_credentials",
            "scope": self.scope,
            "client_assertion_type": _JWT_BEARER,
            "client_assertion": self.client_assertion(token_url),
        }
        response = self._post_or_get("POST", token_url, "SMART token endpoint", timeout, form)
        body = json_or_none(response) or {}
        status = response.status_code
        if status != 200:
            error = str(body.get("error") or response.reason_phrase or "no details")[:80]
            description = str(body.get("error_description") or "")[:200]
            message = f"SMART token endpoint -> {status}: {error}" + (f": {description}" if description else "")
            log.debug("SMART token endpoint -> %d (%s)", status, error)
            if status in (408, 429) or status >= 500:
                raise FhirTransientError(message, status=status)
            raise FhirPermanentError(message, status=status)
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise FhirPermanentError("SMART token endpoint -> 200 without an access_token", status=status)
        expires_in = body.get("expires_in")
        seconds = float(expires_in) if isinstance(expires_in, (int, float)) and expires_in > 0 else 300.0
        log.debug("SMART token endpoint -> 200 (expires in %.0fs)", seconds)
        return token, seconds

    def _post_or_get(
        self, method: str, url: str, what: str, timeout: httpx.Timeout | None, form: Mapping[str, str] | None = None
    ) -> httpx.Response:
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        try:
            return self._http.request(method, url, data=form, headers={"Accept": "application/json"}, **extra)
        except httpx.TimeoutException as exc:
            raise FhirTransientError(f"{what}: timed out", detail=type(exc).__name__) from exc
        except httpx.TransportError as exc:
            raise FhirTransientError(f"{what}: connection failed ({type(exc).__name__})", detail=str(exc)) from exc


def _as_timeout(value: Any) -> httpx.Timeout | None:
    """The FHIR request's own timeout (httpx keeps it in ``request.extensions``), for the token call."""
    if isinstance(value, httpx.Timeout):
        return value
    if isinstance(value, dict):
        try:
            return httpx.Timeout(**value)
        except TypeError:
            return None
    return None


def build_auth(
    auth: EhrAuth, base_url: str, *, timeout_s: float, what: str, scope: str | None = None
) -> httpx.Auth | None:
    """The httpx auth a FHIR server's configuration asks for; ConfigError naming ``what`` when a secret is missing.

    ``scope``: the SMART scopes to ask for when the configuration gives none (reads for an
    EHR source, writes for a destination).
    """
    if auth.type == "bearer":
        try:
            return BearerAuth.from_env(auth.token_env or "")
        except ValueError as exc:
            raise ConfigError(f"{what}: {exc}") from exc
    if auth.type == "smart-backend":
        try:
            pem = Path(auth.private_key_file or "").read_bytes()
        except OSError as exc:
            raise ConfigError(f"{what}: SMART private key file cannot be read ({type(exc).__name__})") from exc
        try:
            return SmartBackendAuth(
                client_id=auth.client_id or "",
                private_key_pem=pem,
                key_id=auth.key_id or "",
                scope=auth.scope or scope or auth.smart_scope,
                token_url=auth.token_url,
                fhir_base_url=base_url,
                timeout_s=timeout_s,
            )
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{what}: SMART private key not usable ({exc})") from exc
    return None
