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

Resends of one SOP Instance (DICOM C-STORE, inbox file, or an HL7 ORU carrying a UID)
are compared with the messages already taken with that SOP Instance UID (rejected ones
do not count):

- same UID and same content hash (the SHA-256 of the stored bytes): an *identical
  resend*. Nothing is recorded, analysed or delivered again; the first message gets a
  ``duplicate_received`` event and the sender is answered success (``Admission.duplicate``).
- same UID, different content: a *changed resend*, recorded as a new message (a new
  version of the latest earlier one) and analysed; both get a ``resent_changed`` event
  naming the other.

Why: a cart that did not see our answer resends, and each copy used to cost an analysis
and a second HL7 ORU; a corrected ECG under the same UID must still reach the EHR.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from ecgbridge.core.live import SettingsSource, current
from ecgbridge.core.queue import Dispatcher
from ecgbridge.core.retention import CONTENT_PRUNED
from ecgbridge.core.routing import MessageFacts, match_route
from ecgbridge.core.settings import Route, Settings
from ecgbridge.core.states import MessageState, Source
from ecgbridge.core.store import MessageRow, MessageStore
from ecgbridge.errors import StorageError
from ecgbridge.mapping.ecg import Patient, acquisition_time

__all__ = ["Arrival", "Admission", "Intake"]

log = logging.getLogger("ecgbridge.intake")

#: Held from the look-up of a SOP Instance UID to the record of its message, so that two
#: associations (threads) delivering the same instance at once cannot both record it.
_INSTANCE_LOCK = threading.Lock()


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
    #: When the ECG was recorded (UTC) and its Accession Number: how an over-read finds it.
    acquired_at: datetime | None = None
    accession_number: str | None = None
    #: The keyed patient pseudonym that orders deliveries (:meth:`Intake.patient_key`), never the identifier.
    patient_key: str | None = None

    @property
    def source(self) -> str:
        return self.facts.source


@dataclass(frozen=True)
class Admission:
    """What ``admit`` did: the message id, its route (None: unrouted) and whether it is queued.

    ``duplicate``: an identical resend; ``message_id`` is then the earlier message and nothing
    new was recorded. ``resend_of``: the earlier message a changed resend is a new version of.
    """

    message_id: str
    route: Route | None
    queued: bool
    duplicate: bool = False
    resend_of: str | None = None


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

    def patient_key(self, patient: Patient) -> str | None:
        """The pseudonym of the ECG's patient for the message row (:mod:`ecgbridge.core.ordering`)."""
        return self.store.patient_keys.key_for(patient.id, patient.id_issuer)

    def admit(
        self, arrival: Arrival, *, on_recorded: Callable[[str], None] | None = None, route_name: str | None = None
    ) -> Admission:
        """Route, record, enqueue; ``on_recorded(message_id)`` runs between the record and the enqueue.

        An identical resend of a SOP Instance records nothing (``on_recorded`` is not called);
        see the module docstring for the resend rule. ``route_name`` takes that route whatever
        the routing rules say (``ecgbridge import --route``: an archive run through a chosen route).
        """
        route = self.settings.route(route_name) if route_name else match_route(self.settings.routes, arrival.facts)
        state = MessageState.RECEIVED if route else MessageState.UNROUTED
        uid = arrival.sop_instance_uid
        with _INSTANCE_LOCK if uid else nullcontext():
            earlier = self._taken_with_uid(uid) if uid else []
            same = next((row for row in earlier if row.blob_sha256 == arrival.blob_sha256), None)
            if same is not None:
                self.store.add_event(
                    same.id,
                    "duplicate_received",
                    f"the same SOP Instance with identical content was received again ({_sender(arrival)}); "
                    "answered success, not recorded or analysed again",
                    level="info",
                )
                return Admission(same.id, route, queued=False, duplicate=True)
            message_id = self._record(arrival, state, route=route.name if route else None)
        previous = earlier[-1].id if earlier else None
        if previous is not None:
            self.store.add_event(
                message_id,
                "resent_changed",
                f"a new version of message {previous}: same SOP Instance UID, different content",
                level="warning",
            )
            self.store.add_event(
                previous,
                "resent_changed",
                f"a changed version of this SOP Instance was received as message {message_id}",
                level="warning",
            )
        if on_recorded is not None:
            on_recorded(message_id)
        if route is None:
            self.store.add_event(
                message_id, "unrouted", f"no route matches {arrival.facts.describe()}", level="warning"
            )
            return Admission(message_id, None, queued=False, resend_of=previous)
        try:
            self.dispatcher.analyse(message_id)
            self.store.set_state(message_id, MessageState.QUEUED)
        except StorageError as exc:
            # Safe on disk: the gateway's recovery sweep enqueues it when the broker is back.
            self.store.add_event(message_id, "enqueue_failed", str(exc), level="warning")
            return Admission(message_id, route, queued=False, resend_of=previous)
        return Admission(message_id, route, queued=True, resend_of=previous)

    def _taken_with_uid(self, uid: str) -> list[MessageRow]:
        """Messages already taken with this SOP Instance UID, oldest first.

        Refused ones do not count, nor ones whose content retention deleted: a site that sends
        such an ECG again wants it kept again.
        """
        with self.store.session() as s:
            rows = s.scalars(
                select(MessageRow).where(MessageRow.sop_instance_uid == uid).order_by(MessageRow.received_at)
            )
            return [
                row
                for row in rows
                if row.state != MessageState.REJECTED
                and not (row.state == MessageState.RECEIVED and row.route is None)
                and CONTENT_PRUNED not in (row.flags or [])
            ]

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
            acquired_at=acquisition_time(arrival.acquired_at)[0],  # a cart's naive time: local, as the writers read it
            accession_number=arrival.accession_number,
            patient_key=arrival.patient_key,
        )


def _sender(arrival: Arrival) -> str:
    """Who resent it, for the event: the DICOM AE and address; otherwise only the source (file names may hold PHI)."""
    if arrival.source == Source.DICOM and arrival.remote:
        return f"from {arrival.remote}"
    return f"via {arrival.source}"
