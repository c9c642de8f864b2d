"""Why a message went (or would go) where it did: routing facts from a stored message or a file.

"Why is this ECG unrouted?" is answered only by the facts the listener routed on, read the
way it read them (the store's row; for HL7 the stored bytes re-read with the same MSH and
OBX readers), and each route's verdict on them. No patient data enters the facts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ecgbridge.core.routing import MessageFacts, RoutingExplanation, explain_routing, sop_class_name
from ecgbridge.core.settings import Route
from ecgbridge.core.states import MessageState, Source
from ecgbridge.core.store import MessageRow, MessageStore
from ecgbridge.errors import DecodeError, Hl7Error, InputError, UnsupportedInputError

__all__ = [
    "Subject",
    "Explanation",
    "facts_from_message",
    "facts_from_bytes",
    "explain",
    "explain_message",
    "explain_bytes",
]

#: The segments whose fields routing reads (OBX is cut after OBX-4 by the parser).
_ROUTING_SEGMENTS = frozenset({"MSH", "ORC", "OBR", "OBX"})
#: HL7 message types the listener routes; the others (orders, ADT) are recorded, never routed.
_ROUTED_HL7 = "ORU^R01"


@dataclass(frozen=True)
class Subject:
    """What is being explained: the facts routing sees, a description and notes (no patient data)."""

    facts: MessageFacts
    description: str
    notes: tuple[str, ...] = ()
    #: For a stored message: its id, state and the route it was given when it arrived.
    message_id: str | None = None
    state: str | None = None
    recorded_route: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "message_id": self.message_id,
            "state": self.state,
            "recorded_route": self.recorded_route,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class Explanation:
    """A subject and the routing decision the current routes make for it."""

    subject: Subject
    routing: RoutingExplanation
    notes: tuple[str, ...] = field(default=())

    @property
    def matched(self) -> Route | None:
        return self.routing.matched

    def lines(self) -> list[str]:
        facts = self.routing.facts
        out = [self.subject.description, f"routing looks at: {_facts_text(facts)}"]
        out += self.routing.lines()
        out += [f"note: {n}" for n in (*self.subject.notes, *self.notes)]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.subject.to_dict(),
            **self.routing.to_dict(),
            "notes": [*self.subject.notes, *self.notes],
        }


def _facts_text(facts: MessageFacts) -> str:
    parts = [f"source {facts.source}"]
    if facts.source == Source.DICOM:
        parts += [
            f"calling AE {facts.calling_ae_title or '(none)'}",
            f"SOP class {sop_class_name(facts.sop_class_uid)}",
        ]
    if facts.source == Source.HL7:
        codes = list(dict.fromkeys(facts.obx_codes))
        parts += [
            f"sending application (MSH-3) {facts.sending_application or '(none)'}",
            f"sending facility (MSH-4) {facts.sending_facility or '(none)'}",
            f"message type {facts.message_type or '(none)'}",
            "OBX codes " + (", ".join(codes[:12]) + (", ..." if len(codes) > 12 else "") if codes else "(none)"),
        ]
    return "; ".join(parts)


# ----- HL7: what the listener reads ----------------------------------------------------------
def _hl7_facts(raw: bytes) -> tuple[MessageFacts, str, list[str]]:
    """Facts of an HL7 v2 message read as ``gateway.hl7_inbound`` reads them; (facts, MSH-9, notes)."""
    from ecgbridge.mapping.hl7_common import first_segment, read_header, strip_mllp
    from ecgbridge.mapping.hl7_wire import classify, decode_message, first_component, parse_segments, validate_header

    data = strip_mllp(raw)
    try:
        sniffed = read_header(first_segment(data))
        validate_header(sniffed)
        text, _codec, _flags = decode_message(data, sniffed)
        header = read_header(text)
    except Hl7Error as exc:
        raise Hl7Error(f"not a readable HL7 v2 message: {exc}", code=exc.code, location=exc.location) from exc
    message_type = header.message_type
    codes: tuple[str, ...] = ()
    notes: list[str] = []
    if message_type == _ROUTED_HL7:
        segments = parse_segments(text, _ROUTING_SEGMENTS)
        codes = tuple(c for c in (first_component(s, 3) for s in segments if s.name == "OBX") if c)
    else:
        try:
            classify(header)
            notes.append(
                f"HL7 {message_type} is not an ECG result: the MLLP listener records it (orders are linked to "
                f"their ECGs) and never routes it; routes apply to {_ROUTED_HL7} messages"
            )
        except Hl7Error as exc:
            notes.append(f"the MLLP listener refuses this message (AR): {exc}; it never reaches routing")
    facts = MessageFacts(
        source=Source.HL7,
        sending_application=header.component(3) or None,
        sending_facility=header.component(4) or None,
        message_type=message_type,
        obx_codes=codes,
    )
    return facts, message_type, notes


# ----- a stored message ----------------------------------------------------------------------
def _calling_ae(remote: str | None) -> str | None:
    """The calling AE title of a DICOM message's ``remote`` ("AE@address")."""
    if not remote:
        return None
    ae, at, _address = remote.rpartition("@")
    return (ae if at else remote).strip() or None


def facts_from_message(store: MessageStore, message_id: str) -> Subject:
    """The routing facts of a stored message (id or unique id prefix), read as its listener read them."""
    row = store.get(message_id) or store.find_by_prefix(message_id)
    if row is None:
        raise InputError(f"no message with id {message_id!r} (or it is the prefix of several)")
    notes: list[str] = []
    if row.source == Source.DICOM:
        facts = MessageFacts(Source.DICOM, _calling_ae(row.remote), row.sop_class_uid)
    elif row.source == Source.HL7:
        try:
            raw = store.read_blob(row.blob_sha256)
        except OSError as exc:
            raise InputError(
                f"the stored bytes of message {row.id} are missing from the blob store ({exc.strerror or exc})"
            ) from exc
        facts, message_type, hl7_notes = _hl7_facts(raw)
        if row.message_type and row.message_type != message_type:
            facts = replace(facts, message_type=row.message_type)
        notes += hl7_notes
    else:
        facts = MessageFacts(row.source)
        notes.append("files (inbox or import) are routed by their source only")
    notes += _recorded_notes(row)
    return Subject(
        facts=facts,
        description=_row_description(row),
        notes=tuple(notes),
        message_id=row.id,
        state=row.state,
        recorded_route=row.route,
    )


def _row_description(row: MessageRow) -> str:
    via = {"dicom": "DICOM C-STORE", "hl7": "HL7 over MLLP", "file": "a file"}.get(row.source, row.source)
    kind = f" {row.message_type}" if row.message_type else ""
    remote = f" from {row.remote}" if row.remote else ""
    return f"message {row.id}: {row.state}, received {row.received_at:%Y-%m-%d %H:%M:%S} via {via}{kind}{remote}"


def _recorded_notes(row: MessageRow) -> list[str]:
    if row.state == MessageState.REJECTED:
        return [
            f"this message was rejected when it arrived ({row.error or 'see its error records'}): it never "
            "reached routing; shown is what the current routes would do with it"
        ]
    if row.state == MessageState.PROCESSED:
        return []
    when = f"route {row.route!r}" if row.route else "no route (unrouted)"
    return [f"when it arrived it was given {when}; the decision above is that of the routes in force now"]


# ----- uploaded bytes ------------------------------------------------------------------------
def facts_from_bytes(
    data: bytes, *, name: str | None = None, calling_ae_title: str | None = None, source: str | None = None
) -> Subject:
    """The routing facts of a file as a listener would read it.

    DICOM: as a C-STORE (``source`` dicom, the default; the calling AE title is the caller's
    to give) or as an inbox file (``source`` file). HL7 v2 (framed or not): as the MLLP
    listener reads it. ECG XML: as an inbox file. Raises :class:`InputError` (a subclass)
    saying what is wrong when the bytes are none of these or cannot be read.
    """
    from ecgbridge.mapping.readers import looks_like_dicom, looks_like_hl7, looks_like_xml

    label = f"file {name}" if name else "the file"
    if source is not None and source not in tuple(Source):
        raise InputError(f"source {source!r} is not one of {', '.join(s.value for s in Source)}")
    if not data:
        raise DecodeError(f"{label} is empty (0 bytes)")
    if looks_like_hl7(data):
        if source not in (None, Source.HL7):
            raise InputError(f"{label} is an HL7 v2 message: it arrives over MLLP (source hl7), not as {source}")
        facts, message_type, notes = _hl7_facts(data)
        if message_type == _ROUTED_HL7:
            notes += _waveform_notes(data, "hl7", "the MLLP listener would answer AE/AR")
        return Subject(facts, f"{label}: HL7 v2 {message_type} ({len(data)} bytes)", tuple(notes))
    if looks_like_dicom(data):
        return _dicom_subject(data, label, calling_ae_title, source)
    if looks_like_xml(data):
        if source not in (None, Source.FILE):
            raise InputError(f"{label} is XML: ECG XML arrives as a file (inbox), not as {source}")
        _check_xml(data, label)
        return Subject(
            MessageFacts(Source.FILE),
            f"{label}: ECG XML ({len(data)} bytes), as the inbox takes it",
            (
                "files (inbox or import) are routed by their source only",
                *_waveform_notes(data, "file", "the inbox would move it to failed/"),
            ),
        )
    raise UnsupportedInputError(
        f"{label} is not a format ecgbridge receives: expected DICOM (the 'DICM' marker at byte 128), "
        "HL7 v2 (starting with MSH) or ECG XML (HL7 aECG, Philips Sierra, GE MUSE)"
    )


def _dicom_subject(data: bytes, label: str, calling_ae_title: str | None, source: str | None) -> Subject:
    from ecgbridge.mapping.codes import ECG_STORAGE_SOP_CLASSES
    from ecgbridge.mapping.dicom_waveform import read_bytes

    if source not in (None, Source.DICOM, Source.FILE):
        raise InputError(f"{label} is DICOM: it arrives by C-STORE (source dicom) or in the inbox (file), not {source}")
    try:
        ds = read_bytes(data)
    except DecodeError as exc:
        raise DecodeError(f"{label} is not a readable DICOM file: {exc}") from exc
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else "")) or None
    notes: list[str] = []
    if source == Source.FILE:
        facts = MessageFacts(Source.FILE)
        description = f"{label}: DICOM {sop_class_name(sop_class)} ({len(data)} bytes), as the inbox takes it"
        notes.append("files (inbox or import) are routed by their source only")
    else:
        calling = (calling_ae_title or "").strip() or None
        facts = MessageFacts(Source.DICOM, calling, sop_class)
        description = f"{label}: DICOM {sop_class_name(sop_class)} ({len(data)} bytes), as a C-STORE"
        description += f" from calling AE {calling}" if calling else ""
        if calling is None:
            notes.append("no calling AE title given (--calling-ae): routes that list calling AE titles cannot match")
    if sop_class not in ECG_STORAGE_SOP_CLASSES:
        notes.append(
            f"SOP class {sop_class or '(none)'} is not an ECG waveform: the DICOM listener refuses it at "
            "association and the inbox rejects it, so it never reaches routing"
        )
    else:
        how = "the inbox would move it to failed/" if source == Source.FILE else "the DICOM listener would refuse it"
        notes += _waveform_notes(data, "dicom", how)
    return Subject(facts, description, tuple(notes))


def _waveform_notes(data: bytes, hint: str, refusal: str) -> list[str]:
    """A note when the ECG in ``data`` is unusable: the listener rejects it before routing."""
    from ecgbridge.mapping.readers import read_ecg_bytes

    try:
        read_ecg_bytes(data, hint=hint)
    except InputError as exc:
        return [
            f"its ECG is not usable ({type(exc).__name__}: {exc}): {refusal} and keep it as rejected, "
            "so it would never reach routing"
        ]
    return []


def _check_xml(data: bytes, label: str) -> None:
    from xml.etree.ElementTree import ParseError

    import defusedxml.ElementTree as SafeET
    from defusedxml import DefusedXmlException

    from ecgbridge.mapping.vendor import detect_format

    try:
        root = SafeET.fromstring(data)
    except (ParseError, DefusedXmlException, ValueError, LookupError) as exc:
        raise DecodeError(f"{label} is not well-formed XML ({type(exc).__name__}: {exc})") from exc
    if detect_format(root) is None:
        raise UnsupportedInputError(
            f"{label} is XML but not an ECG format ecgbridge reads (HL7 aECG, Philips Sierra, GE MUSE)"
        )


# ----- the explanation -------------------------------------------------------------------------
def explain(routes: Sequence[Route], subject: Subject) -> Explanation:
    """The decision ``routes`` make for ``subject``, with a note when it differs from the recorded one."""
    routing = explain_routing(routes, subject.facts)
    notes: tuple[str, ...] = ()
    if subject.message_id is not None and subject.state not in (MessageState.REJECTED, MessageState.PROCESSED):
        now = routing.matched.name if routing.matched is not None else None
        if now != subject.recorded_route:
            notes = (
                f"the routes have changed since: it would now get {f'route {now!r}' if now else 'no route (unrouted)'}",
            )
    return Explanation(subject, routing, notes)


def explain_message(routes: Sequence[Route], store: MessageStore, message_id: str) -> Explanation:
    """:func:`explain` of a stored message."""
    return explain(routes, facts_from_message(store, message_id))


def explain_bytes(
    routes: Sequence[Route],
    data: bytes,
    *,
    name: str | None = None,
    calling_ae_title: str | None = None,
    source: str | None = None,
) -> Explanation:
    """:func:`explain` of uploaded bytes (see :func:`facts_from_bytes`)."""
    return explain(routes, facts_from_bytes(data, name=name, calling_ae_title=calling_ae_title, source=source))
