"""Serving the console with uvicorn in a thread of the gateway process."""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

from ecgbridge.core.tls import listener_context
from ecgbridge.gateway.console.app import create_app
from ecgbridge.gateway.console.context import ConsoleContext

__all__ = ["ConsoleServer"]

log = logging.getLogger("ecgbridge.console")


class ConsoleServer:
    """The console on ``console.host:console.port``; ``start()`` returns once it listens."""

    def __init__(self, ctx: ConsoleContext) -> None:
        self.ctx = ctx
        console = ctx.settings.console
        self.app = create_app(ctx)
        config = uvicorn.Config(
            self.app,
            host=console.host,
            port=console.port,
            log_level="warning",
            access_log=False,  # query strings may hold search terms (names, ids): no access log
            server_header=False,
            lifespan="off",
        )
        if console.tls is not None:
            # uvicorn's own TLS options cannot set the minimum version or the cipher list: load
            # its config first, then put in the context every ecgbridge listener uses.
            config.load()
            config.ssl = listener_context(console.tls, "console.tls")
        self.scheme = "https" if console.tls is not None else "http"
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        for server in self._server.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return self.ctx.settings.console.port

    def start(self, timeout_s: float = 15.0) -> None:
        self._thread = threading.Thread(target=self._server.run, name="console", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the console did not start on {self.ctx.settings.console.host}:"
                    f"{self.ctx.settings.console.port} (port in use?)"
                )
            time.sleep(0.05)
        log.info("console on %s://%s:%d/", self.scheme, self.ctx.settings.console.host, self.port)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
