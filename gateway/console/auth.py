"""Logins, sessions, CSRF, throttling and roles for the console.

A browser signs in with a user name and password (argon2id, :mod:`ecgbridge.core.accounts`)
and gets a random session id in an HttpOnly, SameSite=Strict cookie; the session lives
in the gateway's memory (a gateway restart signs everyone out) and expires after
``console.session_idle_s`` without activity. Every state-changing request made with a
session must carry the session's CSRF token (form field ``csrf_token`` or header
``X-CSRF-Token``). Scripts use ``Authorization: Bearer <API token>`` instead (no cookie,
so no CSRF). After ``console.login_max_failures`` failed logins for one user name or from
one address, logins for it are refused for ``console.login_lockout_s``. A viewer may
look, an operator may act on messages, an admin may also reload the configuration and
manage users; a refused action is answered 403 and audited.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fastapi import HTTPException, Request

from ecgbridge.core.accounts import Principal, Role
from ecgbridge.gateway.console.context import context_of

__all__ = [
    "SESSION_COOKIE",
    "CSRF_HEADER",
    "Session",
    "Sessions",
    "LoginThrottle",
    "principal_of",
    "require",
    "check_csrf",
]

SESSION_COOKIE = "ecgbridge_session"
CSRF_HEADER = "X-CSRF-Token"
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass
class Session:
    principal: Principal
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    last_seen: float = field(default_factory=time.monotonic)


class Sessions:
    """Server-side sessions by random id; idle ones expire."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self._by_id: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, principal: Principal) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        session = Session(principal)
        with self._lock:
            self._by_id[sid] = session
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        now = time.monotonic()
        with self._lock:
            session = self._by_id.get(sid)
            if session is None:
                return None
            if now - session.last_seen > self.idle_s:
                del self._by_id[sid]
                return None
            session.last_seen = now
            return session

    def drop(self, sid: str | None) -> None:
        with self._lock:
            self._by_id.pop(sid or "", None)

    def drop_user(self, name: str) -> None:
        with self._lock:
            for sid in [k for k, s in self._by_id.items() if s.principal.name == name]:
                del self._by_id[sid]


class LoginThrottle:
    """Counts failed logins per user name and per address; locks each after too many."""

    def __init__(self, max_failures: int, lockout_s: float) -> None:
        self.max_failures = max_failures
        self.lockout_s = lockout_s
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(key, []) if now - t < self.lockout_s]
        self._failures[key] = times
        return times

    def locked(self, *keys: str) -> bool:
        now = time.monotonic()
        with self._lock:
            return any(len(self._recent(k, now)) >= self.max_failures for k in keys)

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        with self._lock:
            for k in keys:
                self._recent(k, now).append(now)

    def succeeded(self, *keys: str) -> None:
        with self._lock:
            for k in keys:
                self._failures.pop(k, None)


def _bearer(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def session_of(request: Request) -> Session | None:
    sessions: Sessions = request.app.state.sessions
    return sessions.get(request.cookies.get(SESSION_COOKIE))


def principal_of(request: Request) -> Principal | None:
    """Who is asking: an API token's principal, else the session's, else None."""
    token = _bearer(request)
    if token is not None:
        return context_of(request).accounts.token_principal(token)
    session = session_of(request)
    return session.principal if session else None


def check_csrf(request: Request, form_token: str | None = None) -> None:
    """Refuse a state-changing session request without its CSRF token (403)."""
    if request.method not in _UNSAFE or _bearer(request) is not None:
        return
    session = session_of(request)
    sent = form_token or request.headers.get(CSRF_HEADER) or ""
    if session is None or not hmac.compare_digest(sent.encode(), session.csrf.encode()):
        context_of(request).audit(
            session.principal if session else None, "csrf_refused", request, target=request.url.path, outcome="denied"
        )
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")


async def _form_token(request: Request) -> str | None:
    kind = request.headers.get("content-type", "")
    if kind.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        value = (await request.form()).get("csrf_token")  # parsed once; the endpoint reuses it
        return value if isinstance(value, str) else None
    return None


def require(role: Role) -> Callable[[Request], Awaitable[Principal]]:
    """A FastAPI dependency: the principal when it has ``role``; 401 without login, 403 (audited) without rights.

    State-changing requests made with a session must also carry the session's CSRF token.
    """

    async def dependency(request: Request) -> Principal:
        who = principal_of(request)
        if who is None:
            raise HTTPException(401, "sign in first", headers={"WWW-Authenticate": "Bearer"})
        if not who.allows(role):
            context_of(request).audit(
                who, "forbidden", request, target=request.url.path, outcome="denied", detail={"needed": role.value}
            )
            raise HTTPException(403, f"this needs the {role.value} role; you are {who.role.value}")
        if request.method in _UNSAFE:
            check_csrf(request, await _form_token(request))
        return who

    return dependency
