"""What an operator may do to messages: retry a delivery, replay a destination's dead letters.

Each action only changes state and enqueues ids; the worker's idempotent jobs do the
work, so replaying a delivery that meanwhile succeeded sends nothing twice. Every
action records an event on the message (the console also audits who asked).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select

from ecgbridge.core.queue import Dispatcher
from ecgbridge.core.retention import CONTENT_PRUNED
from ecgbridge.core.settings import Settings
from ecgbridge.core.states import DeliveryState, MessageState
from ecgbridge.core.store import DeliveryRow, MessageRow, MessageStore
from ecgbridge.errors import ConfigError, EcgBridgeError, StorageError

__all__ = [
    "ActionError",
    "Replay",
    "Reroute",
    "retry_delivery",
    "dead_letters",
    "replay_dead_letters",
    "reroute_unrouted",
]


class ActionError(EcgBridgeError):
    """An operator action that cannot be done as asked (unknown message, removed destination, ...)."""

    def __init__(self, message: str, *, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Replay:
    """What a bulk replay did (or, in a dry run, would do)."""

    destination: str
    dry_run: bool
    message_ids: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.message_ids)


def _check_destination(settings: Settings, destination: str) -> None:
    try:
        settings.destination(destination)
    except ConfigError:
        raise ActionError(
            f"destination {destination!r} is no longer in the configuration: add it back (and reload) "
            "before replaying to it"
        ) from None


def retry_delivery(
    store: MessageStore,
    dispatcher: Dispatcher,
    settings: Settings,
    message_id: str,
    destination: str,
    *,
    reason: str = "retried by an operator",
) -> None:
    """Put one failed or dead-lettered delivery back to pending and enqueue it."""
    row = store.get(message_id)
    if row is None:
        raise ActionError(f"no message {message_id}", status=404)
    if CONTENT_PRUNED in (row.flags or []):
        raise ActionError(f"message {message_id}'s content was deleted by retention: nothing to deliver", status=410)
    delivery = store.delivery(message_id, destination)
    if delivery is None:
        raise ActionError(f"message {message_id} has no delivery to {destination!r}", status=404)
    if delivery.state == DeliveryState.DELIVERED:
        raise ActionError(f"the delivery to {destination!r} already succeeded ({delivery.remote_ref})")
    _check_destination(settings, destination)
    store.update_delivery(message_id, destination, state=DeliveryState.PENDING, count_attempt=False)
    store.reset_attempts(message_id, destination)
    if row.state == MessageState.FAILED and store.get_result(message_id) is not None:
        store.set_state(message_id, MessageState.ANALYSED)
    store.add_event(message_id, "delivery_replayed", f"{destination}: {reason}", level="info")
    try:
        dispatcher.deliver(message_id, destination)
    except StorageError as exc:  # pending in the store: the gateway's recovery sweep enqueues it
        store.add_event(message_id, "enqueue_failed", str(exc), level="warning")


def dead_letters(store: MessageStore, destination: str | None = None, *, limit: int = 10_000) -> list[DeliveryRow]:
    """Dead-lettered deliveries (oldest first), of one destination or all."""
    with store.session() as s:
        q = select(DeliveryRow).where(DeliveryRow.state == DeliveryState.DEAD.value)
        if destination:
            q = q.where(DeliveryRow.destination == destination)
        return list(s.scalars(q.order_by(DeliveryRow.updated_at).limit(limit)))


def replay_dead_letters(
    store: MessageStore, dispatcher: Dispatcher, settings: Settings, destination: str, *, dry_run: bool = True
) -> Replay:
    """Every dead letter of ``destination`` back to pending and enqueued; a dry run only counts them."""
    _check_destination(settings, destination)
    replay = Replay(destination, dry_run, [d.message_id for d in dead_letters(store, destination)])
    if dry_run:
        return replay
    for message_id in list(replay.message_ids):
        try:
            retry_delivery(store, dispatcher, settings, message_id, destination, reason="bulk replay of dead letters")
        except EcgBridgeError as exc:
            replay.failed[message_id] = str(exc)
    return replay


@dataclass
class Reroute:
    """What routing the unrouted messages again did."""

    routed: int = 0
    unrouted: int = 0
    unreadable: int = 0
    by_route: dict[str, int] = field(default_factory=dict)

    def text(self) -> str:
        parts = [f"{self.routed} message(s) routed and queued for analysis"]
        parts += [f"{n} to {name}" for name, n in sorted(self.by_route.items())]
        parts.append(f"{self.unrouted} still match no route")
        if self.unreadable:
            parts.append(f"{self.unreadable} could not be read again")
        return "; ".join(parts) + "."


def reroute_unrouted(
    store: MessageStore, dispatcher: Dispatcher, settings: Settings, *, dry_run: bool = False, limit: int = 10_000
) -> Reroute:
    """Route every ``unrouted`` message with the routes in force; the matched ones are analysed."""
    from ecgbridge.core.explain import facts_from_message
    from ecgbridge.core.routing import match_route

    outcome = Reroute()
    with store.session() as s:
        ids = list(
            s.scalars(
                select(MessageRow.id)
                .where(MessageRow.state == MessageState.UNROUTED.value)
                .order_by(MessageRow.received_at)
                .limit(limit)
            )
        )
    for message_id in ids:
        row = store.get(message_id)
        if row is None or CONTENT_PRUNED in (row.flags or []):
            outcome.unreadable += 1
            continue
        try:
            facts = facts_from_message(store, message_id).facts
        except EcgBridgeError:
            outcome.unreadable += 1
            continue
        route = match_route(settings.routes, facts)
        if route is None:
            outcome.unrouted += 1
            continue
        outcome.routed += 1
        outcome.by_route[route.name] = outcome.by_route.get(route.name, 0) + 1
        if dry_run:
            continue
        store.set_state(message_id, MessageState.RECEIVED, route=route.name)
        store.add_event(
            message_id, "rerouted", f"routed again after a configuration change: route {route.name}", level="info"
        )
        try:
            dispatcher.analyse(message_id)
            store.set_state(message_id, MessageState.QUEUED)
        except StorageError as exc:
            store.add_event(message_id, "enqueue_failed", str(exc), level="warning")
    return outcome


@dataclass
class Reanalysis:
    """A re-analysis request: the result version it asks for; ``joined`` when one was already waiting."""

    message_id: str
    version: int
    joined: bool


def reanalyse(
    store: MessageStore,
    dispatcher: Dispatcher,
    settings: Settings,
    message_id: str,
    *,
    requested_by: str,
    reason: str | None = None,
) -> Reanalysis:
    """Ask for the next result version of an analysed message, made with its route's current models.

    The request is a ``result_versions`` row and the message goes back to ``queued``; the
    worker's analyse task (same task name, same arguments) finds the waiting version, saves
    it and moves the route's deliveries on to it. Asking while a version waits joins it and
    enqueues again, so a double click or a retried request makes one version; a lost task is
    found by the gateway's recovery sweep like any queued message.
    """
    row = store.get(message_id)
    if row is None:
        raise ActionError(f"no message {message_id}", status=404)
    if store.get_result(message_id) is None:
        raise ActionError(f"message {message_id} has no result to re-analyse (state {row.state})")
    if not store.blobs.path(row.blob_sha256).exists():
        raise ActionError(
            f"the ECG of message {message_id} is no longer in the store: nothing to re-analyse", status=410
        )
    if row.route is None or not any(r.name == row.route for r in settings.routes):
        raise ActionError(
            f"the message's route {row.route!r} is no longer in the configuration: it cannot be re-analysed"
        )
    version, made = store.request_version(message_id, requested_by=requested_by, reason=reason)
    if made:
        store.add_event(
            message_id, "reanalysis_requested", f"result version {version} requested by {requested_by}", level="info"
        )
    store.set_state(message_id, MessageState.QUEUED)
    try:
        dispatcher.analyse(message_id)
    except StorageError as exc:  # queued in the store: the gateway's recovery sweep enqueues it
        store.add_event(message_id, "enqueue_failed", str(exc), level="warning")
    return Reanalysis(message_id, version, joined=not made)
