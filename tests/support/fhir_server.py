"""Start and talk to the test FHIR R4 peer in ``tests/fhir_server``.

The peer is Medplum's ``@medplum/fhir-router`` with its in-memory repository behind
a small Node HTTP adapter (see ``tests/fhir_server/README.md``). Data lives only in
the Node process: stopping the server discards everything.

Typical fixture::

    @pytest.fixture(scope="session")
    def fhir_server():
        require_node()  # skips locally, fails in CI, when the peer cannot run
        with FhirServer() as server:
            yield server

Requires ``node`` (>= 20.19) on PATH and ``npm ci --prefix tests/fhir_server``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from .node_peer import node_executable, node_unavailable
from .peers import need

SERVER_DIR = Path(__file__).resolve().parent.parent / "fhir_server"
SERVER_SCRIPT = SERVER_DIR / "server.mjs"
BASE_PATH = "/fhir/R4"
INSTALL_HINT = "run `npm ci --prefix tests/fhir_server` from the repository root"

_ParamValue = str | int | float | Iterable[str | int | float]


class FhirServerError(RuntimeError):
    """The test FHIR server could not be started or answered unexpectedly."""


def _node_executable() -> str | None:
    return node_executable("FHIR_PEER_NODE")


def node_available() -> str | None:
    """Return ``None`` when the peer can run, else why not (for :func:`tests.support.peers.need`)."""
    return node_unavailable(
        "FHIR_PEER_NODE",
        "the FHIR R4 test peer",
        SERVER_DIR / "node_modules" / "@medplum" / "fhir-router",
        INSTALL_HINT,
    )


def require_node() -> None:
    """Return when the peer can run; else :func:`tests.support.peers.need` (skip locally, fail in CI)."""
    reason = node_available()
    if reason:
        need(f"FHIR server peer unavailable: {reason}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # same as Node's listen(): TIME_WAIT leftovers of a stopped server do not count
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def _tail(path: Path | None, limit: int = 4000) -> str:
    if path is None or not path.exists():
        return ""
    data = path.read_bytes()[-limit:]
    return data.decode("utf-8", errors="replace").strip()


class FhirServer:
    """A running (or startable) instance of the in-memory FHIR R4 peer.

    The port is chosen once (on the first ``start()`` when not given) and kept, so
    ``stop()`` followed by ``start()`` brings the server back on the same URL, empty.
    """

    def __init__(
        self,
        port: int | None = None,
        bearer: str | None = None,
        *,
        validate: bool = False,
        search_handling: str = "strict",
        startup_timeout: float = 30.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if search_handling not in ("strict", "lenient"):
            raise ValueError("search_handling must be 'strict' or 'lenient'")
        self._port = port
        self.bearer = bearer
        self.validate = validate
        self.search_handling = search_handling
        self.startup_timeout = startup_timeout
        self._extra_env = dict(env or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_dir: Path | None = None
        self._stdout_path: Path | None = None
        self._stderr_path: Path | None = None
        self._stdout_offset = 0
        self.startup_seconds: float | None = None

    # -- addresses ---------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            self._port = free_port()
        return self._port

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """FHIR base URL, e.g. ``http://127.0.0.1:PORT/fhir/R4`` (no trailing slash)."""
        return f"{self.origin}{BASE_PATH}"

    @property
    def headers(self) -> dict[str, str]:
        """Headers a well-behaved client sends (Accept and, if configured, the bearer)."""
        headers = {"Accept": "application/fhir+json"}
        if self.bearer:
            headers["Authorization"] = f"Bearer {self.bearer}"
        return headers

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> FhirServer:
        """Spawn ``node server.mjs`` and wait until ``/metadata`` answers 200."""
        if self.running:
            return self
        reason = node_available()
        if reason is not None:
            raise FhirServerError(reason)
        node = _node_executable()
        assert node is not None

        if self._log_dir is None:
            self._log_dir = Path(tempfile.mkdtemp(prefix="fhir-peer-"))
        self._stdout_path = self._log_dir / "stdout.log"
        self._stderr_path = self._log_dir / "stderr.log"

        env = dict(os.environ)
        env.pop("FHIR_REQUIRE_BEARER", None)
        env.update(
            FHIR_PORT=str(self.port),
            FHIR_HOST="127.0.0.1",
            FHIR_SEARCH_HANDLING=self.search_handling,
            FHIR_VALIDATE="1" if self.validate else "0",
            FHIR_EXIT_ON_STDIN_CLOSE="1",
        )
        if self.bearer:
            env["FHIR_REQUIRE_BEARER"] = self.bearer
        env.update(self._extra_env)

        # Output goes to files, not pipes: nobody drains a pipe during a test run and a
        # full pipe would block the Node event loop. stdin stays an open pipe so that the
        # server exits by itself if this Python process dies without calling stop().
        if _port_in_use(self.port):
            raise FhirServerError(f"cannot start the FHIR test server: 127.0.0.1:{self.port} is already in use")
        started = time.monotonic()
        self._stdout_offset = self._stdout_path.stat().st_size if self._stdout_path.exists() else 0
        with open(self._stdout_path, "ab") as out, open(self._stderr_path, "ab") as err:
            self._proc = subprocess.Popen(
                [node, str(SERVER_SCRIPT), str(self.port)],
                cwd=SERVER_DIR,
                env=env,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
            )
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _wait_ready(self, started: float) -> None:
        """Ready = our process printed its "listening" line and GET /metadata gives 200.

        The stdout line matters: before it, an answer on the port would come from some
        other process that grabbed the port.
        """
        deadline = started + self.startup_timeout
        last_error = "no answer yet"
        with httpx.Client(timeout=2.0) as client:
            while True:
                assert self._proc is not None
                code = self._proc.poll()
                if code is not None:
                    raise FhirServerError(
                        f"FHIR test server exited with status {code} before it was ready "
                        f"(port {self.port}).\n{self._diagnostics()}"
                    )
                if not self._announced_listening():
                    last_error = "server has not started listening yet"
                else:
                    try:
                        resp = client.get(f"{self.base_url}/metadata", headers=self.headers)
                        if resp.status_code == 200:
                            return
                        last_error = f"GET /metadata answered {resp.status_code}"
                    except httpx.TransportError as exc:
                        last_error = f"{type(exc).__name__}: {exc}"
                if time.monotonic() > deadline:
                    raise FhirServerError(
                        f"FHIR test server not ready after {self.startup_timeout:.0f}s on port "
                        f"{self.port} ({last_error}).\n{self._diagnostics()}"
                    )
                time.sleep(0.05)

    def _announced_listening(self) -> bool:
        if self._stdout_path is None or not self._stdout_path.exists():
            return False
        with open(self._stdout_path, "rb") as fh:
            fh.seek(self._stdout_offset)
            return b"fhir-peer: listening on " in fh.read()

    def _diagnostics(self) -> str:
        parts = []
        err = _tail(self._stderr_path)
        out = _tail(self._stdout_path, 1500)
        if err:
            parts.append(f"--- server stderr (tail) ---\n{err}")
        if out:
            parts.append(f"--- server stdout (tail) ---\n{out}")
        return "\n".join(parts) or "(the server wrote nothing)"

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after ``timeout`` seconds)."""
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

    def restart(self) -> FhirServer:
        """Stop and start again on the same port (with an empty store)."""
        self.stop()
        return self.start()

    def logs(self) -> str:
        """Everything the server wrote to stdout (one line per request) so far."""
        return self._stdout_path.read_text(errors="replace") if self._stdout_path else ""

    def stderr(self) -> str:
        return self._stderr_path.read_text(errors="replace") if self._stderr_path else ""

    def __enter__(self) -> FhirServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __del__(self) -> None:  # best effort; tests should call stop() / use `with`
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"FhirServer({self.base_url!r}, {state})"

    # -- HTTP convenience ----------------------------------------------------------

    def client(self, **kwargs: Any) -> httpx.Client:
        """An ``httpx.Client`` rooted at the FHIR base, with Accept/Authorization set."""
        headers = {**self.headers, **kwargs.pop("headers", {})}
        kwargs.setdefault("timeout", 10.0)
        return httpx.Client(base_url=self.base_url + "/", headers=headers, **kwargs)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send one request to ``<base_url>/<path>``; returns the response as is."""
        with self.client() as client:
            return client.request(method, path.lstrip("/"), **kwargs)

    def search(
        self,
        resource_type: str,
        params: Mapping[str, _ParamValue] | Iterable[tuple[str, str]] | None = None,
        **kwargs: _ParamValue,
    ) -> dict[str, Any]:
        """``GET <base>/<resource_type>?...`` and return the searchset Bundle.

        Keyword arguments become query parameters (``identifier="sys|val"``, ``_count=5``);
        a list value repeats the parameter. Names that are not Python identifiers
        (``"code:text"``, ``"value-quantity"``) go in ``params``.
        """
        query: list[tuple[str, str]] = []
        items: Iterable[tuple[str, Any]]
        if params is None:
            items = []
        elif isinstance(params, Mapping):
            items = params.items()
        else:
            items = params
        for key, value in [*items, *kwargs.items()]:
            values = value if isinstance(value, list | tuple) else [value]
            query.extend((key, str(v)) for v in values)
        resp = self.request("GET", resource_type, params=query)
        return _json_or_raise(resp, f"search {resource_type}")

    def read(self, resource_type: str, resource_id: str | None = None) -> dict[str, Any]:
        """``GET <base>/<Type>/<id>``; also accepts a single ``"Type/id"`` reference."""
        if resource_id is None:
            resource_type, _, resource_id = resource_type.partition("/")
        if not resource_id:
            raise ValueError("read() needs a resource type and an id (or 'Type/id')")
        resp = self.request("GET", f"{resource_type}/{resource_id}")
        return _json_or_raise(resp, f"read {resource_type}/{resource_id}")


def _json_or_raise(resp: httpx.Response, what: str) -> dict[str, Any]:
    if resp.is_success:
        body: dict[str, Any] = resp.json()
        return body
    detail = resp.text[:2000]
    raise FhirServerError(f"{what} failed: HTTP {resp.status_code} {detail}")
