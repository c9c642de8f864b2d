"""One ECG file's bytes into the pipeline: what the inbox does with each file and ``ecgbridge import`` with an archive.

In this order, so nothing is lost or doubled: the bytes are written to the store (fsync);
a message already recorded with the same content and the same name (``remote``) is that
file again (a crash came between the record and whatever the caller does next, or an
archive imported twice) and nothing new is recorded; the bytes are read as an ECG (an input
error records a ``rejected`` message with its reason); otherwise the message is admitted
(:meth:`ecgbridge.core.intake.Intake.admit`: routed, recorded, enqueued; an identical resend
of a SOP Instance taken before records nothing).

Store or broker trouble raises (an :class:`~ecgbridge.errors.EcgBridgeError`): nothing was
recorded, and the caller tries the file again later.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from enum import StrEnum

from ecgbridge.core.intake import Arrival, Intake
from ecgbridge.core.routing import MessageFacts
from ecgbridge.core.states import MessageState, Source
from ecgbridge.core.store import MessageStore
from ecgbridge.errors import InputError
from ecgbridge.mapping.readers import read_ecg_bytes

__all__ = ["FileOutcome", "Taken", "take_file", "would_take"]

log = logging.getLogger("ecgbridge.file_intake")

_REMOTE_MAX = 128  # MessageRow.remote column width


class Taken(StrEnum):
    """What became of a file."""

    STORED = "stored"  #: recorded and routed (queued, or left for the recovery sweep if the broker is down)
    UNROUTED = "unrouted"  #: recorded, no route takes it (kept, never analysed)
    DUPLICATE = "duplicate"  #: an identical resend of a SOP Instance already taken: nothing recorded
    ALREADY = "already"  #: this very file (content and name) was recorded before: nothing recorded
    REJECTED = "rejected"  #: not an ECG ecgbridge can read: recorded as rejected, with why


@dataclass(frozen=True)
class FileOutcome:
    taken: Taken
    message_id: str
    #: The reader's complaint (``rejected``), or the earlier outcome's error (``already``).
    error: str | None = None
    route: str | None = None


def take_file(
    intake: Intake, data: bytes, name: str, *, route_name: str | None = None, flags: tuple[str, ...] = ()
) -> FileOutcome:
    """Store, read, record, route and enqueue one file's bytes; ``name`` is kept as the message's remote.

    ``flags`` are added to the message's (``NO_DELIVERY_FLAG``: analysed, delivered nowhere)."""
    store = intake.store
    sha, size = store.save_blob(data)
    tag = sha[:12]
    remote = name[:_REMOTE_MAX]
    earlier = _recorded_before(store, sha, remote)
    if earlier is not None:
        return earlier

    arrival = Arrival(facts=MessageFacts(source=Source.FILE), blob_sha256=sha, blob_size=size, remote=remote)
    try:
        ecg = read_ecg_bytes(data, hint="file")
    except Exception as exc:
        error = str(exc) if isinstance(exc, InputError) else f"internal error reading the file ({type(exc).__name__})"
        kind = type(exc).__name__
        if not isinstance(exc, InputError):
            log.exception("reading file %s failed unexpectedly", tag)
        mid = intake.reject(arrival, error, kind)
        log.warning("file %s rejected as message %s: %s", tag, mid, kind)
        return FileOutcome(Taken.REJECTED, mid, f"{kind}: {error}")

    admitted = intake.admit(
        replace(
            arrival,
            sop_instance_uid=ecg.study.sop_instance_uid,
            flags=[*ecg.flags, *flags],
            placer_order_number=ecg.study.placer_order_number,
            filler_order_number=ecg.study.filler_order_number,
        ),
        route_name=route_name,
    )
    route = admitted.route.name if admitted.route else None
    if admitted.duplicate:
        log.info("file %s is an identical resend of message %s; not recorded again", tag, admitted.message_id)
        return FileOutcome(Taken.DUPLICATE, admitted.message_id, route=route)
    log.info("file %s stored as message %s (%s)", tag, admitted.message_id, f"route {route}" if route else "unrouted")
    return FileOutcome(Taken.STORED if route else Taken.UNROUTED, admitted.message_id, route=route)


def would_take(store: MessageStore, data: bytes, name: str) -> FileOutcome:
    """What :func:`take_file` would do with these bytes, writing nothing (``ecgbridge import --dry-run``).

    ``stored`` stands for "would be admitted": routing, and whether it is a resend, are not tried.
    """
    earlier = _recorded_before(store, hashlib.sha256(data).hexdigest(), name[:_REMOTE_MAX])
    if earlier is not None:
        return earlier
    try:
        read_ecg_bytes(data, hint="file")
    except Exception as exc:
        return FileOutcome(Taken.REJECTED, "", f"{type(exc).__name__}: {exc}")
    return FileOutcome(Taken.STORED, "")


def _recorded_before(store: MessageStore, sha: str, remote: str) -> FileOutcome | None:
    """This very file (content and name) recorded earlier: what became of it then."""
    existing = store.find_by_blob(sha, Source.FILE, remote=remote)
    if not existing:
        return None
    row = existing[0]
    rejected = row.state == MessageState.REJECTED
    return FileOutcome(Taken.REJECTED if rejected else Taken.ALREADY, row.id, row.error, row.route)
