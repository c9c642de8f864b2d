"""Start the test OpenID Connect provider in ``tests/oidc_provider`` (panva's ``oidc-provider``).

One confidential client with one redirect URI, PKCE required, the provider's own login and
consent pages, and test accounts with a ``groups`` claim (``tests/oidc_provider/server.mjs``).
State lives only in the Node process. Typical use::

    require_provider()  # skips locally, fails in CI, when the provider cannot run
    with OidcProvider(redirect_uri) as provider:
        ...  # provider.issuer, provider.client_id, provider.client_secret

Requires ``node`` (>= 20.19) on PATH and ``npm ci --prefix tests/oidc_provider``.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx

from .node_peer import node_executable, node_unavailable
from .peers import need
from .processes import free_port

__all__ = ["OidcProvider", "OidcProviderError", "provider_available", "require_provider", "ACCOUNTS", "INSTALL_HINT"]

SERVER_DIR = Path(__file__).resolve().parent.parent / "oidc_provider"
SERVER_SCRIPT = SERVER_DIR / "server.mjs"
INSTALL_HINT = "run `npm ci --prefix tests/oidc_provider` from the repository root"
#: The accounts server.mjs knows, with their groups (any password is accepted).
ACCOUNTS = {
    "alice": ["ecg-admins", "staff"],
    "oscar": ["ecg-operators"],
    "victor": ["ecg-viewers"],
    "carol": ["cafeteria"],
}


class OidcProviderError(RuntimeError):
    """The test OpenID Connect provider could not be started."""


def _node() -> str | None:
    return node_executable("OIDC_PEER_NODE")


def provider_available() -> str | None:
    """``None`` when the provider can run, else why not (for :func:`tests.support.peers.need`)."""
    return node_unavailable(
        "OIDC_PEER_NODE",
        "the OpenID Connect test provider",
        SERVER_DIR / "node_modules" / "oidc-provider",
        INSTALL_HINT,
    )


def require_provider() -> None:
    """Return when the provider can run; else :func:`tests.support.peers.need` (skip locally, fail in CI)."""
    reason = provider_available()
    if reason:
        need(reason)


class OidcProvider:
    """A running ``oidc-provider`` on 127.0.0.1 (its port chosen here unless given), issuer ``http://127.0.0.1:PORT``."""

    def __init__(
        self,
        redirect_uri: str,
        port: int | None = None,
        *,
        client_id: str = "ecgbridge-console",
        startup_timeout: float = 30.0,
    ) -> None:
        self.redirect_uri = redirect_uri
        self.port = port or free_port()
        self.client_id = client_id
        self.client_secret = secrets.token_urlsafe(24)
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_dir = Path(tempfile.mkdtemp(prefix="oidc-peer-"))

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OidcProvider:
        """Spawn ``node server.mjs PORT REDIRECT_URI`` and wait until discovery answers."""
        reason = provider_available()
        if reason is not None:
            raise OidcProviderError(reason)
        node = _node()
        assert node is not None
        env = {**os.environ, "OIDC_CLIENT_ID": self.client_id, "OIDC_CLIENT_SECRET": self.client_secret}
        # output to files (nobody drains a pipe); stdin stays open so the server exits if this process dies
        with open(self._log_dir / "stdout.log", "ab") as out, open(self._log_dir / "stderr.log", "ab") as err:
            self._proc = subprocess.Popen(
                [node, str(SERVER_SCRIPT), str(self.port), self.redirect_uri],
                cwd=SERVER_DIR,
                env=env,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        # ready = our process said it listens (not some other process on the port) and discovery answers
        deadline = time.monotonic() + self.startup_timeout
        last = "no answer yet"
        with httpx.Client(timeout=2.0) as client:
            while True:
                assert self._proc is not None
                code = self._proc.poll()
                if code is not None:
                    raise OidcProviderError(f"the OIDC test provider exited with status {code}.\n{self.output()}")
                if b"oidc-provider: listening on " in (self._log_dir / "stdout.log").read_bytes():
                    try:
                        resp = client.get(f"{self.issuer}/.well-known/openid-configuration")
                        if resp.status_code == 200:
                            return
                        last = f"discovery answered {resp.status_code}"
                    except httpx.TransportError as exc:
                        last = f"{type(exc).__name__}: {exc}"
                if time.monotonic() > deadline:
                    raise OidcProviderError(
                        f"the OIDC test provider was not ready after {self.startup_timeout:.0f} s ({last}).\n"
                        f"{self.output()}"
                    )
                time.sleep(0.05)

    def output(self) -> str:
        """What the provider wrote (stderr, then stdout), for failure messages."""
        parts = []
        for name in ("stderr.log", "stdout.log"):
            path = self._log_dir / name
            if path.exists():
                parts.append(f"--- {name} ---\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    def stop(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)

    def __enter__(self) -> OidcProvider:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
