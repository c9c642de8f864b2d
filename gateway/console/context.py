"""What the console's routes need, passed in once (no globals): settings, store, queue, accounts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fastapi import Request

from ecgbridge.core.accounts import AccountStore, Principal
from ecgbridge.core.live import LiveSettings
from ecgbridge.core.queue import Dispatcher
from ecgbridge.core.settings import Settings
from ecgbridge.core.store import MessageStore

__all__ = ["ConsoleContext", "context_of"]


@dataclass
class ConsoleContext:
    live: LiveSettings
    store: MessageStore
    dispatcher: Dispatcher
    accounts: AccountStore
    #: listener name -> whether it is up now (dashboard, /metrics ``ecgbridge_listener_up``).
    listeners: dict[str, Callable[[], bool]] = field(default_factory=dict)
    #: Reload the configuration file (hot reload): returns what the reload did.
    reload: Callable[..., Any] | None = None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def settings(self) -> Settings:
        return self.live.current

    def audit(
        self,
        who: Principal | None,
        action: str,
        request: Request | None = None,
        *,
        target: str | None = None,
        outcome: str = "ok",
        detail: dict[str, Any] | None = None,
        note: str | None = None,
    ) -> None:
        """One audit row: who (or "anonymous"), what, on what, from where."""
        self.accounts.audit(
            who.name if who else "anonymous",
            action,
            target=target,
            role=who.role.value if who else None,
            outcome=outcome,
            remote_addr=request.client.host if request is not None and request.client else None,
            detail=detail,
            note=note,
        )


def context_of(request: Request) -> ConsoleContext:
    ctx: ConsoleContext = request.app.state.ctx
    return ctx
