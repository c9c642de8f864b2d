"""Delivering a stored result to one destination: the sender, then the delivery's state.

The job re-reads the delivery's state, so a redelivered task or a recovery sweep never
sends twice what was delivered; senders are idempotent on the receiver's side too
(conditional creates, a stable MSH-10). The outcome is the sender's to classify:
delivered, transient (retried with backoff by the task, dead-lettered after
``delivery.max_attempts``) or permanent (failed, with an error record).
"""

from __future__ import annotations

import logging

from ecgbridge.core.settings import Settings
from ecgbridge.core.states import DeliveryState, MessageState
from ecgbridge.core.store import MessageStore
from ecgbridge.errors import EcgBridgeError, PermanentDeliveryError, TransientDeliveryError
from ecgbridge.mapping.ecg import AnalysisResult
from ecgbridge.outbound.sender import Outgoing
from ecgbridge.worker.jobs import WorkerContext, attachment_bytes, load_ecg

__all__ = ["deliver_message", "dead_letter", "backoff_s"]

log = logging.getLogger("ecgbridge.worker")

_DONE = (DeliveryState.DELIVERED, DeliveryState.FAILED, DeliveryState.DEAD)


def deliver_message(ctx: WorkerContext, message_id: str, destination: str) -> str | None:
    """Write the stored result to one destination; returns the receiver's reference."""
    store = ctx.store
    current = store.delivery(message_id, destination)
    if current is not None and current.state in _DONE:
        return current.remote_ref
    row = store.get(message_id)
    stored = store.get_result(message_id)
    if row is None or stored is None:
        log.error("deliver: message %s has no stored result", message_id)
        return None
    dest = ctx.settings.destination(destination)
    result = AnalysisResult.from_dict(stored.result)
    order = store.order_for_message(row.id)
    outgoing = Outgoing(
        message_id=row.id,
        result=result,
        ecg=load_ecg(store, row),
        attachments=attachment_bytes(store, result),
        order=order.details if order is not None else None,
    )
    try:
        ref = ctx.senders.get(dest).send(outgoing)
    except TransientDeliveryError as exc:
        store.update_delivery(message_id, destination, state=DeliveryState.PENDING, error=str(exc))
        store.add_event(message_id, "delivery_retry", f"{destination}: {exc}", level="warning")
        raise
    except (PermanentDeliveryError, EcgBridgeError) as exc:
        store.update_delivery(message_id, destination, state=DeliveryState.FAILED, error=str(exc))
        store.set_state(message_id, MessageState.FAILED, error=f"delivery to {destination} failed: {exc}")
        store.add_event(message_id, "delivery_failed", f"{destination}: {exc}")
        log.warning("delivery of %s to %s failed permanently", message_id, destination)
        return None
    store.update_delivery(message_id, destination, state=DeliveryState.DELIVERED, remote_ref=ref)
    log.info("delivered message %s to %s as %s", message_id, destination, ref)
    _finish_message(store, message_id)
    return ref


def _finish_message(store: MessageStore, message_id: str) -> None:
    states = {d.state for d in store.deliveries(message_id)}
    if states == {DeliveryState.DELIVERED}:
        store.set_state(message_id, MessageState.DELIVERED)


def dead_letter(ctx: WorkerContext, message_id: str, destination: str, error: str) -> None:
    """Give up on a destination after the last retry; visible in ``ecgbridge messages``."""
    ctx.store.update_delivery(message_id, destination, state=DeliveryState.DEAD, error=error, count_attempt=False)
    ctx.store.set_state(message_id, MessageState.FAILED, error=f"delivery to {destination} dead-lettered: {error}")
    ctx.store.add_event(message_id, "dead_letter", f"{destination}: {error}")
    log.error("delivery of %s to %s dead-lettered", message_id, destination)


def backoff_s(settings: Settings, attempts: int) -> float:
    d = settings.delivery
    return float(min(d.backoff_max_s, d.backoff_initial_s * (2 ** max(0, attempts - 1))))
