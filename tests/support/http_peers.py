"""Small real HTTP peers for the EHR context tests: a slow server, a fault-injecting
proxy in front of the FHIR test server, and a SMART Backend Services token endpoint.

Each listens on 127.0.0.1 on a free port in a daemon thread (``with Peer() as p:``).
They are test infrastructure; nothing in ecgbridge imports them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

FHIR_JSON = "application/fhir+json"

Reply = tuple[int, dict[str, str], bytes]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a peer that sleeps must not hold up stop()


class HttpPeer:
    """A ThreadingHTTPServer whose requests go to ``self.handle(method, path, headers, body)``."""

    def __init__(self) -> None:
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                peer.requests.append((self.command, self.path))
                try:
                    status, headers, payload = peer.handle(self.command, self.path, dict(self.headers), body)
                except BrokenPipeError:
                    return
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

        self.requests: list[tuple[str, str]] = []
        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Reply:
        raise NotImplementedError

    def start(self) -> HttpPeer:
        self._thread = threading.Thread(target=self._server.serve_forever, name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> HttpPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def json_reply(status: int, body: Any, content_type: str = FHIR_JSON) -> Reply:
    return status, {"Content-Type": content_type}, json.dumps(body).encode()


class SlowPeer(HttpPeer):
    """Answers every request with an empty searchset, but only after ``delay_s``."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Reply:
        time.sleep(self.delay_s)
        return json_reply(200, {"resourceType": "Bundle", "type": "searchset", "total": 0, "entry": []})


class FaultProxy(HttpPeer):
    """Forwards to a real FHIR server, except for resource types listed in ``faults``; ``delay_s``
    holds every request that long first (a stand-in for a real EHR's FHIR API, 100-300 ms).

    ``faults`` maps a resource type to (status, body) answered instead; ``otherwise``, when
    given, is answered to every other request (a server that refuses everything: no upstream
    needed); ``smart_configuration`` is served at ``<base>/.well-known/smart-configuration``.
    The Host header is rewritten to the proxy's, so the server's next links come back through
    the proxy.
    """

    def __init__(
        self,
        upstream_origin: str,
        *,
        base_path: str = "/fhir/R4",
        faults: Mapping[str, tuple[int, dict[str, Any]]] | None = None,
        smart_configuration: dict[str, Any] | None = None,
        otherwise: tuple[int, dict[str, Any]] | None = None,
        delay_s: float = 0.0,
    ) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.upstream = upstream_origin.rstrip("/")
        self.base_path = base_path
        self.faults = dict(faults or {})
        self.otherwise = otherwise
        self.smart_configuration = smart_configuration
        self._http = httpx.Client(timeout=30)

    @property
    def base_url(self) -> str:
        return f"{self.origin}{self.base_path}"

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Reply:
        if self.delay_s:  # a real EHR's FHIR API: every answer takes this long
            time.sleep(self.delay_s)
        route = urlsplit(path).path[len(self.base_path) :].strip("/")
        if route == ".well-known/smart-configuration" and self.smart_configuration is not None:
            return json_reply(200, self.smart_configuration, "application/json")
        resource_type = route.split("/")[0]
        if resource_type in self.faults:
            status, outcome = self.faults[resource_type]
            return json_reply(status, outcome)
        if self.otherwise is not None:
            return json_reply(*self.otherwise)
        forward = {
            k: v
            for k, v in headers.items()
            if k.lower() in ("accept", "authorization", "content-type", "prefer", "if-none-exist", "if-match")
        }
        forward["Host"] = f"127.0.0.1:{self.port}"
        resp = self._http.request(method, self.upstream + path, headers=forward, content=body or None)
        out = {k: v for k, v in resp.headers.items() if k.lower() in ("content-type", "location", "www-authenticate")}
        return resp.status_code, out, resp.content

    def stop(self) -> None:
        super().stop()
        self._http.close()


class SmartTokenEndpoint(HttpPeer):
    """A SMART Backend Services token endpoint that really checks the client assertion.

    It verifies the JWT signature with ``public_key_pem`` (PyJWT), ``kid``, ``aud`` (its own
    URL), ``iss`` = ``sub`` = ``client_id``, ``exp`` at most 5 minutes ahead and a fresh
    ``jti``; then it issues the next of ``tokens`` (the last one repeats). Anything wrong:
    401 ``invalid_client`` with the reason in ``error_description``.
    """

    def __init__(
        self, *, public_key_pem: bytes, client_id: str, key_id: str, tokens: list[str], expires_in: int = 300
    ) -> None:
        super().__init__()
        self.public_key_pem = public_key_pem
        self.client_id = client_id
        self.key_id = key_id
        self.tokens = list(tokens)
        self.expires_in = expires_in
        self.issued = 0
        self.seen_jti: set[str] = set()
        self.claims: list[dict[str, Any]] = []
        self.scopes: list[str] = []

    @property
    def token_url(self) -> str:
        return f"{self.origin}/auth/token"

    def _refuse(self, why: str, error: str = "invalid_client") -> Reply:
        return json_reply(
            401 if error == "invalid_client" else 400, {"error": error, "error_description": why}, "application/json"
        )

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Reply:
        import jwt

        if method != "POST" or urlsplit(path).path != "/auth/token":
            return json_reply(404, {"error": "not_found"}, "application/json")
        form = {k: v[-1] for k, v in parse_qs(body.decode()).items()}
        if form.get("grant_type") != "client_credentials":
            return self._refuse("grant_type must be client_credentials", "unsupported_grant_type")
        if form.get("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
            return self._refuse("client_assertion_type must be jwt-bearer", "invalid_request")
        assertion = form.get("client_assertion", "")
        try:
            header = jwt.get_unverified_header(assertion)
            if header.get("kid") != self.key_id:
                return self._refuse(f"unknown kid {header.get('kid')!r}")
            claims = jwt.decode(
                assertion,
                self.public_key_pem,
                algorithms=["RS384", "ES384"],
                audience=self.token_url,
                issuer=self.client_id,
                options={"require": ["exp", "iss", "sub", "aud", "jti"]},
            )
        except jwt.PyJWTError as exc:
            return self._refuse(f"client assertion rejected: {exc}")
        if claims["sub"] != self.client_id:
            return self._refuse("sub must equal the client id")
        if claims["exp"] - time.time() > 305:
            return self._refuse("exp is more than 5 minutes ahead")
        if claims["jti"] in self.seen_jti:
            return self._refuse("jti was used before")
        self.seen_jti.add(claims["jti"])
        self.claims.append(claims)
        self.scopes.append(form.get("scope", ""))
        token = self.tokens[min(self.issued, len(self.tokens) - 1)]
        self.issued += 1
        return json_reply(
            200,
            {
                "access_token": token,
                "token_type": "bearer",
                "expires_in": self.expires_in,
                "scope": form.get("scope", ""),
            },
            "application/json",
        )


def closed_port_url() -> str:
    """A base URL on a port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/fhir/R4"


__all__ = ["HttpPeer", "SlowPeer", "FaultProxy", "SmartTokenEndpoint", "closed_port_url", "json_reply"]
