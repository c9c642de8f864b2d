"""A TCP forwarder that can be shut like a server that went down, and opened again on the same port.

The soak (``bench/soak.py``) uses it in front of the FHIR test server: Medplum's repository
lives in its process's memory, so stopping that process would also forget every report it
holds, and a report written again after the restart could not be told from a duplicate.
Shutting the gate instead gives ecgbridge what a stopped server gives it (connections
refused, open connections reset) while the EHR keeps its records.
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType

from .processes import free_port

__all__ = ["TcpGate"]


class TcpGate:
    """Forwards ``127.0.0.1:port`` to ``upstream_port``; ``shut()`` refuses, ``open()`` forwards again."""

    def __init__(self, upstream_port: int, port: int | None = None) -> None:
        self.upstream_port = upstream_port
        self.port = port or free_port()
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._open_sockets: set[socket.socket] = set()

    @property
    def is_open(self) -> bool:
        return self._listener is not None

    def open(self) -> TcpGate:
        with self._lock:
            if self._listener is not None:
                return self
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="tcp-gate", daemon=True).start()
        return self

    def shut(self) -> None:
        """Stop listening and reset every forwarded connection, as a server's crash would."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._open_sockets = self._open_sockets, set()
        if listener is not None:
            listener.close()
        for sock in sockets:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                sock.close()  # linger 0: the peer gets a reset
            except OSError:
                pass

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # shut
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # shut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._open_sockets |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), name="tcp-gate-pump", daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            with self._lock:
                self._open_sockets -= {source, sink}

    def __enter__(self) -> TcpGate:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shut()
