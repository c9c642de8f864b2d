"""Delivering a stored result to one destination: the sender, then the delivery's state.

The job re-reads the delivery's state, so a redelivered task or a recovery sweep never
sends twice what was delivered; senders are idempotent on the receiver's side too
(conditional creates, a stable MSH-10). The outcome is the sender's to classify:
delivered, transient (retried with backoff by the task, dead-lettered after
``delivery.max_attempts``) or permanent (failed, with an error record). A transient
failure stores when the retry is due (``next_attempt_at``, in the same write as the
attempt), so the gateway's recovery sweep does not run it again before its backoff.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from ecgbridge.core.settings import Settings
from ecgbridge.core.states import DeliveryState, MessageState
from ecgbridge.core.store import MessageRow, MessageStore
from ecgbridge.errors import DestinationBusy, EcgBridgeError, PermanentDeliveryError, TransientDeliveryError
from ecgbridge.mapping.ecg import AnalysisResult
from ecgbridge.outbound.sender import Outgoing
from ecgbridge.worker.jobs import WorkerContext, attachment_bytes, load_ecg, render_failed, render_report

__all__ = ["deliver_message", "dead_letter", "backoff_s", "retry_countdown"]

log = logging.getLogger("ecgbridge.worker")

_DONE = (DeliveryState.DELIVERED, DeliveryState.FAILED, DeliveryState.DEAD)
T = TypeVar("T")


class DeliveryClaimed(Exception):
    """Another task is sending this delivery now (or the destination's sends are all busy, or an
    earlier ECG of the patient is still to go there first): try again once that may have passed,
    without spending an attempt."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"claimed by another task for {retry_after_s:.0f} s more")
        self.retry_after_s = retry_after_s


def deliver_message(ctx: WorkerContext, message_id: str, destination: str, claim: str | None = None) -> str | None:
    """Write the result version the delivery row names to one destination; returns the receiver's reference.

    ``claim`` (the task's id) first claims the delivery (``MessageStore.claim_delivery``), so two
    tasks for it never both send; a delivery another task holds raises :class:`DeliveryClaimed`.

    A re-analysis may move the row on to a newer version while an older one is being sent:
    the older outcome then settles nothing (the task for the newer version sends that one).
    """
    store = ctx.store
    if claim is not None:
        wait_s = store.claim_delivery(message_id, destination, claim, ctx.settings.delivery.claim_s)
        if wait_s > 0:
            raise DeliveryClaimed(wait_s)
    current = store.delivery(message_id, destination)
    if current is not None and current.state in _DONE:
        return current.remote_ref
    version = (current.version or 1) if current is not None else 1
    row = store.get(message_id)
    stored = store.result_version(message_id, version)
    if row is None or stored is None or stored.result is None:
        log.error("deliver: message %s has no stored result version %d", message_id, version)
        return None
    dest = ctx.settings.destination(destination)
    if dest.ordering == "per_patient":
        _wait_for_earlier(ctx, row, destination, dest.ordering_max_wait_s)
    result = AnalysisResult.from_dict(stored.result)
    if dest.wants_report() and not result.attachments and not render_failed(store, message_id, version):
        # its render task has not run (the sweep sent this delivery first): draw it here, once
        result = replace(result, attachments=render_report(ctx, message_id, version))
    order = store.order_for_message(row.id)
    outgoing = Outgoing(
        message_id=row.id,
        result=result,
        ecg=load_ecg(store, row),
        attachments=attachment_bytes(store, result),
        order=order.details if order is not None else None,
        version=version,
    )
    label = f"{destination}" + (f" (result version {version})" if version > 1 else "")
    try:
        ref = ctx.senders.get(dest).send(outgoing)
    except DestinationBusy as exc:  # nothing sent: later, without spending an attempt
        raise DeliveryClaimed(exc.retry_after_s) from exc
    except TransientDeliveryError as exc:
        attempts = ((current.attempts or 0) if current is not None else 0) + 1
        due = datetime.now(UTC) + timedelta(seconds=retry_countdown(ctx.settings, attempts, exc))
        store.update_delivery(
            message_id, destination, state=DeliveryState.PENDING, error=str(exc), version=version, next_attempt_at=due
        )
        store.add_event(message_id, "delivery_retry", f"{label}: {exc}", level="warning")
        raise
    except (PermanentDeliveryError, EcgBridgeError) as exc:
        settled = store.update_delivery(
            message_id, destination, state=DeliveryState.FAILED, error=str(exc), version=version
        )
        if (settled.version or 1) != version:
            _superseded(store, message_id, f"{label}: refused ({exc})", settled.version)
            return None
        store.set_state(message_id, MessageState.FAILED, error=f"delivery to {label} failed: {exc}")
        store.add_event(message_id, "delivery_failed", f"{label}: {exc}")
        log.warning("delivery of %s to %s failed permanently", message_id, destination)
        return None
    # The receiver has it now: if the store cannot say so yet (a full disk), keep trying here rather
    # than fail the task, whose retry would send it a second time.
    settled = _until_recorded(
        lambda: store.update_delivery(
            message_id, destination, state=DeliveryState.DELIVERED, remote_ref=ref, version=version
        ),
        patience_s=ctx.settings.delivery.claim_s / 2,  # the claim outlasts the wait
    )
    if (settled.version or 1) != version:
        _superseded(store, message_id, f"{label}: delivered as {ref}", settled.version)
        return ref
    log.info("delivered message %s to %s as %s (result version %d)", message_id, destination, ref, version)
    _finish_message(store, message_id)
    return ref


#: Seconds between looks at whether the earlier ECG a delivery waits behind has gone.
ORDER_RECHECK_S = 1.0


def _wait_for_earlier(ctx: WorkerContext, row: MessageRow, destination: str, max_wait_s: float) -> None:
    """Raise :class:`DeliveryClaimed` while an earlier ECG of the same patient may still be sent first.

    An earlier ECG received more than ``max_wait_s`` ago no longer holds this one: it goes, and an
    event on it says which ECG it went ahead of (once). The first wait is an event too.
    """
    routes = [r.name for r in ctx.settings.routes if destination in r.destinations]
    ahead = ctx.store.ahead_in_order(row, destination, routes)
    if ahead is None:
        return
    earlier, received_at = ahead
    waited_s = (datetime.now(UTC) - received_at).total_seconds()
    kinds = {e.kind for e in ctx.store.events(row.id)}
    if waited_s <= max_wait_s:
        if "delivery_waiting" not in kinds:
            ctx.store.add_event(
                row.id,
                "delivery_waiting",
                f"{destination}: waiting for message {earlier}, an earlier ECG of the same patient, to be sent first",
                level="info",
            )
        # due again when the task retries: the recovery sweep must not enqueue copies of a waiting delivery
        ctx.store.hold_delivery(row.id, destination, datetime.now(UTC) + timedelta(seconds=ORDER_RECHECK_S + 1))
        raise DeliveryClaimed(ORDER_RECHECK_S)
    if "delivery_out_of_order" not in kinds:
        ctx.store.add_event(
            row.id,
            "delivery_out_of_order",
            f"{destination}: sent ahead of message {earlier}, an earlier ECG of the same patient still unsent "
            f"{waited_s:.0f} s after it was received (ordering_max_wait_s {max_wait_s:.0f})",
            level="warning",
        )


def _until_recorded(record: Callable[[], T], patience_s: float) -> T:
    """``record()``, tried again every second for up to ``patience_s`` while the store fails to write."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return record()
        except Exception as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("delivered, but the store did not record it (%s); trying again", type(exc).__name__)
            time.sleep(1.0)


def _superseded(store: MessageStore, message_id: str, what: str, now: int | None) -> None:
    """An older version's outcome that came in after a re-analysis moved the delivery on: recorded only."""
    store.add_event(
        message_id, "delivery_superseded", f"{what}; result version {now} has replaced it"[:500], level="info"
    )
    log.info("delivery of %s superseded by result version %s", message_id, now)


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


def retry_countdown(settings: Settings, attempts: int, exc: TransientDeliveryError) -> float:
    """Seconds until the retry after ``attempts`` attempts: the backoff, or longer when the receiver asked."""
    return max(backoff_s(settings, attempts), float(getattr(exc, "retry_after_s", 0) or 0))
