"""The states a message and a delivery move through, as enums (stored as their plain string values).

``StrEnum`` members compare equal to their values, so rows written before these enums
existed read back unchanged and the database schema is the same::

    received -> queued -> analysed -> delivered
        |          |          '-----> failed      (a destination failed for good)
        |          '----------------> failed      (analysis failed: bad ECG, model error)
        '-> unrouted                               (no route matched: kept, not analysed)
    rejected                                       (refused at the gateway: bytes kept)
    processed                                      (not an ECG: an order or ADT message, applied)

A delivery is ``pending`` until it is ``delivered``; ``failed`` when the receiver refused
it for good, ``dead`` when the retries ran out (an operator may replay it).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["MessageState", "DeliveryState", "Source", "WorkKind", "Work", "FINAL_MESSAGE_STATES"]


class MessageState(StrEnum):
    RECEIVED = "received"
    QUEUED = "queued"
    ANALYSED = "analysed"
    DELIVERED = "delivered"
    FAILED = "failed"
    UNROUTED = "unrouted"
    REJECTED = "rejected"
    PROCESSED = "processed"


#: States in which no analysis will run for the message.
FINAL_MESSAGE_STATES = frozenset({MessageState.FAILED, MessageState.REJECTED, MessageState.UNROUTED})


class DeliveryState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    DEAD = "dead"


class Source(StrEnum):
    """How a message arrived: a DICOM C-STORE, an HL7 message over MLLP, a file (inbox or import)."""

    DICOM = "dicom"
    HL7 = "hl7"
    FILE = "file"


class WorkKind(StrEnum):
    ANALYSE = "analyse"
    DELIVER = "deliver"


@dataclass(frozen=True)
class Work:
    """One piece of unfinished work the recovery sweep may enqueue again."""

    message_id: str
    kind: WorkKind
    destination: str | None = None


#: A message flag: analyse, but deliver to no destination (``ecgbridge import --no-deliver``).
NO_DELIVERY_FLAG = "no_delivery"
