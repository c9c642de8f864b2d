"""A real console for one test: the FastAPI app served by uvicorn on a free port, over a real store."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ecgbridge.core.accounts import AccountStore, Role
from ecgbridge.core.live import LiveSettings
from ecgbridge.core.queue import Dispatcher, make_celery
from ecgbridge.core.reload import reload_settings
from ecgbridge.core.settings import load_settings
from ecgbridge.core.store import MessageStore
from ecgbridge.gateway.console.context import ConsoleContext
from ecgbridge.gateway.console.server import ConsoleServer

from .processes import write_config

__all__ = ["Console", "running_console", "login", "csrf_of", "PASSWORD"]

PASSWORD = "correct horse battery staple"


@dataclass
class Console:
    url: str
    config: Path
    store: MessageStore
    accounts: AccountStore
    live: LiveSettings
    ctx: ConsoleContext
    server: ConsoleServer

    @contextmanager
    def client(self, user: str | None = None) -> Iterator[httpx.Client]:
        """An HTTP client; signed in as ``user`` (password :data:`PASSWORD`) when given."""
        with httpx.Client(base_url=self.url, timeout=30, follow_redirects=False) as client:
            if user is not None:
                login(client, user)
            yield client


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token on the page"
    return match.group(1)


def login(client: httpx.Client, user: str, password: str = PASSWORD) -> str:
    """Sign in through the form; returns the session's CSRF token."""
    answer = client.post("/login", data={"username": user, "password": password, "next": "/"})
    assert answer.status_code == 303, answer.text[:500]
    return csrf_of(client.get("/").text)


@contextmanager
def running_console(
    tmp_path: Path,
    *,
    broker_url: str | None = None,
    config: dict[str, Any] | None = None,
    users: dict[str, Role] | None = None,
) -> Iterator[Console]:
    """A console on 127.0.0.1:<free port>; users (password :data:`PASSWORD`) created first.

    Without ``broker_url`` the queue points at a closed port: enqueueing then fails the way
    a broker outage does (the store keeps the work for the recovery sweep).
    """
    # A dead broker: a port bound but never listening, so connections are refused at once and no
    # other server of the test (the console itself on port 0) can take it meanwhile.
    dead = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    dead.bind(("127.0.0.1", 0))
    cfg: dict[str, Any] = {
        "data_dir": str(tmp_path / "data"),
        "broker": {"url": broker_url or f"redis://127.0.0.1:{dead.getsockname()[1]}/0"},
        "console": {"host": "127.0.0.1", "port": 0},
        **(config or {}),
    }
    path = write_config(tmp_path / "ecgbridge.yaml", cfg)
    settings = load_settings(path)
    store = MessageStore(settings.database_url, settings.data_dir)
    store.create_schema()
    accounts = AccountStore(store)
    for name, role in (users or {"admin": Role.ADMIN, "operator": Role.OPERATOR, "viewer": Role.VIEWER}).items():
        accounts.create_user(name, PASSWORD, role)
    live = LiveSettings(settings)

    def reload(actor: str = "system", remote_addr: str | None = None) -> Any:
        return reload_settings(live, accounts, actor=actor, remote_addr=remote_addr)

    ctx = ConsoleContext(live, store, Dispatcher(make_celery(settings)), accounts, reload=reload)
    server = ConsoleServer(ctx)
    server.start()
    try:
        yield Console(f"http://127.0.0.1:{server.port}", path, store, accounts, live, ctx, server)
    finally:
        server.stop()
        dead.close()
