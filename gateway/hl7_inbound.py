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

Nothing here logs message content: logs carry MSH-10 control ids, peers and
internal message ids only.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Sequence

from hl7apy.exceptions import HL7apyException

from ecgbridge.errors import (
    DecodeError,
    EcgBridgeError,
    Hl7Error,
    InputError,
    StorageError,
    UnsupportedInputError,
    WaveformError,
)
from ecgbridge.core.settings import Settings
from ecgbridge.mapping.hl7_common import (
    CHARSETS,
    ErrorLocation,
    decode_bytes,
    error_location,
    escape,
    field_text,
    python_codec,
    read_er7,
)

from ecgbridge.core.queue import Dispatcher
from ecgbridge.core.routing import MessageFacts, match_route
from ecgbridge.core.store import MessageRow, MessageStore

__all__ = [
    "InboundContext",
    "handle_message",
    "handle_oversize",
    "Hl7Error",
    "Encoding",
    "Header",
    "read_header",
    "validate_header",
    "classify",
    "decode_message",
    "build_ack",
    "ERROR_CODES",
    "SUPPORTED_MESSAGES",
    "ORDER_MESSAGE_TYPES",
]

log = logging.getLogger("ecgbridge.hl7")

#: HL7 table 0357 (message error condition codes) used in ERR-3 / ELD-4.
ERROR_CODES: dict[int, str] = {
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    207: "Application internal error",
}

#: MSH-9 type -> the events we take.
SUPPORTED_MESSAGES: dict[str, frozenset[str]] = {
    "ORU": frozenset({"R01"}),
    "ORM": frozenset({"O01"}),
    "OML": frozenset({"O21"}),
    "ADT": frozenset({"A01", "A04", "A08"}),
}
ORDER_MESSAGE_TYPES = frozenset({"ORM^O01", "OML^O21"})
_ORU_SEGMENTS = frozenset({"MSH", "ORC", "OBR", "OBX"})
_NOT_ECG_TYPES = ORDER_MESSAGE_TYPES | {"ADT^A01", "ADT^A04", "ADT^A08"}
_DEFAULT_VERSION = "2.5.1"
_USER_MESSAGE_MAX = 200

Location = tuple[Any, ...]  # (segment id, sequence, field, field repetition, component)


# ----- encoding characters and MSH ------------------------------------------------------
@dataclass(frozen=True)
class Encoding:
    """The delimiters of one message (MSH-1 and MSH-2)."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str | None = None

    @property
    def msh2(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent + (self.truncation or "")

    def as_hl7apy(self) -> dict[str, str]:
        return {"FIELD": self.field, "COMPONENT": self.component, "REPETITION": self.repetition,
                "ESCAPE": self.escape, "SUBCOMPONENT": self.subcomponent, "GROUP": "\r", "SEGMENT": "\r"}

    def escape_text(self, text: str) -> str:
        """Plain text -> an ER7 value in these delimiters (``mapping.hl7_common.escape``)."""
        chars = {"FIELD": self.field, "COMPONENT": self.component, "REPETITION": self.repetition,
                 "ESCAPE": self.escape, "SUBCOMPONENT": self.subcomponent}
        if self.truncation:
            chars["TRUNCATION"] = self.truncation
        return escape(text, chars)


DEFAULT_ENCODING = Encoding()


def _encoding_from(field_sep: str, msh2: str, version: tuple[int, ...]) -> Encoding | None:
    """The encoding characters of MSH-2, or None when they are unusable."""
    allowed_len = (4, 5) if version >= (2, 7) else (4,)
    chars = field_sep + msh2
    if len(msh2) not in allowed_len or len(set(chars)) != len(chars):
        return None
    if any(c.isalnum() or c.isspace() or ord(c) < 32 for c in chars):
        return None
    return Encoding(field_sep, msh2[0], msh2[1], msh2[2], msh2[3], msh2[4] if len(msh2) == 5 else None)


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = re.findall(r"\d+", text.split("^", 1)[0])
    return tuple(int(p) for p in parts[:3]) if parts else ()


@dataclass(frozen=True)
class Header:
    """MSH read without hl7apy, so that even a message hl7apy refuses can be answered.

    ``parts[n - 1]`` is MSH-n for n >= 2 (``parts[0]`` is "MSH"); values are raw ER7.
    """

    parts: tuple[str, ...]
    encoding: Encoding
    #: False when MSH-2 was unusable: ``encoding`` is then the default one.
    trusted: bool = True

    def raw(self, n: int) -> str:
        if n == 1:
            return self.encoding.field
        return self.parts[n - 1] if n - 1 < len(self.parts) else ""

    def component(self, n: int, c: int = 1) -> str:
        value = self.raw(n).split(self.encoding.repetition, 1)[0]
        comps = value.split(self.encoding.component)
        return comps[c - 1].strip() if c - 1 < len(comps) else ""

    @property
    def control_id(self) -> str:
        return self.raw(10).strip()

    @property
    def version(self) -> str:
        return self.component(12)

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return _version_tuple(self.version)

    @property
    def message_type(self) -> str:
        """TYPE^EVENT, e.g. ORU^R01 (empty parts left empty)."""
        return f"{self.component(9, 1).upper()}^{self.component(9, 2).upper()}"

    @property
    def charset(self) -> str:
        return self.raw(18).split(self.encoding.repetition, 1)[0].strip().upper()

    @property
    def enhanced(self) -> bool:
        return bool(self.component(15) or self.component(16))


def read_header(text: str) -> Header:
    """Locate MSH and split it on its own separators; :class:`Hl7Error` 100 / 102 without a usable one."""
    if not text.startswith("MSH") or len(text) < 8:
        raise Hl7Error("the message does not start with an MSH segment", code=100, location=("MSH", 1))
    sep = text[3]
    if sep.isalnum() or sep.isspace() or ord(sep) < 32:
        raise Hl7Error("MSH-1 field separator is missing or invalid", code=102, location=("MSH", 1, 1))
    segment = re.split(r"[\r\n]", text, maxsplit=1)[0]
    parts = tuple(segment.split(sep))
    version = _version_tuple(parts[11]) if len(parts) > 11 else ()
    encoding = _encoding_from(sep, parts[1] if len(parts) > 1 else "", version or (2, 5))
    if encoding is None:
        return Header(parts, Encoding(field=sep) if sep not in "^~\\&" else DEFAULT_ENCODING, trusted=False)
    return Header(parts, encoding)


def _first_segment(raw: bytes) -> str:
    """The first segment of raw bytes, decoded byte for byte (MSH is ASCII in every set we read)."""
    return re.split(rb"[\r\n]", _strip_lead(raw), maxsplit=1)[0].decode("latin-1")


def _sniff_header(raw: bytes) -> Header | None:
    """MSH from raw bytes: enough to answer whatever the rest holds; None without one."""
    try:
        return read_header(_first_segment(raw))
    except Hl7Error:
        return None


def _ack_codec(header: Header | None) -> str:
    """The codec the ACK is written in: the sender's MSH-18 (UTF-8 when absent or unknown)."""
    if header is not None and header.charset in CHARSETS:
        return python_codec(header.charset)
    return "utf-8"


def _strip_lead(data: bytes) -> bytes:
    return data.lstrip(b"\xef\xbb\xbf\x00 \t\r\n")


def validate_header(header: Header) -> None:
    """The MSH checks every message must pass before its type is looked at."""
    if not header.trusted:
        raise Hl7Error("MSH-2 encoding characters are missing, duplicated or invalid", code=102,
                       location=("MSH", 1, 2))
    if not header.component(9, 1):
        raise Hl7Error("MSH-9 message type is missing", code=101, location=("MSH", 1, 9))
    if not header.control_id:
        raise Hl7Error("MSH-10 message control id is missing", code=101, location=("MSH", 1, 10))
    if not header.version:
        raise Hl7Error("MSH-12 version id is missing", code=101, location=("MSH", 1, 12))
    from hl7apy import SUPPORTED_LIBRARIES

    if header.version not in SUPPORTED_LIBRARIES:
        raise Hl7Error(f"HL7 version {header.version[:16]!r} is not supported (2.1 to 2.8.2 are)",
                       code=203, location=("MSH", 1, 12))
    if header.charset and header.charset not in CHARSETS:
        raise Hl7Error(f"MSH-18 character set {header.charset[:20]!r} is not supported (UNICODE UTF-8, "
                       "ASCII, 8859/1 ... 8859/15 are)", code=103, location=("MSH", 1, 18))


def classify(header: Header) -> str:
    """The kind of message (ORU, ORM, OML, ADT); raises 200 / 201 for what we do not take."""
    kind, event = header.component(9, 1).upper(), header.component(9, 2).upper()
    if kind not in SUPPORTED_MESSAGES:
        raise Hl7Error(f"unsupported message type {kind[:8]!r}: this receiver takes ORU^R01, ORM^O01, "
                       "OML^O21 and ADT^A01/A04/A08", code=200, location=("MSH", 1, 9, 1, 1),
                       kind="unsupported_message_type")
    if event not in SUPPORTED_MESSAGES[kind]:
        raise Hl7Error(f"unsupported event {event[:8]!r} for {kind}: this receiver takes "
                       f"{', '.join(kind + '^' + e for e in sorted(SUPPORTED_MESSAGES[kind]))}",
                       code=201, location=("MSH", 1, 9, 1, 2), kind="unsupported_message_type")
    return kind


# ----- character sets ---------------------------------------------------------------------
def decode_message(raw: bytes, header: Header | None) -> tuple[str, str, list[str]]:
    """Bytes -> (text with \\r segment terminators, Python codec, flags), honouring MSH-18.

    Decoding is ``mapping.hl7_common.decode_bytes`` (the worker reads the stored bytes
    the same way); we add the flag for a guessed charset and the ERR location.
    """
    try:
        text, charset = decode_bytes(raw)
    except DecodeError as exc:
        where = error_location(exc)
        raise Hl7Error(str(exc), code=102, location=_erl(where) if where else ("MSH", 1, 18),
                       kind="DecodeError") from exc
    declared = header.charset if header is not None else ""
    flags = ["charset_assumed:8859/1"] if not declared and charset == "8859/1" else []
    return text.replace("\r\n", "\r").replace("\n", "\r"), python_codec(charset), flags


# ----- the ACK ----------------------------------------------------------------------------
def _timestamp(now: datetime | None = None) -> str:
    """HL7 TS with milliseconds and the UTC offset: YYYYMMDDHHMMSS.sss+ZZZZ."""
    now = (now or datetime.now()).astimezone()
    return now.strftime("%Y%m%d%H%M%S") + f".{now.microsecond // 1000:03d}" + now.strftime("%z")


def new_control_id() -> str:
    """A fresh MSH-10 (20 characters: the ST length limit up to v2.6)."""
    return uuid.uuid4().hex[:20].upper()


_ENHANCED = {"AA": "CA", "AE": "CE", "AR": "CR"}


def _should_send(condition: str, code: str) -> bool:
    """MSH-15 rules for the accept acknowledgment (table 0155)."""
    if condition == "NE":
        return False
    if condition == "ER":
        return code != "CA"
    if condition == "SU":
        return code == "CA"
    return True  # AL, empty or unknown: always


def build_ack(header: Header | None, code: str, error: Hl7Error | None = None, *,
              now: datetime | None = None, control_id: str | None = None) -> str | None:
    """The ACK for ``header`` (None: no usable MSH), ER7 with \\r terminators.

    ``code`` is the original-mode code (AA / AE / AR); in enhanced mode it becomes
    CA / CE / CR and None is returned when MSH-15 says not to acknowledge.
    Values copied from the inbound MSH stay raw ER7 (same delimiters); our own text
    is escaped. The layout follows the sender's version (MSH-9 with or without the
    structure, ERR-2..8 from v2.5, ERR-1 ELD plus MSA-3 before).
    """
    enc = header.encoding if header is not None else DEFAULT_ENCODING
    trusted = header is not None and header.trusted
    version = (header.version_tuple if header is not None else ()) or _version_tuple(_DEFAULT_VERSION)
    enhanced = header is not None and trusted and header.enhanced
    if enhanced:
        code = _ENHANCED.get(code, code)
        if not _should_send(header.component(15).upper(), code):  # type: ignore[union-attr]
            return None

    def copied(n: int) -> str:
        if header is None:
            return ""
        value = header.raw(n)
        return value if trusted else enc.escape_text(value)

    event = header.component(9, 2) if header is not None else ""
    msh9 = "ACK"
    if event:  # MSH-9.3, the message structure, exists from v2.3.1
        msh9 += enc.component + enc.escape_text(event) + (enc.component + "ACK" if version >= (2, 3, 1) else "")
    msh = [""] * 19
    msh[3] = copied(5) or "ECGBRIDGE"
    msh[4] = copied(6)
    msh[5] = copied(3)
    msh[6] = copied(4)
    msh[7] = _timestamp(now)
    msh[9] = msh9
    msh[10] = enc.escape_text(control_id or new_control_id())
    msh[11] = copied(11) or "P"
    msh[12] = copied(12) if header is not None and header.version else _DEFAULT_VERSION
    if enhanced:
        msh[15] = msh[16] = "NE"
    msh[18] = copied(18)
    segments = [_segment("MSH" + enc.field + enc.msh2, msh[3:], enc)]

    msa = [code, copied(10)]
    if error is not None and version < (2, 5):
        msa.append(enc.escape_text(_user_message(error)))
    segments.append(_segment("MSA", msa, enc))
    if error is not None:
        segments.append(_err_segment(error, enc, version))
    return "".join(s + "\r" for s in segments)


def _segment(name: str, fields: Sequence[str], enc: Encoding) -> str:
    values = list(fields)
    while values and not values[-1]:
        values.pop()
    return enc.field.join([name, *values])


def _user_message(error: Hl7Error) -> str:
    return " ".join(str(error).split())[:_USER_MESSAGE_MAX]


def _err_segment(error: Hl7Error, enc: Encoding, version: tuple[int, ...]) -> str:
    text = ERROR_CODES.get(error.code, "Application internal error")
    loc = [str(p) if p not in (None, "") else "" for p in error.location]
    if version >= (2, 5):
        erl = enc.component.join(loc)
        cwe = enc.component.join([str(error.code), enc.escape_text(text), "HL70357"])
        return _segment("ERR", ["", erl, cwe, "E", "", "", "", enc.escape_text(_user_message(error))], enc)
    # v2.1-2.4: ERR-1 ELD = segment ^ sequence ^ field ^ code (CE in subcomponents)
    eld = (loc + ["", "", ""])[:3]
    ce = enc.subcomponent.join([str(error.code), enc.escape_text(text), "HL70357"])
    return _segment("ERR", [enc.component.join(eld + [ce])], enc)


def _encode(ack: str | None, codec: str) -> bytes:
    return ack.encode(codec, errors="replace") if ack else b""


# ----- parsing with hl7apy ------------------------------------------------------------------
def parse_segments(text: str, only: frozenset[str] | None = None) -> list[Any]:
    """hl7apy segments in wire order (``mapping.hl7_common.read_er7``, OBX-5 of NA / MA / ED
    set aside: hl7apy needs seconds for tens of thousands of samples).

    ``only``: parse just these segments, OBX cut after OBX-4; for an ORU, whose full
    reading (and validation) is ``mapping.hl7_waveform``'s, this halves the time.
    """
    try:
        return list(read_er7(_only(text, only) if only else text, find_groups=False).message.children)
    except DecodeError as exc:
        raise _decode_failure(exc) from exc
    except HL7apyException as exc:
        raise Hl7Error(f"the message cannot be parsed ({type(exc).__name__})", code=102,
                       kind="DecodeError") from exc


def _only(text: str, names: frozenset[str]) -> str:
    sep = text[3:4] or "|"
    kept = []
    for segment in text.split("\r"):
        name = segment[:3]
        if name in names:
            kept.append(sep.join(segment.split(sep, 5)[:5]) if name == "OBX" else segment)
    return "\r".join(kept)


def _decode_failure(exc: DecodeError) -> Hl7Error:
    """A reader's DecodeError as an AR: 100 when a segment is at fault, 102 for a field."""
    where = error_location(exc)
    code = 100 if where is not None and where.field is None else 102
    return Hl7Error(str(exc), code=code, location=_erl(where) if where is not None else (), kind="DecodeError")


def _erl(where: ErrorLocation) -> Location:
    parts: list[Any] = [where.segment, where.sequence]
    for value in (where.field, where.repetition, where.component):
        if value is None:
            break
        parts.append(value)
    return tuple(parts)


def _named(segments: list[Any], name: str) -> list[Any]:
    return [s for s in segments if s.name == name]


def _raw(segment: Any, n: int) -> str:
    """Field ``n`` (first repetition) as ER7 with the default delimiters ("1234^Smith^John")."""
    if segment is None:
        return ""
    reps = [f for f in segment.children if f.name == f"{segment.name}_{n}"]
    if not reps:
        return ""
    return str(reps[0].to_er7(encoding_chars=DEFAULT_ENCODING.as_hl7apy())).strip()


def _first(segment: Any, n: int) -> str:
    """The first component of field ``n`` as plain text (e.g. EI.1 of OBR-2)."""
    return (field_text(segment, n, 1) or "") if segment is not None else ""


# ----- handling -------------------------------------------------------------------------------
@dataclass
class InboundContext:
    """What the handler needs, passed in (not global), as the DICOM handler gets its own."""

    settings: Settings
    store: MessageStore
    dispatcher: Dispatcher


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
    except Exception as exc:  # noqa: BLE001 - the boundary: answer, never crash
        log.exception("HL7 %s from %s: unexpected failure storing the message", msg.control_id, peer)
        err = Hl7Error(f"internal error ({type(exc).__name__})", code=207, ack="AE")
        return _encode(build_ack(msg.header, "AE", err), msg.codec)
    try:
        code = _process(msg, ctx)
        return _encode(build_ack(msg.header, code), msg.codec)
    except Exception as exc:  # noqa: BLE001 - the boundary: answer, never crash
        err = _as_hl7_error(exc)
        _record_failure(msg, ctx, err, exc)
        return _encode(build_ack(msg.header, err.hl7_ack_code, err), msg.codec)


def handle_oversize(head: bytes, size: int, limit: int, peer: str, ctx: InboundContext) -> bytes:
    """A frame over ``max_message_bytes``: keep its head and an error record, answer AR."""
    msg = _Inbound(raw=head, peer=peer, header=_sniff_header(head))
    msg.codec = _ack_codec(msg.header)
    err = Hl7Error(f"message too large: {size} bytes, this receiver takes at most {limit} bytes",
                   code=207, location=("MSH", 1), kind="message_too_large")
    try:
        msg.sha, msg.size = ctx.store.save_blob(head)
        msg.flags.append("truncated:first_bytes_only")
        _record_failure(msg, ctx, err, err)
    except Exception:  # noqa: BLE001 - the answer matters more than the record
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
        ctx.store.add_event(duplicate.id, "duplicate_received", f"the same message (MSH-10 {msg.control_id}) "
                            f"was received again from {msg.peer}; acknowledged, not recorded again", level="info")
        log.info("HL7 %s %s from %s: already accepted as message %s", msg.message_type, msg.control_id,
                 msg.peer, duplicate.id)
        return "AA"
    segments = parse_segments(msg.text, _ORU_SEGMENTS if kind == "ORU" else None)
    if kind == "ORU":
        return _accept_oru(msg, segments, ctx)
    if kind in ("ORM", "OML"):
        return _accept_order(msg, segments, ctx)
    return _accept_other(msg, ctx)


def _accepted_before(store: MessageStore, sha: str) -> MessageRow | None:
    """A message with these exact bytes that was already taken (a resend without our ACK)."""
    for row in store.find_by_blob(sha, "hl7"):
        if row.state == "rejected" or (row.state == "received" and row.route is None):
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
            msg.message_id = store.record_message(
                source="hl7", remote=msg.remote, blob_sha256=msg.sha, blob_size=msg.size, state="rejected",
                error=detail, flags=msg.flags, message_type=msg.message_type,
                placer_order_number=msg.placer, filler_order_number=msg.filler)
        elif isinstance(exc, InputError):
            store.set_state(msg.message_id, "rejected", error=detail)
        store.add_event(msg.message_id, err.kind, detail)
    except Exception:  # noqa: BLE001 - the ACK still goes out
        log.exception("could not record the failure of HL7 message %s", msg.control_id)
    if isinstance(exc, InputError):
        log.warning("HL7 %s %s from %s rejected (%s %s): message %s", msg.message_type or "-", msg.control_id,
                    msg.peer, err.hl7_ack_code, err.code, msg.message_id)
    else:
        # The type only: an unexpected exception's text may quote message content.
        log.error("HL7 %s %s from %s failed: %s (message %s)", msg.message_type or "-", msg.control_id, msg.peer,
                  type(exc).__name__, msg.message_id)
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
        where = error_location(exc)
        raise Hl7Error(str(exc), code=207, location=_erl(where) if where else ("OBX",), ack="AR",
                       kind="UnsupportedInputError") from exc

    header = msg.header
    assert header is not None
    codes = tuple(c for c in (_first(obx, 3) for obx in obxs) if c)
    facts = MessageFacts(source="hl7", sending_application=header.component(3) or None,
                         sending_facility=header.component(4) or None, message_type="ORU^R01", obx_codes=codes)
    route = match_route(ctx.settings.routes, facts)
    store = ctx.store
    msg.message_id = mid = store.record_message(
        source="hl7", remote=msg.remote, blob_sha256=msg.sha, blob_size=msg.size,
        state="received" if route else "unrouted", route=route.name if route else None,
        flags=sorted(set(ecg.flags) | set(msg.flags)), sop_instance_uid=ecg.study.sop_instance_uid,
        placer_order_number=msg.placer, filler_order_number=msg.filler, message_type="ORU^R01")
    _note_charset(msg, ctx)
    order = store.find_order(msg.placer, msg.filler) if (msg.placer or msg.filler) else None
    if order is not None:
        store.add_event(mid, "order_linked", _order_text(order, order.message_id), level="info")
    if route is None:
        store.add_event(mid, "unrouted", f"no route matches source hl7, sending application "
                        f"{facts.sending_application}, facility {facts.sending_facility}, ORU^R01, "
                        f"OBX codes {', '.join(codes[:12]) or '-'}", level="warning")
        log.info("HL7 ORU^R01 %s from %s stored as message %s: unrouted", msg.control_id, msg.peer, mid)
        return "AA"
    try:
        ctx.dispatcher.analyse(mid)
        store.set_state(mid, "queued")
    except StorageError as exc:
        # Safe on disk: the gateway's recovery sweep enqueues it when the broker is back.
        store.add_event(mid, "enqueue_failed", str(exc), level="warning")
    log.info("HL7 ORU^R01 %s from %s stored as message %s (route %s)", msg.control_id, msg.peer, mid, route.name)
    return "AA"


def _note_charset(msg: _Inbound, ctx: InboundContext) -> None:
    if "charset_assumed:8859/1" in msg.flags and msg.message_id:
        ctx.store.add_event(msg.message_id, "charset_assumed", "no MSH-18 and not valid UTF-8: "
                            "read as ISO 8859-1", level="warning")


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


def _order_details(header: Header, orc: Any, obr: Any, pid: Any, pv1: Any,
                   placer: str | None, filler: str | None) -> dict[str, Any]:
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
        raise Hl7Error(f"{msg.message_type} without an ORC segment", code=100, location=("ORC", 1),
                       kind="hl7_parse_error")
    numbered = []
    for i, (orc, obr) in enumerate(groups, 1):
        placer = _first(orc, 2) or _first(obr, 2) or None
        filler = _first(orc, 3) or _first(obr, 3) or None
        if not placer and not filler:
            raise Hl7Error("order without a placer or filler order number (ORC-2 / ORC-3 / OBR-2 / OBR-3)",
                           code=101, location=("ORC", i, 2))
        numbered.append((orc, obr, placer, filler))
    pid, pv1 = (_named(segments, "PID") or [None])[0], (_named(segments, "PV1") or [None])[0]
    msg.placer, msg.filler = numbered[0][2], numbered[0][3]
    store = ctx.store
    msg.message_id = mid = store.record_message(
        source="hl7", remote=msg.remote, blob_sha256=msg.sha, blob_size=msg.size, state="received",
        flags=msg.flags, message_type=msg.message_type, placer_order_number=msg.placer,
        filler_order_number=msg.filler)
    _note_charset(msg, ctx)
    linked = 0
    for orc, obr, placer, filler in numbered:
        order = store.upsert_order(
            placer_order_number=placer, filler_order_number=filler,
            order_control=_none(_raw(orc, 1)), status=_none(_raw(orc, 5)), message_id=mid,
            details=_order_details(header, orc, obr, pid, pv1, placer, filler))
        linked += _link_waiting_ecgs(store, order, mid)
    store.set_state(mid, "processed")
    log.info("HL7 %s %s from %s stored as message %s: %d order(s), %d earlier ECG(s) linked",
             msg.message_type, msg.control_id, msg.peer, mid, len(numbered), linked)
    return "AA"


def _order_text(order: Any, message_id: str | None) -> str:
    return (f"order {order.id} (placer {order.placer_order_number or '-'}, filler "
            f"{order.filler_order_number or '-'}) from message {message_id or '-'}")


def _link_waiting_ecgs(store: MessageStore, order: Any, order_message_id: str) -> int:
    """ECG messages that arrived before their order: an ``order_linked`` event on each."""
    detail = _order_text(order, order_message_id)
    marker = f"order {order.id} "
    count = 0
    for row in store.messages_for_order(order):
        if row.id == order_message_id or row.message_type in _NOT_ECG_TYPES or row.state == "rejected":
            continue
        if any(e.kind == "order_linked" and e.detail.startswith(marker) for e in store.events(row.id)):
            continue
        store.add_event(row.id, "order_linked", detail, level="info")
        count += 1
    return count


# ----- ADT: demographics -----------------------------------------------------------------------
def _accept_other(msg: _Inbound, ctx: InboundContext) -> str:
    msg.message_id = ctx.store.record_message(
        source="hl7", remote=msg.remote, blob_sha256=msg.sha, blob_size=msg.size, state="processed",
        flags=msg.flags, message_type=msg.message_type)
    _note_charset(msg, ctx)
    log.info("HL7 %s %s from %s stored as message %s", msg.message_type, msg.control_id, msg.peer, msg.message_id)
    return "AA"
