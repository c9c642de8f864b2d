"""``admit()``: the one way a stored inbound ECG enters the pipeline, whichever listener took it.

A listener's job ends once the bytes are on disk (fsync) and it has read what routing
may look at; from there every listener calls :meth:`Intake.admit`, which

1. matches the route (first match wins; deny by default),
2. records the message as ``received`` (routed) or ``unrouted`` (kept, never analysed),
3. for an unrouted message, records an ``unrouted`` event saying what was looked at,
4. enqueues the message id for analysis and marks it ``queued``; a broker that does not
   take it leaves the message ``received`` with an ``enqueue_failed`` event, and the
   gateway's recovery sweep enqueues it later.

The sender is answered success only after ``admit`` returned: the message is then
durable, whatever happens to the broker. :meth:`Intake.reject` records what a listener
refused (bytes kept, ``rejected``, an error event) so IT staff can see and replay it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ecgbridge.core.live import SettingsSource, current
from ecgbridge.core.queue import Dispatcher
from ecgbridge.core.routing import MessageFacts, match_route
from ecgbridge.core.settings import Route, Settings
from ecgbridge.core.states import MessageState
from ecgbridge.core.store import MessageStore
from ecgbridge.errors import StorageError

__all__ = ["Arrival", "Admission", "Intake"]

log = logging.getLogger("ecgbridge.intake")


@dataclass(frozen=True)
class Arrival:
    """A stored inbound message and what the listener read of it (no patient data)."""

    facts: MessageFacts
    blob_sha256: str
    blob_size: int
    remote: str | None = None
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    flags: Sequence[str] = ()
    placer_order_number: str | None = None
    filler_order_number: str | None = None
    message_type: str | None = None

    @property
    def source(self) -> str:
        return self.facts.source


@dataclass(frozen=True)
class Admission:
    """What ``admit`` did: the message id, its route (None: unrouted) and whether it is queued."""

    message_id: str
    route: Route | None
    queued: bool


class Intake:
    """The settings, store and dispatcher a listener hands every message to."""

    def __init__(self, settings: SettingsSource, store: MessageStore, dispatcher: Dispatcher) -> None:
        self._settings = settings
        self.store = store
        self.dispatcher = dispatcher

    @property
    def settings(self) -> Settings:
        """The configuration in force now (a hot reload changes the routes of the next message)."""
        return current(self._settings)

    def admit(self, arrival: Arrival, *, on_recorded: Callable[[str], None] | None = None) -> Admission:
        """Route, record, enqueue; ``on_recorded(message_id)`` runs between the record and the enqueue."""
        route = match_route(self.settings.routes, arrival.facts)
        state = MessageState.RECEIVED if route else MessageState.UNROUTED
        message_id = self._record(arrival, state, route=route.name if route else None)
        if on_recorded is not None:
            on_recorded(message_id)
        if route is None:
            self.store.add_event(
                message_id, "unrouted", f"no route matches {arrival.facts.describe()}", level="warning"
            )
            return Admission(message_id, None, queued=False)
        try:
            self.dispatcher.analyse(message_id)
            self.store.set_state(message_id, MessageState.QUEUED)
        except StorageError as exc:
            # Safe on disk: the gateway's recovery sweep enqueues it when the broker is back.
            self.store.add_event(message_id, "enqueue_failed", str(exc), level="warning")
            return Admission(message_id, route, queued=False)
        return Admission(message_id, route, queued=True)

    def reject(self, arrival: Arrival, error: str, kind: str) -> str:
        """Record a refused message (bytes kept, state ``rejected``) and its error event; its id."""
        message_id = self._record(arrival, MessageState.REJECTED, error=error)
        self.store.add_event(message_id, kind, error)
        return message_id

    def _record(
        self, arrival: Arrival, state: MessageState, *, route: str | None = None, error: str | None = None
    ) -> str:
        return self.store.record_message(
            source=arrival.source,
            remote=arrival.remote,
            sop_class_uid=arrival.sop_class_uid,
            sop_instance_uid=arrival.sop_instance_uid,
            blob_sha256=arrival.blob_sha256,
            blob_size=arrival.blob_size,
            state=state,
            route=route,
            error=error,
            flags=list(arrival.flags),
            placer_order_number=arrival.placer_order_number,
            filler_order_number=arrival.filler_order_number,
            message_type=arrival.message_type,
        )
