"""Sign-in through an OpenID Connect provider (optional: ``console.oidc``).

The authorization code flow with PKCE (S256), ``state`` and ``nonce``: the provider is
found by discovery, the ID token's signature is checked against the provider's JWKS and its
issuer, audience, expiry and nonce are validated. The protocol steps are Authlib's (the
authorization and token requests, client authentication, the ID token claims) and joserfc's
(the signature); the HTTP is the project's httpx, not Authlib's httpx integration, which
wants a second HTTP library. The person then gets the same server-side session as a password
login (:class:`~.auth.Sessions`), with the role that ``console.oidc.role_mapping`` gives the
values of ``roles_claim``.

A pending sign-in (state, nonce, PKCE verifier, where to go next) stays in the gateway's
memory for :data:`PENDING_TTL_S` and is bound to the browser that started it by a random
cookie. That cookie is SameSite=Lax and scoped to ``/login/oidc`` because the session
cookie (SameSite=Strict) is not sent on the provider's cross-site redirect back; for the
same reason the callback answers with a page that continues to the console, where a
redirect would arrive without the new session cookie. Every sign-in and every refusal is
audited (reason only: no code, token or claim value but the user name).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from ecgbridge.core.accounts import Principal, Role
from ecgbridge.core.settings import OidcSettings
from ecgbridge.errors import ConfigError
from ecgbridge.gateway.console.auth import SESSION_COOKIE, Sessions
from ecgbridge.gateway.console.context import ConsoleContext, context_of
from ecgbridge.gateway.console.templating import render

# authlib and joserfc (and the cryptography under them, about 9 MB resident) are imported by the
# functions that sign someone in: a gateway without OpenID Connect never loads them.
if TYPE_CHECKING:
    from joserfc.jwk import KeySet

__all__ = ["router", "START_PATH", "CALLBACK_PATH", "FLOW_COOKIE", "PENDING_TTL_S", "sign_in_options"]

log = logging.getLogger("ecgbridge.console")

router = APIRouter(include_in_schema=False)

START_PATH = "/login/oidc"
CALLBACK_PATH = "/login/oidc/callback"
FLOW_COOKIE = "ecgbridge_oidc"
#: Seconds a started sign-in may take at the provider.
PENDING_TTL_S = 600
#: Pending sign-ins kept at most (the oldest go first): anonymous requests cannot fill the memory.
MAX_PENDING = 1000
#: Seconds the discovery document (and the keys read with it) is used before it is read again.
METADATA_TTL_S = 3600
#: Seconds of clock difference accepted on the ID token's times.
LEEWAY_S = 60
_ENDPOINTS = ("authorization_endpoint", "token_endpoint", "jwks_uri")
# signatures checked against the provider's published keys only (no shared-secret HS*, never "none")
_ASYMMETRIC = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "Ed25519"}
)
# a path on this console, in printable URL characters only (no whitespace a browser would strip)
_LOCAL_PATH = re.compile(r"/(?![/\\])[A-Za-z0-9\-._~!$&()*+,;=:@%/?]*")


class Refusal(Exception):
    """A sign-in that does not go on: ``reason`` for the audit log, ``text`` for the person."""

    def __init__(self, reason: str, text: str, status: int = 400, *, actor: str = "-", outcome: str = "failed") -> None:
        super().__init__(reason)
        self.reason = reason
        self.text = text
        self.status = status
        self.actor = actor
        self.outcome = outcome


def _unreachable(oidc: OidcSettings, what: str, exc: Exception) -> Refusal:
    log.warning("OIDC sign-in: %s at %s failed: %s", what, oidc.issuer, type(exc).__name__)
    return Refusal("provider_unreachable", f"{oidc.name} cannot be reached: try again later.", 502)


def _misconfigured(oidc: OidcSettings, reason: str, why: str) -> Refusal:
    log.error("OIDC sign-in: %s", why)
    return Refusal(reason, f"{oidc.name} is not set up correctly for this console.", 502)


@dataclass
class _Pending:
    nonce: str
    code_verifier: str
    redirect_uri: str
    next: str
    browser_sha256: str
    created: float = field(default_factory=time.monotonic)


class _Provider:
    """One provider as ``console.oidc`` describes it: discovery, keys, the authorization and token requests."""

    def __init__(self, oidc: OidcSettings, secret: str | None) -> None:
        self.oidc = oidc
        self.secret = secret
        self._metadata: dict[str, Any] | None = None
        self._read_at = 0.0
        self._jwks: KeySet | None = None

    async def _json(self, url: str) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=self.oidc.timeout_s) as client:
            resp = await client.get(url, headers={"Accept": "application/json"})
        resp.raise_for_status()
        body = resp.json()
        if not isinstance(body, dict):
            raise ValueError("not a JSON object")
        return body

    async def metadata(self) -> dict[str, Any]:
        """The discovery document, checked: the issuer is the one configured, the endpoints https when required."""
        oidc = self.oidc
        if self._metadata is not None and time.monotonic() - self._read_at < METADATA_TTL_S:
            return self._metadata
        try:
            metadata = await self._json(f"{oidc.issuer}/.well-known/openid-configuration")
        except (httpx.HTTPError, ValueError) as exc:
            raise _unreachable(oidc, "discovery", exc) from exc
        issuer = metadata.get("issuer")
        if not isinstance(issuer, str) or issuer.rstrip("/") != oidc.issuer:
            raise _misconfigured(
                oidc, "issuer_mismatch", f"the discovery document of {oidc.issuer} names another issuer"
            )
        for name in _ENDPOINTS:
            url = metadata.get(name)
            if not isinstance(url, str) or not url.startswith(("https://", "http://")):
                raise _misconfigured(oidc, "bad_discovery", f"the discovery document of {oidc.issuer} has no {name}")
            if oidc.require_https and not url.startswith("https://"):
                raise _misconfigured(oidc, "insecure_endpoint", f"{name} of {oidc.issuer} is not https")
        self._metadata, self._read_at, self._jwks = metadata, time.monotonic(), None
        return metadata

    def authorization_url(self, metadata: dict[str, Any], redirect_uri: str) -> tuple[str, str, _Pending]:
        """Where to send the browser, the state, and what the callback needs (nonce, PKCE verifier)."""
        from authlib.common.security import generate_token
        from authlib.oauth2.rfc6749.parameters import prepare_grant_uri
        from authlib.oauth2.rfc7636 import create_s256_code_challenge

        state, nonce, verifier = generate_token(43), generate_token(43), generate_token(64)
        url = prepare_grant_uri(
            metadata["authorization_endpoint"],
            client_id=self.oidc.client_id,
            response_type="code",
            redirect_uri=redirect_uri,
            scope=" ".join(self.oidc.scopes),
            state=state,
            nonce=nonce,
            code_challenge=create_s256_code_challenge(verifier),
            code_challenge_method="S256",
        )
        return url, state, _Pending(nonce, verifier, redirect_uri, "/", "")

    def _auth_method(self, metadata: dict[str, Any]) -> str:
        if self.secret is None:
            return "none"  # a public client: PKCE only
        offered = metadata.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        return (
            "client_secret_post"
            if "client_secret_basic" not in offered and "client_secret_post" in offered
            else "client_secret_basic"
        )

    async def exchange(self, metadata: dict[str, Any], code: str, pending: _Pending) -> dict[str, Any]:
        """The tokens for an authorization code (its PKCE verifier sent along)."""
        from authlib.oauth2.auth import ClientAuth
        from authlib.oauth2.rfc6749.parameters import prepare_token_request

        oidc = self.oidc
        body = prepare_token_request(
            "authorization_code", code=code, redirect_uri=pending.redirect_uri, code_verifier=pending.code_verifier
        )
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
        auth = ClientAuth(oidc.client_id, self.secret, self._auth_method(metadata))
        url, headers, body = auth.prepare("POST", metadata["token_endpoint"], headers, body)
        try:
            async with httpx.AsyncClient(timeout=oidc.timeout_s) as client:
                resp = await client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise _unreachable(oidc, "the token request", exc) from exc
        try:
            token = resp.json()
        except ValueError:
            token = None
        if isinstance(token, dict) and isinstance(token.get("error"), str):
            raise Refusal(f"token_error:{_word(token['error'])}", _AGAIN, 401)
        if resp.status_code != 200 or not isinstance(token, dict):
            raise Refusal(f"token_error:http_{resp.status_code}", _AGAIN, 502 if resp.status_code >= 500 else 401)
        return token

    async def _keys(self, metadata: dict[str, Any], *, again: bool = False) -> KeySet:
        from joserfc.errors import JoseError
        from joserfc.jwk import KeySet

        if self._jwks is None or again:
            try:
                jwks = await self._json(metadata["jwks_uri"])
            except (httpx.HTTPError, ValueError) as exc:
                raise _unreachable(self.oidc, "reading the keys", exc) from exc
            try:
                self._jwks = KeySet.import_key_set(jwks)  # type: ignore[arg-type]  # a JSON object, checked here
            except (JoseError, ValueError, KeyError, TypeError) as exc:
                raise _misconfigured(self.oidc, "bad_jwks", f"the keys of {self.oidc.issuer} cannot be read") from exc
        return self._jwks

    async def id_token_claims(self, metadata: dict[str, Any], token: dict[str, Any], nonce: str) -> dict[str, Any]:
        """The ID token's claims once its signature, issuer, audience, times and nonce are right; else JoseError."""
        from authlib.oidc.core import CodeIDToken
        from joserfc import jwt
        from joserfc.errors import InvalidKeyIdError
        from joserfc.jws import JWSRegistry

        id_token = token.get("id_token")
        if not isinstance(id_token, str):
            raise Refusal("no_id_token", _AGAIN, 401)
        offered = metadata.get("id_token_signing_alg_values_supported") or []
        # never empty: joserfc reads an empty list as "its recommended algorithms", HS256 among them
        allowed = [a for a in offered if a in _ASYMMETRIC] or ["RS256"]
        registry = JWSRegistry(algorithms=allowed, strict_check_header=False)
        try:
            decoded = jwt.decode(id_token, await self._keys(metadata), registry=registry)
        except InvalidKeyIdError:  # the provider has rotated its keys since they were read
            decoded = jwt.decode(id_token, await self._keys(metadata, again=True), registry=registry)
        claims = CodeIDToken(
            decoded.claims,
            decoded.header,
            {
                "iss": {"essential": True, "value": metadata["issuer"]},
                "aud": {"essential": True, "value": self.oidc.client_id},
            },
            {"nonce": nonce, "client_id": self.oidc.client_id, "access_token": token.get("access_token")},
        )
        claims.validate(leeway=LEEWAY_S)
        return dict(claims)


class OidcLogins:
    """The provider (made again when ``console.oidc`` or its secret changes) and the pending sign-ins."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._provider: _Provider | None = None

    def provider(self, oidc: OidcSettings) -> _Provider:
        secret = None
        if oidc.client_secret_env:
            secret = os.environ.get(oidc.client_secret_env)
            if not secret:
                raise _misconfigured(
                    oidc, "client_secret_missing", f"environment variable {oidc.client_secret_env} is not set"
                )
        with self._lock:
            if self._provider is None or self._provider.oidc != oidc or self._provider.secret != secret:
                self._provider = _Provider(oidc, secret)
            return self._provider

    def remember(self, state: str, pending: _Pending) -> None:
        with self._lock:
            self._expire()
            while len(self._pending) >= MAX_PENDING:
                del self._pending[next(iter(self._pending))]
            self._pending[state] = pending

    def take(self, state: str) -> _Pending | None:
        """The pending sign-in of ``state``, once: a state is never accepted twice."""
        with self._lock:
            self._expire()
            return self._pending.pop(state, None)

    def _expire(self) -> None:
        now = time.monotonic()
        for state in [s for s, p in self._pending.items() if now - p.created > PENDING_TTL_S]:
            del self._pending[state]


_CREATE = threading.Lock()
_AGAIN = "The sign-in could not be completed: try again."


def _logins(request: Request) -> OidcLogins:
    state = request.app.state
    with _CREATE:
        logins: OidcLogins | None = getattr(state, "oidc_logins", None)
        if logins is None:
            logins = state.oidc_logins = OidcLogins()
    return logins


def sign_in_options(ctx: ConsoleContext) -> dict[str, Any]:
    """What the login page needs to offer single sign-on (the provider's name, or None)."""
    oidc = ctx.settings.console.oidc
    return {"oidc_name": oidc.name if oidc is not None else None}


def _local_path(target: str | None) -> str:
    """Only a path on this console: no scheme, no //host, nothing a browser would strip first."""
    return target if target and _LOCAL_PATH.fullmatch(target) else "/"


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _word(value: str) -> str:
    """A provider's error code as safe audit text (it is the provider's input)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "", value)[:48] or "unknown"


def _mapped_role(oidc: OidcSettings, value: Any) -> Role | None:
    values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    roles = [Role(oidc.role_mapping[v]) for v in values if isinstance(v, str) and v in oidc.role_mapping]
    return max(roles, key=lambda r: r.rank) if roles else None


def _principal(ctx: ConsoleContext, oidc: OidcSettings, claims: dict[str, Any], address: str) -> Principal:
    """The console user for validated ID token claims; OIDC-only users are created and kept at the mapped role."""
    name = claims.get(oidc.username_claim)
    name = name.strip() if isinstance(name, str) else ""
    if not name or len(name) > 64:
        raise Refusal("no_username", f"{oidc.name} did not say who you are ({oidc.username_claim}).", 403)
    role = _mapped_role(oidc, claims.get(oidc.roles_claim))
    if role is None:
        raise Refusal(
            "unmapped_role",
            f"Your account at {oidc.name} has no group that gives access to this console: ask an administrator.",
            403,
            actor=name,
            outcome="denied",
        )
    row = ctx.accounts.user(name)
    if row is None:
        if not oidc.allow_unknown_users:
            raise Refusal(
                "unknown_user",
                "You have no user on this console yet: ask an administrator.",
                403,
                actor=name,
                outcome="denied",
            )
        try:
            ctx.accounts.create_user(name, None, role)
            ctx.accounts.audit(
                "system", "user_created", target=name, remote_addr=address, detail={"role": role.value, "via": "oidc"}
            )
        except ConfigError:
            pass  # made by a sign-in at the same moment
        row = ctx.accounts.user(name)
        if row is None:
            raise Refusal("user_missing", _AGAIN, 500, actor=name)
    if row.disabled:
        raise Refusal("user_disabled", "Your user on this console is disabled.", 403, actor=name, outcome="denied")
    if row.password_hash is None and row.role != role.value:
        # an OIDC-only user's API tokens follow the role the provider gives now
        ctx.accounts.set_role(name, role)
        ctx.accounts.audit(
            "system", "user_changed", target=name, remote_addr=address, detail={"role": role.value, "via": "oidc"}
        )
    return Principal(name, role, via="oidc")


async def _refuse(request: Request, ctx: ConsoleContext, refusal: Refusal, next_path: str) -> Response:
    address = request.client.host if request.client else "-"
    await run_in_threadpool(
        ctx.accounts.audit,
        refusal.actor,
        "login",
        outcome=refusal.outcome,
        remote_addr=address,
        detail={"via": "oidc", "reason": refusal.reason},
    )
    log.warning("OIDC sign-in from %s refused: %s", address, refusal.reason)
    return render(
        request, "login.html", status_code=refusal.status, next=next_path, error=refusal.text, **sign_in_options(ctx)
    )


def _oidc(ctx: ConsoleContext) -> OidcSettings:
    oidc = ctx.settings.console.oidc
    if oidc is None:
        raise HTTPException(404, "sign-in with OpenID Connect is not set up on this console")
    return oidc


@router.get(START_PATH)
async def oidc_start(request: Request, next: str = "/") -> Response:
    """Send the browser to the provider, remembering state, nonce and PKCE verifier here."""
    ctx = context_of(request)
    oidc = _oidc(ctx)
    next_path = _local_path(next)
    logins = _logins(request)
    try:
        provider = logins.provider(oidc)
        metadata = await provider.metadata()
    except Refusal as refusal:
        return await _refuse(request, ctx, refusal, next_path)
    redirect_uri = oidc.redirect_url or str(request.url_for("oidc_callback"))
    url, state, pending = provider.authorization_url(metadata, redirect_uri)
    browser = request.cookies.get(FLOW_COOKIE) or ""
    if len(browser) < 32:  # one value per browser: sign-ins started in two tabs both complete
        browser = secrets.token_urlsafe(32)
    pending.next, pending.browser_sha256 = next_path, _sha256(browser)
    logins.remember(state, pending)
    response = RedirectResponse(url, status_code=303)
    response.set_cookie(
        FLOW_COOKIE,
        browser,
        max_age=PENDING_TTL_S,
        path=START_PATH,
        httponly=True,
        samesite="lax",  # sent on the provider's redirect back, a top-level GET
        secure=request.url.scheme == "https",
    )
    return response


@router.get(CALLBACK_PATH, name="oidc_callback")
async def oidc_callback(request: Request) -> Response:
    """The provider's answer: check state and browser, exchange the code, validate the ID token, sign in."""
    ctx = context_of(request)
    oidc = _oidc(ctx)
    address = request.client.host if request.client else "-"
    pending = _logins(request).take(request.query_params.get("state") or "")
    next_path = pending.next if pending is not None else "/"
    try:
        who = await _sign_in(request, ctx, oidc, pending, address)
    except Refusal as refusal:
        return await _refuse(request, ctx, refusal, next_path)
    sessions: Sessions = request.app.state.sessions
    sid, _ = sessions.create(who)
    await run_in_threadpool(
        ctx.accounts.audit, who.name, "login", role=who.role.value, remote_addr=address, detail={"via": "oidc"}
    )
    response = render(request, "login.html", continue_to=next_path, signed_in=who, next=next_path)
    response.set_cookie(
        SESSION_COOKIE, sid, httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/"
    )
    return response


async def _sign_in(
    request: Request, ctx: ConsoleContext, oidc: OidcSettings, pending: _Pending | None, address: str
) -> Principal:
    from joserfc.errors import ClaimError, JoseError

    params = request.query_params
    if pending is None:
        raise Refusal("state_mismatch", "This sign-in was not started here, or took too long: try again.")
    if not hmac.compare_digest(_sha256(request.cookies.get(FLOW_COOKIE) or ""), pending.browser_sha256):
        raise Refusal("browser_mismatch", "This sign-in was started in another browser: try again.")
    if params.get("error"):
        raise Refusal(f"provider_error:{_word(params['error'])}", f"{oidc.name} did not sign you in.", 401)
    code = params.get("code")
    if not code:
        raise Refusal("missing_code", _AGAIN)
    provider = _logins(request).provider(oidc)
    metadata = await provider.metadata()
    if "iss" in params and params["iss"] != metadata["issuer"]:  # RFC 9207: the answer of another provider
        raise Refusal("issuer_mismatch", _AGAIN)
    token = await provider.exchange(metadata, code, pending)
    try:
        claims = await provider.id_token_claims(metadata, token, pending.nonce)
    except JoseError as exc:  # signature, issuer, audience, expiry, nonce ...: which, never the token
        claim = f":{_word(exc.claim)}" if isinstance(exc, ClaimError) else ""
        raise Refusal(f"id_token_invalid:{_word(exc.error)}{claim}", _AGAIN, 401) from exc
    except ValueError as exc:  # keys or token that are not JOSE at all
        raise Refusal("id_token_invalid:malformed", _AGAIN, 401) from exc
    return await run_in_threadpool(_principal, ctx, oidc, claims, address)
