"""HL7 v2 inbound messages: persist, validate, record, route, enqueue; then the ACK.

:func:`handle_message` mirrors the DICOM C-STORE handler (``gateway.dicom_scp``):

1. the raw bytes are written to the blob store (fsync) FIRST, so even a malformed
   message is kept for inspection;
2. MSH is located (robustly enough to answer even when hl7apy cannot parse the
   message), MSH-18 picks the character set, hl7apy parses the segments we read;
3. by message type (MSH-9):

   - ``ORU^R01``: the waveform is converted (``mapping.hl7_waveform``) so a bad one
     is answered AE naming the OBX before it ever reaches a worker; the message is
     recorded, routed (sending application / facility, message type, OBX-3 codes)
     and its id enqueued; ``unrouted`` when no route matches (still AA: kept);
   - ``ORU^R01`` *without* waveform from a sending application named in
     ``overreads.hl7_sending_applications``: a cardiologist's read (over-read), recorded
     ``processed`` and stored as a label by :mod:`ecgbridge.core.labels` (AA; a preliminary
     read is stored, not a label). From any other sender it is refused as before (AR,
     "carries no waveform");
   - ``ORM^O01`` / ``OML^O21``: each ORC/OBR order is upserted, ECG messages that
     arrived before it get an ``order_linked`` event; the message is ``processed``;
   - ``ADT^A01`` / ``A04`` / ``A08``: recorded as ``processed`` (demographics stay in
     the blob; nothing else needs them yet);
   - anything else: AR, table 0357 code 200 (type) or 201 (event);

4. only then the ACK. Every failure is an ACK (never a dropped connection) and an
   error record (``store.add_event``) on the message.

Acknowledgment modes. Original mode (MSH-15 and MSH-16 both empty): MSA-1 AA / AE / AR.
Enhanced mode (either valued): we send the accept acknowledgment only, CA / CE / CR
(mapped one to one from AA / AE / AR: validation happens before we commit), when
MSH-15 asks for it (AL or empty: always; NE: never; ER: only CE / CR; SU: only CA).
We do not send application-level acknowledgments: the result ORU^R01 written back
to the EHR is the application response. Our ACK sets MSH-15 / MSH-16 to NE in
enhanced mode so that nobody acknowledges the acknowledgment.

Character sets. MSH-18 (table 0211) is honoured for the ASCII-compatible sets
(ASCII, 8859/1-9 and 15, UNICODE UTF-8, and a few national sets); without MSH-18 the
message is read as UTF-8 and, when that fails, as ISO 8859-1 with the flag
``charset_assumed:8859/1``. The ACK echoes MSH-18 and is encoded the same way.

Resends. A sender that got no ACK resends the same bytes; a message whose exact
bytes were already accepted is acknowledged again (AA) without a second record, so
a resend after a crash never yields a second analysis.

The HL7 rules themselves (MSH checks, message types, the ACK and its ERR) are
``mapping.hl7_wire``'s, MSH and separators ``mapping.hl7_common``'s; this module does
the I/O around them.

Nothing here logs message content: logs carry MSH-10 control ids, peers and
internal message ids only.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from ecgbridge.core.intake import Arrival, Intake
from ecgbridge.core.routing import MessageFacts
from ecgbridge.core.states import MessageState, Source
from ecgbridge.core.store import MessageRow, MessageStore
from ecgbridge.errors import (
    DecodeError,
    EcgBridgeError,
    Hl7Error,
    InputError,
    StorageError,
    UnsupportedInputError,
    WaveformError,
)
from ecgbridge.mapping.hl7_common import Header, error_location, read_header
from ecgbridge.mapping.hl7_common import first_segment as _first_segment
from ecgbridge.mapping.hl7_wire import (
    Location,
    build_ack,
    classify,
    decode_message,
    parse_segments,
    validate_header,
)
from ecgbridge.mapping.hl7_wire import (  # under the names the handler below uses
    ack_codec as _ack_codec,
)
from ecgbridge.mapping.hl7_wire import (
    decode_failure as _decode_failure,
)
from ecgbridge.mapping.hl7_wire import (
    encode_ack as _encode,
)
from ecgbridge.mapping.hl7_wire import (
    erl as _erl,
)
from ecgbridge.mapping.hl7_wire import (
    first_component as _first,
)
from ecgbridge.mapping.hl7_wire import (
    named as _named,
)
from ecgbridge.mapping.hl7_wire import (
    raw_field as _raw,
)
from ecgbridge.mapping.hl7_wire import (
    sniff_header as _sniff_header,
)

__all__ = [
    "InboundContext",
    "handle_message",
    "handle_oversize",
    "ORDER_MESSAGE_TYPES",
]

log = logging.getLogger("ecgbridge.hl7")

ORDER_MESSAGE_TYPES = frozenset({"ORM^O01", "OML^O21"})
_ORU_SEGMENTS = frozenset({"MSH", "ORC", "OBR", "OBX"})
_NOT_ECG_TYPES = ORDER_MESSAGE_TYPES | {"ADT^A01", "ADT^A04", "ADT^A08"}


# ----- handling -------------------------------------------------------------------------------
#: The handler's dependencies, passed in (not global), as the DICOM handler gets its own.
InboundContext = Intake


@dataclass
class _Inbound:
    """What we learnt about one inbound message so far (for its record and its ACK)."""

    raw: bytes
    peer: str
    sha: str = ""
    size: int = 0
    header: Header | None = None
    codec: str = "utf-8"
    text: str = ""
    flags: list[str] = field(default_factory=list)
    message_id: str | None = None
    placer: str | None = None
    filler: str | None = None

    @property
    def message_type(self) -> str | None:
        if self.header is None or not self.header.component(9, 1):
            return None
        return self.header.message_type[:32]

    @property
    def remote(self) -> str:
        host = self.peer.rsplit(":", 1)[0] if ":" in self.peer else self.peer
        app = self.header.component(3) if self.header is not None else ""
        return f"{app}@{host}"[:128] if app else host[:128]

    @property
    def control_id(self) -> str:
        return (self.header.control_id if self.header is not None else "")[:40] or "-"


def handle_message(raw: bytes, peer: str, ctx: InboundContext) -> bytes:
    """One inbound HL7 message -> the ACK to send back (not framed; b"" sends none).

    Never raises: every failure is answered (AE / AR, CE / CR) and recorded.
    """
    msg = _Inbound(raw=raw, peer=peer, header=_sniff_header(raw))
    msg.codec = _ack_codec(msg.header)
    try:
        msg.sha, msg.size = ctx.store.save_blob(raw)
    except StorageError as exc:
        log.error("HL7 %s from %s not stored: %s", msg.control_id, peer, exc)
        err = Hl7Error(f"not stored, send again later: {exc}", code=207, ack="AE", kind="StorageError")
        return _encode(build_ack(msg.header, "AE", err), msg.codec)
    except Exception as exc:
        log.exception("HL7 %s from %s: unexpected failure storing the message", msg.control_id, peer)
        err = Hl7Error(f"internal error ({type(exc).__name__})", code=207, ack="AE")
        return _encode(build_ack(msg.header, "AE", err), msg.codec)
    try:
        code = _process(msg, ctx)
        return _encode(build_ack(msg.header, code), msg.codec)
    except Exception as exc:
        err = _as_hl7_error(exc)
        _record_failure(msg, ctx, err, exc)
        return _encode(build_ack(msg.header, err.hl7_ack_code, err), msg.codec)


def handle_oversize(head: bytes, size: int, limit: int, peer: str, ctx: InboundContext) -> bytes:
    """A frame over ``max_message_bytes``: keep its head and an error record, answer AR."""
    msg = _Inbound(raw=head, peer=peer, header=_sniff_header(head))
    msg.codec = _ack_codec(msg.header)
    err = Hl7Error(
        f"message too large: {size} bytes, this receiver takes at most {limit} bytes",
        code=207,
        location=("MSH", 1),
        kind="message_too_large",
    )
    try:
        msg.sha, msg.size = ctx.store.save_blob(head)
        msg.flags.append("truncated:first_bytes_only")
        _record_failure(msg, ctx, err, err)
    except Exception:
        log.exception("could not record the oversized HL7 message %s from %s", msg.control_id, peer)
    return _encode(build_ack(msg.header, "AR", err), msg.codec)


def _as_hl7_error(exc: BaseException) -> Hl7Error:
    if isinstance(exc, Hl7Error):
        return exc
    if isinstance(exc, StorageError):
        return Hl7Error(f"not stored, send again later: {exc}", code=207, ack="AE", kind="StorageError")
    if isinstance(exc, EcgBridgeError):
        return Hl7Error(str(exc), code=207, ack=exc.hl7_ack_code, kind=type(exc).__name__)
    return Hl7Error(f"internal error ({type(exc).__name__})", code=207, ack="AE", kind="internal_error")


def _process(msg: _Inbound, ctx: InboundContext) -> str:
    """Validate and take the message; returns the original-mode ACK code."""
    sniffed = read_header(_first_segment(msg.raw))  # 100 / 102 without a usable MSH
    validate_header(sniffed)  # MSH-2, -9, -10, -12, -18 before anything is decoded
    msg.text, msg.codec, flags = decode_message(msg.raw, sniffed)
    msg.flags.extend(flags)
    msg.header = read_header(msg.text)  # the same MSH, now in the right character set
    kind = classify(msg.header)
    duplicate = _accepted_before(ctx.store, msg.sha)
    if duplicate is not None:
        ctx.store.add_event(
            duplicate.id,
            "duplicate_received",
            f"the same message (MSH-10 {msg.control_id}) "
            f"was received again from {msg.peer}; acknowledged, not recorded again",
            level="info",
        )
        log.info(
            "HL7 %s %s from %s: already accepted as message %s",
            msg.message_type,
            msg.control_id,
            msg.peer,
            duplicate.id,
        )
        return "AA"
    segments = parse_segments(msg.text, _ORU_SEGMENTS if kind == "ORU" else None)
    if kind == "ORU":
        return _accept_oru(msg, segments, ctx)
    if kind in ("ORM", "OML"):
        return _accept_order(msg, segments, ctx)
    return _accept_other(msg, ctx)


def _accepted_before(store: MessageStore, sha: str) -> MessageRow | None:
    """A message with these exact bytes that was already taken (a resend without our ACK)."""
    for row in store.find_by_blob(sha, Source.HL7):
        if row.state == MessageState.REJECTED or (row.state == MessageState.RECEIVED and row.route is None):
            continue
        return row
    return None


def _record_failure(msg: _Inbound, ctx: InboundContext, err: Hl7Error, exc: BaseException) -> None:
    """The rejected message's record and error record (kept with its bytes for IT staff)."""
    store = ctx.store
    detail = str(err)
    try:
        if msg.message_id is None:
            if not msg.sha:
                return
            arrival = Arrival(
                facts=MessageFacts(source=Source.HL7),
                blob_sha256=msg.sha,
                blob_size=msg.size,
                remote=msg.remote,
                flags=msg.flags,
                message_type=msg.message_type,
                placer_order_number=msg.placer,
                filler_order_number=msg.filler,
            )
            msg.message_id = ctx.reject(arrival, detail, err.kind)
            return _log_failure(msg, err, exc)
        if isinstance(exc, InputError):
            store.set_state(msg.message_id, MessageState.REJECTED, error=detail)
        store.add_event(msg.message_id, err.kind, detail)
    except Exception:
        log.exception("could not record the failure of HL7 message %s", msg.control_id)
    _log_failure(msg, err, exc)


def _log_failure(msg: _Inbound, err: Hl7Error, exc: BaseException) -> None:
    if isinstance(exc, InputError):
        log.warning(
            "HL7 %s %s from %s rejected (%s %s): message %s",
            msg.message_type or "-",
            msg.control_id,
            msg.peer,
            err.hl7_ack_code,
            err.code,
            msg.message_id,
        )
    else:
        # The type only: an unexpected exception's text may quote message content.
        log.error(
            "HL7 %s %s from %s failed: %s (message %s)",
            msg.message_type or "-",
            msg.control_id,
            msg.peer,
            type(exc).__name__,
            msg.message_id,
        )
        log.debug("traceback of the failure of HL7 message %s", msg.control_id, exc_info=exc)


# ----- ORU^R01: an ECG --------------------------------------------------------------------------
def _obx_location(exc: WaveformError) -> Location:
    """Where the waveform error is: the location the reader attached, else the OBX it names."""
    where = error_location(exc)
    if where is not None:
        return _erl(where)
    m = re.search(r"\bOBX(?:\s+segment)?\s*(?:#|no\.?|number)?\s*(\d+)", str(exc), re.IGNORECASE)
    return ("OBX", int(m.group(1)), 5) if m else ("OBX",)


def _accept_oru(msg: _Inbound, segments: list[Any], ctx: InboundContext) -> str:
    obrs, orcs, obxs = _named(segments, "OBR"), _named(segments, "ORC"), _named(segments, "OBX")
    if not obrs:
        raise Hl7Error("ORU^R01 without an OBR segment", code=100, location=("OBR", 1), kind="hl7_parse_error")
    orc = orcs[0] if orcs else None
    msg.placer = _first(obrs[0], 2) or _first(orc, 2) or None
    msg.filler = _first(obrs[0], 3) or _first(orc, 3) or None
    from ecgbridge.mapping.hl7_waveform import parse_oru_waveform

    try:
        ecg = parse_oru_waveform(msg.text)
    except WaveformError as exc:
        raise Hl7Error(str(exc), code=207, location=_obx_location(exc), ack="AE", kind="WaveformError") from exc
    except DecodeError as exc:
        raise _decode_failure(exc) from exc
    except UnsupportedInputError as exc:
        if _is_overread(msg, obxs, ctx):
            return _accept_overread(msg, ctx)
        where = error_location(exc)
        raise Hl7Error(
            str(exc), code=207, location=_erl(where) if where else ("OBX",), ack="AR", kind="UnsupportedInputError"
        ) from exc

    header = msg.header
    assert header is not None
    codes = tuple(c for c in (_first(obx, 3) for obx in obxs) if c)
    facts = MessageFacts(
        source=Source.HL7,
        sending_application=header.component(3) or None,
        sending_facility=header.component(4) or None,
        message_type="ORU^R01",
        obx_codes=codes,
    )
    arrival = Arrival(
        facts=facts,
        blob_sha256=msg.sha,
        blob_size=msg.size,
        remote=msg.remote,
        sop_instance_uid=ecg.study.sop_instance_uid,
        flags=sorted(set(ecg.flags) | set(msg.flags)),
        placer_order_number=msg.placer,
        filler_order_number=msg.filler,
        message_type="ORU^R01",
        acquired_at=ecg.study.acquired_at,
        accession_number=ecg.study.accession_number,
        patient_key=ctx.patient_key(ecg.patient),
    )

    def recorded(message_id: str) -> None:
        msg.message_id = message_id
        _note_charset(msg, ctx)
        order = ctx.store.find_order(msg.placer, msg.filler) if (msg.placer or msg.filler) else None
        if order is not None:
            ctx.store.add_event(message_id, "order_linked", _order_text(order, order.message_id), level="info")

    admitted = ctx.admit(arrival, on_recorded=recorded)
    log.info(
        "HL7 ORU^R01 %s from %s stored as message %s (%s)",
        msg.control_id,
        msg.peer,
        admitted.message_id,
        f"route {admitted.route.name}" if admitted.route else "unrouted",
    )
    return "AA"


# ----- ORU^R01 without waveform from an over-read source: a cardiologist's read ----------------------------
#: OBX value types that carry a waveform: an ORU with one is an ECG, whoever sends it.
_WAVEFORM_TYPES = frozenset({"CD", "NA", "MA"})


def _is_overread(msg: _Inbound, obxs: list[Any], ctx: InboundContext) -> bool:
    """An ORU^R01 with no waveform OBX from a sending application named in ``overreads``."""
    header = msg.header
    assert header is not None
    if not ctx.settings.overreads.hl7_source(header.component(3)):
        return False
    return not any((_first(obx, 2) or "").upper() in _WAVEFORM_TYPES for obx in obxs)


def _accept_overread(msg: _Inbound, ctx: InboundContext) -> str:
    """Record the message, then the read (:func:`ecgbridge.core.labels.record_overread`); AA after both.

    The message is ``received`` until the read is stored, then ``processed``: a sender that got
    no ACK and resends finds no accepted copy and the read is taken again (never lost).
    Preliminary reads (status P) are stored too, not as labels (AA all the same).
    """
    from ecgbridge.core.labels import record_overread
    from ecgbridge.mapping.overread_readers import read_oru

    header = msg.header
    assert header is not None
    read = read_oru(msg.text)
    msg.flags.append("overread")
    msg.message_id = ctx.store.record_message(
        source=Source.HL7,
        remote=msg.remote,
        blob_sha256=msg.sha,
        blob_size=msg.size,
        state=MessageState.RECEIVED,
        flags=msg.flags,
        message_type=msg.message_type,
    )
    _note_charset(msg, ctx)
    recorded = record_overread(
        ctx.store,
        read,
        message_id=msg.message_id,
        source=Source.HL7,
        sender=header.component(3),
        window_min=ctx.settings.overreads.link_window_min,
    )
    ctx.store.set_state(msg.message_id, MessageState.PROCESSED)
    log.info(
        "HL7 ORU^R01 %s from %s stored as message %s: over-read %d (%s)",
        msg.control_id,
        msg.peer,
        msg.message_id,
        recorded.overread.id,
        recorded.outcome,
    )
    return "AA"


def _note_charset(msg: _Inbound, ctx: InboundContext) -> None:
    if "charset_assumed:8859/1" in msg.flags and msg.message_id:
        ctx.store.add_event(
            msg.message_id, "charset_assumed", "no MSH-18 and not valid UTF-8: read as ISO 8859-1", level="warning"
        )


# ----- ORM^O01 / OML^O21: orders ----------------------------------------------------------------
def _order_groups(segments: list[Any]) -> list[tuple[Any | None, Any | None]]:
    """(ORC, OBR) pairs in message order; an OBR without its own ORC gets the last one's."""
    groups: list[list[Any | None]] = []
    for seg in segments:
        if seg.name == "ORC":
            groups.append([seg, None])
        elif seg.name == "OBR":
            if groups and groups[-1][1] is None:
                groups[-1][1] = seg
            else:
                groups.append([groups[-1][0] if groups else None, seg])
    return [(g[0], g[1]) for g in groups]


def _none(value: str) -> str | None:
    return value or None


def _order_details(
    header: Header, orc: Any, obr: Any, pid: Any, pv1: Any, placer: str | None, filler: str | None
) -> dict[str, Any]:
    return {
        "placer_order_number": placer,
        "filler_order_number": filler,
        "placer_group_number": _none(_raw(orc, 4)),
        "order_control": _none(_raw(orc, 1)),
        "order_status": _none(_raw(orc, 5)),
        "ordering_provider": _none(_raw(orc, 12) or _raw(obr, 16)),
        "universal_service_id": _none(_raw(obr, 4)),
        "visit_number": _none(_raw(pv1, 19)),
        "patient_class": _none(_raw(pv1, 2)),
        "patient_identifier": _none(_raw(pid, 3)),
        "requested_at": _none(_raw(orc, 9) or _raw(obr, 6)),
        "sending_application": _none(header.raw(3)),
        "sending_facility": _none(header.raw(4)),
    }


def _accept_order(msg: _Inbound, segments: list[Any], ctx: InboundContext) -> str:
    header = msg.header
    assert header is not None
    groups = _order_groups(segments)
    if not groups:
        raise Hl7Error(
            f"{msg.message_type} without an ORC segment", code=100, location=("ORC", 1), kind="hl7_parse_error"
        )
    numbered = []
    for i, (orc, obr) in enumerate(groups, 1):
        placer = _first(orc, 2) or _first(obr, 2) or None
        filler = _first(orc, 3) or _first(obr, 3) or None
        if not placer and not filler:
            raise Hl7Error(
                "order without a placer or filler order number (ORC-2 / ORC-3 / OBR-2 / OBR-3)",
                code=101,
                location=("ORC", i, 2),
            )
        numbered.append((orc, obr, placer, filler))
    pid, pv1 = (_named(segments, "PID") or [None])[0], (_named(segments, "PV1") or [None])[0]
    msg.placer, msg.filler = numbered[0][2], numbered[0][3]
    store = ctx.store
    msg.message_id = mid = store.record_message(
        source=Source.HL7,
        remote=msg.remote,
        blob_sha256=msg.sha,
        blob_size=msg.size,
        state=MessageState.RECEIVED,
        flags=msg.flags,
        message_type=msg.message_type,
        placer_order_number=msg.placer,
        filler_order_number=msg.filler,
    )
    _note_charset(msg, ctx)
    linked = 0
    for orc, obr, placer, filler in numbered:
        order = store.upsert_order(
            placer_order_number=placer,
            filler_order_number=filler,
            order_control=_none(_raw(orc, 1)),
            status=_none(_raw(orc, 5)),
            message_id=mid,
            details=_order_details(header, orc, obr, pid, pv1, placer, filler),
        )
        linked += _link_waiting_ecgs(store, order, mid)
    store.set_state(mid, MessageState.PROCESSED)
    log.info(
        "HL7 %s %s from %s stored as message %s: %d order(s), %d earlier ECG(s) linked",
        msg.message_type,
        msg.control_id,
        msg.peer,
        mid,
        len(numbered),
        linked,
    )
    return "AA"


def _order_text(order: Any, message_id: str | None) -> str:
    return (
        f"order {order.id} (placer {order.placer_order_number or '-'}, filler "
        f"{order.filler_order_number or '-'}) from message {message_id or '-'}"
    )


def _link_waiting_ecgs(store: MessageStore, order: Any, order_message_id: str) -> int:
    """ECG messages that arrived before their order: an ``order_linked`` event on each."""
    detail = _order_text(order, order_message_id)
    marker = f"order {order.id} "
    count = 0
    for row in store.messages_for_order(order):
        if row.id == order_message_id or row.message_type in _NOT_ECG_TYPES or row.state == MessageState.REJECTED:
            continue
        if any(e.kind == "order_linked" and e.detail.startswith(marker) for e in store.events(row.id)):
            continue
        store.add_event(row.id, "order_linked", detail, level="info")
        count += 1
    return count


# ----- ADT: demographics -----------------------------------------------------------------------
def _accept_other(msg: _Inbound, ctx: InboundContext) -> str:
    msg.message_id = ctx.store.record_message(
        source=Source.HL7,
        remote=msg.remote,
        blob_sha256=msg.sha,
        blob_size=msg.size,
        state=MessageState.PROCESSED,
        flags=msg.flags,
        message_type=msg.message_type,
    )
    _note_charset(msg, ctx)
    log.info("HL7 %s %s from %s stored as message %s", msg.message_type, msg.control_id, msg.peer, msg.message_id)
    return "AA"
