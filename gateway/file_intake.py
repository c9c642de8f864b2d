"""One ECG file's bytes into the pipeline: what the inbox does with each file and ``ecgbridge import`` with an archive.

In this order, so nothing is lost or doubled: the bytes are written to the store (fsync);
a message already recorded with the same content and the same name (``remote``) is that
file again (a crash came between the record and whatever the caller does next, or an
archive imported twice) and nothing new is recorded; the bytes are read as an ECG (an input
error records a ``rejected`` message with its reason); otherwise the message is admitted
(:meth:`ecgbridge.core.intake.Intake.admit`: routed, recorded, enqueued; an identical resend
of a SOP Instance taken before records nothing).

A WFDB record (PhysioNet: a ``.hea`` header and the signal files it names, ``.dat`` or
``.mat``) is several files, while a message keeps one blob: :func:`file_bytes` takes the
header as the record and returns the header and its signal files packed as one container
(:func:`ecgbridge.mapping.wfdb_record.pack_wfdb_record`), which is stored, hashed and read
like any other file; :func:`record_parts` names the signal files that are taken with a
header beside them, never alone. Only ``ecgbridge import`` takes WFDB records: the inbox
takes one file at a time, and would need a header and all its signal files settled, and
moved together, before taking a record.

Store or broker trouble raises (an :class:`~ecgbridge.errors.EcgBridgeError`): nothing was
recorded, and the caller tries the file again later.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

from ecgbridge.core.intake import Arrival, Intake
from ecgbridge.core.routing import MessageFacts
from ecgbridge.core.states import MessageState, Source
from ecgbridge.core.store import MessageStore
from ecgbridge.errors import InputError
from ecgbridge.mapping.ecg import Ecg
from ecgbridge.mapping.readers import looks_like_xml, read_ecg_bytes

__all__ = ["FileOutcome", "Taken", "file_bytes", "is_wfdb_header", "record_parts", "take_file", "would_take"]

log = logging.getLogger("ecgbridge.file_intake")

_REMOTE_MAX = 128  # MessageRow.remote column width
#: The most of a WFDB header read to find its signal files (they are named before any comment).
_HEADER_SCAN_BYTES = 1 << 20


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
    intake: Intake,
    data: bytes,
    name: str,
    *,
    route_name: str | None = None,
    flags: tuple[str, ...] = (),
    overreads: bool = False,
) -> FileOutcome:
    """Store, read, record, route and enqueue one file's bytes; ``name`` is kept as the message's remote.

    ``flags`` are added to the message's (``NO_DELIVERY_FLAG``: analysed, delivered nowhere).
    ``overreads``: the folder is an over-read source (``overreads.inbox``): a confirmed vendor XML
    export's statements are also stored as a read of its ECG (``gateway.overread_intake``)."""
    store = intake.store
    sha, size = store.save_blob(data)
    tag = sha[:12]
    remote = name[:_REMOTE_MAX]
    earlier = _recorded_before(store, sha, remote)
    if earlier is not None:
        if overreads and earlier.taken is not Taken.REJECTED:
            _take_overread(intake, data, earlier.message_id, None)  # a crash may have come before the read
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
            acquired_at=ecg.study.acquired_at,
            accession_number=ecg.study.accession_number,
        ),
        route_name=route_name,
    )
    route = admitted.route.name if admitted.route else None
    if overreads:
        _take_overread(intake, data, admitted.message_id, ecg)
    if admitted.duplicate:
        log.info("file %s is an identical resend of message %s; not recorded again", tag, admitted.message_id)
        return FileOutcome(Taken.DUPLICATE, admitted.message_id, route=route)
    log.info("file %s stored as message %s (%s)", tag, admitted.message_id, f"route {route}" if route else "unrouted")
    return FileOutcome(Taken.STORED if route else Taken.UNROUTED, admitted.message_id, route=route)


def _take_overread(intake: Intake, data: bytes, message_id: str, ecg: Ecg | None) -> None:
    """The confirmed read a Philips / GE MUSE export carries, stored once as a read of its own ECG."""
    if not looks_like_xml(data):
        return
    from ecgbridge.gateway.overread_intake import record_self_read
    from ecgbridge.mapping.overread_readers import read_vendor_xml
    from ecgbridge.mapping.vendor._xml import parse

    try:
        read = read_vendor_xml(parse(data))
        if read is not None and ecg is None:
            ecg = read_ecg_bytes(data, hint="file")
    except InputError:
        return  # the ECG itself was read above; a read that cannot be is no read
    if read is not None and ecg is not None:
        record_self_read(intake, message_id, read, ecg, source=Source.FILE, sender=None)


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


def is_wfdb_header(path: Path) -> bool:
    """A WFDB header (``.hea``): taken as its whole record."""
    return path.name.lower().endswith(".hea")


def record_parts(folder: Path, names: Iterable[str]) -> set[str]:
    """Those of ``names`` (files in ``folder``) that a WFDB header among them names as its signal files.

    They are part of that record (:func:`file_bytes` of the header packs them) and are not
    taken on their own. A header that cannot be read claims nothing (taking it says why).
    """
    from ecgbridge.mapping.wfdb_record import wfdb_signal_files

    present = set(names)
    parts: set[str] = set()
    for name in present:
        if not is_wfdb_header(Path(name)):
            continue
        try:
            with open(folder / name, "rb") as f:
                head = f.read(_HEADER_SCAN_BYTES)
        except OSError:
            continue
        parts.update(part for part in wfdb_signal_files(head) if part in present and part != name)
    return parts


def file_bytes(path: Path, *, max_bytes: int) -> bytes:
    """The bytes to take for the file at ``path``: its own, or for a WFDB header its record's container.

    Raises :class:`OSError` when it cannot be read or is larger than ``max_bytes`` (a record:
    its files together). A header naming a signal file that is not beside it still gives a
    container: reading it rejects the record, naming the missing file.
    """
    if is_wfdb_header(path):
        from ecgbridge.mapping.wfdb_record import pack_wfdb_record

        data = pack_wfdb_record(path, max_bytes=max_bytes)
        if len(data) > max_bytes:
            raise OSError(f"more than {max_bytes} bytes with its signal files: not an ECG")
        return data
    if path.stat().st_size > max_bytes:
        raise OSError(f"more than {max_bytes} bytes: not an ECG")
    return path.read_bytes()
